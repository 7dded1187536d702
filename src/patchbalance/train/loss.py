"""The `loss:` block of `patchbalance train` (SPEC §7): class weights and summed loss terms.

`loss.class_weights` gives the cross-entropy one weight per class. A named scheme computes them
from f_c, class c's pixel share over the training table's active rows (its `px_<class>`
columns), under the sampler's weights when the training loader is weighted and uniformly
otherwise:

- `inverse_frequency`: w_c ∝ 1 / f_c;
- `median_frequency`: w_c = median(f) / f_c, the median over the classes present (Eigen &
  Fergus 2015). With f the pixel share, this is proportional to 1 / f_c, so once normalised it
  equals `inverse_frequency`;
- `inverse_sqrt`: w_c ∝ 1 / sqrt(f_c);
- `effective_number:<beta>`: w_c ∝ (1 - beta) / (1 - beta^n_c), n_c = f_c * P pixels, P the
  active rows' pixel total (Cui et al. 2019; with millions of pixels, beta must be very close
  to 1 for the weights to differ).

Then, in this order: the weights are scaled to a pixel-weighted mean of 1 (sum_c f_c w_c = 1);
a class with no pixel gets the largest weight of the present classes; and every weight above
`loss.max_class_weight` (default 50) is set to it. Clipping comes last, so the cap holds for
every weight the loss sees; when it binds, the pixel-weighted mean falls below 1 (logged).

A list (one weight per class) or a `{class index: weight}` mapping (classes not named get 1) is
used as written: neither normalised nor clipped.

`loss.terms` sums losses, each times its `factor`: `cross_entropy` (torch's CrossEntropyLoss,
which takes the class weights) and `dice` (segmentation_models_pytorch's DiceLoss, `mode`
multiclass by default), or any loss class named by `_target_`. Both skip the ignore index.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from patchbalance.atomic import atomic_writer
from patchbalance.balanced_table import read_balanced_table
from patchbalance.errors import ConfigError
from patchbalance.measures import class_share
from patchbalance.table import class_columns, dataset_excluded, drawn_weights, table_columns

log = logging.getLogger(__name__)

DEFAULT_MAX_CLASS_WEIGHT = 50.0
CLASS_WEIGHTS_FILE = "class_weights.json"
LOSS_OPTION_KEYS = ("class_weights", "max_class_weight")
CROSS_ENTROPY = "cross_entropy"
DICE = "dice"
DICE_MODES = ("binary", "multiclass", "multilabel")
CROSS_ENTROPY_TARGETS = ("torch.nn.CrossEntropyLoss", "torch.nn.modules.loss.CrossEntropyLoss")
TERM_TARGETS = {
    CROSS_ENTROPY: "torch.nn.CrossEntropyLoss",
    DICE: "segmentation_models_pytorch.losses.DiceLoss",
}
SCHEME_HELP = (
    "use inverse_frequency, median_frequency, inverse_sqrt, effective_number:<beta> with "
    "0 < beta < 1, a list of one weight per class, or a {class: weight} mapping"
)


# --------------------------------------------------------------------------------------------
# The schemes: raw weights from the class shares (infinite for an absent class)


def _inverse_frequency(share: np.ndarray, pixels: np.ndarray, beta: float | None) -> np.ndarray:
    return 1.0 / share


def _median_frequency(share: np.ndarray, pixels: np.ndarray, beta: float | None) -> np.ndarray:
    return float(np.median(share)) / share  # the shares of the present classes only


def _inverse_sqrt(share: np.ndarray, pixels: np.ndarray, beta: float | None) -> np.ndarray:
    return 1.0 / np.sqrt(share)


def _effective_number(share: np.ndarray, pixels: np.ndarray, beta: float | None) -> np.ndarray:
    assert beta is not None
    # 1 - beta^n as -expm1(n log beta): exact for the huge n of pixel counts and beta near 1.
    return (1.0 - beta) / -np.expm1(pixels * math.log(beta))


SCHEMES: dict[str, Callable[[np.ndarray, np.ndarray, float | None], np.ndarray]] = {
    "inverse_frequency": _inverse_frequency,
    "median_frequency": _median_frequency,
    "inverse_sqrt": _inverse_sqrt,
    "effective_number": _effective_number,
}


@dataclass(frozen=True)
class ClassWeightsSpec:
    """A validated `loss.class_weights`: a named scheme, or weights given one per class."""

    scheme: str
    beta: float | None = None
    given: tuple[float, ...] | None = None
    max_class_weight: float = DEFAULT_MAX_CLASS_WEIGHT

    @property
    def label(self) -> str:
        """Return the scheme as the configuration writes it (`effective_number:0.9999`)."""
        return self.scheme if self.beta is None else f"{self.scheme}:{self.beta!r}"


@dataclass
class ClassWeights:
    """The class weights a run's cross-entropy takes, and what they were computed from."""

    spec: ClassWeightsSpec
    weights: np.ndarray
    class_share: np.ndarray | None
    weighted: bool
    absent: list[int]
    clipped: list[int]

    def to_dict(self) -> dict[str, Any]:
        """Return what `class_weights.json` holds."""
        share = self.class_share
        return {
            "scheme": self.spec.scheme,
            "beta": self.spec.beta,
            "max_class_weight": None if self.spec.given else self.spec.max_class_weight,
            "class_share_source": None
            if share is None
            else ("weighted_sampler" if self.weighted else "uniform"),
            "class_share": None if share is None else [float(v) for v in share],
            "weights": [float(v) for v in self.weights],
            "pixel_weighted_mean": None if share is None else float(share @ self.weights),
            "absent_classes": self.absent,
            "clipped_classes": self.clipped,
        }

    def describe(self) -> str:
        """Return one line: the scheme, the share it used and the weights."""
        source = "as given"
        if self.class_share is not None:
            draws = "the weighted sampler's draws" if self.weighted else "uniform draws"
            source = f"pixel shares under {draws}"
        weights = ", ".join(f"{w:.4g}" for w in self.weights)
        return f"loss.class_weights {self.spec.label} ({source}): [{weights}]"


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError as exc:
        raise ConfigError(f"{what} must be a number, got {value!r}") from exc
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")
    return number


