"""The sampling methods of SPEC §3.7, as a registry: a name maps to one function.

Every method has the same signature: it takes the `Signals` of the active patches (computed
once: counts, proportions, uniform share, composition and uniqueness) and the `weights:` block
(validated once, by the configuration), and returns a raw score per active patch with notes for
the summary. `normalise_weights` then applies `power`, `uniform_mix` and `max_weight` as for
every method.

A new method is one function registered here, plus its parameters in `WeightsConfig`:

    @register_sampling_method("my_method")
    def my_method(signals: Signals, settings: WeightsConfig) -> MethodResult:
        return signals.proportions[:, -1] + 1e-3, {}

The configuration accepts every registered name for `sampling_method`.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from patchbalance.measures import class_proportions, class_share
from patchbalance.sampling.class_target import class_target_weights, parse_target_share
from patchbalance.sampling.scores import (
    average_rank,
    cluster_balanced_scores,
    inverse_frequency_scores,
    repeat_factor_scores,
)

log = logging.getLogger(__name__)

MethodResult = tuple[np.ndarray, dict[str, Any]]


@dataclass
class Signals:
    """What a sampling method may read about the active patches, each computed once.

    Attributes:
        counts: (N, C) pixel counts per class.
        class_values: the class value of each count column.
        window_pixels: (N,) pixels per window.
        composition_score: (N,) 1 / the size of the patch's composition cluster.
        cluster_id: (N,) the composition cluster of each patch.
        uniqueness: (N,) visual uniqueness, or None in masks_only mode.
    """

    counts: np.ndarray
    class_values: list[int]
    window_pixels: np.ndarray
    composition_score: np.ndarray
    cluster_id: np.ndarray
    uniqueness: np.ndarray | None = None

    @cached_property
    def proportions(self) -> np.ndarray:
        """Return (N, C) class proportions of each patch's valid pixels."""
        return class_proportions(self.counts)

    @cached_property
    def uniform_share(self) -> np.ndarray:
        """Return (C,) the class pixel share per epoch under uniform draws."""
        return class_share(np.asarray(self.counts))

    @cached_property
    def composition_rank(self) -> np.ndarray:
        """Return r_c: the average rank of the composition score, in (0, 1]."""
        return average_rank(self.composition_score)

    @cached_property
    def uniqueness_rank(self) -> np.ndarray | None:
        """Return r_u: the average rank of the uniqueness score (None without embeddings)."""
        return None if self.uniqueness is None else average_rank(self.uniqueness)


Method = Callable[[Signals, Any], MethodResult]


@dataclass(frozen=True)
class SamplingMethod:
    """A registered method: its function and what it needs from the build."""

    name: str
    scores: Method
    needs_uniqueness: bool = False


SAMPLING_METHODS: dict[str, SamplingMethod] = {}


def register_sampling_method(
    name: str, needs_uniqueness: bool = False
) -> Callable[[Method], Method]:
    """Return a decorator that registers a method function under `name`."""

    def register(function: Method) -> Method:
        SAMPLING_METHODS[name] = SamplingMethod(name, function, needs_uniqueness)
        return function

    return register


def get_sampling_method(name: str) -> SamplingMethod:
    """Return the registered method `name`; a `ValueError` names the closest ones otherwise."""
    if name in SAMPLING_METHODS:
        return SAMPLING_METHODS[name]
    close = difflib.get_close_matches(name, SAMPLING_METHODS, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ValueError(
        f"unknown sampling_method '{name}'; {hint}choose one of {', '.join(SAMPLING_METHODS)}"
    )


def sampling_scores(name: str, signals: Signals, settings: Any) -> MethodResult:
    """Return the raw score of method `name` for each active patch, and its summary notes."""
    return get_sampling_method(name).scores(signals, settings)


def _reduced(name: str) -> dict[str, Any]:
    return {
        "reduced": f"{name} without embeddings uses the composition signal alone "
        "(mode masks_only has no uniqueness)"
    }


def _rank_method(name: str, combine: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
    def scores(signals: Signals, settings: Any) -> MethodResult:
        if signals.uniqueness_rank is None:
            return signals.composition_rank, _reduced(name)
        return combine(signals.composition_rank, signals.uniqueness_rank), {}

    register_sampling_method(name)(scores)


_rank_method("rank_max", np.maximum)
_rank_method("rank_multiply", np.multiply)
_rank_method("rank_add", lambda r_c, r_u: (r_c + r_u) / 2.0)


@register_sampling_method("multiplicative")
def _multiplicative(signals: Signals, settings: Any) -> MethodResult:
    score = np.asarray(signals.composition_score, dtype=np.float64)
    if signals.uniqueness is None:
        return score.copy(), _reduced("multiplicative")
    return score * signals.uniqueness, {}


@register_sampling_method("composition_only")
def _composition_only(signals: Signals, settings: Any) -> MethodResult:
    return signals.composition_rank, {}


@register_sampling_method("uniqueness_only", needs_uniqueness=True)
def _uniqueness_only(signals: Signals, settings: Any) -> MethodResult:
    # The configuration has checked that the mode computes uniqueness.
    return signals.uniqueness_rank, {}


@register_sampling_method("cluster_balanced")
def _cluster_balanced(signals: Signals, settings: Any) -> MethodResult:
    return (
        cluster_balanced_scores(signals.composition_score, signals.cluster_id, signals.uniqueness),
        {},
    )


@register_sampling_method("repeat_factor")
def _repeat_factor(signals: Signals, settings: Any) -> MethodResult:
    return repeat_factor_scores(
        signals.counts, signals.window_pixels, settings.min_pixels, settings.repeat_threshold
    )


@register_sampling_method("inverse_frequency")
def _inverse_frequency(signals: Signals, settings: Any) -> MethodResult:
    return inverse_frequency_scores(signals.proportions, sqrt=settings.sqrt), {}


@register_sampling_method("class_target")
def _class_target(signals: Signals, settings: Any) -> MethodResult:
    values = list(signals.class_values)
    if not signals.uniform_share.any():
        note = "no active patch has pixels of the classes: the weights are equal"
        log.warning("class_target: %s", note)
        return np.ones(len(signals.counts)), {
            "class_target": {"target_share": settings.target_share, "notes": [note]}
        }
    target = parse_target_share(settings.target_share, signals.uniform_share, values)
    # class_target_weights makes the one float64 copy of the counts it needs.
    result = class_target_weights(np.asarray(signals.counts), target, settings.min_ess)
    for note in result.notes:
        log.warning("class_target: %s", note)
    return result.probabilities, {
        "class_target": {"target_share": settings.target_share, **result.to_summary(values)}
    }
