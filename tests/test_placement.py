"""`placement: class_centred` in the rasters source (SPEC §2.1)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import rasterio

from patchbalance.config import load_config
from patchbalance.sources.local import records_from_rasters
from rasters import write_geotiff

PATCH = 32


def scene(tmp_path, seed: int = 0, size: int = 256):
    """Write an image and a mask: class 1 ground, class 2 a band, class 7 a few small blobs."""
    rng = np.random.default_rng(seed)
    mask = np.ones((size, size), dtype=np.uint8)
    mask[100:160] = 2
    for row, col in rng.integers(5, size - 12, size=(9, 2)):
        mask[row : row + 7, col : col + 7] = 7
    mask[-4:] = 255
    image = np.stack([mask * 20] * 3).astype(np.uint8)
    write_geotiff(tmp_path / f"img{seed}.tif", image)
    write_geotiff(tmp_path / f"mask{seed}.tif", mask, nodata=255)
    return mask


def config_for(tmp_path, method: str | None = None, **placement):
    """Load a config over the two scenes; `method` is written as `sampling_method` when given."""
    config = {
        **({"sampling_method": method} if method else {}),
        "input": {
            "rasters": [
                {"image_path": f"img{i}.tif", "mask_path": f"mask{i}.tif"} for i in range(2)
            ],
            "patch_size": PATCH,
            **placement,
        },
        "output": {"csv_path": "out.csv"},
    }
    path = tmp_path / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    return load_config(path)


@pytest.fixture
def masks(tmp_path):
    return [scene(tmp_path, seed) for seed in range(2)]


def test_class_windows_lie_inside_and_hold_enough_of_their_class(tmp_path, masks):
    records = records_from_rasters(config_for(tmp_path, placement="class_centred"))

    added = records[records["placement"] != "grid"]
    assert len(added) > 0 and set(added["placement"]) == {"class:7"}  # 7 is rare, 1 and 2 not
    for row in added.itertuples():
        mask = masks[int(row.mask_path.endswith("mask1.tif"))]
        assert 0 <= row.row_off <= mask.shape[0] - PATCH
        assert 0 <= row.col_off <= mask.shape[1] - PATCH
        window = mask[row.row_off : row.row_off + PATCH, row.col_off : row.col_off + PATCH]
        assert np.count_nonzero(window == 7) >= 0.01 * PATCH * PATCH


def iou(a, b) -> float:
    inter = max(0, PATCH - abs(a[0] - b[0])) * max(0, PATCH - abs(a[1] - b[1]))
    return inter / (2 * PATCH * PATCH - inter)


@pytest.mark.parametrize("max_overlap", [0.0, 0.5])
def test_no_two_class_windows_overlap_more_than_max_overlap(tmp_path, masks, max_overlap):
    records = records_from_rasters(
        config_for(tmp_path, placement="class_centred", max_overlap=max_overlap, rare_classes=[2])
    )

    added = records[records["placement"] != "grid"]
    assert {"class:2", "class:7"} <= set(added["placement"])
    for _, group in added.groupby("image_path"):
        corners = list(zip(group["row_off"], group["col_off"], strict=True))
        for i, a in enumerate(corners):
            for b in corners[i + 1 :]:
                assert iou(a, b) <= max_overlap + 1e-12


def test_grid_windows_are_those_of_placement_grid_and_a_rerun_is_identical(tmp_path, masks):
    grid = records_from_rasters(config_for(tmp_path, placement="grid"))
    centred = records_from_rasters(config_for(tmp_path, placement="class_centred"))
    again = records_from_rasters(config_for(tmp_path, placement="class_centred"))

    assert "placement" not in grid.columns
    pd.testing.assert_frame_equal(
        centred[centred["placement"] == "grid"].drop(columns="placement"), grid
    )
    pd.testing.assert_frame_equal(centred, again)
    # No class window repeats a grid window (keys stay unique).
    assert not centred.duplicated(["image_path", "row_off", "col_off", "patch_size"]).any()


def test_the_default_method_comes_with_class_centred_windows_and_naming_either_keeps_the_grid(
    tmp_path, masks
):
    default = config_for(tmp_path)
    named_method = config_for(tmp_path, method="class_target")
    named_grid = config_for(tmp_path, placement="grid")
    written = config_for(tmp_path, method="rank_max", placement="class_centred")

    assert (default.placement, default.placement_is_default) == ("class_centred", True)
    assert (named_method.placement, named_method.placement_is_default) == ("grid", False)
    assert (named_grid.placement, named_grid.placement_is_default) == ("grid", False)
    assert (written.placement, written.placement_is_default) == ("class_centred", False)
    records = records_from_rasters(default)
    pd.testing.assert_frame_equal(records, records_from_rasters(written))
    # Class 7 (under rare_below's 5 % of the grid's pixels) gets windows; 1 and 2 do not.
    assert set(records["placement"]) == {"grid", "class:7"}
    assert "placement" not in records_from_rasters(named_method).columns


def test_a_default_build_says_its_class_windows_are_the_default(tmp_path, masks):
    from patchbalance.balancing.pipeline import run_build

    result = run_build(config_for(tmp_path), progress=False)

    assert result.summary["placement_is_default"] is True
    assert result.summary["sampling_method_is_default"] is True
    assert (result.table["placement"] == "class:7").sum() > 0
    line = next(x for x in result.summary_text.splitlines() if x.startswith("class-centred"))
    assert line.endswith("(input.placement: grid leaves them out)")
    from patchbalance.balancing.plan import plan_text

    plan = plan_text(config_for(tmp_path))
    assert "sampling_method: class_target (the default)" in plan
    assert "placement: class_centred (the default over rasters" in plan
    assert "placement:" not in plan_text(config_for(tmp_path, method="class_target"))
    named = run_build(config_for(tmp_path, method="class_target"), progress=False)
    assert named.summary["placement_is_default"] is False
    assert "placement" not in named.table.columns
    assert len(named.table) == (result.table["placement"] == "grid").sum()


def test_class_windows_per_raster_caps_the_windows_of_each_class(tmp_path, masks):
    records = records_from_rasters(
        config_for(tmp_path, placement="class_centred", class_windows_per_raster=2)
    )

    added = records[records["placement"] != "grid"]
    assert added.groupby(["image_path", "placement"]).size().max() == 2


def test_placement_needs_the_rasters_source(tmp_path):
    from patchbalance.errors import ConfigError

    (tmp_path / "records.csv").write_text("image_path,mask_path,row_off,col_off,patch_size\n")
    (tmp_path / "config.yaml").write_text(
        "input:\n  records_path: records.csv\n  placement: class_centred\n"
        "output:\n  csv_path: out.csv\n"
    )
    with pytest.raises(ConfigError, match="placement: class_centred needs the rasters source"):
        load_config(tmp_path / "config.yaml")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from Linux /proc")
def test_peak_memory_stays_bounded_on_a_raster_too_large_to_load_whole(tmp_path):
    # 60,000 x 60,000 pixels of uint8 would be 3.6 GB in memory. The file is sparse: only the
    # marked tiles are written, the rest reads as nodata.
    side, block = 60_416, 512
    mask_path, image_path = tmp_path / "big_mask.tif", tmp_path / "big_image.tif"
    profile = {
        "driver": "GTiff", "width": side, "height": side, "count": 1, "dtype": "uint8",
        "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate",
        "nodata": 255, "sparse_ok": True, "crs": "EPSG:32640",
        "transform": rasterio.transform.from_origin(300000, 2800000, 1, 1),
    }  # fmt: skip
    tile = np.ones((block, block), dtype=np.uint8)
    tile[100:130, 200:230] = 9
    with rasterio.open(mask_path, "w", **profile) as dataset:
        for n in range(0, side // block, 17):  # 7 tiles on the diagonal
            dataset.write(
                tile, 1, window=rasterio.windows.Window(n * block, n * block, block, block)
            )
    with rasterio.open(image_path, "w", **profile):
        pass  # never read: class-centred placement reads masks only
    script = textwrap.dedent(
        f"""
        import rasterio
        from patchbalance.sources.placement import PlacementSettings, class_centred_records
        from patchbalance.windows import probe_raster
        settings = PlacementSettings(patch_size=256, stride=256)
        # GDAL's block cache (5 % of RAM by default) is capped, so the figure is the pass's own.
        with rasterio.Env(GDAL_CACHEMAX=64):
            records, figures = class_centred_records(
                [("{image_path}", "{mask_path}")], [probe_raster("{mask_path}")], settings
            )
        # VmHWM, not ru_maxrss: the latter keeps the forked parent's peak across exec.
        status = open("/proc/self/status").read()
        peak_mb = int(status.split("VmHWM:")[1].split()[0]) / 1024
        print(len(records), figures["rare_classes"], int(peak_mb))
        """
    )
    output = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600
    ).stdout.split()

    count, peak_mb = int(output[0]), int(output[-1])
    # Class 9 is 900 of the 7 tiles' 1.8 million labelled pixels: rare; one window per blob.
    assert count == 7 and output[1] == "[9]"
    # A strip of one block row is 31 MB; the whole mask would be 3,650 MB.
    assert peak_mb < 600, f"peak RSS {peak_mb} MB"


def test_a_class_centred_build_reads_each_raster_header_once(tmp_path, masks, monkeypatch):
    """The rasters source probes each file once; the raster stage reuses those headers."""
    import patchbalance.sources.local as local
    import patchbalance.windows as windows
    from patchbalance.balancing.pipeline import run_build

    probed: list[str] = []
    real_probe = windows.probe_raster

    def counting_probe(path):
        probed.append(os.path.basename(str(path)))
        return real_probe(path)

    monkeypatch.setattr(windows, "probe_raster", counting_probe)
    monkeypatch.setattr(local, "probe_raster", counting_probe)
    config = config_for(tmp_path, placement="class_centred")
    config.compute.scheduler = "threads"
    config.clustering.k_min, config.clustering.k_max = 2, 3
    table = run_build(config).table
    assert (table["placement"] != "grid").any()
    assert sorted(probed) == ["img0.tif", "img1.tif", "mask0.tif", "mask1.tif"]


def test_region_pixels_are_those_of_a_sort_over_every_pixel():
    from scipy import ndimage

    from patchbalance.sources import placement

    def by_full_sort(pixels_of_class, rng):
        labels, count = ndimage.label(pixels_of_class)
        flat = np.flatnonzero(labels)
        region = labels.ravel()[flat] - 1
        order = np.lexsort((-rng.random(flat.size), region))
        starts = np.searchsorted(region[order], np.arange(count))
        sizes = np.bincount(region, minlength=count)
        pixels = np.full((count, placement.PIXELS_PER_REGION, 2), -1, dtype=np.int64)
        for k in range(placement.PIXELS_PER_REGION):
            has = sizes > k
            chosen = flat[order[starts[has] + k]]
            pixels[has, k, 0], pixels[has, k, 1] = np.divmod(chosen, pixels_of_class.shape[1])
        return sizes, pixels

    rng = np.random.default_rng(3)
    for trial in range(40):
        shape = tuple(int(n) for n in rng.integers(1, 200, size=2))
        blobs = rng.random(shape) < rng.random() * 0.2
        mask = ndimage.binary_dilation(blobs, iterations=int(rng.integers(0, 6)))
        sizes, pixels = placement._regions(mask, np.random.default_rng(trial))
        expected_sizes, expected_pixels = by_full_sort(mask, np.random.default_rng(trial))
        np.testing.assert_array_equal(sizes, expected_sizes)
        np.testing.assert_array_equal(pixels, expected_pixels)
    assert sizes.max() > 64  # regions large enough for the candidate threshold to apply
