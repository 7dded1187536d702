"""The scores behind the sampling methods, and their normalisation into weights (SPEC §3.7).

Every function takes arrays over the active patches only and returns an array of the same
length; `sampler_weights` scatters the result back over all rows and gives excluded rows 0.
The methods themselves, by name, are the registry in `patchbalance.sampling.registry`.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.stats import rankdata

from patchbalance.balanced_table import check_weights
from patchbalance.measures import class_presence_threshold

log = logging.getLogger(__name__)


def average_rank(values: np.ndarray) -> np.ndarray:
    """Return the average rank of each value divided by the count, in (0, 1]; ties share a rank."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values.copy()
    return rankdata(values, method="average") / values.size


def cluster_balanced_scores(
    composition_score: np.ndarray, cluster_id: np.ndarray, uniqueness: np.ndarray | None = None
) -> np.ndarray:
    """Return composition_score * (u_i / mean u of the patch's cluster); u = 1 without uniqueness.

    With composition_score = 1 / cluster size, every cluster's scores sum to 1.
    """
    composition_score = np.asarray(composition_score, dtype=np.float64)
    if uniqueness is None:
        return composition_score.copy()
    uniqueness = np.asarray(uniqueness, dtype=np.float64)
    _, inverse = np.unique(cluster_id, return_inverse=True)
    sums = np.bincount(inverse, weights=uniqueness)
    sizes = np.bincount(inverse)
    cluster_mean = sums / sizes
    mean_of_patch = cluster_mean[inverse]
    # A cluster whose members are all exact duplicates has mean uniqueness 0: share equally.
    ratio = np.divide(
        uniqueness, mean_of_patch, out=np.ones_like(uniqueness), where=mean_of_patch > 0
    )
    return composition_score * ratio


def repeat_factor_scores(
    counts: np.ndarray,
    window_pixels: np.ndarray,
    min_pixels: float | None = None,
    repeat_threshold: float | None = None,
) -> tuple[np.ndarray, dict[str, object]]:
    """Return LVIS-style repeat factors per patch and the per-class figures behind them.

    f_c = fraction of patches containing class c (at least `min_pixels`); the patch's factor is
    the max over the classes it contains of max(1, sqrt(t / f_c)), with t = `repeat_threshold`
    or the median f_c over the classes that occur. A patch that contains no class is given 1.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = (
        counts >= np.maximum(class_presence_threshold(min_pixels, window_pixels), 1.0)[:, None]
    )
    frequency = present.mean(axis=0) if len(counts) else np.zeros(counts.shape[1])
    occurring = frequency > 0
    threshold = (
        float(repeat_threshold)
        if repeat_threshold is not None
        else (float(np.median(frequency[occurring])) if occurring.any() else 1.0)
    )
    class_factor = np.ones_like(frequency)
    class_factor[occurring] = np.maximum(1.0, np.sqrt(threshold / frequency[occurring]))
    factors = np.where(present, class_factor[None, :], 1.0).max(axis=1, initial=1.0)
    return factors, {"class_frequency": frequency, "repeat_threshold": threshold}


def inverse_frequency_scores(proportions: np.ndarray, sqrt: bool = False) -> np.ndarray:
    """Return sum_c p_ic / g_c with g_c = mean_i p_ic (or sqrt(g_c) when `sqrt`)."""
    proportions = np.asarray(proportions, dtype=np.float64)
    mean_share = proportions.mean(axis=0) if len(proportions) else np.zeros(proportions.shape[1])
    inverse = np.zeros_like(mean_share)
    occurring = mean_share > 0
    inverse[occurring] = 1.0 / (np.sqrt(mean_share[occurring]) if sqrt else mean_share[occurring])
    return proportions @ inverse


def normalise_weights(
    scores: np.ndarray,
    power: float = 1.0,
    max_weight: float | None = None,
    uniform_mix: float = 0.0,
    notes: dict[str, object] | None = None,
) -> np.ndarray:
    """Return scores ** power scaled to mean 1, mixed with uniform, then capped (SPEC §3.7).

    `uniform_mix` m keeps a share m of the draws uniform: w <- (1 - m) w + m, which keeps the
    mean at 1. The cap at `max_weight` times the mean comes last (`cap_weights`): the result
    has mean 1 and max <= max_weight, unless too few patches have a weight above 0 for both to
    hold; then the cap holds, and the note `max_weight` (in `notes`, and the log) says so.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores.copy()
    weights = check_weights(
        np.power(scores, power) if power != 1.0 else scores.copy(),
        "the patch scores",
        all_zero_hint="every active patch has a score of 0, so no weight can be positive; try "
        "another sampling_method or a smaller weights.power",
    )
    total = weights.sum()
    weights *= weights.size / total
    if uniform_mix:
        weights = (1.0 - uniform_mix) * weights + uniform_mix
    if max_weight is not None:
        weights, note = cap_weights(weights, max_weight)
        if note:
            log.warning("%s", note)
            if notes is not None:
                notes["max_weight"] = note
    return weights


def cap_weights(weights: np.ndarray, max_weight: float) -> tuple[np.ndarray, str | None]:
    """Return weights of mean 1 capped at `max_weight`, and a note when both cannot hold.

    The capped weights are min(f w, max_weight) with the one factor f that keeps the mean at 1
    (found exactly over the weights sorted from the largest). When fewer than N / max_weight
    patches have a weight above 0, no factor does: those patches get max_weight, the mean
    falls below 1, and the note says so.
    """
    n = weights.size
    if weights.max() <= max_weight:
        return weights, None
    ordered = np.sort(weights)[::-1]
    capped = np.arange(1, n + 1)  # j: how many of the largest weights are capped
    # The sum of the weights below the j capped, summed from the smallest (exactly 0 over zeros).
    rest = np.append(np.cumsum(ordered[::-1])[::-1][1:], 0.0)
    room = n - capped * max_weight  # what the uncapped weights must add up to
    below = np.append(ordered[1:], 0.0)  # the largest uncapped weight
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(rest > 0, room / rest, np.inf)
        fits = (room >= 0) & (rest > 0) & (factor * below <= max_weight * (1 + 1e-12))
    if fits.any():
        j = int(np.argmax(fits))
        return np.minimum(weights * factor[j], max_weight), None
    positive = int(np.count_nonzero(weights > 0))
    weights = np.where(weights > 0, max_weight, 0.0)
    return weights, (
        f"max_weight {max_weight:g} cannot hold with a mean weight of 1: only {positive:,} of "
        f"{n:,} active patches have a weight above 0; they were capped at {max_weight:g}, so "
        f"the mean weight is {weights.mean():.4g} (raise max_weight to at least "
        f"{n / positive:.4g} for a mean of 1)"
    )


def sampler_weights(active: np.ndarray, active_weights: np.ndarray) -> np.ndarray:
    """Return a weight per row: `active_weights` on active rows in order, exactly 0 elsewhere."""
    active = np.asarray(active, dtype=bool)
    weights = np.zeros(active.shape[0], dtype=np.float64)
    weights[active] = active_weights
    return weights
