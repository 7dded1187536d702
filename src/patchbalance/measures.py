"""Measures of pixel counts and weights that every command shares.

Class proportions of each patch, the class pixel share of a set of patches (weighted or not),
the effective sample size of a set of weights, the pixels a class needs in a window to count as
present, and the class entropy of each patch.
"""

from __future__ import annotations

import numpy as np

# Rows whose entropy is computed at once: bounded temporaries for millions of patches.
ROWS_AT_ONCE = 262_144


def class_presence_threshold(min_pixels: float | None, window_pixels: np.ndarray) -> np.ndarray:
    """Return the pixel count from which a class counts as present in each window.

    `None` means 1 % of the window; a value below 1 is a fraction of the window; otherwise it
    is a pixel count.
    """
    window_pixels = np.asarray(window_pixels, dtype=np.float64)
    if min_pixels is None:
        return 0.01 * window_pixels
    if min_pixels < 1:
        return min_pixels * window_pixels
    return np.full_like(window_pixels, float(min_pixels))


def class_proportions(counts: np.ndarray) -> np.ndarray:
    """Return each row's counts divided by its total (rows with no valid pixel stay 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def class_share(amounts: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Return the class pixel share of rows `amounts` (N, C), each row weighted when given.

    All zeros when there is no pixel at all.
    """
    totals = amounts.sum(axis=0) if weights is None else weights @ amounts
    whole = totals.sum()
    return totals / whole if whole > 0 else np.zeros_like(totals)


def effective_sample_size(weights: np.ndarray) -> float:
    """Return (sum w)^2 / sum w^2 of the weights."""
    # Taken on weights scaled to a largest of 1 (the same ratio): huge weights never overflow.
    largest = float(np.max(weights, initial=0.0))
    scaled = weights / largest if largest > 0 else weights
    return float(scaled.sum() ** 2 / np.square(scaled).sum())


def class_entropy(counts: np.ndarray) -> np.ndarray:
    """Return the Shannon entropy (nats) of each row's class distribution; NaN without pixels."""
    counts = np.asarray(counts)
    if len(counts) > ROWS_AT_ONCE:  # bounded temporaries for millions of patches
        return np.concatenate(
            [
                class_entropy(counts[i : i + ROWS_AT_ONCE])
                for i in range(0, len(counts), ROWS_AT_ONCE)
            ]
        )
    proportions = class_proportions(counts)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(proportions > 0, proportions * np.log(proportions), 0.0)
    entropy = -terms.sum(axis=1)
    entropy[np.asarray(counts).sum(axis=1) == 0] = np.nan
    return entropy + 0.0  # turns -0.0 into 0.0