def _class_index(key: Any, n_classes: int) -> int:
    text = str(key).strip()
    index = int(text) if text.lstrip("-").isdigit() and not isinstance(key, bool) else None
    if index is None or not 0 <= index < n_classes:
        raise ConfigError(
            f"loss.class_weights names class {key!r}, which is not a class index "
            f"0..{n_classes - 1}; key the mapping by class index"
        )
    return index


def _given_weights(value: Any, n_classes: int) -> tuple[float, ...]:
    if isinstance(value, Mapping):
        weights = [1.0] * n_classes
        for key, weight in value.items():
            index = _class_index(key, n_classes)
            weights[index] = _number(weight, f"loss.class_weights[{index}]")
    else:
        if len(value) != n_classes:
            raise ConfigError(
                f"loss.class_weights has {len(value)} weights but there are {n_classes} classes; "
                "give one weight per class, or a {class: weight} mapping"
            )
        weights = [_number(w, f"loss.class_weights[{i}]") for i, w in enumerate(value)]
    if not any(weights):
        raise ConfigError("loss.class_weights are all 0; give at least one class a weight > 0")
    return tuple(weights)


def _scheme_and_beta(value: str) -> tuple[str, float | None]:
    name, _, argument = value.strip().partition(":")
    if name not in SCHEMES:
        raise ConfigError(f"loss.class_weights: unknown scheme {value!r}; {SCHEME_HELP}")
    if name != "effective_number":
        if argument:
            raise ConfigError(f"loss.class_weights: {name} takes no ':' argument, got {value!r}")
        return name, None
    try:
        beta = float(argument)
    except ValueError as exc:
        raise ConfigError(
            f"loss.class_weights: {value!r} needs a beta, e.g. effective_number:0.999999"
        ) from exc
    if not 0 < beta < 1:
        raise ConfigError(
            f"loss.class_weights: effective_number's beta must lie strictly between 0 and 1, "
            f"got {argument}"
        )
    return name, beta


