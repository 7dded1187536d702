"""CoreSet selection over a balanced table (SPEC §6): pool, budget, scoring, training weights.

`select_coreset(df, config)` is the Python API; `run_select_coreset_command` reads the table,
runs it and writes the output table and its summary (both atomically) for the command line.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbalance.config import CoresetConfig, coreset_config_from_mapping, load_coreset_config
from patchbalance.coreset import scorers
from patchbalance.errors import ConfigError, InputError
from patchbalance.progress import StageClock, progress_bar
from patchbalance.stats import class_entropy
from patchbalance.table import (
    KEY_COLUMNS,
    boolean_column,
    class_columns,
    class_proportions,
    class_share,
    effective_sample_size,
    excluded_but_weighted,
    excluded_column,
    key_label,
    key_sorted,
    normalised_keys,
    read_table,
    warn_excluded_but_weighted,
    write_table,
)
from patchbalance.weights import (
    inverse_frequency_scores,
    normalise_weights,
    repeat_factor_scores,
    sampler_weights,
)

log = logging.getLogger(__name__)

TILE_COLUMNS = ("tile_minx", "tile_miny", "tile_maxx", "tile_maxy")
EMBEDDING_METHODS = ("fa", "fd", "lc_fd", "fa_cb")
CLASS_METHODS = ("cb", "fa_cb")
SELECTED_COLUMN = "coreset_selected"


@dataclass
class CoresetResult:
    """The output table (every input row kept) and the figures for the summary."""

    table: pd.DataFrame
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading the table's columns


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
    excluded = excluded_column(table, where)
    excluded = np.zeros(n, bool) if excluded is None else excluded
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
    if "sampler_weight" in table:
        weights = pd.to_numeric(table["sampler_weight"], errors="coerce").to_numpy(np.float64)
        warn_excluded_but_weighted(
            excluded_but_weighted(excluded, weights),
            where,
            "they are left out of the CoreSet pool and get weight 0",
        )
    return pool, {"excluded": int(excluded.sum()), "low_entropy": int(left_out_low.sum())}


def check_key_columns(table: pd.DataFrame, what: str) -> None:
    """Raise InputError naming the patch-key columns that `table` lacks."""
    missing = [name for name in KEY_COLUMNS if name not in table.columns]
    if missing:
        raise InputError(
            f"{what}: missing the patch key column(s) {', '.join(missing)}; CoreSet selection "
            "needs image_path, row_off, col_off and patch_size (the build writes them)"
        )


def check_unique_keys(
    keys: pd.DataFrame, what: str, fix: str = "each patch may appear once"
) -> None:
    """Raise InputError when a patch key occurs more than once, counting and naming one."""
    duplicated = keys.duplicated(keep=False).to_numpy()
    if duplicated.any():
        first = int(np.flatnonzero(duplicated)[0])
        raise InputError(
            f"{what}: {int(duplicated.sum())} rows share a patch key with another row (first: "
            f"{key_label(keys, first)}); {fix}"
        )


def class_matrix(table: pd.DataFrame) -> tuple[np.ndarray, list[int], bool]:
    """Return per-row class amounts (N, C), the class values, and whether they are pixel counts.

    Pixel counts come from the `px_<value>` columns; without them, proportions come from
    `class_dist_json` (the upstream table's form).
    """
    columns, values = class_columns(table)
    if columns:
        counts = table[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        return np.nan_to_num(counts, nan=0.0), values, True
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


# --------------------------------------------------------------------------------------------
# Embeddings


def embedding_matrix(values: pd.Series, what: str) -> np.ndarray:
    """Return a (N, D) float32 matrix from a column of vectors (lists, arrays or JSON text)."""
    items = values.to_numpy(dtype=object)
    absent = values.isna().to_numpy()
    if absent.any():
        raise InputError(f"{what}: {int(absent.sum())} pool patch(es) have no embedding")
    if len(items) and isinstance(items[0], str):
        try:
            items = [json.loads(item) for item in items]
        except (json.JSONDecodeError, TypeError) as exc:
            raise InputError(
                f"{what}: embeddings stored as text must be JSON lists: {exc}"
            ) from exc
    try:
        matrix = (
            np.stack([np.asarray(item, dtype=np.float32) for item in items])
            if len(items)
            else np.empty((0, 0), np.float32)
        )
    except ValueError as exc:
        raise InputError(f"{what}: the embeddings do not all have the same length ({exc})") from exc
    if matrix.ndim != 2:
        raise InputError(f"{what}: each embedding must be a flat list of numbers")
    return matrix


def read_embeddings_cache(path: Path, column: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Return the patch keys and the (N, D) float32 vectors of an embeddings Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise InputError(f"{path}: embeddings file (parquet_path) not found")
    try:
        schema = pq.read_schema(path)
        names = set(schema.names)
        key_names = [name for name in KEY_COLUMNS if name in names]
        if not {"image_path", "row_off", "col_off"} <= set(key_names):
            raise InputError(
                f"{path}: the embeddings file needs the key columns image_path, row_off, col_off "
                "(and patch_size) to be joined with the table"
            )
        name = column if column in names else "embedding"
        if name not in names:
            raise InputError(f"{path}: no '{column}' column with the embeddings")
        table = pq.read_table(path, columns=[*key_names, name])
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file: {exc}".splitlines()[0]) from exc
    vectors_column = table.column(name).combine_chunks()
    kind = vectors_column.type
    if pa.types.is_fixed_size_list(kind):
        dim = kind.list_size
        flat = vectors_column.flatten().to_numpy(zero_copy_only=False)
        vectors = flat.astype(np.float32).reshape(-1, dim)
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pa.compute.list_value_length(vectors_column).to_numpy(zero_copy_only=False)
        if len(lengths) and (np.any(lengths != lengths[0]) or vectors_column.null_count):
            raise InputError(f"{path}: the '{name}' vectors do not all have the same length")
        dim = int(lengths[0]) if len(lengths) else 0
        flat = vectors_column.flatten().to_numpy(zero_copy_only=False)
        vectors = flat.astype(np.float32).reshape(-1, dim)
    else:
        vectors = embedding_matrix(table.column(name).to_pandas(), str(path))
    keys = table.select(key_names).to_pandas()
    keys["image_path"] = keys["image_path"].astype(str)
    for key in key_names[1:]:
        keys[key] = keys[key].to_numpy(dtype=np.int64)
    return keys, vectors


def join_embeddings(pool_keys: pd.DataFrame, path: Path, column: str) -> np.ndarray:
    """Return the cached embedding of each pool patch, joined by patch key (never by position)."""
    cache_keys, vectors = read_embeddings_cache(path, column)
    names = list(cache_keys.columns)
    check_unique_keys(cache_keys, str(path), "the embeddings file must hold each patch once")
    position = pd.MultiIndex.from_frame(cache_keys).get_indexer(
        pd.MultiIndex.from_frame(pool_keys[names])
    )
    missing = position < 0
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise InputError(
            f"{path}: {int(missing.sum())} of {len(pool_keys)} pool patches have no row in the "
            f"embeddings file (first: {key_label(pool_keys, first)}); point parquet_path at the "
            "embeddings cache of the build that wrote this table"
        )
    return vectors[position]


def pool_embeddings(
    table: pd.DataFrame,
    pool_rows: np.ndarray,
    pool_keys: pd.DataFrame,
    config: CoresetConfig,
    embeddings: np.ndarray | None,
) -> tuple[np.ndarray, str]:
    """Return the pool's embeddings (n_pool, D) and where they came from.

    In order: the `embeddings` array (aligned with the table's rows), the table's
    `embedding_column`, or the Parquet file `parquet_path` joined by the patch key.
    """
    if embeddings is not None:
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or len(embeddings) != len(table):
            raise InputError(
                f"embeddings must be an array of shape (rows of the table = {len(table)}, D), "
                f"got {embeddings.shape}"
            )
        return np.ascontiguousarray(embeddings[pool_rows], dtype=np.float32), "array"
    column = config.embedding_column
    if column and column in table.columns:
        values = table[column].iloc[pool_rows]
        return embedding_matrix(values, f"column '{column}'"), f"column {column}"
    if config.parquet_path:
        path = config.resolve(config.parquet_path)
        return join_embeddings(pool_keys, path, column or "embedding"), str(path)
    if column:
        raise InputError(
            f"method {config.method} needs embeddings: the table has no column '{column}' "
            "and no parquet_path is set"
        )
    raise InputError(
        f"method {config.method} needs embeddings: set embedding_column (a column of the "
        "table) or parquet_path (the embeddings cache of build-balanced-dataset)"
    )


# --------------------------------------------------------------------------------------------
# Budget and weights


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


def coreset_weights(
    method: str,
    amounts: np.ndarray,
    are_counts: bool,
    window_pixels: np.ndarray,
    input_weights: np.ndarray | None,
    max_weight: float | None,
) -> np.ndarray:
    """Return the training weight of each selected patch, mean 1 (SPEC §3.7 formulas).

    `amounts` are the selected patches' class pixel counts (or proportions when
    `are_counts` is False); `input_weights` are their sampler_weight values for "keep".
    """
    n = len(amounts)
    if method == "uniform":
        scores = np.ones(n)
    elif method == "inverse_frequency":
        scores = inverse_frequency_scores(class_proportions(amounts))
    elif method == "repeat_factor":
        counts = amounts if are_counts else amounts * window_pixels[:, None]
        scores, _ = repeat_factor_scores(counts, window_pixels)
    elif method == "keep":
        if input_weights is None:
            raise InputError(
                "sampler_weights: keep needs a sampler_weight column in the input table; "
                "choose inverse_frequency, repeat_factor or uniform"
            )
        scores = np.asarray(input_weights, dtype=np.float64)
        bad = ~np.isfinite(scores) | (scores < 0)
        if bad.any():
            raise InputError(
                f"sampler_weights: keep found {int(bad.sum())} selected row(s) whose "
                "sampler_weight is empty, negative or not finite"
            )
        if not scores.sum() > 0:
            raise InputError(
                "sampler_weights: keep found sampler_weight 0 on every selected row; choose "
                "inverse_frequency, repeat_factor or uniform"
            )
    else:
        raise ConfigError(f"unknown sampler_weights {method!r}")
    return normalise_weights(scores, power=1.0, max_weight=max_weight)


# --------------------------------------------------------------------------------------------
# Selection


def _as_config(config: CoresetConfig | dict[str, Any]) -> CoresetConfig:
    if isinstance(config, CoresetConfig):
        return config
    if not isinstance(config, dict):
        raise ConfigError(
            f"config must be a CoresetConfig or a mapping, not {type(config).__name__}"
        )
    block = dict(config.get("coreset", config))
    # The Python API is handed the table, so the file paths of the command are optional here.
    block.setdefault("input_csv_path", "")
    block.setdefault("output_csv_path", "")
    return coreset_config_from_mapping(block)


def _updater(bar: Any) -> Callable[[int], None] | None:
    """Return the bar's update method, or None for a bar that shows nothing."""
    return None if bar.disable else bar.update


def select_coreset(
    df: pd.DataFrame,
    config: CoresetConfig | dict[str, Any],
    embeddings: np.ndarray | None = None,
    *,
    progress: bool = False,
) -> pd.DataFrame:
    """Return every row of `df` with the CoreSet columns and training weights of SPEC §6.

    Adds `coreset_score` (the `score_column`; empty outside the pool) and `coreset_selected`,
    and replaces `sampler_weight` with weights over the selected rows only (mean 1 there,
    exactly 0 on every other row). `embeddings`, when given, is an (len(df), D) array aligned
    with the rows of `df`; otherwise they come from `embedding_column` or `parquet_path`.
    """
    return run_selection(df, config, embeddings, progress=progress).table


def run_selection(
    df: pd.DataFrame,
    config: CoresetConfig | dict[str, Any],
    embeddings: np.ndarray | None = None,
    *,
    progress: bool = False,
    where: str | None = None,
) -> CoresetResult:
    """Return the output table of `select_coreset` and the figures for its summary.

    `where` names the input table (its file) in messages.
    """
    config = _as_config(config)
    clock = StageClock(digits=3)
    notes: list[str] = []
    method = config.method
    check_key_columns(df, "the input table")

    with clock.stage("pool"):
        pool, left_out = pool_mask(df, config.exclude_low_entropy, where)
        n_pool = int(pool.sum())
        if n_pool == 0:
            raise InputError(
                f"the CoreSet pool is empty: all {len(df)} rows are excluded "
                f"({left_out['excluded']}) or low-entropy ({left_out['low_entropy']}); "
                "set exclude_low_entropy: false or rebuild with milder exclusion"
            )
        keys_all = normalised_keys(df)
        candidates = np.flatnonzero(pool)
        # Pool arrays run in patch-key order, so "first position wins" breaks ties by key.
        pool_rows = candidates[key_sorted(keys_all.iloc[candidates])]
        pool_keys = keys_all.iloc[pool_rows].reset_index(drop=True)
        check_unique_keys(pool_keys, "the input table")
        count = budget_count(config.budget, config.budget_mode, n_pool)

        amounts, class_values, are_counts = class_matrix(df)
        pool_amounts = amounts[pool_rows]
        empty = pool_amounts.sum(axis=1) <= 0
        if empty.any() and (method in CLASS_METHODS or method in ("lc", "lc_fd")):
            first = int(np.flatnonzero(empty)[0])
            raise InputError(
                f"{int(empty.sum())} pool patch(es) have no class pixels (first: "
                f"{key_label(pool_keys, first)}); mark them excluded (empty_mask) before selection"
            )

    info: dict[str, Any] = {}
    with clock.stage("scoring"):
        complexity = None
        if method in ("lc", "lc_fd"):
            if "class_entropy" in df.columns:
                entropy = pd.to_numeric(df["class_entropy"], errors="coerce").to_numpy(np.float64)
                entropy = entropy[pool_rows]
                missing = ~np.isfinite(entropy)
                if missing.any():
                    entropy[missing] = class_entropy(pool_amounts[missing])
            else:
                entropy = class_entropy(pool_amounts)
            complexity = scorers.label_complexity_scores(entropy)

        vectors = None
        if method in EMBEDDING_METHODS:
            vectors, source = pool_embeddings(df, pool_rows, pool_keys, config, embeddings)
            scorers.check_finite_embeddings(vectors, source)
            info["embeddings"] = {"source": source, "dim": int(vectors.shape[1])}
            if config.fd_use_spatial:
                coordinates = spatial_coordinates(df.iloc[pool_rows], "fd_use_spatial")
                vectors = np.hstack([vectors, coordinates.astype(np.float32)])

        balance = None
        if method in CLASS_METHODS:
            features = class_proportions(pool_amounts)
            if config.cb_use_spatial:
                features = np.hstack(
                    [features, spatial_coordinates(df.iloc[pool_rows], "cb_use_spatial")]
                )
            backend, device = scorers.resolve_cb_device(config.device)
            info["cb_backend"] = backend if device is None else f"{backend} ({device})"
            with progress_bar(count, "cb greedy", progress, "step", 0.5) as bar:
                picks = scorers.class_balance_order(features, count, backend, device, _updater(bar))
            balance = scorers.class_balance_scores(picks, n_pool)

        if method == "lc":
            scores = complexity
        elif method == "cb":
            scores = balance
        elif method == "fa":
            scores = scorers.feature_activation_scores(vectors)
        elif method == "fa_cb":
            activation = scorers.feature_activation_scores(vectors)
            scores = config.fa_cb_lambda * activation + (1.0 - config.fa_cb_lambda) * balance
        else:  # fd, lc_fd
            sweep = config.fd_k_max - config.fd_k_min + 1
            with progress_bar(sweep, "fd k sweep", progress, "step", 0.5) as bar:
                diversity = scorers.feature_diversity_order(
                    vectors,
                    config.fd_k_min,
                    config.fd_k_max,
                    config.fd_use_vendi,
                    config.fd_vendi_delta,
                    config.seed,
                    _updater(bar),
                )
            notes.extend(diversity.notes)
            info["fd"] = {
                "k": diversity.k,
                "k_rule": diversity.rule,
                "sweep": {str(k): round(v, 6) for k, v in diversity.sweep.items()},
                "sweep_sample": diversity.sweep_sample,
                "cluster_sizes": np.bincount(diversity.labels).tolist(),
            }
            order = diversity.order
            if method == "lc_fd":
                cutoff = scorers.default_cutoff(n_pool, config.lc_fd_cutoff_m)
                info["lc_fd_cutoff_m"] = cutoff
                order = scorers.label_complexity_then_diversity_order(order, complexity, cutoff)
            scores = scorers.order_scores(order, n_pool)
        chosen = scorers.top_by_score(scores, count)

    with clock.stage("weights"):
        selected_pool = np.zeros(n_pool, dtype=bool)
        selected_pool[chosen] = True
        selected_rows = pool_rows[selected_pool]
        selected = np.zeros(len(df), dtype=bool)
        selected[selected_rows] = True
        window_pixels = df["patch_size"].to_numpy(dtype=np.float64) ** 2
        input_weights = (
            pd.to_numeric(df["sampler_weight"], errors="coerce").to_numpy(np.float64)
            if "sampler_weight" in df.columns
            else None
        )
        weights = coreset_weights(
            config.sampler_weights,
            amounts[selected],
            are_counts,
            window_pixels[selected],
            input_weights[selected] if input_weights is not None else None,
            config.max_weight,
        )
        table = df.copy()
        score_column = np.full(len(df), np.nan)
        score_column[pool_rows] = scores
        table[config.score_column] = score_column
        table[SELECTED_COLUMN] = selected
        table["sampler_weight"] = sampler_weights(selected, weights)

    summary = _summary(
        df, config, pool, pool_rows, selected, amounts, class_values, table, left_out, count
    )
    summary.update(info)
    summary["notes"] = notes
    summary["timings_s"] = clock.seconds
    return CoresetResult(table=table, summary=summary, notes=notes)


def _summary(
    df: pd.DataFrame,
    config: CoresetConfig,
    pool: np.ndarray,
    pool_rows: np.ndarray,
    selected: np.ndarray,
    amounts: np.ndarray,
    class_values: list[int],
    table: pd.DataFrame,
    left_out: dict[str, int],
    count: int,
) -> dict[str, Any]:
    weights = table["sampler_weight"].to_numpy(np.float64)
    pool_share = class_share(amounts[pool])
    coreset_share = class_share(amounts[selected])
    weighted_share = class_share(amounts[selected], weights[selected])
    selected_weights = weights[selected]
    ess = effective_sample_size(selected_weights)
    summary: dict[str, Any] = {
        "method": config.method,
        "budget": config.budget,
        "budget_mode": config.budget_mode,
        "n_rows": len(df),
        "n_pool": int(pool.sum()),
        "left_out_of_pool": left_out,
        "n_selected": int(count),
        "selected_share_of_pool": round(count / max(int(pool.sum()), 1), 6),
        "class_pixel_share": {
            str(value): {
                "pool": round(float(pool_share[j]), 6),
                "coreset": round(float(coreset_share[j]), 6),
                "coreset_weighted": round(float(weighted_share[j]), 6),
            }
            for j, value in enumerate(class_values)
        },
        "sampler_weights": config.sampler_weights,
        "max_weight": config.max_weight,
        "effective_sample_size": round(ess, 3),
    }
    if "freq_cluster_id" in df.columns:
        clusters = pd.to_numeric(df["freq_cluster_id"], errors="coerce")
        in_pool = clusters.iloc[pool_rows].value_counts().sort_index()
        chosen = clusters[selected].value_counts()
        summary["selected_per_cluster"] = {
            str(int(cluster)): {"pool": int(size), "selected": int(chosen.get(cluster, 0))}
            for cluster, size in in_pool.items()
            if np.isfinite(cluster)
        }
    return summary


def summary_text(summary: dict[str, Any], output: Path | None, summary_path: Path | None) -> str:
    """Return the summary as a few lines for the terminal."""
    budget = summary["budget"]
    shown = f"{budget:g} of the pool" if summary["budget_mode"] == "fraction" else f"{int(budget)}"
    lines = [
        f"CoreSet method {summary['method']}, budget {shown}: selected "
        f"{summary['n_selected']:,} of {summary['n_pool']:,} pool patches "
        f"({summary['selected_share_of_pool']:.1%}); {summary['n_rows']:,} rows in the table "
        f"({summary['left_out_of_pool']['excluded']:,} excluded, "
        f"{summary['left_out_of_pool']['low_entropy']:,} low-entropy left out)",
    ]
    if "fd" in summary:
        fd = summary["fd"]
        lines.append(f"fd clusters: k = {fd['k']} by the {fd['k_rule']} rule")
    if "cb_backend" in summary:
        lines.append(f"cb greedy ran on {summary['cb_backend']}")
    lines.append("class pixel share          pool    CoreSet   CoreSet weighted")
    for value, share in summary["class_pixel_share"].items():
        lines.append(
            f"  class {value:<16} {share['pool']:8.2%}  {share['coreset']:8.2%}  "
            f"{share['coreset_weighted']:10.2%}"
        )
    if "selected_per_cluster" in summary:
        parts = [
            f"{cluster}: {counts['selected']}/{counts['pool']}"
            for cluster, counts in summary["selected_per_cluster"].items()
        ]
        lines.append("selected per freq_cluster_id (selected/pool): " + ", ".join(parts))
    cap = summary["max_weight"]
    lines.append(
        f"sampler_weight: {summary['sampler_weights']} over the CoreSet (mean 1"
        f"{f', max {cap:g}' if cap is not None else ''}; 0 elsewhere), effective sample size "
        f"{summary['effective_sample_size']:,.1f}"
    )
    for note in summary.get("notes", []):
        lines.append(f"note: {note}")
    if output is not None:
        lines.append(f"wrote {output}")
    if summary_path is not None:
        lines.append(f"wrote {summary_path}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The command


def _summary_path(config: CoresetConfig, output: Path) -> Path:
    if config.summary_path:
        return config.resolve(config.summary_path)
    return output.with_name(f"{output.stem}.summary.json")


def run_select_coreset_command(
    config_path: Path, overrides: list[str], dry_run: bool = False, progress: bool = True
) -> str:
    """Run `patchbalance select-coreset CONFIG`; return the summary text to print.

    Reads `input_csv_path`, selects, and writes `output_csv_path` (CSV or Parquet by its
    extension) and the summary JSON next to it, each atomically. With `dry_run`, checks the
    configuration and inputs and returns the plan without selecting or writing.
    """
    from patchbalance import __version__
    from patchbalance.atomic import check_writable
    from patchbalance.outputs import write_json

    start = time.perf_counter()
    config = load_coreset_config(config_path, overrides)
    if not config.input_csv_path:
        raise ConfigError(f"{config_path}: input_csv_path is empty; point it at the balanced table")
    if not config.output_csv_path:
        raise ConfigError(
            f"{config_path}: output_csv_path is empty; say where to write the CoreSet"
        )
    input_path = config.resolve(config.input_csv_path)
    output_path = config.resolve(config.output_csv_path)
    summary_path = _summary_path(config, output_path)
    table = read_table(input_path)

    if dry_run:
        check_key_columns(table, str(input_path))
        pool, left_out = pool_mask(table, config.exclude_low_entropy, str(input_path))
        count = budget_count(config.budget, config.budget_mode, int(pool.sum()))
        if config.method in EMBEDDING_METHODS:
            if config.embedding_column and config.embedding_column in table.columns:
                source = f"column {config.embedding_column}"
            elif config.parquet_path:
                cache = config.resolve(config.parquet_path)
                if not cache.is_file():
                    raise InputError(f"{cache}: embeddings file (parquet_path) not found")
                source = str(cache)
            else:
                raise InputError(
                    f"method {config.method} needs embeddings: set embedding_column or parquet_path"
                )
        else:
            source = "not needed"
        return "\n".join(
            [
                f"plan: CoreSet method {config.method} on {input_path}",
                f"  rows {len(table):,}; pool {int(pool.sum()):,} (excluded "
                f"{left_out['excluded']:,}, low-entropy left out {left_out['low_entropy']:,})",
                f"  budget {config.budget:g} ({config.budget_mode}) -> {count:,} patches",
                f"  embeddings: {source}",
                f"  sampler_weight: {config.sampler_weights} over the CoreSet",
                f"  would write {output_path} and {summary_path}",
            ]
        )

    # Fail on an unwritable output before the selection, not after it.
    check_writable(output_path, "the CoreSet table (output_csv_path)")
    check_writable(summary_path, "the CoreSet summary")
    result = run_selection(table, config, progress=progress, where=str(input_path))
    with StageClock(3, result.summary["timings_s"]).stage("write"):
        write_table(result.table, output_path)
        result.summary.update(
            {
                "input": str(input_path),
                "output": str(output_path),
                "version": __version__,
                "total_s": round(time.perf_counter() - start, 3),
            }
        )
        write_json(result.summary, summary_path)
    return summary_text(result.summary, output_path, summary_path)
