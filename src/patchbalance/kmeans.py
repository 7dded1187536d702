"""The k-means sweep shared by the composition clusters and the CoreSet's fd scorer.

Both pick k by fitting KMeans for each k of a range on a seeded subsample, scoring each fit
with their own rule (the inertia for the elbow, the mean per-cluster Vendi score for fd), then
fit the chosen k on every row and number the clusters by decreasing size.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning

# Above this many rows a fit uses MiniBatchKMeans: KMeans' full passes get slow.
MINIBATCH_ABOVE = 100_000

FitScore = Callable[[np.ndarray, KMeans | MiniBatchKMeans], float]


def inertia_score(sample: np.ndarray, model: KMeans | MiniBatchKMeans) -> float:
    """Return the fit's inertia: the score of the elbow rule."""
    return float(model.inertia_)


def fit_kmeans(
    data: np.ndarray, k: int, seed: int, n_init: int, minibatch_above: int | None = MINIBATCH_ABOVE
) -> KMeans | MiniBatchKMeans:
    """Return KMeans (MiniBatchKMeans above `minibatch_above` rows; never for None) fitted on data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if minibatch_above is not None and len(data) > minibatch_above:
            model = MiniBatchKMeans(
                n_clusters=k,
                random_state=seed,
                n_init=n_init,
                batch_size=4096,
                max_no_improvement=20,
            )
        else:
            model = KMeans(n_clusters=k, random_state=seed, n_init=n_init)
        return model.fit(data)


def sweep_sample(data: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Return `size` rows of `data` drawn with a generator seeded by `seed`, in row order.

    All of `data` when it has no more than `size` rows.
    """
    if len(data) <= size:
        return data
    rng = np.random.default_rng(seed)
    return data[np.sort(rng.choice(len(data), size=size, replace=False))]


def distinct_rows(data: np.ndarray, decimals: int | None = None) -> int:
    """Return how many distinct rows `data` has (after rounding to `decimals` when given)."""
    rows = data if decimals is None else np.round(data, decimals)
    return len(np.unique(rows, axis=0))


def sweep_k(
    sample: np.ndarray,
    ks: Sequence[int],
    seed: int,
    n_init: int,
    score: FitScore = inertia_score,
    stop: Callable[[dict[int, float]], bool] | None = None,
    progress: Callable[[int], None] | None = None,
    minibatch_above: int | None = MINIBATCH_ABOVE,
) -> dict[int, float]:
    """Return {k: score} of a KMeans fit on `sample` for each k of `ks`, in order.

    Args:
        sample: the rows to fit on.
        ks: the k to try.
        seed: the random state of every fit.
        n_init: KMeans' n_init.
        score: the score rule of a fit (the inertia by default).
        stop: called with the scores so far after each k; True ends the sweep early.
        progress: called with 1 after each k.
        minibatch_above: see `fit_kmeans`.

    Returns:
        The scores by k.
    """
    scores: dict[int, float] = {}
    for k in ks:
        model = fit_kmeans(sample, k, seed, n_init, minibatch_above)
        scores[k] = score(sample, model)
        if progress is not None:
            progress(1)
        if stop is not None and stop(scores):
            break
    return scores


def renumber_by_size(raw_labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return labels renumbered so that cluster 0 is the largest, and the non-empty sizes.

    Ties go by the fitted id, so the numbering is deterministic; empty clusters are dropped.
    """
    raw_sizes = np.bincount(raw_labels, minlength=k)
    order = np.lexsort((np.arange(len(raw_sizes)), -raw_sizes))
    order = order[raw_sizes[order] > 0]
    renumber = np.full(len(raw_sizes), -1, dtype=np.int64)
    renumber[order] = np.arange(len(order))
    return renumber[raw_labels], raw_sizes[order]


def elbow_k(ks: np.ndarray, inertias: np.ndarray) -> int:
    """Return the k whose (k, inertia) point, both scaled to [0, 1], lies farthest from the chord.

    The chord joins the first and last points; the first k wins ties. With fewer than three
    candidates the largest k is returned.
    """
    ks = np.asarray(ks, dtype=np.float64)
    inertias = np.asarray(inertias, dtype=np.float64)
    if len(ks) < 3:
        return int(ks.max())
    x = (ks - ks.min()) / (ks.max() - ks.min())
    span = inertias.max() - inertias.min()
    y = (inertias - inertias.min()) / span if span > 0 else np.zeros_like(inertias)
    dx, dy = x[-1] - x[0], y[-1] - y[0]
    length = np.hypot(dx, dy)
    if length == 0:
        return int(ks[0])
    distance = np.abs(dx * (y[0] - y) - (x[0] - x) * dy) / length
    # Round so that floating-point noise cannot break a tie the geometry says is exact.
    return int(ks[int(np.argmax(np.round(distance, 12)))])
