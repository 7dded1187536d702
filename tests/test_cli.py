"""The command line: exit codes and one-line messages for the bad inputs of SPEC §8."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cli_checks import one_line_error as _one_line_error
from patchbalance.cli import app
from rasters import record, write_pair, write_two_pairs_and_records

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def project(tmp_path):
    """A folder with two real rasters, a records CSV and a valid config; returns the config path."""
    write_two_pairs_and_records(tmp_path, seed=0, n_classes=3, size=32)
    config = {
        "balanced_dataset": {
            "input": {"records_path": "records.csv"},
            "clustering": {"k_min": 2, "k_max": 3},
            "output": {"csv_path": "out/table.csv"},
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _edit(path: Path, change) -> Path:
    data = yaml.safe_load(path.read_text())
    change(data["balanced_dataset"])
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_valid_config_builds_and_prints_the_summary(project):
    result = _run("build-balanced-dataset", project, "-q")
    assert result.exit_code == 0, result.output
    assert "effective sample size" in result.stdout
    table = pd.read_csv(project.parent / "out" / "table.csv")
    assert len(table) == 8
    assert table.loc[~table["excluded"], "sampler_weight"].mean() == pytest.approx(1.0)


def test_missing_config_file(tmp_path):
    _one_line_error(
        _run("build-balanced-dataset", tmp_path / "nope.yaml"), "nope.yaml", "not found"
    )


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("balanced_dataset:\n  mode: masks_only\n  input: [unclosed\n")
    _one_line_error(_run("build-balanced-dataset", path), "bad.yaml", "YAML syntax error at line 4")


def test_unknown_key_suggests_the_closest_valid_key(project):
    _edit(project, lambda b: b.setdefault("exclusion", {}).update(black_tolerence=3))
    _one_line_error(
        _run("build-balanced-dataset", project),
        "unknown key 'exclusion.black_tolerence'; did you mean 'black_tolerance'?",
    )


def test_wrong_type_names_the_key_and_value(project):
    _one_line_error(
        _run("build-balanced-dataset", project, "--set", "clustering.k_max=many"),
        "'clustering.k_max'",
        "'many'",
    )


def test_k_min_larger_than_k_max(project):
    _one_line_error(
        _run("build-balanced-dataset", project, "--set", "clustering.k_min=9"),
        "k_min (9) is larger than k_max (3)",
    )


def _build_table(project: Path, name: str, exclusion: dict | None) -> pd.DataFrame:
    """Build the project with `exclusion` (None: the defaults) into out/<name>.csv; return it."""
    data = yaml.safe_load(project.read_text())
    block = data["balanced_dataset"]
    block["output"]["csv_path"] = f"out/{name}.csv"
    if exclusion is not None:
        block["exclusion"] = exclusion
    path = project.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    result = _run("build-balanced-dataset", path, "-q")
    assert result.exit_code == 0, result.output
    return pd.read_csv(project.parent / "out" / f"{name}.csv")


def test_upstream_synonyms_build_the_same_table_as_the_keys_they_stand_for(project):
    # The fixture's mask `a` is all class 0 in its top 32 rows: its two top windows have
    # entropy 0, every other window mixes classes (entropy well above 0.5).
    synonyms = _build_table(
        project, "synonyms", {"exclude_image_black_border": False, "min_entropy_threshold": 0.5}
    )
    canonical = _build_table(
        project, "canonical", {"exclude_black_border": False, "min_entropy": 0.5}
    )
    default = _build_table(project, "default", None)

    pd.testing.assert_frame_equal(synonyms, canonical)
    top_of_a = (
        synonyms["image_path"].str.endswith("a.tif") & (synonyms["row_off"] == 0)
    ).to_numpy()
    assert top_of_a.sum() == 2
    assert np.array_equal(synonyms["has_low_entropy"].to_numpy(), top_of_a)
    assert np.array_equal(synonyms["excluded"].to_numpy(), top_of_a)
    assert np.all(synonyms.loc[top_of_a, "sampler_weight"] == 0)
    # The defaults (min_entropy 0) exclude nothing, so the synonym changed the weights.
    assert not default["excluded"].any() and not default["has_low_entropy"].any()
    assert np.all(default.loc[top_of_a, "sampler_weight"] > 0)


@pytest.mark.parametrize(
    ("model", "synonym", "key", "value"),
    [
        ("exclusion", "exclude_mask_border_nodata", "exclude_border_nodata", False),
        ("exclusion", "exclude_image_black_border", "exclude_black_border", False),
        ("exclusion", "black_border_tolerance", "black_tolerance", 7.0),
        ("exclusion", "min_entropy_threshold", "min_entropy", 0.3),
        ("output", "geojson_path", "footprints_path", "f.geojson"),
        ("hyperparameters", "num_epochs", "epochs", 3),
        ("hyperparameters", "max_epochs", "epochs", 4),
        ("hyperparameters", "learning_rate", "lr", 0.05),
    ],
)
def test_each_upstream_synonym_sets_the_key_it_stands_for(model, synonym, key, value):
    from patchbalance.config import ExclusionConfig, OutputConfig
    from patchbalance.train.config import HyperparametersConfig

    models = {
        "exclusion": ExclusionConfig,
        "output": OutputConfig,
        "hyperparameters": HyperparametersConfig,
    }
    given = {synonym: value}
    if model == "output":
        given["csv_path"] = "t.csv"
    section = models[model].model_validate(given)
    default = models[model].model_validate({"csv_path": "t.csv"} if model == "output" else {})
    assert getattr(default, key) != value  # the synonym's value is not the default ...
    got = getattr(section, key)
    assert (str(got) if model == "output" else got) == value  # ... it lands on its key
    others = {name for name in models[model].model_fields if name != key}
    assert {name: getattr(section, name) for name in others} == {
        name: getattr(default, name) for name in others
    }


def test_the_black_border_synonym_turns_the_check_off_in_a_build(tmp_path):
    """The upstream key, as the upstream docs write it, changes the build's exclusion."""
    from patchbalance.balancing.pipeline import run_build
    from patchbalance.config import config_from_mapping

    rng = np.random.default_rng(1)
    mask = rng.integers(0, 3, size=(64, 64)).astype(np.uint8)
    image = np.full((3, 64, 64), 120, dtype=np.uint8)
    image[:, :, :8] = 0  # a black left border in the first column of windows
    image_path, mask_path = write_pair(tmp_path, "a", mask, image=image)
    records = [record(image_path, mask_path, r, c, 32) for r in (0, 32) for c in (0, 32)]
    built = {}
    for flag in (True, False):
        config = config_from_mapping(
            {
                "input": {"patch_records": records},
                "clustering": {"k_min": 2, "k_max": 2},
                "exclusion": {"exclude_image_black_border": flag},
                "output": {"csv_path": str(tmp_path / f"t{flag}.csv")},
            },
            base_dir=tmp_path,
        )
        built[flag] = run_build(config).table
    assert built[True]["has_image_black_border"].sum() == 2
    assert built[True]["excluded"].sum() == 2
    assert built[False]["excluded"].sum() == 0


