"""CoreSet selection over a balanced table (SPEC §6): score the pool, take the top, weight it.

`select_coreset(df, config)` is the Python API. Each method name maps to one scorer in
`SCORERS`; a scorer turns the pool into one score per pool row (higher = selected first).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

import patchbalance.coreset.scorers as scorers
from patchbalance.config.loading import is_resolved
from patchbalance.coreset.config import (
    CoresetConfig,
    coreset_config_from_mapping,
    with_resolved_paths,
)
from patchbalance.coreset.pool import (
    budget_count,
    check_key_columns,
    check_unique_keys,
    class_matrix,
    pool_mask,
    spatial_coordinates,
)
from patchbalance.coreset.pool_embeddings import pool_embeddings
from patchbalance.coreset.weights import coreset_weights
from patchbalance.errors import ConfigError, InputError
from patchbalance.measures import (
    class_entropy,
    class_proportions,
    class_share,
    effective_sample_size,
)
from patchbalance.progress import StageClock, progress_bar
from patchbalance.sampling.scores import sampler_weights
from patchbalance.table import EXCLUDED, SAMPLER_WEIGHT, key_label, key_sorted, normalised_keys

log = logging.getLogger(__name__)

EMBEDDING_METHODS = ("fa", "fd", "lc_fd", "fa_cb")
CLASS_METHODS = ("cb", "fa_cb")
# Methods whose scores come from the class pixels, so a pool patch without any is an error.
CLASS_PIXEL_METHODS = ("lc", "cb", "lc_fd", "fa_cb")
SELECTED_COLUMN = "coreset_selected"


@dataclass
class CoresetResult:
    """The output table (every input row kept) and the figures for the summary."""

    table: pd.DataFrame
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@dataclass
class Pool:
    """What the scorers see: the pool rows in patch-key order, their classes, the budget."""

    table: pd.DataFrame
    config: CoresetConfig
    mask: np.ndarray  # (N,) bool: the row is in the pool
    rows: np.ndarray  # (n_pool,) table positions, in patch-key order
    keys: pd.DataFrame  # (n_pool,) patch keys of those rows
    amounts: np.ndarray  # (N, C) class amounts of every table row
    class_values: list[int]
    are_counts: bool
    count: int  # how many the budget selects
    left_out: dict[str, int]
    embeddings: np.ndarray | None = None  # the caller's (N, D) array, if any
    progress: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # figures for the summary
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Return the number of pool rows."""
        return len(self.rows)

    @property
    def pool_amounts(self) -> np.ndarray:
        """Return the (n_pool, C) class amounts of the pool rows."""
        return self.amounts[self.rows]


# --------------------------------------------------------------------------------------------
# The pieces the scorers share


def _updater(bar: Any) -> Callable[[int], None] | None:
    """Return the bar's update method, or None for a bar that shows nothing."""
    return None if bar.disable else bar.update


def _label_complexity(pool: Pool) -> np.ndarray:
    """Return the pool's label-complexity scores from `class_entropy` (computed where empty)."""
    table = pool.table
    if "class_entropy" in table.columns:
        entropy = pd.to_numeric(table["class_entropy"], errors="coerce").to_numpy(np.float64)
        entropy = entropy[pool.rows]
        missing = ~np.isfinite(entropy)
        if missing.any():
            entropy[missing] = class_entropy(pool.pool_amounts[missing])
    else:
        entropy = class_entropy(pool.pool_amounts)
    return scorers.label_complexity_scores(entropy)


def _vectors(pool: Pool) -> np.ndarray:
    """Return the pool's embeddings (with window centroids appended under `fd_use_spatial`)."""
    vectors, source = pool_embeddings(
        pool.table, pool.rows, pool.keys, pool.config, pool.embeddings
    )
    scorers.check_finite_embeddings(vectors, source)
    pool.info["embeddings"] = {"source": source, "dim": int(vectors.shape[1])}
    if pool.config.fd_use_spatial:
        coordinates = spatial_coordinates(pool.table.iloc[pool.rows], "fd_use_spatial")
        vectors = np.hstack([vectors, coordinates.astype(np.float32)])
    return vectors


def _class_balance(pool: Pool) -> np.ndarray:
    """Return the pool's class-balance scores from the greedy order over class proportions."""
    features = class_proportions(pool.pool_amounts)
    if pool.config.cb_use_spatial:
        features = np.hstack(
            [features, spatial_coordinates(pool.table.iloc[pool.rows], "cb_use_spatial")]
        )
    backend, device = scorers.resolve_cb_device(pool.config.device)
    pool.info["cb_backend"] = backend if device is None else f"{backend} ({device})"
    with progress_bar(pool.count, "cb greedy", pool.progress, "step", 0.5) as bar:
        picks = scorers.class_balance_order(features, pool.count, backend, device, _updater(bar))
    return scorers.class_balance_scores(picks, pool.n)


