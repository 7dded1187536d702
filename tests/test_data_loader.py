"""build_dataloader: weighted draws through a real DataLoader over real windows."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chisquare
from torch.utils.data import SequentialSampler, WeightedRandomSampler

from data_fixtures import write_table
from patchbalance.data import CSVWindowedSegmentationDataset, build_dataloader
from patchbalance.errors import ConfigError, InputError
from rasters import write_geotiff

PATCH = 4
WEIGHTS = np.array([1.0, 0.0, 2.0, 4.0, 0.0, 0.5, 3.0, 1.5, 0.0, 6.0])


@pytest.fixture
def id_table(tmp_path):
    """A table whose row i reads a window filled with the value i, so items reveal their row."""
    n = WEIGHTS.size
    image = np.repeat(np.arange(n, dtype=np.uint8), PATCH)[None, None, :].repeat(PATCH, axis=1)
    image = np.concatenate([image] * 3)  # (3, PATCH, n * PATCH)
    image_path = write_geotiff(tmp_path / "ids.tif", image, tiled=False)
    mask_path = write_geotiff(
        tmp_path / "mask.tif", np.zeros(image.shape[1:], np.uint8), tiled=False
    )
    frame = pd.DataFrame(
        {
            "image_path": str(image_path),
            "mask_path": str(mask_path),
            "row_off": 0,
            "col_off": np.arange(n) * PATCH,
            "patch_size": PATCH,
            "sampler_weight": WEIGHTS,
        }
    )
    return write_table(frame, tmp_path / "ids.csv")


def rows_drawn(loader) -> np.ndarray:
    """Return the table row of every item the loader yields, in order."""
    rows = [np.rint(batch["image"][:, 0, 0, 0].numpy() * 255).astype(int) for batch in loader]
    return np.concatenate(rows)


def test_weighted_loader_reads_rows_at_the_frequency_of_their_weights(id_table):
    dataset = CSVWindowedSegmentationDataset(id_table, n_classes=2)
    loader = build_dataloader(
        dataset,
        {"weighted_sampler": True, "weighted_sampler_num_samples": 6000},
        batch_size=200,
        seed=3,
    )
    assert isinstance(loader.sampler, WeightedRandomSampler)
    rows = rows_drawn(loader)
    assert rows.size == 6000
    counts = np.bincount(rows, minlength=WEIGHTS.size)
    assert counts[WEIGHTS == 0].sum() == 0  # zero-weight rows are never drawn
    positive = WEIGHTS > 0
    expected = rows.size * WEIGHTS[positive] / WEIGHTS.sum()
    assert chisquare(counts[positive], expected).pvalue > 1e-3


def test_num_samples_and_no_replacement_are_honoured(id_table):
    dataset = CSVWindowedSegmentationDataset(id_table, n_classes=2)
    loader = build_dataloader(
        dataset,
        {
            "weighted_sampler": True,
            "weighted_sampler_num_samples": 7,
            "weighted_sampler_replacement": False,
        },
        batch_size=3,
        seed=1,
    )
    rows = rows_drawn(loader)
    assert len(loader.sampler) == 7 and sorted(rows) == sorted(np.flatnonzero(WEIGHTS > 0))
    with pytest.raises(InputError, match="only 7 rows have a weight > 0"):
        build_dataloader(
            dataset,
            {
                "weighted_sampler": True,
                "weighted_sampler_num_samples": 8,
                "weighted_sampler_replacement": False,
            },
            batch_size=3,
        )


def test_shuffle_true_with_the_weighted_sampler_is_ignored_with_one_log_line(id_table, caplog):
    dataset = CSVWindowedSegmentationDataset(id_table, n_classes=2)
    with caplog.at_level(logging.INFO, logger="patchbalance.data.loader"):
        loader = build_dataloader(
            dataset,
            {"shuffle": True, "weighted_sampler": True, "num_workers": 2, "drop_last": True},
            batch_size=4,
            seed=0,
        )
        rows = rows_drawn(loader)
    assert rows.size == 8 and set(rows) <= set(np.flatnonzero(WEIGHTS > 0))
    assert [r.message for r in caplog.records].count(
        "data_loader.shuffle is ignored: the weighted sampler orders the draws"
    ) == 1


def test_validation_loaders_never_draw_by_weight(id_table):
    dataset = CSVWindowedSegmentationDataset(id_table, n_classes=2)
    loader = build_dataloader(
        dataset, {"weighted_sampler": True, "shuffle": True}, batch_size=4, training=False
    )
    assert isinstance(loader.sampler, SequentialSampler)
    np.testing.assert_array_equal(rows_drawn(loader), np.arange(WEIGHTS.size))


def test_same_seed_repeats_the_draws_and_another_seed_changes_them(id_table):
    dataset = CSVWindowedSegmentationDataset(id_table, n_classes=2)
    block = {"weighted_sampler": True, "weighted_sampler_num_samples": 50}
    first = rows_drawn(build_dataloader(dataset, block, batch_size=10, seed=7))
    again = rows_drawn(build_dataloader(dataset, block, batch_size=10, seed=7))
    other = rows_drawn(build_dataloader(dataset, block, batch_size=10, seed=8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_table_without_sampler_weight_is_a_clear_error_when_weighted(tmp_path, id_table):
    frame = pd.read_csv(id_table).drop(columns=["sampler_weight"])
    dataset = CSVWindowedSegmentationDataset(write_table(frame, tmp_path / "n.csv"), n_classes=2)
    with pytest.raises(InputError, match="weighted_sampler: true needs a 'sampler_weight' column"):
        build_dataloader(dataset, {"weighted_sampler": True}, batch_size=2)
    # Without the weighted sampler the table is fine.
    assert len(build_dataloader(dataset, {"shuffle": True}, batch_size=2)) == 5


def test_nan_or_negative_table_weights_are_errors_naming_the_rows(tmp_path, id_table):
    frame = pd.read_csv(id_table)
    frame.loc[[2, 7], "sampler_weight"] = [np.nan, np.nan]
    dataset = CSVWindowedSegmentationDataset(write_table(frame, tmp_path / "n.csv"), n_classes=2)
    with pytest.raises(
        InputError, match=r"n\.csv: sampler_weight is NaN in 2 row\(s\) \(rows 3, 8\)"
    ):
        build_dataloader(dataset, {"weighted_sampler": True}, batch_size=2)


def test_weight_errors_name_table_rows_after_excluded_rows_are_dropped(tmp_path, id_table):
    frame = pd.read_csv(id_table)
    frame["excluded"] = frame["sampler_weight"] == 0  # rows 1, 4 and 8
    frame.loc[6, "sampler_weight"] = -1.0
    dataset = CSVWindowedSegmentationDataset(
        write_table(frame, tmp_path / "x.csv"), n_classes=2, drop_excluded=True
    )
    assert len(dataset) == 7
    with pytest.raises(InputError, match=r"negative in 1 row\(s\) \(row 7\)"):
        build_dataloader(dataset, {"weighted_sampler": True}, batch_size=2)


def test_unknown_data_loader_key_suggests_the_closest(id_table):
    dataset = CSVWindowedSegmentationDataset(id_table, n_classes=2)
    with pytest.raises(ConfigError, match="did you mean 'weighted_sampler_replacement'"):
        build_dataloader(dataset, {"weighted_sampler_replacment": False}, batch_size=2)


def test_worker_only_keys_are_dropped_without_workers(id_table):
    dataset = CSVWindowedSegmentationDataset(id_table, n_classes=2)
    loader = build_dataloader(
        dataset,
        {"num_workers": 0, "prefetch_factor": 2, "persistent_workers": True, "batch_size": 5},
        batch_size=2,
    )
    assert loader.batch_size == 5 and len(rows_drawn(loader)) == WEIGHTS.size