def test_uniqueness_only_in_masks_only_mode_says_to_use_embeddings(project):
    _one_line_error(
        _run("build-balanced-dataset", project, "--set", "sampling_method=uniqueness_only"),
        "use mode: embeddings",
    )


def test_missing_record_columns(project):
    pd.read_csv(project.parent / "records.csv").drop(columns=["col_off"]).to_csv(
        project.parent / "records.csv", index=False
    )
    _one_line_error(
        _run("build-balanced-dataset", project), "records.csv", "missing record column(s) col_off"
    )


def test_duplicate_patch_keys_name_the_rows(project):
    records = pd.read_csv(project.parent / "records.csv")
    pd.concat([records, records.iloc[[2]]]).to_csv(project.parent / "records.csv", index=False)
    _one_line_error(
        _run("build-balanced-dataset", project), "duplicate patch key", "row 3 and", "row 9"
    )


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("row_off", -32, "row_off and col_off must be >= 0"),
        ("patch_size", 0, "patch_size must be > 0"),
        ("col_off", 1.5, "col_off must be a whole number"),
    ],
)
def test_bad_offsets_and_sizes_name_the_row(project, column, value, message):
    records = pd.read_csv(project.parent / "records.csv")
    records[column] = records[column].astype(object)
    records.loc[4, column] = value
    records.to_csv(project.parent / "records.csv", index=False)
    _one_line_error(_run("build-balanced-dataset", project), "records.csv row 5", message)


def test_every_patch_excluded_counts_the_reasons(project):
    _one_line_error(
        _run("build-balanced-dataset", project, "--set", "exclusion.min_entropy=5"),
        "every one of the 8 patches is excluded",
        "low_entropy: 8",
    )


def test_output_folder_not_writable(project):
    (project.parent / "blocker").write_text("a file, not a folder")
    _one_line_error(
        _run("build-balanced-dataset", project, "--set", "output.csv_path=blocker/table.csv"),
        "cannot create the output folder",
    )


def test_strict_makes_a_missing_raster_an_error(project):
    (project.parent / "masks" / "b.tif").unlink()
    assert _run("build-balanced-dataset", project, "-q").exit_code == 0
    _one_line_error(
        _run("build-balanced-dataset", project, "--strict"), "--strict: 4 patch", "b.tif"
    )


def test_dry_run_prints_the_plan_and_writes_nothing(project):
    result = _run("build-balanced-dataset", project, "--dry-run")
    assert result.exit_code == 0
    assert "patches: 8 from 4 raster files" in result.stdout
    assert (
        "records -> mask statistics -> exclusion -> composition clusters -> weights -> outputs"
        in result.stdout
    )
    assert not (project.parent / "out").exists()


def test_set_overrides_change_the_run(project):
    result = _run(
        "build-balanced-dataset",
        project,
        "-q",
        "--set",
        "output.csv_path=other.parquet",
        "--set",
        "balanced_dataset.sampling_method=repeat_factor",
    )
    assert result.exit_code == 0, result.output
    assert "weights: repeat_factor" in result.stdout
    assert len(pd.read_parquet(project.parent / "other.parquet")) == 8