def _diversity_order(pool: Pool, vectors: np.ndarray) -> np.ndarray:
    """Return the feature-diversity order of the pool (round robin over the fd clusters)."""
    config = pool.config
    sweep = config.fd_k_max - config.fd_k_min + 1
    with progress_bar(sweep, "fd k sweep", pool.progress, "step", 0.5) as bar:
        diversity = scorers.feature_diversity_order(
            vectors,
            config.fd_k_min,
            config.fd_k_max,
            config.fd_use_vendi,
            config.fd_vendi_delta,
            config.seed,
            _updater(bar),
        )
    pool.notes.extend(diversity.notes)
    pool.info["fd"] = {
        "k": diversity.k,
        "k_rule": diversity.rule,
        "sweep": {str(k): round(v, 6) for k, v in diversity.sweep.items()},
        "sweep_sample": diversity.sweep_sample,
        "cluster_sizes": np.bincount(diversity.labels).tolist(),
    }
    return diversity.order


# --------------------------------------------------------------------------------------------
# The scorers: one per method name


def label_complexity_scorer(pool: Pool) -> np.ndarray:
    """Return `lc` scores: the label complexity (class entropy) of each pool patch."""
    return _label_complexity(pool)


def class_balance_scorer(pool: Pool) -> np.ndarray:
    """Return `cb` scores: earlier in the greedy class-balance order scores higher."""
    return _class_balance(pool)


def feature_activation_scorer(pool: Pool) -> np.ndarray:
    """Return `fa` scores: the feature activation of each pool patch's embedding."""
    return scorers.feature_activation_scores(_vectors(pool))


def feature_diversity_scorer(pool: Pool) -> np.ndarray:
    """Return `fd` scores: earlier in the round robin over embedding clusters scores higher."""
    return scorers.order_scores(_diversity_order(pool, _vectors(pool)), pool.n)


def complexity_then_diversity_scorer(pool: Pool) -> np.ndarray:
    """Return `lc_fd` scores: the `lc_fd_cutoff_m` most complex patches, in diversity order."""
    complexity = _label_complexity(pool)
    order = _diversity_order(pool, _vectors(pool))
    cutoff = scorers.default_cutoff(pool.n, pool.config.lc_fd_cutoff_m)
    pool.info["lc_fd_cutoff_m"] = cutoff
    order = scorers.label_complexity_then_diversity_order(order, complexity, cutoff)
    return scorers.order_scores(order, pool.n)


def activation_and_balance_scorer(pool: Pool) -> np.ndarray:
    """Return `fa_cb` scores: lambda * feature activation + (1 - lambda) * class balance."""
    activation = scorers.feature_activation_scores(_vectors(pool))
    balance = _class_balance(pool)
    weight = pool.config.fa_cb_lambda
    return weight * activation + (1.0 - weight) * balance


Scorer = Callable[[Pool], np.ndarray]
SCORERS: dict[str, Scorer] = {
    "lc": label_complexity_scorer,
    "cb": class_balance_scorer,
    "fa": feature_activation_scorer,
    "fd": feature_diversity_scorer,
    "lc_fd": complexity_then_diversity_scorer,
    "fa_cb": activation_and_balance_scorer,
}


# --------------------------------------------------------------------------------------------
# Selection


def _as_config(config: CoresetConfig | dict[str, Any]) -> CoresetConfig:
    if isinstance(config, CoresetConfig):
        # Resolved once, at load; one changed in Python since then is resolved (and checked) again.
        return config if is_resolved(config) else with_resolved_paths(config)
    if not isinstance(config, dict):
        raise ConfigError(
            f"config must be a CoresetConfig or a mapping, not {type(config).__name__}"
        )
    block = dict(config.get("coreset", config))
    # The Python API is handed the table, so the file paths of the command are optional here.
    block.setdefault("input_csv_path", "")
    block.setdefault("output_csv_path", "")
    return coreset_config_from_mapping(block)


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


