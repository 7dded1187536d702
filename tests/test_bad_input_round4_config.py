"""Round four of bad input, configuration values: checked at load, one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import patchbalance.balancing.raster_reading as raster_reading
from cli_checks import one_line_error, run_cli, snapshot, write_yaml
from data_fixtures import write_scene, write_train_config
from rasters import write_records_build


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """Two pairs, records.csv and build.yaml (not built); returns the build config."""
    return write_records_build(tmp_path_factory.mktemp("records"), "out/balanced.csv")


@pytest.fixture(scope="module")
def train_config(tmp_path_factory) -> Path:
    """A minimal train config over two small scenes; returns its path."""
    return write_train_config(tmp_path_factory.mktemp("train"), device="cpu")


# --------------------------------------------------------------------------------------------
# Whole numbers and seeds (BAD 12, 13)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train_dataset.n_first_rows_to_read", "abc"),
        ("train_dataset.n_first_rows_to_read", "-5"),
        ("train_dataset.n_first_rows_to_read", "2.5"),
        ("train_dataset.n_first_rows_to_read", "0"),
        ("train_dataset.ignore_index", "abc"),
        ("val_dataset.n_first_rows_to_read", "1.5"),
        ("train_dataset.mask_band", "0"),
    ],
)
def test_a_dataset_number_that_is_not_a_whole_number_in_range_names_the_key(
    train_config, key, value
):
    for dry_run in ([], ["--dry-run"]):
        line = one_line_error(
            run_cli("train", train_config, *dry_run, "--set", f"{key}={value}"),
            str(train_config),
            f"'{key}'",
            "whole number",
        )
        assert "invalid literal" not in line
    assert not (train_config.parent / "out").exists()


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("seed=-5", "'seed'"),
        ("clustering.random_state=-7", "'clustering.random_state'"),
        ("seed=4294967296", "'seed'"),
    ],
)
def test_a_negative_seed_is_refused_at_load_in_a_run_and_a_dry_run(records, setting, key):
    before = snapshot(records.parent)
    for dry_run in (["--dry-run"], []):
        one_line_error(
            run_cli("build-balanced-dataset", records, *dry_run, "--set", setting),
            str(records),
            key,
        )
    assert snapshot(records.parent) == before


def test_a_negative_train_and_coreset_seed_are_refused(train_config, tmp_path):
    one_line_error(run_cli("train", train_config, "--dry-run", "--set", "seed=-1"), "'seed'")
    coreset = write_yaml(
        tmp_path / "coreset.yaml",
        {"coreset": {"input_csv_path": "t.csv", "output_csv_path": "c.csv", "seed": -3}},
    )
    one_line_error(run_cli("select-coreset", coreset), str(coreset), "'seed'")


# --------------------------------------------------------------------------------------------
# Bands the rasters lack, found before any work (WEAK 14)


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("train_dataset.selected_bands", "[5]", "image"),
        ("train_dataset.mask_band", "2", "mask"),
        ("val_dataset.selected_bands", "[1,4]", "image"),
    ],
)
def test_a_band_the_rasters_lack_fails_the_train_dry_run_naming_the_key(
    train_config, key, value, kind
):
    line = one_line_error(
        run_cli("train", train_config, "--dry-run", "--set", f"{key}={value}"),
        f"{key} is {max(yaml.safe_load(value)) if '[' in value else value}",
        f"the {kind} ",
        "band(s)",
    )
    assert ".tif" in line


def test_embedding_bands_the_images_lack_fail_before_the_statistics(records, monkeypatch):
    def no_statistics(*args, **kwargs):
        raise AssertionError("the statistics ran")

    monkeypatch.setattr(raster_reading, "_statistics", no_statistics)
    one_line_error(
        run_cli(
            "build-balanced-dataset",
            records,
            "--set",
            "mode=embeddings",
            "--set",
            "embeddings.bands=[1,2,7]",
            "--set",
            "embeddings.backbone=efficientnet_lite0",
        ),  # fmt: skip
        "embeddings.bands is 7",
        "the image ",
        "has 3 band(s)",
    )
    assert not list((records.parent / "out").glob("*"))


def test_a_scene_with_enough_bands_passes_the_band_check(tmp_path):
    image, mask, _, _ = write_scene(tmp_path, "five", bands=5)
    from patchbalance.windows import check_band, probe_rasters

    infos, _ = probe_rasters([str(image)], 1)
    check_band({path: info.count for path, info in infos.items()}, 5, "embeddings.bands", "image")
