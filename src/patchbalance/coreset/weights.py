"""Training weights over the CoreSet (SPEC §6): mean 1 on the selected rows, 0 elsewhere."""

from __future__ import annotations

import numpy as np

from patchbalance.errors import ConfigError, InputError
from patchbalance.table import class_proportions
from patchbalance.weights import inverse_frequency_scores, normalise_weights, repeat_factor_scores


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