def parse_class_weights(
    loss_block: Mapping[str, Any] | None, n_classes: int
) -> ClassWeightsSpec | None:
    """Return the validated `loss.class_weights` of a `loss:` block (None when absent).

    Raises `ConfigError` naming `loss.class_weights` (or `loss.max_class_weight`) for an
    unknown scheme, a beta outside (0, 1), a list of the wrong length, a negative weight or a
    class outside 0..n_classes-1.
    """
    block = dict(loss_block or {})
    value = block.get("class_weights")
    cap_value = block.get("max_class_weight", DEFAULT_MAX_CLASS_WEIGHT)
    cap = _number(cap_value, "loss.max_class_weight")
    if cap < 1:
        raise ConfigError(
            f"loss.max_class_weight must be >= 1 (the weights' pixel-weighted mean), got {cap_value}"
        )
    if value is None:
        return None
    if isinstance(value, str):
        scheme, beta = _scheme_and_beta(value)
        return ClassWeightsSpec(scheme, beta, None, cap)
    if isinstance(value, Mapping) or (isinstance(value, Sequence) and not isinstance(value, bytes)):
        kind = "mapping" if isinstance(value, Mapping) else "list"
        return ClassWeightsSpec(kind, None, _given_weights(value, n_classes), cap)
    raise ConfigError(f"loss.class_weights: {value!r} is not understood; {SCHEME_HELP}")


# --------------------------------------------------------------------------------------------
# From the class counts to the weights


def class_weights_from_counts(
    spec: ClassWeightsSpec, counts: np.ndarray, draw_weights: np.ndarray | None = None
) -> ClassWeights:
    """Return the class weights of `spec` for the active rows' class counts.

    Args:
        spec: a named scheme (weights given as a list or mapping are returned as written).
        counts: (N, C) pixel counts of the active rows, column c for class index c.
        draw_weights: (N,) the sampler's weights of those rows, or None for uniform draws.

    Returns:
        The weights, normalised to sum_c f_c w_c = 1, absent classes filled and then clipped.
    """
    counts = np.nan_to_num(np.asarray(counts, dtype=np.float64))
    weighted = draw_weights is not None
    share = class_share(counts, None if draw_weights is None else np.asarray(draw_weights, float))
    if spec.given is not None:
        return ClassWeights(spec, np.asarray(spec.given, float), share, weighted, [], [])
    present = share > 0
    if not present.any():
        raise ConfigError(
            "loss.class_weights: the training table's active rows have no class pixel at all; "
            "check its px_<class> columns and the dataset's class_values"
        )
    pixels = share * counts.sum()
    raw = np.full(share.shape, np.nan)
    raw[present] = SCHEMES[spec.scheme](share[present], pixels[present], spec.beta)
    weights = raw / float(share[present] @ raw[present])
    weights[~present] = weights[present].max()
    clipped = weights > spec.max_class_weight
    weights = np.minimum(weights, spec.max_class_weight)
    return ClassWeights(
        spec,
        weights,
        share,
        weighted,
        [int(c) for c in np.flatnonzero(~present)],
        [int(c) for c in np.flatnonzero(clipped)],
    )


def _class_index_of_values(dataset: Any, values: list[int], n_classes: int) -> np.ndarray:
    """Return the class index of each raw class value (-1 for a value that is no class)."""
    if hasattr(dataset, "map_mask"):
        index = np.asarray(dataset.map_mask(np.asarray(values, dtype=np.float64)), dtype=np.int64)
    else:
        order = getattr(dataset, "class_values", None) or list(range(n_classes))
        position = {int(v): j for j, v in enumerate(order[:n_classes])}
        index = np.asarray([position.get(int(v), -1) for v in values], dtype=np.int64)
    return np.where((index >= 0) & (index < n_classes), index, -1)


