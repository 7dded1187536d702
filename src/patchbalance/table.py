"""The patch table as every command reads it: boolean columns, row numbers, excluded rows.

One rule each, shared by `report`, `select-coreset`, the training dataset and its loader, so
that they never disagree about which rows a table excludes or which row a message names.

Row numbers in messages are the table's own data rows as a spreadsheet shows them: the first
row under the header is row 1. `row_numbers` and `rows_text` turn array positions into them.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from patchbalance.errors import InputError

log = logging.getLogger(__name__)

TRUE_WORDS = ("true", "t", "yes", "1", "1.0")
FALSE_WORDS = ("false", "f", "no", "0", "0.0")
BOOLEAN_RULE = "true/false, 1/0, yes/no or t/f"


def row_numbers(positions: np.ndarray) -> np.ndarray:
    """Return the 1-based data row numbers of 0-based table positions."""
    return np.asarray(positions, dtype=np.int64) + 1


def rows_text(positions: np.ndarray, shown: int = 5, numbered: bool = False) -> str:
    """Return "row 3" or "rows 3, 8 and 4 more" for 0-based positions (or 1-based `numbered`)."""
    numbers = np.asarray(positions, dtype=np.int64)
    numbers = numbers if numbered else row_numbers(numbers)
    listed = ", ".join(str(int(number)) for number in numbers[:shown])
    more = f" and {numbers.size - shown} more" if numbers.size > shown else ""
    return f"row{'s' if numbers.size > 1 else ''} {listed}{more}"


def _prefix(where: str | None) -> str:
    return f"{where}: " if where else ""


def boolean_column(table: pd.DataFrame, name: str, where: str | None = None) -> np.ndarray:
    """Return column `name` of `table` as a bool array.

    Accepts real booleans, the numbers 1 and 0, and (any case, spaces around ignored) the
    words of `TRUE_WORDS` and `FALSE_WORDS`. Anything else, an empty cell included, raises
    `InputError` naming `where` (the table's file), the column and the first such row.
    """
    column = table[name]
    if pd.api.types.is_bool_dtype(column.dtype) and not column.isna().any():
        return column.to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        true, valid = values == 1, (values == 1) | (values == 0)
    else:
        text = column.astype("string").str.strip().str.lower()
        true = text.isin(TRUE_WORDS).to_numpy(dtype=bool)
        valid = true | text.isin(FALSE_WORDS).to_numpy(dtype=bool)
    if not valid.all():
        _raise_not_boolean(column, name, np.flatnonzero(~valid), where)
    return np.asarray(true, dtype=bool)


def _raise_not_boolean(column: pd.Series, name: str, bad: np.ndarray, where: str | None) -> None:
    first = column.iloc[int(bad[0])]
    problem = "is empty" if pd.isna(first) or not str(first).strip() else f"holds {first!r}"
    count = f" ({bad.size} rows in all)" if bad.size > 1 else ""
    raise InputError(
        f"{_prefix(where)}column '{name}' {problem} in {rows_text(bad[:1])}{count}; "
        f"a true/false column takes {BOOLEAN_RULE}"
    )


def excluded_column(table: pd.DataFrame, where: str | None = None) -> np.ndarray | None:
    """Return the table's `excluded` column as bools, or None when the table has none."""
    return boolean_column(table, "excluded", where) if "excluded" in table.columns else None


def excluded_but_weighted(excluded: np.ndarray | None, weights: np.ndarray) -> np.ndarray:
    """Return which rows are marked excluded yet carry a sampler_weight above 0."""
    if excluded is None:
        return np.zeros(len(weights), dtype=bool)
    return np.asarray(excluded, dtype=bool) & (np.asarray(weights, dtype=np.float64) > 0)


def warn_excluded_but_weighted(rows: np.ndarray, where: str | None, consequence: str) -> None:
    """Log one warning counting the excluded rows with a weight > 0 (nothing when none)."""
    positions = np.flatnonzero(rows)
    if positions.size == 0:
        return
    log.warning(
        "%s%d row(s) are marked excluded but have sampler_weight > 0 (first: %s, e.g. a table "
        "edited by hand or merged from two runs); %s",
        _prefix(where),
        positions.size,
        rows_text(positions[:1]),
        consequence,
    )


def drawn_weights(
    weights: np.ndarray,
    excluded: np.ndarray | None,
    where: str | None = None,
    warn: bool = True,
) -> np.ndarray:
    """Return `weights` with excluded rows set to 0: an excluded row is never drawn.

    With `warn`, logs once how many excluded rows had a weight above 0.
    """
    weights = np.array(weights, dtype=np.float64)
    stray = excluded_but_weighted(excluded, weights)
    if warn:
        warn_excluded_but_weighted(stray, where, "they are treated as weight 0 and never drawn")
    weights[stray] = 0.0
    return weights
