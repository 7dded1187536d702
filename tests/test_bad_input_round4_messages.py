"""Round four of bad input, messages: duplicate YAML keys, compare's classes, keys as written."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cli_checks import one_line_error, run_cli, snapshot
from compare_fixtures import tiny_configs
from data_fixtures import write_train_config, write_training_tables
from patchbalance.demo import write_demo_dataset
from rasters import write_two_pairs_and_records


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    """Two pairs and records.csv (classes 0, 1, 2); returns the folder."""
    folder = tmp_path_factory.mktemp("records")
    write_two_pairs_and_records(folder, seed=0, n_classes=3, size=32, zero_top=False)
    return folder


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


BUILD_TEXT = """\
balanced_dataset:
  input:
    records_path: records.csv
  clustering:
    k_min: 2
    k_max: 3
  output:
    csv_path: out/balanced.csv
"""


def _build(folder: Path, text: str = BUILD_TEXT, name: str = "build.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# YAML keys given twice (WEAK 8)


def test_a_key_given_twice_in_a_build_config_names_the_key_and_both_lines(records):
    config = _build(records, BUILD_TEXT + "  clustering:\n    k_max: 5\n", "twice.yaml")
    for dry_run in ([], ["--dry-run"]):
        one_line_error(
            run_cli("build-balanced-dataset", config, *dry_run),
            str(config),
            "duplicate key 'clustering' at line 9 (first given at line 4)",
        )
    assert not (records / "out").exists()


def test_two_compare_arms_of_one_name_are_refused(tmp_path, demo):
    config = tiny_configs(tmp_path, demo)
    text = config.read_text().replace(
        "  arms:\n", "  arms:\n    rank_max:\n      build: {sampling_method: inverse_frequency}\n"
    )
    config.write_text(text)
    line = one_line_error(run_cli("compare", config, "--dry-run"), str(config))
    assert "duplicate key 'rank_max'" in line
    assert not (tmp_path / "out").exists()


def test_a_key_given_twice_in_a_train_config_is_refused(tmp_path):
    train_table, val_table = write_training_tables(tmp_path)
    config = tmp_path / "train.yaml"
    config.write_text(
        f"train_dataset:\n  input_csv_path: {train_table}\n  n_classes: 4\n"
        f"val_dataset:\n  input_csv_path: {val_table}\nseed: 1\nseed: 2\n"
    )
    one_line_error(
        run_cli("train", config, "--dry-run"),
        str(config),
        "duplicate key 'seed' at line 7 (first given at line 6)",
    )


# --------------------------------------------------------------------------------------------
# compare's classes and files (WEAK 12)


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ({"class_names": {7: "ghost"}}, "class_names names class 7"),
        ({"catch_all": [0, 9]}, "catch_all names class 9"),
        ({"classes_of_interest": [3, 12]}, "classes_of_interest names class 12"),
        ({"classes_of_interest": []}, "'classes_of_interest': is empty"),
    ],
)
def test_compare_refuses_classes_the_data_cannot_have_before_any_build(
    tmp_path, demo, setting, fragment
):
    config = tiny_configs(tmp_path, demo, **setting)
    for dry_run in (["--dry-run"], []):
        one_line_error(run_cli("compare", config, *dry_run), str(config), fragment)
    assert not (tmp_path / "out").exists()


def test_a_file_without_a_compare_block_says_so(tmp_path, demo):
    one_line_error(
        run_cli("compare", demo["config"]),
        str(demo["config"]),
        "no 'compare:' block (found 'balanced_dataset')",
    )


def test_a_build_that_names_a_folder_says_it_is_a_folder(tmp_path, demo):
    config = tiny_configs(tmp_path, demo, build=str(tmp_path))
    one_line_error(run_cli("compare", config, "--dry-run"), f"{tmp_path} is a folder", "'build:'")


# --------------------------------------------------------------------------------------------
# Keys named as the user wrote them (WEAK 16)


def test_geojson_path_null_unsets_its_synonym_and_errors_name_it(records):
    text = BUILD_TEXT + "    footprints_path: out/f.geojson\n"
    config = _build(records, text, "footprints.yaml")
    plan = run_cli("build-balanced-dataset", config, "--dry-run")
    assert plan.exit_code == 0 and "f.geojson" in plan.stdout, plan.output
    unset = run_cli(
        "build-balanced-dataset", config, "--dry-run", "--set", "output.geojson_path=null"
    )
    assert unset.exit_code == 0, unset.output
    assert "geojson" not in unset.stdout
    line = one_line_error(
        run_cli(
            "build-balanced-dataset",
            _build(
                records,
                BUILD_TEXT.replace(
                    "csv_path: out/balanced.csv", "csv_path: out/b.csv\n    geojson_path: out/f.txt"
                ),
                "named.yaml",
            ),
        ),  # fmt: skip
        "'output.geojson_path'",
        "must end in",
    )
    assert "footprints_path" not in line


def test_prior_correction_errors_name_no_union_member(tmp_path):
    config = write_train_config(tmp_path, device="cpu", prior_correction="strong")
    line = one_line_error(run_cli("train", config, "--dry-run"), "'prior_correction'")
    assert "prior_correction." not in line and "more problem" not in line


def test_an_accelerator_without_cuda_is_named_as_written(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    config = write_train_config(tmp_path, hyperparameters={"accelerator": "gpu"})
    line = one_line_error(run_cli("train", config, "--dry-run"), "hyperparameters.accelerator: gpu")
    assert "device" not in line


def test_clustering_classes_no_patch_holds_are_named(records, caplog):
    config = _build(records)
    before = snapshot(records)
    one_line_error(
        run_cli("build-balanced-dataset", config, "--set", "clustering.classes=[7]"),
        "clustering.classes lists 7",
        "no patch holds",
    )
    assert snapshot(records) == before
    with caplog.at_level(logging.WARNING):
        result = run_cli(
            "build-balanced-dataset", config, "-q", "--set", "clustering.classes=[0,1,2,7]"
        )
    assert result.exit_code == 0, result.output
    assert "clustering.classes lists 7, which no patch holds" in result.stderr


def test_an_unresolvable_interpolation_names_the_key_holding_it(records):
    config = _build(records, BUILD_TEXT.replace("k_max: 3", "k_max: ${oc.env:PB_TEST_UNSET_K}"))
    one_line_error(
        run_cli("build-balanced-dataset", config, "--dry-run"),
        "'clustering.k_max'",
        "PB_TEST_UNSET_K",
    )
