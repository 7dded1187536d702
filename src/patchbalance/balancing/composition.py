"""Semantic composition (SPEC §3.4): pseudo-counts, centred log-ratio, KMeans with the elbow rule."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from patchbalance.config import ClusteringConfig
from patchbalance.errors import InputError
from patchbalance.kmeans import (
    distinct_rows,
    elbow_k,
    fit_kmeans,
    renumber_by_size,
    sweep_k,
    sweep_sample,
)

log = logging.getLogger(__name__)


def pseudo_count_proportions(counts: np.ndarray, alpha: float) -> np.ndarray:
    """Return q_ic = (n_ic + alpha) / (n_i + alpha * C) for pixel counts `counts` (N, C)."""
    counts = np.asarray(counts, dtype=np.float64)
    n_classes = counts.shape[1]
    return (counts + alpha) / (counts.sum(axis=1, keepdims=True) + alpha * n_classes)


def clr(counts: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Return the centred log-ratio of the pseudo-count proportions; each row sums to 0."""
    logs = np.log(pseudo_count_proportions(counts, alpha))
    return logs - logs.mean(axis=1, keepdims=True)


@dataclass
class CompositionResult:
    """Composition clusters of the active patches."""

    labels: np.ndarray  # (n_active,) cluster id, 0 = largest cluster
    sizes: np.ndarray  # (k,) patches per cluster
    k: int
    sweep: dict[int, float] = field(default_factory=dict)  # k -> inertia of the sweep
    sweep_sample: int = 0  # patches the sweep was fitted on
    notes: list[str] = field(default_factory=list)

    @property
    def cluster_size(self) -> np.ndarray:
        """Return the size of each patch's cluster."""
        return self.sizes[self.labels]

    @property
    def composition_score(self) -> np.ndarray:
        """Return 1 / cluster size per patch: the rarer the composition, the higher."""
        return 1.0 / self.cluster_size


def fit_composition_clusters(
    counts: np.ndarray,
    config: ClusteringConfig,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> CompositionResult:
    """Return the composition clusters of the active patches' class pixel counts (N, C).

    k comes from `config.k_selection`: the elbow over k_min..k_max (clamped to the number of
    distinct CLR rows, on a seeded subsample of `sweep_sample` patches when N is larger), or
    the fixed `k`. Clusters are renumbered by decreasing size so that cluster 0 is the most
    common composition.
    """
    n = len(counts)
    if n < 2:
        raise InputError(
            f"only {n} active patch(es) are left after exclusion; composition clustering needs "
            "at least 2 (relax the exclusion settings or add patches)"
        )
    features = clr(counts, config.pseudo_count)
    distinct = distinct_rows(features, decimals=9)
    notes: list[str] = []
    sweep: dict[int, float] = {}
    sample_size = 0

    if config.k_selection == "fixed":
        k = int(config.k or 1)
        if k > distinct:
            notes.append(f"k={k} exceeds the {distinct} distinct compositions; using k={distinct}")
            k = distinct
    else:
        k_max = min(config.k_max, distinct)
        k_min = min(config.k_min, k_max)
        if k_max < config.k_max:
            notes.append(
                f"k_max={config.k_max} clamped to {k_max}: only {distinct} distinct compositions"
            )
        if k_min < config.k_min:
            notes.append(f"k_min={config.k_min} clamped to {k_min}")
        sample = sweep_sample(features, config.sweep_sample, seed)
        sample_size = len(sample)
        sample_distinct = distinct_rows(sample, decimals=9)
        candidates = [k for k in range(k_min, k_max + 1) if k <= sample_distinct] or [k_min]
        # The sweep fits full KMeans at any sample size; only the final fit may switch.
        sweep = sweep_k(
            sample, candidates, seed, config.n_init, progress=progress, minibatch_above=None
        )
        k = elbow_k(np.array(list(sweep)), np.array(list(sweep.values())))

    for note in notes:
        log.warning(note)
    model = fit_kmeans(features, k, seed, config.n_init)
    labels, sizes = renumber_by_size(model.labels_, k)
    return CompositionResult(
        labels=labels, sizes=sizes, k=len(sizes), sweep=sweep, sweep_sample=sample_size, notes=notes
    )


def cluster_profiles(
    labels: np.ndarray, sizes: np.ndarray, proportions: np.ndarray, class_values: np.ndarray
) -> list[dict[str, object]]:
    """Return, per cluster, its size and the mean class proportions of its members."""
    k = len(sizes)
    sums = np.zeros((k, proportions.shape[1]))
    np.add.at(sums, labels, proportions)
    means = sums / np.maximum(sizes, 1)[:, None]
    return [
        {
            "cluster": c,
            "size": int(sizes[c]),
            "mean_class_share": {
                str(int(value)): round(float(means[c, j]), 4)
                for j, value in enumerate(class_values)
            },
        }
        for c in range(k)
    ]
