"""Sampler schedules and the drawn class shares of a training run (SPEC §7, `sampler_schedule`).

A weighted sampler shifts the class prior the model learns; a schedule changes the draw weights
while the model trains, through the sampler's `set_weights` (the same on every rank):

- `anneal` (`{name: anneal, start: s}`): the table's weights until the fraction `s` of the
  steps, then a straight line, in draw probabilities, to uniform over the same active rows
  (rows the table never draws stay at 0): balanced first, then back to the natural mix.
- `adaptive` (`{name: adaptive, every: k, gamma: g}`): every k steps the class targets are
  re-solved with `class_target` on the table's pixel counts, each class's target scaled by
  (1 - IoU_c)^g and renormalised, under the `min_ess` floor. IoU_c comes from the model's own
  predictions on the batches it trained on since the last update, never from validation data.

`TrainingDraws` is what an engine calls after each optimizer step: it counts the class pixels
of the batches actually trained on (the `drawn_share_<class>` columns of metrics.csv), keeps the
adaptive schedule's confusion matrix and applies the schedule. Counts are summed over ranks by
the `reduce` callable the engine gives (identity on one process).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from patchbalance.config.loading import StrictModel
from patchbalance.sampling.registry import DEFAULT_MIN_ESS, check_target_share

log = logging.getLogger(__name__)

# An anneal changes the weights at most this many times (each change redraws the rest of the
# epoch, which costs a pass over the rows).
ANNEAL_UPDATES = 100
DRAWN_SHARE = "drawn_share_"


class AnnealSchedule(StrictModel):
    """`sampler_schedule: {name: anneal, start: s}`."""

    name: Literal["anneal"]
    start: float = Field(default=0.7, ge=0.0, lt=1.0)


class AdaptiveSchedule(StrictModel):
    """`sampler_schedule: {name: adaptive, every: k, gamma: g, target_share, min_ess}`."""

    name: Literal["adaptive"]
    every: int = Field(default=50, ge=1)
    gamma: float = Field(default=1.0, ge=0.0)
    # The targets before the IoU gaps scale them (sqrt, balanced or power:<p>), and the ESS
    # floor: the default build's.
    target_share: str = "sqrt"
    min_ess: float = Field(default=DEFAULT_MIN_ESS, ge=0.0, le=1.0)

    @field_validator("target_share")
    @classmethod
    def _known_target(cls, value: str) -> str:
        check_target_share(value)
        return value


SamplerSchedule = Annotated[AnnealSchedule | AdaptiveSchedule, Field(discriminator="name")]
Reduce = Callable[[np.ndarray], np.ndarray]


def _identity(values: np.ndarray) -> np.ndarray:
    return values


def anneal_probabilities(table: np.ndarray, fraction: float) -> np.ndarray:
    """Return the draw probabilities a fraction of the way from the table's to uniform.

    Args:
        table: (N,) the table's draw weights (0 for rows never drawn).
        fraction: 0 gives the table's probabilities, 1 uniform over the rows of weight > 0.

    Returns:
        (N,) probabilities summing to 1, 0 wherever `table` is 0.
    """
    table = np.asarray(table, dtype=np.float64)
    active = table > 0
    uniform = active / np.count_nonzero(active)
    return (1.0 - fraction) * table / table.sum() + fraction * uniform


def anneal_fraction(step: int, total_steps: int, start: float) -> float:
    """Return how far the anneal has gone after `step` optimizer steps (0 before `start`).

    The fraction moves in at most `ANNEAL_UPDATES` equal increments, reaching 1 at the last step.
    """
    begin = start * total_steps
    if step <= begin or total_steps <= begin:
        return 0.0
    fraction = min((step - begin) / (total_steps - begin), 1.0)
    return float(np.floor(fraction * ANNEAL_UPDATES + 1e-9) / ANNEAL_UPDATES)


def gap_scaled_target(target: np.ndarray, iou: np.ndarray, gamma: float) -> np.ndarray:
    """Return `target` scaled by the IoU gap (1 - IoU_c)^gamma, renormalised.

    Classes without a target keep none; if every gap is 0, the target is returned unchanged.
    """
    scaled = np.asarray(target, dtype=np.float64) * np.power(1.0 - np.clip(iou, 0.0, 1.0), gamma)
    return scaled / scaled.sum() if scaled.sum() > 0 else np.asarray(target, dtype=np.float64)


class TrainingDraws:
    """Drawn class shares and the sampler schedule of one training run.

    Args:
        n_classes: the number of classes (columns of the masks' class indices).
        ignore_index: the mask value left out of every count.
        schedule: the `sampler_schedule` block, or None to keep the table's weights.
        sampler: the training sampler (needs `set_weights` when there is a schedule).
        table_weights: (N,) the table's draw weights, 0 for excluded rows.
        class_counts: (N, n_classes) pixel counts per row (the adaptive schedule's input).
        total_steps: the run's optimizer steps (the anneal's time line).
        reduce: sums an array over the ranks (identity on one process).
    """

    def __init__(
        self,
        n_classes: int,
        ignore_index: int,
        schedule: AnnealSchedule | AdaptiveSchedule | None = None,
        sampler: Any = None,
        table_weights: np.ndarray | None = None,
        class_counts: np.ndarray | None = None,
        total_steps: int | None = None,
        reduce: Reduce | None = None,
    ) -> None:
        self.n_classes = int(n_classes)
        self.ignore_index = int(ignore_index)
        self.schedule = schedule
        self.sampler = sampler
        self.table_weights = table_weights
        self.class_counts = class_counts
        self.total_steps = total_steps
        self.reduce = reduce or _identity
        self.drawn = np.zeros(self.n_classes, dtype=np.float64)
        self.confusion = np.zeros((self.n_classes, self.n_classes), dtype=np.float64)
        self.fraction = 0.0
        self.iou = np.zeros(self.n_classes)
        self.updates: list[dict[str, Any]] = []
        if schedule is not None:
            self._check()

    def _check(self) -> None:
        if not hasattr(self.sampler, "set_weights"):
            raise TypeError("a sampler_schedule needs a sampler with set_weights")
        if self.table_weights is None or self.total_steps is None:
            raise ValueError("a sampler_schedule needs the table's weights and the run's steps")
        if isinstance(self.schedule, AdaptiveSchedule) and self.class_counts is None:
            raise ValueError("the adaptive schedule needs the table's class pixel counts")

    def after_step(self, step: int, masks: Any, logits: Any = None) -> None:
        """Count a trained batch and apply the schedule after optimizer step `step` (1-based).

        Args:
            step: optimizer steps done so far.
            masks: the batch's (B, H, W) class-index masks (a torch tensor).
            logits: the batch's (B, C, H, W) logits (needed by the adaptive schedule).
        """
        self.count(masks, logits)
        self.apply(step)

    def count(self, masks: Any, logits: Any = None) -> None:
        """Count a trained batch's class pixels (and, for the adaptive schedule, its confusion).

        Args:
            masks: the batch's (B, H, W) class-index masks (a torch tensor).
            logits: the batch's (B, C, H, W) logits (needed by the adaptive schedule).
        """
        import torch

        from patchbalance.train.metrics import confusion_matrix

        with torch.no_grad():
            labels = masks.reshape(-1)
            valid = (labels >= 0) & (labels < self.n_classes) & (labels != self.ignore_index)
            counts = torch.bincount(labels[valid].long(), minlength=self.n_classes)
            self.drawn += counts.cpu().numpy()[: self.n_classes]
            if isinstance(self.schedule, AdaptiveSchedule) and logits is not None:
                predicted = logits.detach().argmax(dim=1)
                self.confusion += (
                    confusion_matrix(predicted, masks, self.n_classes, self.ignore_index)
                    .cpu()
                    .numpy()
                )

    def apply(self, step: int) -> None:
        """Apply the schedule after optimizer step `step` (1-based): once per step.

        Args:
            step: optimizer steps done so far.
        """
        if isinstance(self.schedule, AnnealSchedule):
            self._anneal(step)
        elif isinstance(self.schedule, AdaptiveSchedule) and step % self.schedule.every == 0:
            self._adapt(step)

    def _anneal(self, step: int) -> None:
        assert isinstance(self.schedule, AnnealSchedule)
        fraction = anneal_fraction(step, int(self.total_steps or 0), self.schedule.start)
        if fraction != self.fraction:
            self.fraction = fraction
            self.sampler.set_weights(anneal_probabilities(self.table_weights, fraction))

    def _adapt(self, step: int) -> None:
        from patchbalance.measures import class_share
        from patchbalance.sampling.class_target import class_target_weights, parse_target_share
        from patchbalance.train.metrics import iou_from_confusion

        assert isinstance(self.schedule, AdaptiveSchedule)
        confusion = self.reduce(self.confusion)
        self.confusion = np.zeros_like(self.confusion)
        iou = iou_from_confusion(confusion)
        # A class neither labelled nor predicted since the last update keeps its last IoU.
        self.iou = np.where(np.isnan(iou), self.iou, iou)
        active = np.asarray(self.table_weights) > 0
        counts = np.asarray(self.class_counts, dtype=np.float64)[active]
        uniform = class_share(counts)
        base = parse_target_share(self.schedule.target_share, uniform, list(range(self.n_classes)))
        target = gap_scaled_target(base, self.iou, self.schedule.gamma)
        result = class_target_weights(counts, target, min_ess=self.schedule.min_ess)
        weights = np.zeros(active.size)
        weights[active] = result.probabilities
        self.sampler.set_weights(weights)
        self.updates.append(
            {"step": step, "iou": self.iou.tolist(), "target": result.target.tolist()}
        )
        log.info(
            "adaptive sampler_schedule at step %d: training IoU %s, targets %s",
            step,
            np.round(self.iou, 3).tolist(),
            np.round(result.target, 4).tolist(),
        )

    def take_drawn_shares(self) -> dict[str, float]:
        """Return the `drawn_share_<class>` columns since the last call, and start counting anew.

        Returns:
            One share per class index (NaN when no labelled pixel was drawn).
        """
        counts = self.reduce(self.drawn)
        self.drawn = np.zeros_like(self.drawn)
        total = counts.sum()
        shares = counts / total if total > 0 else np.full(self.n_classes, np.nan)
        return {f"{DRAWN_SHARE}{c}": float(v) for c, v in enumerate(shares)}
