"""Bad input of the third round: each gets one clear line (exit 2) or a warning that names it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cli_checks import one_line_error as _one_line_error
from patchbalance.cli import app
from patchbalance.sampling.figures import figures_from_table
from rasters import record, write_geotiff, write_pair, write_two_pairs_and_records

runner = CliRunner()


def _run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _write_config(folder: Path, block: dict) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"balanced_dataset": block}))
    return path


@pytest.fixture()
def project(tmp_path):
    """Two 64 px pairs, a records CSV of 8 windows and a config; returns the config path."""
    write_two_pairs_and_records(tmp_path, seed=0, n_classes=3, size=32, zero_top=False)
    return _write_config(
        tmp_path,
        {
            "input": {"records_path": "records.csv"},
            "clustering": {"k_min": 2, "k_max": 3},
            "output": {"csv_path": "out/table.csv"},
        },
    )


def _balanced_table(folder: Path, **columns) -> Path:
    """Write a small balanced table (4 rows, the last excluded) with `columns` replaced."""
    table = pd.DataFrame(
        {
            "px_0": [10, 20, 30, 0],
            "px_1": [6, 0, 2, 0],
            "sampler_weight": [1.0, 0.5, 1.5, 0.0],
            "excluded": [False, False, False, True],
        }
    )
    for name, values in columns.items():
        table[name] = values
    path = folder / "balanced.csv"
    table.to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------------------------
# Configuration and --set


def test_set_indexes_a_list_item_by_number(tmp_path):
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 1
    image, mask_path = write_pair(tmp_path, "a", mask)
    config = _write_config(
        tmp_path,
        {
            "input": {
                "rasters": [{"image_path": "missing.tif", "mask_path": str(mask_path)}],
                "patch_size": 32,
            },
            "clustering": {"k_min": 2, "k_max": 2},
            "output": {"csv_path": "out/table.csv"},
        },
    )
    result = _run(
        "build-balanced-dataset", config, "-q", "--set", f"input.rasters.0.image_path={image}"
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert set(table["image_path"]) == {str(image)}
    _one_line_error(
        _run("build-balanced-dataset", config, "--set", "input.rasters.3.image_path=x.tif"),
        "input.rasters.3.image_path",
        "'input.rasters' is a list of 1 item(s)",
    )


def test_a_folder_given_as_the_config_is_named_a_folder(tmp_path):
    _one_line_error(_run("build-balanced-dataset", tmp_path), str(tmp_path), "is a folder")


def test_a_table_path_with_another_suffix_is_an_error_naming_the_key(project):
    _one_line_error(
        _run("build-balanced-dataset", project, "--set", "output.csv_path=out/t.xlsx"),
        "output.csv_path",
        ".csv, .parquet or .pq",
        "'.xlsx'",
    )
    assert not (project.parent / "out").exists()


# --------------------------------------------------------------------------------------------
# Records


def test_a_fractional_offset_is_printed_as_a_plain_number(project):
    records = pd.read_csv(project.parent / "records.csv")
    records["row_off"] = records["row_off"].astype(float)
    records.loc[2, "row_off"] = 12.5
    records.to_csv(project.parent / "records.csv", index=False)
    line = _one_line_error(
        _run("build-balanced-dataset", project), "records.csv row 3", "row_off", "got 12.5"
    )
    assert "np." not in line


def test_a_semicolon_separated_csv_suggests_the_separator(project):
    records = pd.read_csv(project.parent / "records.csv")
    records.to_csv(project.parent / "records.csv", index=False, sep=";")
    _one_line_error(
        _run("build-balanced-dataset", project),
        "missing record column(s)",
        "separated by ';'",
        "comma-separated",
    )


def test_parquet_records_with_integer_paths_name_the_column(project):
    records = pd.read_csv(project.parent / "records.csv")
    records["image_path"] = np.arange(len(records), dtype=np.int64)
    records.to_parquet(project.parent / "records.parquet", index=False)
    _one_line_error(
        _run("build-balanced-dataset", project, "--set", "input.records_path=records.parquet"),
        "records.parquet",
        "column 'image_path' holds int64",
        "text",
    )


# --------------------------------------------------------------------------------------------
# report


def test_report_on_a_header_only_table_says_it_has_no_rows(tmp_path):
    path = _balanced_table(tmp_path)
    pd.read_csv(path).iloc[:0].to_csv(path, index=False)
    _one_line_error(_run("report", path), "balanced.csv", "the table has no rows")


@pytest.mark.parametrize("name", ["footprints.geojson", "summary.json"])
def test_report_on_another_kind_of_file_says_it_reads_the_balanced_table(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"type": "FeatureCollection", "features": []}')
    _one_line_error(_run("report", path), name, "balanced table", ".csv or .parquet")


def test_report_on_a_folder_says_it_is_a_folder(tmp_path):
    _one_line_error(_run("report", tmp_path), str(tmp_path), "is a folder")


@pytest.mark.parametrize(
    "value, problem",
    [("many", "holds 'many'"), (np.nan, "is empty"), (-4, "holds -4"), (2.5, "holds 2.5")],
)
def test_report_refuses_a_bad_class_count_in_an_active_row(tmp_path, value, problem):
    path = _balanced_table(tmp_path, px_1=[6, value, 2, 0])
    _one_line_error(_run("report", path), "balanced.csv", "column 'px_1'", problem, "row 2")


def test_report_takes_an_empty_class_count_in_an_excluded_row(tmp_path):
    path = _balanced_table(tmp_path, px_1=[6, 0, 2, np.nan])
    result = _run("report", path)
    assert result.exit_code == 0, result.output
    # The active rows hold 60 pixels of class 0 and 8 of class 1.
    assert "88.24%" in result.stdout and "11.76%" in result.stdout


def test_weights_whose_sum_overflows_are_an_error_without_numpy_warnings(tmp_path):
    path = _balanced_table(tmp_path, sampler_weight=[1e308, 1e308, 1.0, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _one_line_error(_run("report", path), "balanced.csv", "too large to add up")


def test_huge_weights_that_add_up_give_the_same_figures_as_small_ones(tmp_path):
    small = figures_from_table(pd.read_csv(_balanced_table(tmp_path)))
    huge = pd.read_csv(_balanced_table(tmp_path, sampler_weight=[1e300, 0.5e300, 1.5e300, 0.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures = figures_from_table(huge)
    np.testing.assert_allclose(figures.weighted_share, small.weighted_share)
    assert figures.ess == pytest.approx(small.ess)
    assert "nan" not in str(figures.to_dict())


# --------------------------------------------------------------------------------------------
# Masks


def _records_config(folder: Path, pairs: list[tuple[Path, Path]], size: int = 32, **block) -> Path:
    """Write the grid of `size` windows over each 64 px pair as records, and a config."""
    offsets = range(0, 64, size)
    rows = [record(*pair, r, c, size) for pair in pairs for r in offsets for c in offsets]
    pd.DataFrame(rows).to_csv(folder / "records.csv", index=False)
    return _write_config(
        folder,
        {
            "input": {"records_path": "records.csv"},
            "clustering": {"k_min": 2, "k_max": 2},
            "output": {"csv_path": "out/table.csv"},
            **block,
        },
    )


def _two_class_mask(size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2 :] = 1
    mask[: size // 4, : size // 4] = 2
    return mask


def test_a_mask_band_the_mask_lacks_names_the_key_and_the_file(project):
    _one_line_error(
        _run("build-balanced-dataset", project, "--set", "exclusion.mask_band=2"),
        "exclusion.mask_band is 2",
        "masks/a.tif has 1 band(s)",
    )


def test_a_mask_band_the_mask_lacks_is_an_error_before_class_centred_placement(tmp_path):
    image, mask = write_pair(tmp_path, "a", _two_class_mask())
    config = _write_config(
        tmp_path,
        {
            "input": {
                "rasters": [{"image_path": str(image), "mask_path": str(mask)}],
                "patch_size": 32,
                "placement": "class_centred",
            },
            "exclusion": {"mask_band": 3},
            "output": {"csv_path": "out/table.csv"},
        },
    )
    _one_line_error(_run("build-balanced-dataset", config), "exclusion.mask_band is 3", str(mask))


def test_rare_classes_naming_a_class_no_mask_holds_is_an_error(tmp_path):
    image, mask = write_pair(tmp_path, "a", _two_class_mask())
    config = _write_config(
        tmp_path,
        {
            "input": {
                "rasters": [{"image_path": str(image), "mask_path": str(mask)}],
                "patch_size": 32,
                "placement": "class_centred",
                "rare_classes": [9],
            },
            "output": {"csv_path": "out/table.csv"},
        },
    )
    _one_line_error(
        _run("build-balanced-dataset", config),
        "input.rare_classes names class 9",
        "[0, 1, 2]",
    )


def test_a_float_mask_with_a_fractional_value_is_an_error_naming_the_file(tmp_path):
    mask = _two_class_mask().astype(np.float32)
    mask[40, 40] = 1.5
    pair = write_pair(tmp_path, "a", mask, mask_nodata=None)
    config = _records_config(tmp_path, [pair])
    _one_line_error(
        _run("build-balanced-dataset", config),
        str(pair[1]),
        "holds the value 1.5",
        "row_off 32, col_off 32",
    )


def test_a_float_mask_of_whole_numbers_and_nan_is_counted(tmp_path):
    mask = _two_class_mask().astype(np.float32)
    mask[0, 0] = np.nan
    pair = write_pair(tmp_path, "a", mask, mask_nodata=None)
    result = _run("build-balanced-dataset", _records_config(tmp_path, [pair]), "-q")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert [c for c in table.columns if c.startswith("px_")] == ["px_0", "px_1", "px_2"]
    # The NaN pixel (in the first window's class-2 corner) is nodata, not a class.
    assert table["px_2"].sum() == 16 * 16 - 1
    assert table.loc[0, "nodata_ratio"] == pytest.approx(1 / 32**2)


def _build_with_nodata_class(tmp_path, caplog, nodata_class: int):
    """Build over a mask whose top 8 rows are its own nodata (255); return (pair, table, warned)."""
    from patchbalance.balancing.pipeline import run_build

    mask = _two_class_mask()
    mask[:8] = 255
    pair = write_pair(tmp_path, "a", mask, mask_nodata=255)
    config = _records_config(
        tmp_path, [pair], exclusion={"nodata_class": nodata_class, "exclude_border_nodata": False}
    )
    with caplog.at_level(logging.WARNING):
        table = run_build(config, write=False).table
    warned = [r.getMessage() for r in caplog.records if "own nodata value" in r.getMessage()]
    return pair, table, warned


def test_a_masks_own_nodata_counted_as_a_class_is_warned_once(tmp_path, caplog):
    pair, table, warned = _build_with_nodata_class(tmp_path, caplog, 7)
    assert "px_255" in table.columns
    assert len(warned) == 1, warned
    assert str(pair[1]) in warned[0]
    assert "exclusion.nodata_class is 7" in warned[0] and "class 255" in warned[0]
    # 8 rows of 64 px out of 64 x 64, in the 2 windows of the top row.
    assert "(12.5 % of the valid pixels)" in warned[0] and "in 2 window(s)" in warned[0]


def test_no_nodata_warning_when_nodata_class_is_the_masks_own(tmp_path, caplog):
    _, _, warned = _build_with_nodata_class(tmp_path, caplog, 255)
    assert not warned


def test_a_mask_smaller_than_its_image_is_named_as_the_smaller_one(tmp_path, caplog):
    from patchbalance.balancing.pipeline import run_build

    image = write_geotiff(tmp_path / "images" / "a.tif", np.full((3, 64, 64), 90, np.uint8))
    mask = write_geotiff(tmp_path / "masks" / "a.tif", _two_class_mask(32), nodata=255)
    config = _records_config(tmp_path, [(image, mask)], size=16)
    with caplog.at_level(logging.WARNING):
        table = run_build(config, write=False).table
    assert table["exclusion_reason"].eq("window_out_of_bounds").sum() == 12
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "the mask is the smaller one" in messages
    assert "12 window(s) lie outside their raster" in messages
    result = _run("build-balanced-dataset", config, "--strict")
    _one_line_error(result, "--strict: 12 window(s)", "is 32x32", "the mask is the smaller one")


def test_a_mask_in_another_crs_is_warned_with_the_records_source(tmp_path, caplog):
    from patchbalance.balancing.pipeline import run_build

    mask = _two_class_mask()
    image = write_geotiff(tmp_path / "images" / "a.tif", np.full((3, 64, 64), 90, np.uint8))
    # The same transform numbers, read in another CRS.
    other = write_geotiff(tmp_path / "masks" / "a.tif", mask, crs="EPSG:32641", nodata=255)
    config = _records_config(tmp_path, [(image, other)])
    with caplog.at_level(logging.WARNING):
        run_build(config, write=False)
    messages = [r.getMessage() for r in caplog.records if "do not match" in r.getMessage()]
    assert len(messages) == 1
    assert "EPSG:32640" in messages[0] and "EPSG:32641" in messages[0]
    assert str(other) in messages[0]


def test_a_mask_in_another_crs_is_an_error_with_the_rasters_source(tmp_path):
    image = write_geotiff(tmp_path / "images" / "a.tif", np.full((3, 64, 64), 90, np.uint8))
    mask = write_geotiff(tmp_path / "masks" / "a.tif", _two_class_mask(), crs="EPSG:32641")
    config = _write_config(
        tmp_path,
        {
            "input": {
                "rasters": [{"image_path": str(image), "mask_path": str(mask)}],
                "patch_size": 32,
            },
            "output": {"csv_path": "out/table.csv"},
        },
    )
    _one_line_error(
        _run("build-balanced-dataset", config),
        "input.rasters",
        "is in EPSG:32640 but mask",
        "EPSG:32641",
    )


# --------------------------------------------------------------------------------------------
# --dry-run checks what the run checks first


def test_a_dry_run_with_every_raster_missing_is_an_error(project):
    # Paths written relative to a records file kept in another folder: they are taken
    # relative to the configuration's folder, where no such files exist.
    folder = project.parent
    records = pd.read_csv(folder / "records.csv")
    for column in ("image_path", "mask_path"):
        records[column] = [str(Path(p).relative_to(folder)) for p in records[column]]
    (folder / "lists").mkdir()
    records.to_csv(folder / "lists" / "records.csv", index=False)
    for name in ("images", "masks"):
        (folder / name).rename(folder / "lists" / name)
    _edit_block(project, lambda block: block["input"].update(records_path="lists/records.csv"))
    line = _one_line_error(
        _run("build-balanced-dataset", project, "--dry-run"),
        "every one of the 8 patches names a raster that does not exist",
        "images/a.tif",
        f"relative to the configuration's folder {folder}",
    )
    assert "4 file(s) missing" in line
    # The run fails too, after reading.
    _one_line_error(_run("build-balanced-dataset", project), "read_error: 8")


def test_a_dry_run_with_some_rasters_missing_names_them_and_succeeds(project):
    (project.parent / "images" / "b.tif").unlink()
    result = _run("build-balanced-dataset", project, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "(1 missing, e.g. " in result.stdout and "b.tif" in result.stdout


@pytest.mark.parametrize("target", ["blocker/table.csv", "/proc/patchbalance/table.csv"])
def test_a_dry_run_with_an_unwritable_output_folder_is_an_error(project, target):
    (project.parent / "blocker").write_text("a file where a folder should be")
    _one_line_error(
        _run("build-balanced-dataset", project, "--dry-run", "--set", f"output.csv_path={target}"),
        "output.csv_path",
    )


def _edit_block(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data["balanced_dataset"])
    path.write_text(yaml.safe_dump(data))
