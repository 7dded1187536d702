"""The sampling methods of SPEC §3.7, as a registry: a name maps to one function and the model of
its own parameters.

Every method has the same signature: it takes the `Signals` of the active patches (computed
once: counts, proportions, uniform share, composition and uniqueness) and its own parameters
(the keys of the `weights:` block that its model declares, validated by that model), and returns
a raw score per active patch with notes for the summary. `normalise_weights` then applies the
keys every method shares, `power`, `uniform_mix` and `max_weight`.

A new method is one function and, when it has parameters, one model, registered together:

    class MyParams(MethodParams):
        column: int = -1

    @register_sampling_method("my_method", params=MyParams)
    def my_method(signals: Signals, params: MyParams) -> MethodResult:
        return signals.proportions[:, params.column] + 1e-3, {}

The configuration then accepts `sampling_method: my_method` and `weights.column`, and a wrong
type is an error naming `weights.column`. A model's `summary_block` says what the build summary
records of its parameters.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

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


class MethodParams(BaseModel):
    """A method's own keys of the `weights:` block; a method without keys uses this model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def summary_block(self) -> dict[str, Any]:
        """Return what the build summary's `weights` block records of these parameters."""
        return {}


Method = Callable[[Signals, Any], MethodResult]


@dataclass(frozen=True)
class SamplingMethod:
    """A registered method: its function, its parameters model and what it needs.

    Attributes:
        needs_uniqueness: the method reads visual uniqueness (mode: embeddings only).
        sets_class_shares: the method solves for class pixel shares itself, so a starved class
            warning does not point to it as the remedy.
    """

    name: str
    scores: Method
    params: type[MethodParams] = MethodParams
    needs_uniqueness: bool = False
    sets_class_shares: bool = False

    def parse_params(self, values: Mapping[str, Any]) -> MethodParams:
        """Return the method's parameters from its keys of `weights:`; a pydantic
        `ValidationError` names the key otherwise."""
        return self.params.model_validate(dict(values))


SAMPLING_METHODS: dict[str, SamplingMethod] = {}


def register_sampling_method(
    name: str,
    params: type[MethodParams] = MethodParams,
    needs_uniqueness: bool = False,
    sets_class_shares: bool = False,
) -> Callable[[Method], Method]:
    """Return a decorator that registers a method function and its parameters under `name`."""

    def register(function: Method) -> Method:
        SAMPLING_METHODS[name] = SamplingMethod(
            name, function, params, needs_uniqueness, sets_class_shares
        )
        return function

    return register


def parameter_owners() -> dict[str, list[str]]:
    """Return each `weights:` key some method declares, with the methods that declare it."""
    owners: dict[str, list[str]] = {}
    for method in SAMPLING_METHODS.values():
        for key in method.params.model_fields:
            owners.setdefault(key, []).append(method.name)
    return owners