def dataset_class_counts(dataset: Any, n_classes: int) -> np.ndarray:
    """Return (rows, n_classes) pixel counts of the dataset's rows, from its table's px_ columns.

    Raw class value v (`px_<v>`) counts for the class index the dataset maps v to; values that
    map to no class (nodata) are left out.
    """
    path = Path(dataset.input_csv_path)
    columns, values = class_columns(pd.DataFrame(columns=table_columns(path, "training table")))
    if not columns:
        raise ConfigError(
            f"loss.class_weights needs the class pixel counts (px_<class> columns) of a balanced "
            f"table, and {path} has none; train on a table from build-balanced-dataset, or give "
            "the weights as a list"
        )
    # The rows the dataset kept (n_first_rows_to_read, drop_excluded), read by the table's
    # one pixel-count rule: text, empty, negative or fractional counts in an active row are an
    # error naming the column and the row, as in `report`.
    table = read_balanced_table(path, columns=columns, rows=getattr(dataset, "row_numbers", None))
    raw, _ = table.class_counts()
    index = _class_index_of_values(dataset, values, n_classes)
    # Several raw values may map to one class (mask_class_mapping): sum their columns.
    to_class = np.zeros((len(values), n_classes))
    to_class[np.flatnonzero(index >= 0), index[index >= 0]] = 1.0
    return raw @ to_class


def training_class_weights(
    spec: ClassWeightsSpec, dataset: Any, n_classes: int, weighted: bool
) -> ClassWeights:
    """Return the class weights of `spec` for a training dataset, and log them.

    Active rows are those the table does not mark `excluded`; with `weighted`, each counts by
    its sampler weight (excluded rows weigh 0), else all count the same.
    """
    if spec.given is not None:
        result = ClassWeights(spec, np.asarray(spec.given, float), None, weighted, [], [])
    else:
        counts = dataset_class_counts(dataset, n_classes)
        excluded = dataset_excluded(dataset)
        active = np.ones(len(counts), bool) if excluded is None else ~np.asarray(excluded, bool)
        draw = None
        if weighted:
            draw = drawn_weights(dataset.sampler_weights, excluded, warn=False)[active]
        result = class_weights_from_counts(spec, counts[active], draw)
    log.info("%s", result.describe())
    if result.class_share is not None:
        shares = ", ".join(f"{v:.4%}" for v in result.class_share)
        log.info("loss.class_weights: class pixel shares [%s]", shares)
    if result.absent:
        log.info(
            "loss.class_weights: class(es) %s have no pixel in the training table; they get the "
            "largest weight of the present classes",
            ", ".join(map(str, result.absent)),
        )
    if result.clipped:
        log.info(
            "loss.class_weights: class(es) %s clipped to max_class_weight %g; the weights' "
            "pixel-weighted mean is now %.4f",
            ", ".join(map(str, result.clipped)),
            spec.max_class_weight,
            float(result.class_share @ result.weights),  # type: ignore[operator]
        )
    return result


def write_class_weights(weights: ClassWeights, path: Path) -> None:
    """Write the weights, scheme and class shares as JSON at `path`, atomically."""
    with atomic_writer(path) as stream:
        json.dump(weights.to_dict(), stream, indent=2)
        stream.write("\n")


# --------------------------------------------------------------------------------------------
# Loss terms


@dataclass(frozen=True)
class LossTerm:
    """One term of the loss: the `_target_` mapping to instantiate and its factor."""

    spec: dict[str, Any]
    factor: float
    where: str

    @property
    def is_cross_entropy(self) -> bool:
        """Whether the term is torch's CrossEntropyLoss (the one the class weights go to)."""
        return str(self.spec.get("_target_")) in CROSS_ENTROPY_TARGETS


