"""Mask statistics from real GeoTIFF windows: bincount counts, nodata, entropy, class JSON."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from patchbalance.balancing.stats import compute_mask_statistics, statistics_columns
from patchbalance.measures import class_entropy
from rasters import record, write_geotiff, write_pair


def _records(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def test_counts_nodata_ratio_entropy_and_class_json_match_a_hand_count(tmp_path):
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:8, :] = 1  # 256 px of class 1
    mask[8:9, :] = 255  # 32 px nodata
    mask[31, 31] = 3
    image_path, mask_path = write_pair(tmp_path, "a", mask)
    records = _records([record(image_path, mask_path, 0, 0, 32)])
    stats = compute_mask_statistics(records, np.array([0]), {str(mask_path): 255})
    assert stats.class_values.tolist() == [0, 1, 3]
    assert stats.counts.tolist() == [[1024 - 256 - 32 - 1, 256, 1]]
    assert stats.nodata_pixels.tolist() == [32]
    columns = statistics_columns(stats, np.array([True]))
    assert columns["nodata_ratio"].iloc[0] == 32 / 1024
    shares = np.array([735, 256, 1]) / 992
    assert json.loads(columns["class_dist_json"].iloc[0]) == {
        "0": round(shares[0], 6),
        "1": round(shares[1], 6),
        "3": round(shares[2], 6),
    }
    assert columns["class_entropy"].iloc[0] == np.float64(-(shares * np.log(shares)).sum())
    assert columns["dominant_class"].iloc[0] == 0
    assert list(columns.columns[:3]) == ["px_0", "px_1", "px_3"]


def test_windows_of_several_rasters_are_counted_independently(tmp_path):
    first = np.zeros((64, 64), dtype=np.uint8)
    first[:, 32:] = 2
    second = np.full((64, 64), 5, dtype=np.uint8)
    a = write_pair(tmp_path, "a", first)
    b = write_pair(tmp_path, "b", second)
    rows = [
        record(*a, 0, 0, 32),
        record(*a, 0, 32, 32),
        record(*b, 32, 32, 32),
        record(*a, 32, 16, 32),
    ]
    stats = compute_mask_statistics(
        _records(rows), np.arange(4), {str(a[1]): 255, str(b[1]): 255}, num_workers=2
    )
    assert stats.class_values.tolist() == [0, 2, 5]
    assert stats.counts.tolist() == [[1024, 0, 0], [0, 1024, 0], [0, 0, 1024], [512, 512, 0]]


def test_fixed_class_list_counts_other_values_as_nodata(tmp_path):
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[0, :] = 7  # not in the list
    mask[1, :] = 1
    image_path, mask_path = write_pair(tmp_path, "a", mask, mask_nodata=None)
    stats = compute_mask_statistics(
        _records([record(image_path, mask_path, 0, 0, 16)]),
        np.array([0]),
        {str(mask_path): None},
        classes=[0, 1, 2],
    )
    assert stats.class_values.tolist() == [0, 1, 2]
    assert stats.counts.tolist() == [[224, 16, 0]]
    assert stats.nodata_pixels.tolist() == [16]
    assert stats.outside_class_pixels == 16
    assert stats.border_nodata.tolist() == [True]


def test_signed_and_sixteen_bit_masks_are_counted(tmp_path):
    for dtype, values in ((np.uint16, (0, 1000)), (np.int16, (-3, 4))):
        mask = np.full((16, 16), values[0], dtype=dtype)
        mask[:4] = values[1]
        path = write_geotiff(tmp_path / f"{np.dtype(dtype).name}.tif", mask)
        stats = compute_mask_statistics(
            _records([record(path, path, 0, 0, 16)]), np.array([0]), {str(path): None}
        )
        assert stats.class_values.tolist() == list(values)
        assert stats.counts.tolist() == [[192, 64]]


def test_windows_with_many_values_spill_over_and_stay_exact(tmp_path):
    mask = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 40
    path = write_geotiff(tmp_path / "many.tif", mask)
    stats = compute_mask_statistics(
        _records([record(path, path, 0, 0, 32)]), np.array([0]), {str(path): None}
    )
    assert stats.class_values.tolist() == list(range(40))
    np.testing.assert_array_equal(stats.counts[0], np.bincount(mask.ravel()))


def test_entropy_is_nan_without_valid_pixels_and_zero_for_one_class():
    entropy = class_entropy(np.array([[0, 0], [5, 0], [5, 5]]))
    assert np.isnan(entropy[0])
    assert entropy[1] == 0.0
    assert entropy[2] == np.log(2)


def _per_window(counted) -> list[tuple]:
    """Return each window's (sorted value -> count pairs, ring flag, read flag)."""
    out, start = [], 0
    for i, length in enumerate(counted.lengths.tolist()):
        values = counted.values[start : start + length]
        counts = counted.counts[start : start + length]
        order = np.argsort(values)
        pairs = tuple(zip(values[order].tolist(), counts[order].tolist(), strict=True))
        out.append((pairs, bool(counted.border_nodata[i]), bool(counted.read[i])))
        start += length
    return out


def test_overlapping_windows_counted_from_one_box_match_window_by_window(tmp_path):
    from patchbalance.balancing.window_counts import CountTask, _count_each_window, _count_from_box
    from patchbalance.windows import open_raster

    rng = np.random.default_rng(3)
    mask = rng.integers(0, 5, size=(300, 280)).astype(np.uint8)
    mask[rng.random(mask.shape) < 0.01] = 255
    mask[:40, :60] = 2  # a region where some windows hold one value only
    mask[100:103, :] = 9  # a value outside `classes` below
    _, mask_path = write_pair(tmp_path, "a", mask)
    rows, cols = np.meshgrid(np.arange(0, 300 - 48, 7), np.arange(0, 280 - 48, 11), indexing="ij")
    sizes = np.where(rng.random(rows.size) < 0.2, 32, 48)  # two window sizes in one task
    for classes in (None, np.array([0, 1, 2, 3, 4])):
        task = CountTask(str(mask_path), None, rows.ravel(), cols.ravel(), sizes, 255.0, classes)
        with open_raster(str(mask_path)) as dataset:
            from_box = _count_from_box(task, dataset)
            one_by_one = _count_each_window(task, [dataset])
        assert from_box is not None
        assert _per_window(from_box) == _per_window(one_by_one)
        assert from_box.border_nodata.any() and not from_box.border_nodata.all()


def test_sparse_windows_are_read_one_by_one(tmp_path):
    from patchbalance.balancing.window_counts import CountTask, _count_from_box
    from patchbalance.windows import open_raster

    _, mask_path = write_pair(tmp_path, "a", np.zeros((512, 512), dtype=np.uint8))
    # Two windows in opposite corners: their box holds far more pixels than they do.
    task = CountTask(
        str(mask_path), None, np.array([0, 480]), np.array([0, 480]), np.array([32, 32]), None,
        None,
    )  # fmt: skip
    with open_raster(str(mask_path)) as dataset:
        assert _count_from_box(task, dataset) is None
