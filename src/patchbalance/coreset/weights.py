"""Training weights over the CoreSet (SPEC §6): mean 1 on the selected rows, 0 elsewhere.

`sampler_weights:` names one of `CORESET_WEIGHTS`, a registry of functions with one signature:
they take the selected patches (`SelectedPatches`) and return a raw score per patch, which
`coreset_weights` scales to mean 1 under `max_weight`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from patchbalance.balanced_table import check_weights
from patchbalance.errors import ConfigError, InputError
from patchbalance.measures import class_proportions
from patchbalance.sampling.scores import (
    inverse_frequency_scores,
    normalise_weights,
    repeat_factor_scores,
)

# What `keep` tells a user whose table has no usable weights.
OTHER_CHOICES = "choose inverse_frequency, repeat_factor or uniform"


@dataclass(frozen=True)
class SelectedPatches:
    """The selected patches as the weight functions read them.

    Attributes:
        amounts: (N, C) class pixel counts, or proportions when `are_counts` is False.
        window_pixels: (N,) pixels per window.
        input_weights: (N,) the input table's sampler_weight, or None without the column.
    """

    amounts: np.ndarray
    are_counts: bool
    window_pixels: np.ndarray
    input_weights: np.ndarray | None

    @property
    def counts(self) -> np.ndarray:
        """Return (N, C) pixel counts (proportions scaled by the window's pixels)."""
        if self.are_counts:
            return self.amounts
        return self.amounts * self.window_pixels[:, None]


def _keep(patches: SelectedPatches) -> np.ndarray:
    if patches.input_weights is None:
        raise InputError(
            "sampler_weights: keep needs a sampler_weight column in the input table; "
            + OTHER_CHOICES
        )
    return check_weights(
        patches.input_weights,
        "sampler_weights: keep: the selected rows' sampler_weight",
        all_zero_hint=OTHER_CHOICES,
    )


CORESET_WEIGHTS: dict[str, Callable[[SelectedPatches], np.ndarray]] = {
    "uniform": lambda patches: np.ones(len(patches.amounts)),
    "inverse_frequency": lambda patches: inverse_frequency_scores(
        class_proportions(patches.amounts)
    ),
    "repeat_factor": lambda patches: repeat_factor_scores(patches.counts, patches.window_pixels)[0],
    "keep": _keep,
}


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
    if method not in CORESET_WEIGHTS:
        raise ConfigError(
            f"unknown sampler_weights {method!r}; choose one of {', '.join(CORESET_WEIGHTS)}"
        )
    patches = SelectedPatches(amounts, are_counts, window_pixels, input_weights)
    return normalise_weights(CORESET_WEIGHTS[method](patches), power=1.0, max_weight=max_weight)