def get_sampling_method(name: str) -> SamplingMethod:
    """Return the registered method `name`; a `ValueError` names the closest ones otherwise."""
    if name in SAMPLING_METHODS:
        return SAMPLING_METHODS[name]
    close = difflib.get_close_matches(name, SAMPLING_METHODS, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ValueError(
        f"unknown sampling_method '{name}'; {hint}choose one of {', '.join(SAMPLING_METHODS)}"
    )


def sampling_scores(
    name: str, signals: Signals, params: MethodParams | None = None
) -> MethodResult:
    """Return the raw score of method `name` for each active patch, and its summary notes.

    `params` are the method's validated parameters; None uses the defaults of its model.
    """
    method = get_sampling_method(name)
    return method.scores(signals, method.parse_params({}) if params is None else params)


def _reduced(name: str) -> dict[str, Any]:
    return {
        "reduced": f"{name} without embeddings uses the composition signal alone "
        "(mode masks_only has no uniqueness)"
    }


def _rank_method(name: str, combine: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
    def scores(signals: Signals, params: MethodParams) -> MethodResult:
        if signals.uniqueness_rank is None:
            return signals.composition_rank, _reduced(name)
        return combine(signals.composition_rank, signals.uniqueness_rank), {}

    register_sampling_method(name)(scores)


_rank_method("rank_max", np.maximum)
_rank_method("rank_multiply", np.multiply)
_rank_method("rank_add", lambda r_c, r_u: (r_c + r_u) / 2.0)


@register_sampling_method("multiplicative")
def _multiplicative(signals: Signals, params: MethodParams) -> MethodResult:
    score = np.asarray(signals.composition_score, dtype=np.float64)
    if signals.uniqueness is None:
        return score.copy(), _reduced("multiplicative")
    return score * signals.uniqueness, {}


@register_sampling_method("composition_only")
def _composition_only(signals: Signals, params: MethodParams) -> MethodResult:
    return signals.composition_rank, {}


@register_sampling_method("uniqueness_only", needs_uniqueness=True)
def _uniqueness_only(signals: Signals, params: MethodParams) -> MethodResult:
    # The configuration has checked that the mode computes uniqueness.
    return signals.uniqueness_rank, {}


@register_sampling_method("cluster_balanced")
def _cluster_balanced(signals: Signals, params: MethodParams) -> MethodResult:
    return (
        cluster_balanced_scores(signals.composition_score, signals.cluster_id, signals.uniqueness),
        {},
    )


class RepeatFactorParams(MethodParams):
    """`repeat_factor`: the pixels that make a class present, and the frequency threshold."""

    min_pixels: float | None = Field(default=None, gt=0)
    repeat_threshold: float | None = Field(default=None, gt=0)


@register_sampling_method("repeat_factor", params=RepeatFactorParams)
def _repeat_factor(signals: Signals, params: RepeatFactorParams) -> MethodResult:
    return repeat_factor_scores(
        signals.counts, signals.window_pixels, params.min_pixels, params.repeat_threshold
    )


class InverseFrequencyParams(MethodParams):
    """`inverse_frequency`: `sqrt` takes the square root of the inverse frequencies."""

    sqrt: bool = False


@register_sampling_method("inverse_frequency", params=InverseFrequencyParams)
def _inverse_frequency(signals: Signals, params: InverseFrequencyParams) -> MethodResult:
    return inverse_frequency_scores(signals.proportions, sqrt=params.sqrt), {}


# The floor on class_target's effective sample size, a share of the active patches (SPEC §3.8):
# below the ESS of the published gains (12 % Harvey, 19.6 % held-out chips), so it does not bind
# there; it lifts a degenerate solution.
DEFAULT_MIN_ESS = 0.1


def check_target_share(value: str | dict[int, float]) -> str | dict[int, float]:
    """Return a valid `target_share` (sqrt, balanced, power:<p>, {class: share}); else ValueError."""
    if isinstance(value, dict):
        if any(not 0.0 <= share <= 1.0 for share in value.values()):
            raise ValueError("every share in target_share must lie in [0, 1]")
        if sum(value.values()) > 1.0 + 1e-9:
            raise ValueError("the shares in target_share add up to more than 1")
        return value
    if value in ("sqrt", "balanced"):
        return value
    match = re.fullmatch(r"power:([0-9.eE+-]+)", value)
    if match:
        try:
            exponent = float(match.group(1))
        except ValueError:
            exponent = -1.0
        if 0.0 <= exponent <= 1.0:
            return value
    raise ValueError(
        f"'{value}' is not sqrt, balanced, power:<p> with p in [0, 1], or a mapping "
        "{class: share}"
    )


class ClassTargetParams(MethodParams):
    """`class_target` (SPEC §3.8): the class shares to deliver and the floor on the ESS (0 turns
    it off)."""

    target_share: str | dict[int, float] = "sqrt"
    min_ess: float = Field(default=DEFAULT_MIN_ESS, ge=0, le=1)

    @field_validator("target_share")
    @classmethod
    def _known_target(cls, value: str | dict[int, float]) -> str | dict[int, float]:
        return check_target_share(value)

    def summary_block(self) -> dict[str, Any]:
        return {"min_ess": self.min_ess}


@register_sampling_method("class_target", params=ClassTargetParams, sets_class_shares=True)
def _class_target(signals: Signals, params: ClassTargetParams) -> MethodResult:
    values = list(signals.class_values)
    if not signals.uniform_share.any():
        note = "no active patch has pixels of the classes: the weights are equal"
        log.warning("class_target: %s", note)
        return np.ones(len(signals.counts)), {
            "class_target": {"target_share": params.target_share, "notes": [note]}
        }
    target = parse_target_share(params.target_share, signals.uniform_share, values)
    # class_target_weights makes the one float64 copy of the counts it needs.
    result = class_target_weights(np.asarray(signals.counts), target, params.min_ess)
    for note in result.notes:
        log.warning("class_target: %s", note)
    return result.probabilities, {
        "class_target": {"target_share": params.target_share, **result.to_summary(values)}
    }
