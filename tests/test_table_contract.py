"""The balanced table's one set of rules, read the same way by `report`, `train` and `compare`
(docs/bad-input.md, round four, B4)."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from compare_fixtures import EXAMPLES, error_line
from data_fixtures import write_training_tables
from patchbalance.cli import app
from patchbalance.compare.command import _drawable
from patchbalance.errors import InputError
from patchbalance.table import (
    boolean_column,
    class_column,
    class_columns,
    dataset_excluded,
)
from patchbalance.train.loss import dataset_class_counts
from patchbalance.train.metrics import class_log_prior_ratio

runner = CliRunner()

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "patchbalance"
# The module that owns the balanced table's column names; every other module asks it.
OWNER = PACKAGE / "table.py"
COLUMN_NAMES = ("sampler_weight", "excluded")
CLASS_PREFIX = "px_"


def column_literals(source: str) -> list[tuple[int, str]]:
    """Return (line, text) of each string constant in `source` that spells a column name.

    A column name is "sampler_weight", "excluded" or any text starting "px_"; the constant
    parts of f-strings count (`f"px_{value}"` holds "px_"). Prose that mentions a column
    inside a longer message is not a column name.
    """
    return sorted(
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and (node.value in COLUMN_NAMES or node.value.startswith(CLASS_PREFIX))
    )


def test_only_the_table_module_spells_the_balanced_table_column_names():
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {text!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != OWNER
        for line, text in column_literals(path.read_text())
    ]
    assert found == [], "ask patchbalance.table for the column names:\n" + "\n".join(found)
    # The owner spells each of them, so the scan above looks for the right texts.
    assert {text for _, text in column_literals(OWNER.read_text())} >= {*COLUMN_NAMES, "px_"}


def test_the_column_name_scan_finds_a_literal_planted_in_another_module():
    planted = (
        "def read(table, value):\n"
        '    table["excluded"] = False\n'
        '    return table[f"px_{value}"], table.get("sampler_weight"), table["px_3"]\n'
    )
    assert column_literals(planted) == [
        (2, "excluded"),
        (3, "px_"),
        (3, "px_3"),
        (3, "sampler_weight"),
    ]
    prose = '"""The px_<class> columns."""\nhint = f"no sampler_weight column in {path}"\n'
    assert column_literals(prose) == []


def test_a_class_column_name_reads_back_as_its_class_value():
    names = [class_column(value) for value in (12, -1, 0)]
    assert names == ["px_12", "px_-1", "px_0"]
    assert class_columns(pd.DataFrame(columns=names)) == (["px_-1", "px_0", "px_12"], [-1, 0, 12])


def test_a_dataset_that_is_not_ours_has_no_excluded_rows():
    assert dataset_excluded(SimpleNamespace()) is None
    marked = np.array([False, True])
    assert dataset_excluded(SimpleNamespace(excluded=marked)) is marked


@pytest.mark.parametrize(("value", "shown"), [(2, "2"), (0.5, "0.5"), (-1, "-1")])
def test_a_number_other_than_0_or_1_in_excluded_is_an_error_naming_the_cell(value, shown):
    frame = pd.DataFrame({"excluded": [0, 1, value, 0]})
    with pytest.raises(InputError) as error:
        boolean_column(frame, "excluded", "t.csv")
    message = str(error.value)
    assert f"t.csv: column 'excluded' holds {shown}" in message and "in row 3" in message
    assert "np." not in message
    # 1 and 0 (also as floats) are the true and false of a numeric column.
    got = boolean_column(pd.DataFrame({"excluded": [1.0, 0.0, 1.0]}), "excluded")
    np.testing.assert_array_equal(got, [True, False, True])


@pytest.fixture(scope="module")
def counted_tables(tmp_path_factory):
    """The training tables of the data fixtures, with whole px_ counts in every row."""
    folder = tmp_path_factory.mktemp("contract")
    train_table, val_table = write_training_tables(folder)
    frame = pd.read_csv(train_table)
    for c in range(4):
        frame[f"px_{c}"] = 100 * (c + 1) + np.arange(len(frame))
    frame.to_csv(train_table, index=False)
    return train_table, val_table, frame


def train_yaml(folder: Path, train_table: Path, val_table: Path) -> Path:
    """Write the example comparison's train config over the given tables, class weights on."""
    config = yaml.safe_load((EXAMPLES / "compare_train.yaml").read_text())
    config["train_dataset"]["input_csv_path"] = str(train_table)
    config["val_dataset"]["input_csv_path"] = str(val_table)
    config["loss"]["class_weights"] = "inverse_frequency"
    config.update(
        output_dir=str(folder / "out"),
        hyperparameters={"batch_size": 2, "max_steps": 1, "lr": 0.001},
    )
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("cell", "problem"), [("lots", "holds 'lots'"), (-5000, "holds -5000"), ("", "is empty")]
)
def test_train_refuses_a_pixel_count_that_report_refuses_naming_row_and_column(
    tmp_path, counted_tables, cell, problem
):
    train_table, val_table, frame = counted_tables
    frame = frame.astype({"px_3": object})
    frame.loc[4, "px_3"] = cell  # row 5 as a spreadsheet shows it; not an excluded row
    table = tmp_path / "train.csv"
    frame.to_csv(table, index=False)
    before = table.read_bytes()

    trained = runner.invoke(
        app, ["train", str(train_yaml(tmp_path, table, val_table)), "--dry-run"]
    )
    reported = runner.invoke(app, ["report", str(table), "--out", str(tmp_path / "r.html")])

    for result in (trained, reported):
        assert result.exit_code == 2, result.output
        line = error_line(result)
        assert f"column 'px_3' {problem} in row 5" in line and str(table) in line, line
    assert table.read_bytes() == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.html").exists()


