"""Bad input of the third round: each gets one clear line (exit 2) or a warning that names it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from patchbalance.cli import app
from patchbalance.report import figures_from_table
from rasters import record, write_pair

runner = CliRunner()


def _run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _write_config(folder: Path, block: dict) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"balanced_dataset": block}))
    return path


@pytest.fixture()
def project(tmp_path):
    """Two 64 px pairs, a records CSV of 8 windows and a config; returns the config path."""
    rng = np.random.default_rng(0)
    records = []
    for name in ("a", "b"):
        mask = rng.integers(0, 3, size=(64, 64)).astype(np.uint8)
        pair = write_pair(tmp_path, name, mask)
        records += [record(*pair, r, c, 32) for r in (0, 32) for c in (0, 32)]
    pd.DataFrame(records).to_csv(tmp_path / "records.csv", index=False)
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
