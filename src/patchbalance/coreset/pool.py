"""The CoreSet pool (SPEC §6): which rows may be selected, their classes, and the budget.

The pool is the table's rows that are not excluded (and, by default, not low-entropy); the
budget says how many of them the CoreSet takes.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

import patchbalance.coreset.scorers as scorers
from patchbalance.balanced_table import read_balanced_table
from patchbalance.errors import ConfigError, InputError
from patchbalance.table import (
    EXCLUDED,
    FOOTPRINT_BOUNDS,
    KEY_COLUMNS,
    SAMPLER_WEIGHT,
    boolean_column,
    class_columns,
    excluded_but_weighted,
    shared_keys_text,
    warn_excluded_but_weighted,
)

TILE_COLUMNS = FOOTPRINT_BOUNDS


def pool_mask(
    table: pd.DataFrame, exclude_low_entropy: bool, where: str | None = None
) -> tuple[np.ndarray, dict[str, int]]:
    """Return which rows form the pool, and how many rows were left out and why.

    The pool is the rows that are not `excluded` and, with `exclude_low_entropy`, not
    `has_low_entropy`. Without `exclude_low_entropy`, a row whose only exclusion reason is
    `low_entropy` comes back into the pool: that is what the switch is for. Excluded rows left
    out of the pool are never drawn, whatever their input weight; one warning counts those
    whose `sampler_weight` is above 0. `where` names the table in messages.
    """
    n = len(table)
    balanced = read_balanced_table(table, where)
    excluded = np.zeros(n, bool) if balanced.excluded is None else balanced.excluded
    low = (
        boolean_column(table, "has_low_entropy", where)
        if "has_low_entropy" in table
        else np.zeros(n, bool)
    )
    if not exclude_low_entropy and "exclusion_reason" in table:
        only_low = table["exclusion_reason"].fillna("").astype(str).str.strip() == "low_entropy"
        excluded = excluded & ~only_low.to_numpy()
    left_out_low = (low & ~excluded) if exclude_low_entropy else np.zeros(n, bool)
    pool = ~excluded & ~left_out_low
    if SAMPLER_WEIGHT in table:
        # Every method, not only `keep`: a NaN or negative weight in an active row is a broken
        # table, named by the table's own row.
        balanced.check_weights_in(pool)
        warn_excluded_but_weighted(
            excluded_but_weighted(excluded, balanced.stored_weights()),
            where,
            "they are left out of the CoreSet pool and get weight 0",
        )
    return pool, {EXCLUDED: int(excluded.sum()), "low_entropy": int(left_out_low.sum())}


def check_key_columns(table: pd.DataFrame, what: str) -> None:
    """Raise InputError naming the patch-key columns that `table` lacks."""
    missing = [name for name in KEY_COLUMNS if name not in table.columns]
    if missing:
        raise InputError(
            f"{what}: missing the patch key column(s) {', '.join(missing)}; CoreSet selection "
            "needs image_path, row_off, col_off and patch_size (the build writes them)"
        )


def check_unique_keys(
    keys: pd.DataFrame,
    what: str,
    fix: str = "each patch may appear once",
    rows: np.ndarray | None = None,
) -> None:
    """Raise InputError when a patch key occurs more than once, counting and naming one.

    `rows` holds the 1-based row of each key in the file `what` names (default: position + 1).
    """
    shared = shared_keys_text(keys, rows)
    if shared:
        raise InputError(f"{what}: {shared}; {fix}")


def class_matrix(table: pd.DataFrame) -> tuple[np.ndarray, list[int], bool]:
    """Return per-row class amounts (N, C), the class values, and whether they are pixel counts.

    Pixel counts come from the `px_<value>` columns; without them, proportions come from
    `class_dist_json` (the upstream table's form).
    """
    if class_columns(table)[0]:
        counts, values = read_balanced_table(table).class_counts()
        return counts, values, True
    if "class_dist_json" not in table.columns:
        raise InputError(
            "the table has neither px_<class> pixel-count columns nor class_dist_json; build "
            "it with build-balanced-dataset"
        )
    texts = table["class_dist_json"].fillna("{}").astype(str)
    try:
        # Text per row by definition: parsing is the one per-row step, then all is arrays.
        parsed = [json.loads(text) if text.strip() else {} for text in texts]
    except json.JSONDecodeError as exc:
        raise InputError(f"class_dist_json is not valid JSON: {exc}") from exc
    frame = pd.DataFrame.from_records(parsed).fillna(0.0)
    try:
        values = sorted(int(float(name)) for name in frame.columns)
    except ValueError as exc:
        raise InputError(f"class_dist_json has a class key that is not a number: {exc}") from exc
    frame.columns = [int(float(name)) for name in frame.columns]
    matrix = frame.reindex(columns=values, fill_value=0.0).to_numpy(dtype=np.float64)
    return matrix, values, False


def spatial_coordinates(table: pd.DataFrame, option: str) -> np.ndarray:
    """Return each row's window centroid (x, y), each min-max normalised to [0, 1] over `table`."""
    missing = [name for name in TILE_COLUMNS if name not in table.columns]
    if missing:
        raise InputError(
            f"{option}: true needs the columns {', '.join(missing)} (window bounds, written by "
            f"build-balanced-dataset); add them or set {option}: false"
        )
    bounds = table[list(TILE_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    empty = ~np.isfinite(bounds).all(axis=1)
    if empty.any():
        raise InputError(
            f"{option}: true needs window bounds, but {int(empty.sum())} pool row(s) have empty "
            f"{'/'.join(TILE_COLUMNS)} (rasters without a CRS?); set {option}: false"
        )
    x = (bounds[:, 0] + bounds[:, 2]) / 2.0
    y = (bounds[:, 1] + bounds[:, 3]) / 2.0
    return np.column_stack([scorers.minmax(x), scorers.minmax(y)])


def budget_count(budget: float, budget_mode: str, n_pool: int) -> int:
    """Return how many patches the budget selects from a pool of `n_pool`.

    A fraction is rounded to the nearest count, at least 1; a budget <= 0 or larger than the
    pool is an error.
    """
    if not budget > 0:
        raise ConfigError(f"budget must be > 0, got {budget}")
    if budget_mode == "fraction":
        if budget > 1:
            raise ConfigError(
                f"budget {budget:g} is larger than the pool: with budget_mode: fraction it is a "
                f"share of the {n_pool} pool patches and must be at most 1 (for a number of "
                "patches set budget_mode: count)"
            )
        return max(1, int(math.floor(budget * n_pool + 0.5)))
    if budget != int(budget):
        raise ConfigError(f"budget_mode: count needs a whole number, got {budget}")
    if budget > n_pool:
        raise ConfigError(
            f"budget {int(budget)} is larger than the pool of {n_pool} patches; lower the budget "
            "or use budget_mode: fraction"
        )
    return int(budget)