def hand_dataset(tmp_path: Path, rows: list[int] | None) -> SimpleNamespace:
    """A dataset over a 3-row table that keeps `rows` (1-based), as n_first_rows_to_read does."""
    table = pd.DataFrame(
        {
            "px_0": [100, 60, 10],
            "px_2": [0, 40, 990],
            "excluded": ["no", "no", "no"],
            "sampler_weight": [0.5, 1.5, 1.0],
        }
    )
    table.to_csv(tmp_path / "t.csv", index=False)
    numbers = None if rows is None else np.asarray(rows)
    return SimpleNamespace(
        input_csv_path=tmp_path / "t.csv", class_values=[0, 2], row_numbers=numbers, excluded=None
    )


def test_the_prior_correction_uses_the_rows_the_dataset_kept_as_the_loss_does(tmp_path):
    kept = hand_dataset(tmp_path, [1, 2])
    # Kept rows only: uniform shares (160, 40) / 200 = (0.8, 0.2); under the weights (0.5, 1.5):
    # (50 + 90, 60) / 200 = (0.7, 0.3). Row 3 (990 pixels of class 2) is not read.
    np.testing.assert_allclose(
        class_log_prior_ratio(kept, 2, weighted=True), [np.log(0.8 / 0.7), np.log(0.2 / 0.3)]
    )
    np.testing.assert_array_equal(dataset_class_counts(kept, 2), [[100, 0], [60, 40]])
    whole = class_log_prior_ratio(hand_dataset(tmp_path, None), 2, weighted=True)
    assert not np.allclose(whole, [np.log(0.8 / 0.7), np.log(0.2 / 0.3)])


def test_a_bad_count_outside_the_kept_rows_is_not_read_and_inside_is_named_by_its_file_row(
    tmp_path,
):
    dataset = hand_dataset(tmp_path, [2, 3])
    table = pd.read_csv(dataset.input_csv_path).astype({"px_2": object})
    table.loc[0, "px_2"] = "lots"  # row 1: not kept
    table.to_csv(dataset.input_csv_path, index=False)
    assert dataset_class_counts(dataset, 2).tolist() == [[60, 40], [10, 990]]
    class_log_prior_ratio(dataset, 2, weighted=True)
    table.loc[2, "px_2"] = -3  # row 3: kept, second of the dataset's rows
    table.to_csv(dataset.input_csv_path, index=False)
    for read in (
        lambda: dataset_class_counts(dataset, 2),
        lambda: class_log_prior_ratio(dataset, 2, True),
    ):
        with pytest.raises(InputError, match=r"column 'px_2' holds '?-3'? in row 3;"):
            read()


def test_compare_reads_excluded_by_the_one_boolean_rule(tmp_path):
    frame = pd.DataFrame(
        {"px_0": [1, 2, 3], "sampler_weight": [1.0, 2.0, 3.0], "excluded": ["no", "yes", "No"]}
    )
    frame.to_csv(tmp_path / "t.csv", index=False)
    # "no" is not excluded (astype(bool) would read any non-empty text as true).
    assert _drawable(SimpleNamespace(path=tmp_path / "t.csv")) == 2
    frame["excluded"] = ["no", "maybe", "no"]
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match=r"column 'excluded' holds 'maybe' in row 2"):
        _drawable(SimpleNamespace(path=tmp_path / "t.csv"))
