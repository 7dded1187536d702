"""Round four of bad input, outputs and configuration: one line, exit 2, nothing written or lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cli_checks import one_line_error, run_cli, snapshot, write_yaml
from compare_fixtures import tiny_configs
from patchbalance.atomic import atomic_writer
from patchbalance.demo import write_demo_dataset
from rasters import write_records_build


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A finished build: records, config, balanced.csv and its summary; returns the folder."""
    folder = tmp_path_factory.mktemp("built")
    config = write_records_build(folder, "balanced.csv")
    result = run_cli("build-balanced-dataset", config, "-q")
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture()
def project(built, tmp_path) -> Path:
    """A copy of the finished build that a test may try to damage."""
    return Path(shutil.copytree(built, tmp_path / "project"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


# --------------------------------------------------------------------------------------------
# A malformed ${ in any configuration file (BAD 4)


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_a_malformed_interpolation_in_a_build_names_the_file_and_key(project, dry_run):
    build = yaml.safe_load((project / "build.yaml").read_text())
    build["balanced_dataset"]["output"]["csv_path"] = "bt${x.csv"
    config = write_yaml(project / "bad.yaml", build)
    before = snapshot(project)
    line = one_line_error(
        run_cli("build-balanced-dataset", config, *dry_run), str(config), "'output.csv_path'"
    )
    assert "starts no valid interpolation" in line and "\\${" in line
    assert snapshot(project) == before


def test_a_malformed_interpolation_in_compare_names_the_file_and_key(tmp_path, demo):
    config = tiny_configs(tmp_path, demo, output_dir="c${x")
    before = snapshot(tmp_path)
    for dry_run in ([], ["--dry-run"]):
        one_line_error(run_cli("compare", config, *dry_run), str(config), "'output_dir'")
    assert snapshot(tmp_path) == before


def test_a_malformed_interpolation_in_the_build_of_compare_names_that_file(tmp_path, demo):
    build = yaml.safe_load(Path(demo["config"]).read_text())
    build["balanced_dataset"]["output"]["csv_path"] = "bt${x.csv"
    own_build = write_yaml(tmp_path / "build.yaml", build)
    config = tiny_configs(tmp_path, demo, build=str(own_build))
    one_line_error(run_cli("compare", config, "--dry-run"), str(own_build), "'output.csv_path'")


def test_a_malformed_interpolation_in_select_coreset_names_the_file_and_key(project):
    config = write_yaml(
        project / "coreset.yaml",
        {"coreset": {"input_csv_path": "balanced.csv", "output_csv_path": "c${x.csv"}},
    )
    before = snapshot(project)
    one_line_error(run_cli("select-coreset", config), str(config), "'output_csv_path'")
    assert snapshot(project) == before


# --------------------------------------------------------------------------------------------
# Outputs that would replace an input (BAD 5, 6)


@pytest.mark.parametrize(
    ("target", "named"),
    [
        ("balanced.csv", "the table"),
        ("balanced.summary.json", "the table's summary"),
        ("records.csv", "input.records_path"),
        ("build.yaml", "configuration"),
        ("images/a.tif", "a raster of the table (image_path"),
    ],
)
def test_report_out_never_replaces_the_table_its_summary_or_an_input(built, target, named):
    before = snapshot(built)
    one_line_error(
        run_cli("report", built / "balanced.csv", "--out", built / target),
        "--out",
        named,
        str(built / target),
    )
    assert snapshot(built) == before


def test_select_coreset_never_replaces_the_input_tables_summary(project):
    config = write_yaml(
        project / "coreset.yaml",
        {
            "coreset": {
                "method": "cb",
                "input_csv_path": "balanced.csv",
                "output_csv_path": "balanced.parquet",
            }
        },
    )
    before = snapshot(project)
    one_line_error(
        run_cli("select-coreset", config),
        "summary_path",
        "the summary of input_csv_path",
        "balanced.summary.json",
    )
    # Nor an explicit summary_path onto it.
    one_line_error(
        run_cli(
            "select-coreset",
            config,
            "--set",
            "output_csv_path=core.csv",
            "--set",
            "summary_path=balanced.summary.json",
        ),  # fmt: skip
        "summary_path",
        "the summary of input_csv_path",
    )
    assert snapshot(project) == before


# --------------------------------------------------------------------------------------------
# Names no file system takes, and temporaries that always fit (BAD 14)


def test_an_output_name_over_255_bytes_is_refused_before_any_work(project):
    long_name = "t" * 252 + ".csv"
    before = snapshot(project)
    line = one_line_error(
        run_cli(
            "build-balanced-dataset",
            project / "build.yaml",
            "--set",
            f"output.csv_path={long_name}",
        ),  # fmt: skip
        "output.csv_path",
        "256 bytes",
    )
    assert long_name not in line  # shortened
    one_line_error(
        run_cli("report", project / "balanced.csv", "--out", project / ("r" * 256)),
        "--out",
        "256 bytes",
    )
    one_line_error(run_cli("demo", "--out", project / ("d" * 300)), "--out", "300 bytes")
    assert snapshot(project) == before


def test_a_legal_long_output_name_is_written(project):
    # 236 bytes: its summary's name (`<stem>.summary.json`) is 245, the temporaries are short.
    name = "w" * 232 + ".csv"
    result = run_cli(
        "build-balanced-dataset", project / "build.yaml", "-q", "--set", f"output.csv_path={name}"
    )
    assert result.exit_code == 0, result.output
    assert pd.read_csv(project / name)["sampler_weight"].sum() > 0
    assert (project / f"{'w' * 232}.summary.json").is_file()


def test_a_temporary_name_is_short_whatever_the_target(tmp_path):
    target = tmp_path / ("n" * 255)
    with atomic_writer(target) as stream:
        names = [path.name for path in tmp_path.iterdir()]
        stream.write("x")
    assert len(names) == 1 and len(names[0].encode()) <= 40, names
    assert target.read_text() == "x"


# --------------------------------------------------------------------------------------------
# demo --out into a folder that holds the demo's files (BAD 15)


@pytest.mark.parametrize("existing", ["records.csv", "balanced_train.yaml", "masks/scene_2.tif"])
def test_demo_refuses_a_folder_holding_a_file_it_would_write(tmp_path, existing):
    folder = tmp_path / "mine"
    (folder / existing).parent.mkdir(parents=True)
    (folder / existing).write_text("the user's own file\n")
    (folder / "notes.txt").write_text("kept\n")
    before = snapshot(folder)
    one_line_error(run_cli("demo", "--out", folder), str(folder), existing, "new or empty folder")
    assert snapshot(folder) == before


# --------------------------------------------------------------------------------------------
# Weights and keys in a balanced table (WEAK 1, 2, 3)


@pytest.mark.parametrize("weights", ["keep", "uniform", "inverse_frequency"])
@pytest.mark.parametrize("bad", [float("nan"), -2.0])
def test_every_coreset_method_refuses_a_bad_weight_naming_the_table_row(
    built, tmp_path, weights, bad
):
    table = pd.read_csv(built / "balanced.csv")
    # The first row left out of the pool, so that a row's place in the selection is not its row.
    table.loc[0, ["excluded", "sampler_weight"]] = [True, 0.0]
    row = len(table) - 1
    table.loc[row, ["excluded", "sampler_weight"]] = [False, bad]
    table.to_csv(tmp_path / "t.csv", index=False)
    config = write_yaml(
        tmp_path / "coreset.yaml",
        {
            "coreset": {
                "method": "cb",
                "budget": 0.99,
                "input_csv_path": "t.csv",
                "output_csv_path": "c.csv",
                "sampler_weights": weights,
            }
        },
    )
    one_line_error(run_cli("select-coreset", config), f"row {row + 1}", "sampler_weight")
    assert not (tmp_path / "c.csv").exists()


def test_report_warns_about_a_repeated_patch_key_naming_both_rows(built, tmp_path):
    table = pd.read_csv(built / "balanced.csv")
    pd.concat([table, table.iloc[[1]]]).to_csv(tmp_path / "t.csv", index=False)
    result = run_cli("report", tmp_path / "t.csv")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "share a patch key" in line]
    assert len(lines) == 1, result.output
    assert (
        lines[0].startswith("warning: t.csv: 2 rows") and f"rows 2 and {len(table) + 1}" in lines[0]
    )


def test_one_dominating_weight_gives_its_figures_without_a_numpy_warning(built, tmp_path):
    import warnings

    table = pd.read_csv(built / "balanced.csv")
    table.loc[0, "sampler_weight"] = 1e20
    table.to_csv(tmp_path / "t.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run_cli("report", tmp_path / "t.csv", "--out", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    assert "RuntimeWarning" not in result.output
    assert "expected distinct patches/epoch  1.0 of" in result.stdout


# --------------------------------------------------------------------------------------------
# A truncated image is named as the image (WEAK 13)


def test_a_truncated_image_is_named_as_the_image_not_its_mask(tmp_path):
    import json

    import rasterio

    from rasters import write_geotiff

    config = write_records_build(tmp_path, "balanced.csv")
    image = tmp_path / "images" / "b.tif"
    with rasterio.open(image) as dataset:
        pixels = dataset.read()
    write_geotiff(image, pixels, block=16)
    data = image.read_bytes()
    image.write_bytes(data[: int(len(data) * 0.6)])  # the last tiles are cut off

    result = run_cli("build-balanced-dataset", config)
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if "could not be read" in line]
    assert len(warned) == 1 and str(image) in warned[0], result.stderr
    summary = json.loads((tmp_path / "balanced.summary.json").read_text())
    assert summary["first_window_error"].startswith(f"{image}: ")
    assert list(summary["unreadable_files"]) == [str(image)]
    strict = run_cli("build-balanced-dataset", config, "--strict")
    line = one_line_error(strict, str(image))
    assert "masks" not in line
