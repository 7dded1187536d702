"""The balanced table as its consumers read it: one reader, one set of checked arrays.

`build-balanced-dataset` writes the table (SPEC §4); `report`, `select-coreset`, the training
dataset and its loader, `train`'s plan and the TorchGeo sampler read it. They all read it here,
so that they agree on which rows can be drawn, what a valid weight is, which class columns the
table has and how a message numbers a row:

- `check_weights`: the one rule for weights that drive a sampler (finite, >= 0, not all 0);
- `BalancedTable`: the table with its drawn weights (an `excluded` row is never drawn, whatever
  its `sampler_weight`), the pixel-count matrix with its class values, the footprints with
  their CRS, and 1-based row labels for messages;
- `read_balanced_table`: a DataFrame or a CSV/Parquet path in, a `BalancedTable` out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbalance.atomic import file_sha256
from patchbalance.errors import InputError
from patchbalance.paths import default_summary_path, same_file
from patchbalance.table import (
    CRS_COLUMN,
    EXCLUDED,
    FOOTPRINT_BOUNDS,
    SAMPLER_WEIGHT,
    class_columns,
    class_counts,
    drawn_weights,
    excluded_column,
    read_table,
    row_numbers,
    rows_text,
    separator_hint,
    table_columns,
)


def check_weights(
    weights: Any,
    what: str = SAMPLER_WEIGHT,
    rows: np.ndarray | None = None,
    all_zero_hint: str = "check the exclusion settings of the build that wrote the table",
) -> np.ndarray:
    """Return `weights` as a float64 array after checking that they can drive a sampler.

    Args:
        weights: one weight per row.
        what: names the weights in messages (with the table's file when known).
        rows: the table's own 1-based row of each weight (e.g. those left after dropping
            some); default: weight i is row i + 1.
        all_zero_hint: what the all-zero message tells the user to do.

    Returns:
        The weights as float64. Raises `InputError` naming the first offending rows when a
        weight is NaN, infinite or negative, or when every weight is 0.
    """
    array = _finite_and_not_negative(weights, what, rows)
    if not (array > 0).any():
        raise InputError(
            f"{what} is 0 in all {array.size} rows, so there is nothing to draw; {all_zero_hint}"
        )
    return array


def _finite_and_not_negative(weights: Any, what: str, rows: np.ndarray | None) -> np.ndarray:
    array = np.asarray(weights, dtype=np.float64)
    if array.ndim != 1:
        raise InputError(
            f"{what}: expected one weight per row, got an array of shape {array.shape}"
        )
    if array.size == 0:
        raise InputError(f"{what}: the table has no rows to sample from")
    for name, bad in (
        ("NaN", np.isnan(array)),
        ("infinite", np.isinf(array)),
        ("negative", array < 0),
    ):
        if bad.any():
            positions = np.flatnonzero(bad)
            numbers = row_numbers(positions) if rows is None else np.asarray(rows)[positions]
            raise InputError(
                f"{what} is {name} in {numbers.size} row(s) "
                f"({rows_text(numbers, numbered=True)}); weights must be finite and >= 0: "
                "rebuild the table with build-balanced-dataset"
            )
    return array


@dataclass
class BalancedTable:
    """A balanced table and the arrays every consumer reads from it.

    Attributes:
        frame: the table, index reset to 0..N-1.
        where: the table's file (or None for a DataFrame) for messages.
        excluded: (N,) bool, or None when the table has no `excluded` column.
        labels: (N,) the 1-based row number of each row, as a spreadsheet shows it.
    """

    frame: pd.DataFrame
    where: str | None = None
    excluded: np.ndarray | None = None
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def prefix(self) -> str:
        """Return "FILE: " for messages, or "" for a DataFrame."""
        return f"{self.where}: " if self.where else ""

    @property
    def what(self) -> str:
        """Return how messages name the weight column ("FILE: sampler_weight")."""
        return f"{self.prefix}{SAMPLER_WEIGHT}"

    def stored_weights(self) -> np.ndarray:
        """Return the `sampler_weight` column as float64 (NaN where a cell is not a number)."""
        if SAMPLER_WEIGHT not in self.frame.columns:
            raise InputError(
                f"{self.prefix}the table has no {SAMPLER_WEIGHT} column; build it with "
                f"build-balanced-dataset{separator_hint(list(self.frame.columns))}"
            )
        return pd.to_numeric(self.frame[SAMPLER_WEIGHT], errors="coerce").to_numpy(dtype=np.float64)

    def check_weights_in(self, rows: np.ndarray) -> None:
        """Raise `InputError` naming the table rows among `rows` (a mask) whose weight is NaN,
        infinite or negative."""
        if rows.any():
            _finite_and_not_negative(self.stored_weights()[rows], self.what, self.labels[rows])

    def drawn_weights(self, warn: bool = True) -> np.ndarray:
        """Return the checked weight each row is drawn with: excluded rows get 0.

        Raises `InputError` (naming the rows) for NaN, infinite or negative weights, or
        when no row can be drawn. With `warn`, one warning counts the excluded rows whose
        stored weight was above 0.
        """
        stored = _finite_and_not_negative(self.stored_weights(), self.what, self.labels)
        return check_weights(drawn_weights(stored, self.excluded, self.where, warn), self.what)

    def active(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Return which rows are active: not `excluded` (weight > 0 without the column)."""
        if self.excluded is not None:
            return ~self.excluded
        return (self.drawn_weights(warn=False) if weights is None else weights) > 0

    def class_counts(self) -> tuple[np.ndarray, list[int]]:
        """Return the (N, C) pixel counts of the `px_<value>` columns and the class values.

        Raises `InputError` when the table has no such column, or when an active row holds
        a count that is not a whole number >= 0 (text, empty, negative, fractional:
        `table.class_counts`).
        """
        columns, values = class_columns(self.frame)
        if not columns:
            raise InputError(
                f"{self.prefix}the table has no px_<class> columns of class pixel counts; "
                "build it with build-balanced-dataset"
            )
        rows = ~self.excluded if self.excluded is not None else np.ones(len(self.frame), bool)
        return class_counts(self.frame, columns, rows, self.where, self.labels), values

    def footprints(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (N, 4) window bounds xmin, ymin, xmax, ymax and (N,) CRS texts ("" for none)."""
        missing = [c for c in (*FOOTPRINT_BOUNDS, CRS_COLUMN) if c not in self.frame.columns]
        if missing:
            raise InputError(
                f"{self.prefix}the table lacks the column(s) {', '.join(missing)}; a balanced "
                "table written by build-balanced-dataset has them"
            )
        bounds = self.frame[list(FOOTPRINT_BOUNDS)].to_numpy(dtype=np.float64, na_value=np.nan)
        crs = self.frame[CRS_COLUMN].fillna("").astype(str).to_numpy()
        return bounds, crs

    def label(self, position: int) -> str:
        """Return "row 12 (IMAGE at row_off R, col_off C)" for a 0-based position."""
        text = f"row {int(self.labels[position])}"
        if {"image_path", "row_off", "col_off"} <= set(self.frame.columns):
            row = self.frame.iloc[position]
            text += f" ({row['image_path']} at row_off {row['row_off']}, col_off {row['col_off']})"
        return text


def read_balanced_table(
    source: pd.DataFrame | str | Path,
    where: str | None = None,
    columns: list[str] | None = None,
    rows: np.ndarray | None = None,
) -> BalancedTable:
    """Return the `BalancedTable` of a DataFrame, or of the CSV or Parquet file at `source`.

    Args:
        source: the table, or its path.
        where: names the table in messages (default: the path; none for a DataFrame).
        columns: read only these columns of a file (`excluded` and `sampler_weight` are
            added when present).
        rows: keep only these rows, by their 1-based numbers (the rows a training dataset
            kept: `n_first_rows_to_read`, `drop_excluded`); messages keep those numbers.

    Returns:
        The table with its `excluded` column read as booleans (InputError naming the row of
        a cell that is not a boolean).
    """
    if isinstance(source, pd.DataFrame):
        frame = source.reset_index(drop=True)
    else:
        where = where or str(source)
        if columns is not None:
            present = table_columns(Path(source), "balanced table")
            columns = [*columns, *(c for c in (EXCLUDED, SAMPLER_WEIGHT) if c in present)]
            columns = list(dict.fromkeys(columns))
        frame = read_table(Path(source), columns=columns, what="balanced table")
    labels = row_numbers(np.arange(len(frame)))
    if rows is not None:
        labels = np.asarray(rows, dtype=np.int64)
        frame = frame.iloc[labels - 1].reset_index(drop=True)
    if len(frame) == 0:
        raise InputError(
            f"{where + ': ' if where else ''}the table has no rows (only its header); nothing "
            "to read"
        )
    return BalancedTable(
        frame=frame,
        where=where,
        excluded=excluded_column(frame, where),
        labels=labels,
    )


def summary_disagreement(table_path: str | os.PathLike[str]) -> str | None:
    """Return a warning when the summary beside a table records another SHA-256 for it.

    The summary is `<stem>.summary.json` next to the table; it names the table's SHA-256
    (`output_sha256.table`) when the table was written with it, as one set. A table that does
    not match was written by another run, or a build was killed while moving its outputs into
    place. No summary, or one without the hash, says nothing.
    """
    table_path = Path(table_path)
    summary_path = default_summary_path(table_path)
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        recorded = summary["output_sha256"]["table"]
        written = Path(summary["outputs"]["table"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not same_file(written, table_path) or file_sha256(table_path) == recorded:
        return None
    return (
        f"{table_path.name} is not the table its summary {summary_path.name} describes (their "
        "SHA-256 differ): another run wrote one of them, or a build was interrupted; rerun the "
        "build for a matching set"
    )
