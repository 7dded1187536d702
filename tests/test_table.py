"""The patch table's shared rules: one boolean rule, one row convention, excluded rows not drawn.

`report`, `select-coreset`, the training dataset and its loader read the same file the same
way (issue 13, cases 1, 8 and 9).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from patchbalance.cli import app
from patchbalance.coreset import select_coreset
from patchbalance.data import CSVWindowedSegmentationDataset, build_dataloader
from patchbalance.errors import InputError
from patchbalance.sampling.figures import figures_from_table
from patchbalance.table import boolean_column, read_table, rows_text

EXCLUDED = np.array([False, True, False, False, True, False])

ENCODINGS = {
    "bool": lambda flags: flags,
    "float": lambda flags: flags.astype(float),
    "int": lambda flags: flags.astype(int),
    "true/false": lambda flags: np.where(flags, "true", "false"),
    "1/0 text": lambda flags: np.where(flags, "1", "0"),
    "1.0/0.0 text": lambda flags: np.where(flags, "1.0", "0.0"),
    "yes/no": lambda flags: np.where(flags, "yes", "no"),
    "t/f": lambda flags: np.where(flags, "t", "f"),
    "TRUE/False": lambda flags: np.where(flags, " TRUE", "False "),
}


def balanced_table(excluded: np.ndarray = EXCLUDED) -> pd.DataFrame:
    """Return six patches of two classes; the excluded rows have weight 0."""
    n = len(excluded)
    px_1 = np.array([10, 80, 30, 50, 100, 20])[:n]
    return pd.DataFrame(
        {
            "image_path": "scene.tif",
            "mask_path": "scene_mask.tif",
            "row_off": np.arange(n) * 10,
            "col_off": 0,
            "patch_size": 10,
            "px_0": 100 - px_1,
            "px_1": px_1,
            "class_entropy": np.linspace(0.2, 0.7, n),
            "excluded": excluded,
            "exclusion_reason": np.where(excluded, "mask_border_nodata", ""),
            "has_low_entropy": False,
            "sampler_weight": np.where(excluded, 0.0, 1.0),
        }
    )


def _write(table: pd.DataFrame, tmp_path, name: str = "table.csv"):
    path = tmp_path / name
    if path.suffix == ".parquet":
        table.to_parquet(path, index=False)  # text stays text: "1.0" is not read as a number
    else:
        table.to_csv(path, index=False)
    return path


def _select_coreset_command(tmp_path, table_path):
    """Return the result of `patchbalance select-coreset` (lc, 4 patches) on `table_path`."""
    config = tmp_path / "coreset.yaml"
    config.write_text(
        "coreset:\n"
        f"  input_csv_path: {table_path.name}\n"
        "  output_csv_path: coreset.csv\n"
        "  method: lc\n"
        "  budget: 4\n"
        "  budget_mode: count\n",
        encoding="utf-8",
    )
    return CliRunner().invoke(app, ["select-coreset", str(config), "-q"])


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_report_coreset_and_dataset_exclude_the_same_rows(tmp_path, encoding):
    table = balanced_table()
    table["excluded"] = ENCODINGS[encoding](EXCLUDED)
    path = _write(table, tmp_path)
    read = read_table(path)

    figures = figures_from_table(read, where=str(path))
    assert figures.n_active == int((~EXCLUDED).sum())
    # Uniform share over the active rows only, computed by hand.
    active_px_1 = table.loc[~EXCLUDED, "px_1"].sum()
    assert figures.uniform_share[1] == pytest.approx(active_px_1 / (100 * (~EXCLUDED).sum()))

    out = select_coreset(read, {"method": "lc", "budget": 4, "budget_mode": "count"})
    np.testing.assert_array_equal(out["coreset_score"].notna().to_numpy(), ~EXCLUDED)

    dataset = CSVWindowedSegmentationDataset(path, n_classes=2)
    np.testing.assert_array_equal(dataset.excluded, EXCLUDED)
    kept = CSVWindowedSegmentationDataset(path, n_classes=2, drop_excluded=True)
    np.testing.assert_array_equal(kept.row_numbers, np.flatnonzero(~EXCLUDED) + 1)


@pytest.mark.parametrize("bad", ["maybe", "", "2"])
def test_a_value_outside_the_boolean_rule_is_an_error_naming_column_and_row(tmp_path, bad):
    table = balanced_table()
    table["excluded"] = np.where(EXCLUDED, "true", "false").astype(object)
    table.loc[2, "excluded"] = bad  # data row 3 of the file
    path = _write(table, tmp_path)
    read = read_table(path)
    problem = "is empty" if bad == "" else f"holds '{bad}'"
    message = rf"table\.csv: column 'excluded' {problem} in row 3;"
    with pytest.raises(InputError, match=message):
        figures_from_table(read, where=str(path))
    with pytest.raises(InputError, match=message):
        from patchbalance.coreset.pool import pool_mask

        pool_mask(read, True, str(path))
    with pytest.raises(InputError, match=r"column 'excluded' .* in row 3;"):
        select_coreset(read, {"method": "lc", "budget": 4, "budget_mode": "count"})
    with pytest.raises(InputError, match=message):
        CSVWindowedSegmentationDataset(path, n_classes=2)
    for result in (
        CliRunner().invoke(app, ["report", str(path)]),
        _select_coreset_command(tmp_path, path),
    ):
        line = _one_error_line(result)
        assert "table.csv: column 'excluded'" in line and "row 3" in line, line


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_report_select_coreset_and_dataset_commands_read_the_boolean_rule_alike(
    tmp_path, encoding, suffix
):
    table = balanced_table()
    table["excluded"] = ENCODINGS[encoding](EXCLUDED)
    path = _write(table, tmp_path, f"table{suffix}")
    n_active = int((~EXCLUDED).sum())

    report = CliRunner().invoke(app, ["report", str(path)])
    assert report.exit_code == 0, report.output
    assert f"of {n_active} active" in report.stdout, report.stdout

    coreset = _select_coreset_command(tmp_path, path)
    assert coreset.exit_code == 0, coreset.output
    out = pd.read_csv(tmp_path / "coreset.csv")
    np.testing.assert_array_equal(out["coreset_score"].notna().to_numpy(), ~EXCLUDED)
    assert not out.loc[EXCLUDED, "coreset_selected"].any()

    dataset = CSVWindowedSegmentationDataset(path, n_classes=2)
    np.testing.assert_array_equal(dataset.excluded, EXCLUDED)
    kept = CSVWindowedSegmentationDataset(path, n_classes=2, drop_excluded=True)
    np.testing.assert_array_equal(kept.row_numbers, np.flatnonzero(~EXCLUDED) + 1)


@pytest.mark.parametrize("bad", ["maybe", "2", "1.5", "ja"])
def test_the_three_commands_reject_the_same_value_outside_the_boolean_rule(tmp_path, bad):
    table = balanced_table()
    table["excluded"] = np.where(EXCLUDED, "yes", "no").astype(object)
    table.loc[4, "excluded"] = bad  # data row 5 of the file
    path = _write(table, tmp_path, "table.parquet")
    for result in (
        CliRunner().invoke(app, ["report", str(path)]),
        _select_coreset_command(tmp_path, path),
    ):
        line = _one_error_line(result)
        assert f"table.parquet: column 'excluded' holds '{bad}' in row 5;" in line, line
    with pytest.raises(
        InputError, match=rf"table\.parquet: column 'excluded' holds '{bad}' in row 5;"
    ):
        CSVWindowedSegmentationDataset(path, n_classes=2)


def test_boolean_rule_accepts_real_bools_numbers_and_words_in_any_case():
    frame = pd.DataFrame(
        {
            "words": ["True", "FALSE", " yes", "No", "t", "F", "1", "0", "1.0", "0.0"],
            "numbers": [1.0, 0.0, 1, 0, 1, 0, 1, 0, 1, 0],
            "nullable": pd.array([True, False] * 5, dtype="boolean"),
        }
    )
    expected = np.array([True, False] * 5)
    for name in frame.columns:
        np.testing.assert_array_equal(boolean_column(frame, name), expected)
    with pytest.raises(InputError, match=r"column 'numbers' is empty in row 2 \(2 rows in all\)"):
        boolean_column(frame.assign(numbers=[1, np.nan, 0, np.nan, 1, 0, 1, 0, 1, 0]), "numbers")


def test_rows_are_named_from_1_like_a_spreadsheet():
    assert rows_text(np.array([0])) == "row 1"
    assert rows_text(np.arange(7)) == "rows 1, 2, 3, 4, 5 and 2 more"
    assert rows_text(np.array([4, 9]), numbered=True) == "rows 4, 9"


def test_report_and_the_training_loader_name_the_same_rows_for_bad_weights(tmp_path):
    table = balanced_table()
    table.loc[[2, 5], "sampler_weight"] = np.nan
    path = _write(table, tmp_path)
    with pytest.raises(InputError, match=r"\(rows 3, 6\)"):
        figures_from_table(read_table(path), where=str(path))
    dataset = CSVWindowedSegmentationDataset(path, n_classes=2)
    with pytest.raises(InputError, match=r"\(rows 3, 6\)"):
        build_dataloader(dataset, {"weighted_sampler": True}, batch_size=2)


STRAY = "marked excluded but have sampler_weight > 0"


def _stray_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if STRAY in r.getMessage()]


def test_excluded_rows_with_a_weight_are_never_drawn_and_each_command_warns_once(tmp_path, caplog):
    table = balanced_table()
    table.loc[EXCLUDED, "sampler_weight"] = 5.0  # edited by hand: rows 2 and 5
    path = _write(table, tmp_path)
    read = read_table(path)
    caplog.set_level(logging.WARNING)

    figures = figures_from_table(read, where=str(path))
    (warning,) = _stray_warnings(caplog)
    assert "2 row(s)" in warning and "first: row 2" in warning and str(path) in warning
    reference = figures_from_table(balanced_table())  # the same table with weight 0 there
    np.testing.assert_allclose(figures.weighted_share, reference.weighted_share)
    assert figures.ess == pytest.approx(reference.ess)
    assert figures.max_expected_repeats == pytest.approx(reference.max_expected_repeats)

    caplog.clear()
    out = select_coreset(read, {"method": "lc", "budget": 4, "budget_mode": "count"})
    assert len(_stray_warnings(caplog)) == 1
    assert not out.loc[EXCLUDED, "coreset_selected"].any()
    assert (out.loc[EXCLUDED, "sampler_weight"] == 0).all()

    caplog.clear()
    dataset = CSVWindowedSegmentationDataset(path, n_classes=2)
    loader = build_dataloader(dataset, {"weighted_sampler": True}, batch_size=2, seed=0)
    assert len(_stray_warnings(caplog)) == 1
    np.testing.assert_array_equal(np.asarray(loader.sampler.weights)[EXCLUDED], 0.0)
    drawn = np.concatenate([list(loader.sampler) for _ in range(20)])
    assert not np.isin(drawn, np.flatnonzero(EXCLUDED)).any()


def test_report_command_warns_once_about_excluded_rows_with_a_weight(tmp_path):
    pytest.importorskip("matplotlib")
    table = balanced_table()
    table.loc[EXCLUDED, "sampler_weight"] = 5.0
    path = _write(table, tmp_path)
    result = CliRunner().invoke(app, ["report", str(path), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert result.stderr.count(STRAY) == 1, result.stderr
    assert "4 active" in result.stdout