def build_pool(
    df: pd.DataFrame,
    config: CoresetConfig,
    embeddings: np.ndarray | None = None,
    progress: bool = False,
    where: str | None = None,
) -> Pool:
    """Return the pool of `df` in patch-key order, with its class amounts and budget count.

    Args:
        df: the balanced table (its patch-key columns checked already).
        config: the CoreSet configuration.
        embeddings: an optional (len(df), D) array aligned with the rows of `df`.
        progress: show progress bars while scoring.
        where: names the input table (its file) in messages.

    Returns:
        The `Pool`; raises `InputError` for an empty pool, a repeated patch key, or (for the
        methods that score classes) a pool patch without class pixels.
    """
    mask, left_out = pool_mask(df, config.exclude_low_entropy, where)
    n_pool = int(mask.sum())
    if n_pool == 0:
        raise InputError(
            f"the CoreSet pool is empty: all {len(df)} rows are excluded "
            f"({left_out[EXCLUDED]}) or low-entropy ({left_out['low_entropy']}); "
            "set exclude_low_entropy: false or rebuild with milder exclusion"
        )
    keys_all = normalised_keys(df)
    candidates = np.flatnonzero(mask)
    # Pool arrays run in patch-key order, so "first position wins" breaks ties by key.
    rows = candidates[key_sorted(keys_all.iloc[candidates])]
    keys = keys_all.iloc[rows].reset_index(drop=True)
    check_unique_keys(keys, "the input table", rows=rows + 1)
    count = budget_count(config.budget, config.budget_mode, n_pool)
    amounts, class_values, are_counts = class_matrix(df)
    empty = amounts[rows].sum(axis=1) <= 0
    if empty.any() and config.method in CLASS_PIXEL_METHODS:
        first = int(np.flatnonzero(empty)[0])
        raise InputError(
            f"{int(empty.sum())} pool patch(es) have no class pixels (first: "
            f"{key_label(keys, first)}); mark them excluded (empty_mask) before selection"
        )
    return Pool(
        table=df,
        config=config,
        mask=mask,
        rows=rows,
        keys=keys,
        amounts=amounts,
        class_values=class_values,
        are_counts=are_counts,
        count=count,
        left_out=left_out,
        embeddings=embeddings,
        progress=progress,
    )


def _weighted_table(pool: Pool, scores: np.ndarray, chosen: np.ndarray) -> pd.DataFrame:
    """Return the output table: the scores, the selected flag and the CoreSet's weights."""
    df, config = pool.table, pool.config
    selected_pool = np.zeros(pool.n, dtype=bool)
    selected_pool[chosen] = True
    selected = np.zeros(len(df), dtype=bool)
    selected[pool.rows[selected_pool]] = True
    window_pixels = df["patch_size"].to_numpy(dtype=np.float64) ** 2
    input_weights = (
        pd.to_numeric(df[SAMPLER_WEIGHT], errors="coerce").to_numpy(np.float64)
        if SAMPLER_WEIGHT in df.columns
        else None
    )
    weights = coreset_weights(
        config.sampler_weights,
        pool.amounts[selected],
        pool.are_counts,
        window_pixels[selected],
        input_weights[selected] if input_weights is not None else None,
        config.max_weight,
    )
    table = df.copy()
    score_column = np.full(len(df), np.nan)
    score_column[pool.rows] = scores
    table[config.score_column] = score_column
    table[SELECTED_COLUMN] = selected
    table[SAMPLER_WEIGHT] = sampler_weights(selected, weights)
    return table


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
    check_key_columns(df, "the input table")
    with clock.stage("pool"):
        pool = build_pool(df, config, embeddings, progress, where)
    with clock.stage("scoring"):
        scores = SCORERS[config.method](pool)
        chosen = scorers.top_by_score(scores, pool.count)
    with clock.stage("weights"):
        table = _weighted_table(pool, scores, chosen)
    summary = _summary(pool, table)
    summary.update(pool.info)
    summary["notes"] = pool.notes
    summary["timings_s"] = clock.seconds
    return CoresetResult(table=table, summary=summary, notes=pool.notes)


def _summary(pool: Pool, table: pd.DataFrame) -> dict[str, Any]:
    df, config, count = pool.table, pool.config, pool.count
    selected = table[SELECTED_COLUMN].to_numpy(dtype=bool)
    amounts = pool.amounts
    weights = table[SAMPLER_WEIGHT].to_numpy(np.float64)
    pool_share = class_share(amounts[pool.mask])
    coreset_share = class_share(amounts[selected])
    weighted_share = class_share(amounts[selected], weights[selected])
    selected_weights = weights[selected]
    ess = effective_sample_size(selected_weights)
    summary: dict[str, Any] = {
        "method": config.method,
        "budget": config.budget,
        "budget_mode": config.budget_mode,
        "n_rows": len(df),
        "n_pool": int(pool.mask.sum()),
        "left_out_of_pool": pool.left_out,
        "n_selected": int(count),
        "selected_share_of_pool": round(count / max(int(pool.mask.sum()), 1), 6),
        "class_pixel_share": {
            str(value): {
                "pool": round(float(pool_share[j]), 6),
                "coreset": round(float(coreset_share[j]), 6),
                "coreset_weighted": round(float(weighted_share[j]), 6),
            }
            for j, value in enumerate(pool.class_values)
        },
        "sampler_weights": config.sampler_weights,
        "max_weight": config.max_weight,
        "effective_sample_size": round(ess, 3),
    }
    if "freq_cluster_id" in df.columns:
        clusters = pd.to_numeric(df["freq_cluster_id"], errors="coerce")
        in_pool = clusters.iloc[pool.rows].value_counts().sort_index()
        chosen = clusters[selected].value_counts()
        summary["selected_per_cluster"] = {
            str(int(cluster)): {"pool": int(size), "selected": int(chosen.get(cluster, 0))}
            for cluster, size in in_pool.items()
            if np.isfinite(cluster)
        }
    return summary
