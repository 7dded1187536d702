"""Training weights over the CoreSet (SPEC §6): mean 1 on the selected rows, 0 elsewhere."""

from __future__ import annotations

import numpy as np

from patchbalance.balanced_table import check_weights
from patchbalance.errors import ConfigError, InputError
from patchbalance.measures import class_proportions
from patchbalance.sampling.scores import (
    inverse_frequency_scores,
    normalise_weights,
    repeat_factor_scores,
)


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
        scores = check_weights(
            input_weights,
            "sampler_weights: keep: the selected rows' sampler_weight",
            all_zero_hint="choose inverse_frequency, repeat_factor or uniform",
        )
    else:
        raise ConfigError(f"unknown sampler_weights {method!r}")
    return normalise_weights(scores, power=1.0, max_weight=max_weight)