def test_unset_environment_variable_in_interpolation_is_a_config_error(project, monkeypatch):
    monkeypatch.delenv("PB_TEST_UNSET", raising=False)
    _edit(project, lambda b: b["output"].update(csv_path="${oc.env:PB_TEST_UNSET}"))
    _one_line_error(
        _run("build-balanced-dataset", project), "cannot resolve an interpolation", "PB_TEST_UNSET"
    )


def test_environment_interpolation_is_resolved(project, monkeypatch):
    monkeypatch.setenv("PB_TEST_OUT", "from_env.csv")
    _edit(project, lambda b: b["output"].update(csv_path="${oc.env:PB_TEST_OUT}"))
    assert _run("build-balanced-dataset", project, "-q").exit_code == 0
    assert (project.parent / "from_env.csv").exists()


def test_the_console_script_exits_2_without_a_traceback(tmp_path):
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchbalance.cli",
            "build-balanced-dataset",
            str(tmp_path / "x.yaml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert process.returncode == 2
    assert process.stderr.strip() == f"error: {tmp_path / 'x.yaml'}: configuration file not found"


def test_two_input_sources_are_an_error(project):
    _one_line_error(
        _run("build-balanced-dataset", project, "--set", "input.table=tiles"),
        "give exactly one source, not records_path and PostgreSQL (host/dsn/table)",
    )


@pytest.mark.parametrize(
    ("key", "extra"),
    [
        ("output.csv_path", []),
        ("output.summary_path", []),
        ("output.footprints_path", []),
        ("embeddings.parquet_path", ["--set", "mode=embeddings"]),
    ],
)
def test_an_output_target_that_is_a_folder_exits_2_before_any_stage(
    project, monkeypatch, key, extra
):
    import patchbalance.balancing.pipeline

    def no_stage(*args, **kwargs):
        raise AssertionError("a stage ran before the outputs were checked")

    monkeypatch.setattr(patchbalance.balancing.pipeline, "load_records", no_stage)
    # A footprints path must name its format, and a table path CSV or Parquet: the folder is
    # named like one.
    folder = project.parent / ("a_folder.csv" if key == "output.csv_path" else "a_folder.geojson")
    folder.mkdir()
    result = _run("build-balanced-dataset", project, "--set", f"{key}={folder}", *extra)
    _one_line_error(result, str(folder), "names a folder, not a file", key)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_output_under_proc_exits_2_before_any_stage_even_as_root(project, monkeypatch):
    # /proc refuses new files whatever its permission bits say, also to root: only a test
    # file finds that out.
    import patchbalance.balancing.pipeline

    monkeypatch.setattr(patchbalance.balancing.pipeline, "load_records", None)
    result = _run("build-balanced-dataset", project, "--set", "output.csv_path=/proc/table.csv")
    _one_line_error(result, "/proc/table.csv", "cannot write the balanced table", "in /proc")


def test_two_different_duplicated_keys_name_the_rows_of_the_first_and_count_the_keys(project):
    # Copies of rows 4 and 8 appended as rows 9 and 10: row 4 shares its key with row 9,
    # and row 8 with row 10, never row 4 with row 8.
    records = pd.read_csv(project.parent / "records.csv")
    pd.concat([records, records.iloc[[3, 7]]]).to_csv(project.parent / "records.csv", index=False)
    line = _one_line_error(
        _run("build-balanced-dataset", project),
        "duplicate patch key",
        "records.csv row 4 and",
        "records.csv row 9;",
        "2 key(s) occur more than once (4 rows in all)",
    )
    assert "row 8" not in line


def test_an_empty_offset_cell_says_empty_and_names_the_row(project):
    records = pd.read_csv(project.parent / "records.csv")
    records["row_off"] = records["row_off"].astype(object)
    records.loc[4, "row_off"] = None
    records.to_csv(project.parent / "records.csv", index=False)
    line = _one_line_error(
        _run("build-balanced-dataset", project), "records.csv row 5: row_off is empty"
    )
    assert "nan" not in line


def test_a_truncated_raster_warns_with_the_file_and_the_gdal_message(project):
    import json

    import rasterio

    from rasters import write_geotiff

    mask_path = project.parent / "masks" / "b.tif"
    with rasterio.open(mask_path) as dataset:
        mask = dataset.read(1)
    write_geotiff(mask_path, mask, nodata=255, block=16)
    data = mask_path.read_bytes()
    mask_path.write_bytes(data[: int(len(data) * 0.6)])  # the last tiles are cut off

    result = _run("build-balanced-dataset", project)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "could not be read" in line]
    assert len(warnings) == 1, result.stderr
    assert str(mask_path) in warnings[0] and "TIFF" in warnings[0], warnings[0]
    summary = json.loads((project.parent / "out" / "table.summary.json").read_text())
    assert summary["excluded_by_reason"]["read_error"] >= 1
    first = summary["first_window_error"]
    assert str(mask_path) in first and "TIFF" in first
    assert "See previous exception" not in first + warnings[0]
