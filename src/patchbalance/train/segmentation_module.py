"""The `LightningModule` behind `patchbalance train`: the plan's model, loss and optimizer.

One metrics row per validation, as the plain loop writes it (SPEC §7): the mean training loss
and patch count since the previous row, then on the whole validation set the loss and the
confusion matrices (one per prior-correction tau). Every rank reads its share of the validation
set; the sums and the confusion matrices are reduced over the ranks before the row is made, so
the row is the same on every rank and equals a one-process validation of the same model.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from lightning import LightningModule

from patchbalance.embeddings.models import autocast_dtype
from patchbalance.train.components import forward_logits, step_schedulers
from patchbalance.train.metrics import (
    iou_from_confusion,
    mean_iou,
    offset_confusions,
    tau_values,
    validation_metrics,
)
from patchbalance.train.outputs import checkpoint_payload
from patchbalance.train.plan import TrainPlan, build_parts

# Keys of the checkpoint that carry the run's metric history across a resume.
HISTORY_KEY = "patchbalance_history"


class SegmentationModule(LightningModule):
    """The model, loss and optimizer of `plan`, trained and validated by a Lightning `Trainer`.

    Args:
        plan: the run's plan (`train.plan.plan_training`).

    Attributes:
        rows: the metrics rows so far, one per validation.
        best: `{"epoch", "miou", "iou"}` of the best row by mIoU, and `best_confusion` its
            confusion matrix (tau = 0).
        trained_on: where the first training step ran: device, logits dtype, autocast dtype,
            and with several processes their number and the strategy.
    """

    def __init__(self, plan: TrainPlan) -> None:
        super().__init__()
        model, loss_fn, optimizer, schedulers = build_parts(plan)
        self.model = model
        self.loss_fn = loss_fn
        self.plan = plan
        self._optimizer = optimizer
        self._schedulers = schedulers
        self.taus = tau_values(plan.config.prior_correction)
        offsets = np.outer(self.taus, plan.log_prior_ratio).astype(np.float32)
        self.register_buffer("logit_offsets", torch.as_tensor(offsets), persistent=False)
        self.rows: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {
            "epoch": -1,
            "miou": -math.inf,
            "iou": np.full(plan.n_classes, np.nan),
        }
        self.best_confusion = np.zeros((plan.n_classes, plan.n_classes), dtype=np.int64)
        self.best_is_last = False
        self.new_row = False
        self.trained_on: dict[str, Any] = {}
        self._train_sums = torch.zeros(2, dtype=torch.float64)
        self._val_sums = torch.zeros(2, dtype=torch.float64)
        self._confusion = torch.zeros(
            (len(self.taus), plan.n_classes, plan.n_classes), dtype=torch.int64
        )
        self._stepped = 0
        self._started = time.perf_counter()
        self._train_seconds = 0.0

    def configure_optimizers(self) -> Any:
        """Return the optimizer of the `optimizer:` block (schedulers step in this module)."""
        return self._optimizer

    def _record_placement(self, logits: torch.Tensor) -> None:
        self.trained_on.update(
            device=str(logits.device),
            logits_dtype=str(logits.dtype).removeprefix("torch."),
            autocast_dtype=autocast_dtype(logits.device.type),
        )
        if self.trainer.world_size > 1:
            strategy = self.trainer.strategy
            self.trained_on.update(
                processes=self.trainer.world_size,
                strategy=type(strategy).__name__.removesuffix("Strategy").lower(),
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        """Return the loss and logits of one training batch (its loss sum is kept for the row)."""
        images, masks = batch["image"], batch["mask"]
        logits = forward_logits(self.model, images)
        loss = self.loss_fn(logits, masks)
        if not self.trained_on:
            self._record_placement(logits)
        if self._train_sums.device != loss.device:
            self._train_sums = self._train_sums.to(loss.device)
        count = images.shape[0]
        self._train_sums += torch.stack(
            [loss.detach().double() * count, torch.tensor(count, device=loss.device).double()]
        )
        # The logits go to the callbacks (the sampler schedule counts the trained batches).
        return {"loss": loss, "logits": logits.detach()}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Step the per-step schedulers after an optimizer step; stop at `max_steps`."""
        if self.global_step != self._stepped:
            self._stepped = self.global_step
            step_schedulers(self._schedulers, "step", {})
        max_steps = self.trainer.max_steps
        if max_steps is not None and 0 < max_steps <= self.global_step:
            # Validate at max_steps inside an epoch too, as the plain loop does.
            self.trainer.should_stop = True

    def on_train_epoch_end(self) -> None:
        """Step the per-epoch schedulers with the last validation's metrics."""
        last = self.rows[-1] if self.rows else {}
        metrics = {key: last.get(key, math.nan) for key in ("val_loss", "miou", "train_loss")}
        step_schedulers(self._schedulers, "epoch", metrics)

    def on_validation_epoch_start(self) -> None:
        """Reset the validation sums; the training time of the row stops here."""
        self._train_seconds = time.perf_counter() - self._started
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._confusion = torch.zeros_like(self._confusion, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Add one validation batch's loss and confusion matrices to the sums."""
        images, masks = batch["image"], batch["mask"]
        logits = forward_logits(self.model, images)
        loss = self.loss_fn(logits, masks)
        if torch.isfinite(loss):
            count = images.shape[0]
            self._val_sums += torch.stack(
                [loss.double() * count, torch.tensor(count, device=loss.device).double()]
            )
        self._confusion += offset_confusions(
            logits, masks, self.logit_offsets, self.plan.n_classes, self.plan.ignore_index
        )

    def on_validation_epoch_end(self) -> None:
        """Reduce the sums over the ranks and append the metrics row (the same on every rank)."""
        if self.trainer.sanity_checking:
            return
        reduce = self.trainer.strategy.reduce
        train_sum, seen = reduce(self._train_sums.to(self.device), reduce_op="sum").tolist()
        val_sum, val_count = reduce(self._val_sums, reduce_op="sum").tolist()
        confusions = reduce(self._confusion, reduce_op="sum").cpu().numpy()
        iou = iou_from_confusion(confusions[0])
        miou = mean_iou(iou)
        row = {
            "epoch": self.current_epoch + 1,
            "step": self.global_step,
            "train_loss": train_sum / seen if seen else math.nan,
            "val_loss": val_sum / val_count if val_count else math.nan,
            **validation_metrics(confusions, self.taus),
            "lr": float(self._optimizer.param_groups[0]["lr"]),
            "train_patches": int(seen),
            "train_seconds": round(self._train_seconds, 3),
            **(self.plan.draws.take_drawn_shares() if self.plan.draws is not None else {}),
        }
        self.rows.append(row)
        self.new_row = True
        score = miou if math.isfinite(miou) else -math.inf
        self.best_is_last = self.best["epoch"] < 0 or score > self.best["miou"]
        if self.best_is_last:
            self.best = {"epoch": row["epoch"], "miou": score, "iou": iou}
            self.best_confusion = confusions[0]
        # Identical on every rank: logged for callbacks (ModelCheckpoint, EarlyStopping).
        self.log_dict(
            {"val_loss": row["val_loss"], "miou": miou, "train_loss": row["train_loss"]},
            sync_dist=False,
        )
        self._train_sums = torch.zeros_like(self._train_sums)
        self._started = time.perf_counter()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the plain loop's checkpoint keys and the metric history to Lightning's checkpoint."""
        last = self.rows[-1] if self.rows else {"epoch": 0}
        iou = self.best["iou"] if not self.rows else self._row_iou(last)
        checkpoint.update(
            checkpoint_payload(
                self.plan,
                self.model,
                self._optimizer,
                int(last["epoch"]),
                self.global_step,
                iou,
                self.trained_on,
            )
        )
        checkpoint[HISTORY_KEY] = {
            "rows": self.rows,
            "best": self.best,
            "best_confusion": self.best_confusion,
            "trained_on": self.trained_on,
            "draws": _draws_state(self.plan.draws),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take back the metric history of the run a checkpoint continues."""
        history = checkpoint.get(HISTORY_KEY) or {}
        self.rows = list(history.get("rows", []))
        self.best = history.get("best", self.best)
        self.best_confusion = np.asarray(history.get("best_confusion", self.best_confusion))
        self.trained_on = dict(history.get("trained_on", {}))
        if self.plan.draws is not None and history.get("draws"):
            # Where the schedule stood: without it, the first step would set the weights anew.
            vars(self.plan.draws).update(history["draws"])

    def _row_iou(self, row: dict[str, Any]) -> np.ndarray:
        return np.array([row[f"iou_{c}"] for c in range(self.plan.n_classes)], dtype=np.float64)


# The parts of a run's `TrainingDraws` that change as it trains (see `train.schedules`).
DRAWS_STATE = ("drawn", "confusion", "fraction", "iou", "updates")


def _draws_state(draws: Any) -> dict[str, Any]:
    """Return what a resumed run needs of `draws` to go on as the uninterrupted one."""
    return {} if draws is None else {key: getattr(draws, key) for key in DRAWS_STATE}