def _term(item: Any, where: str, ignore_index: int, in_terms: bool = True) -> LossTerm:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where} must be a mapping such as {{name: dice, factor: 0.5}}")
    spec = dict(item)
    factor = _number(spec.pop("factor", 1.0), f"{where}.factor") if in_terms else 1.0
    name = spec.pop("name", None)
    if "_target_" not in spec:
        if name not in TERM_TARGETS:
            raise ConfigError(
                f"{where}.name must be {CROSS_ENTROPY} or {DICE} (or give a _target_ loss "
                f"class), got {name!r}"
            )
        spec["_target_"] = TERM_TARGETS[name]
        if name == DICE:
            spec.setdefault("mode", "multiclass")
    if str(spec["_target_"]) == TERM_TARGETS[DICE] and spec.get("mode") not in DICE_MODES:
        raise ConfigError(
            f"{where}.mode must be one of {', '.join(DICE_MODES)} (segmentation_models_pytorch's "
            f"DiceLoss modes; multiclass for class masks), got {spec.get('mode')!r}"
        )
    target = str(spec["_target_"])
    if target in CROSS_ENTROPY_TARGETS or target == TERM_TARGETS[DICE]:
        # Masks carry ignore_index for nodata; both losses must skip it.
        spec.setdefault("ignore_index", ignore_index)
    return LossTerm(spec, factor, where)


def loss_terms(block: Mapping[str, Any] | None, ignore_index: int) -> list[LossTerm]:
    """Return the terms of a `loss:` block: its `terms` list, or the block as one loss.

    The default, with no block, is one CrossEntropyLoss skipping `ignore_index`. Raises
    `ConfigError` for a malformed term, a `weight` given beside `loss.class_weights`, or class
    weights without a cross-entropy term.
    """
    spec = {k: v for k, v in dict(block or {}).items() if k not in LOSS_OPTION_KEYS}
    if "terms" in spec:
        items = spec.pop("terms")
        if spec:
            raise ConfigError(
                f"loss: with 'terms', put {', '.join(sorted(spec))} inside a term; the block "
                "takes only terms, class_weights and max_class_weight"
            )
        if not isinstance(items, Sequence) or isinstance(items, str) or not items:
            raise ConfigError("loss.terms must be a non-empty list of terms")
        terms = [_term(item, f"loss.terms[{i}]", ignore_index) for i, item in enumerate(items)]
        if not any(term.factor for term in terms):
            raise ConfigError(
                "loss.terms: every factor is 0, so the loss is 0 and nothing would train; give "
                "at least one term a factor above 0"
            )
    else:
        spec.setdefault("_target_", TERM_TARGETS[CROSS_ENTROPY])
        spec.pop("name", None)  # upstream losses carry a display name
        terms = [_term(spec, "loss", ignore_index, in_terms=False)]
    if (block or {}).get("class_weights") is not None:
        cross_entropy = [term for term in terms if term.is_cross_entropy]
        if not cross_entropy:
            raise ConfigError(
                "loss.class_weights go to the cross-entropy, and the loss has none; add a "
                f"term {{name: {CROSS_ENTROPY}}} or remove class_weights"
            )
        for term in cross_entropy:
            if "weight" in term.spec:
                raise ConfigError(
                    f"{term.where}.weight and loss.class_weights both set class weights; keep one"
                )
    return terms


class LossSum(torch.nn.Module):
    """The sum of loss terms, each times its factor: sum_k factor_k * loss_k(logits, target)."""

    def __init__(self, losses: Sequence[torch.nn.Module], factors: Sequence[float]) -> None:
        super().__init__()
        self.losses = torch.nn.ModuleList(losses)
        self.factors = [float(f) for f in factors]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the weighted sum of the terms' losses."""
        total = None
        for factor, loss in zip(self.factors, self.losses, strict=True):
            value = factor * loss(logits, target)
            total = value if total is None else total + value
        return total
