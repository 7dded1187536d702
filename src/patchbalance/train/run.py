"""`patchbalance train`: a segmentation model trained with the weighted sampler (SPEC §7).

The configuration follows the upstream training YAML: `train_dataset:` / `val_dataset:` blocks
(a `_target_` dataset class, its arguments and a `data_loader:` sub-block), `model:`, `loss:`,
`optimizer:`, optional `scheduler_list:`, `hyperparameters: {batch_size, epochs or max_steps,
lr}`, plus `device` (`auto` = CUDA when present), `seed` and `output_dir`. The run goes to its
`engine`: Lightning's Trainer (`train.engine`, the default, which takes `pl_trainer:` and
`callbacks:`) or the plain one-process loop here (`engine: loop`). Upstream keys that neither
uses (`metrics`, `mode`, the top-level `_target_`) are accepted and ignored, with one log line.

Each epoch (both engines): the mean training loss, then on the whole validation set the loss and a confusion
matrix accumulated over every labelled pixel (pixels equal to the ignore index are left out),
from which per-class IoU = TP / (TP + FP + FN) and mIoU = the mean over classes that occur in the
labels or the predictions. The metrics CSV is rewritten (atomically) after every epoch; the best
checkpoint (by validation mIoU) and the last one are saved atomically too.

`train_from_config(mapping, base_dir)` is the Python entry point; `train.command` serves
the command line. The configuration's keys are in `train_config`, the parts a run is built from
in `components`, and the plan (datasets, loaders, device) in `plan`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from patchbalance.atomic import atomic_copy
from patchbalance.errors import ConfigError
from patchbalance.train.components import (  # noqa: F401 - build_loss, build_optimizer, build_schedulers are part of the train API
    DEFAULT_MODEL,
    build_dataset,
    build_loss,
    build_model,
    build_optimizer,
    build_schedulers,
    forward_logits,
    resolve_device,
    seed_everything,
    step_schedulers,
)
from patchbalance.train.config import (  # noqa: F401 - TrainConfig is part of the train API
    TrainConfig,
    resolve_config_mapping,
)
from patchbalance.train.loss import CLASS_WEIGHTS_FILE, write_class_weights
from patchbalance.train.metrics import (  # noqa: F401 - confusion_matrix, iou_from_confusion are part of the train API
    class_log_prior_ratio,
    confusion_matrix,
    iou_from_confusion,
    mean_iou,
    offset_confusions,
    precision_recall_from_confusion,
    tau_values,
    validation_metrics,
)
from patchbalance.train.outputs import (  # noqa: F401 - TrainResult, summary_text are part of the train API
    TrainResult,
    checkpoint_payload,
    prepare_output_dir,
    save_checkpoint,
    summary_text,
    train_result,
    write_metrics,
)
from patchbalance.train.plan import TrainPlan, build_parts, plan_training

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Atomic outputs


def evaluate(
    model: Any,
    loader: Any,
    loss_fn: Any,
    n_classes: int,
    ignore_index: int,
    device: Any,
    progress: bool = False,
    logit_offsets: np.ndarray | None = None,
    precision: str = "fp32",
) -> tuple[float, np.ndarray]:
    """Return `(mean loss, confusion matrix)` of `model` over every batch of `loader`.

    With `logit_offsets` (T, C), the confusion matrices are (T, C, C): one per row of offsets
    added to the class logits before the argmax (the loss is always that of the raw logits).
    `precision` bf16 runs the forward pass and the loss under bf16 autocast.
    """
    import torch
    from tqdm.auto import tqdm

    from patchbalance.embeddings.models import autocast

    model.eval()
    offsets = (
        torch.zeros((1, n_classes))
        if logit_offsets is None
        else torch.as_tensor(np.asarray(logit_offsets, dtype=np.float32))
    )
    offsets = offsets.to(device)
    confusion = torch.zeros(
        (offsets.shape[0], n_classes, n_classes), dtype=torch.int64, device=device
    )
    loss_sum, loss_count = 0.0, 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc="validation", leave=False, disable=not progress):
            images = batch["image"].to(device, non_blocking=True)
            masks = batch["mask"].to(device, non_blocking=True)
            with autocast(str(device), precision):
                logits = forward_logits(model, images)
                loss = loss_fn(logits, masks)
            if torch.isfinite(loss):
                loss_sum += float(loss) * images.shape[0]
                loss_count += images.shape[0]
            confusion += offset_confusions(logits, masks, offsets, n_classes, ignore_index)
    mean_loss = loss_sum / loss_count if loss_count else float("nan")
    result = confusion.cpu().numpy()
    return mean_loss, (result[0] if logit_offsets is None else result)


def _train_epoch(
    plan: TrainPlan,
    model: Any,
    loss_fn: Any,
    optimizer: Any,
    schedulers: list[Any],
    epoch: int,
    step: int,
    progress: bool,
    trained_on: dict[str, Any],
) -> tuple[float, int, int]:
    """Return `(loss sum, patches seen, step)` after one epoch, or when `max_steps` is reached.

    `trained_on` is filled in at the first step with where that step ran (see `TrainResult`).
    """
    from tqdm.auto import tqdm

    from patchbalance.embeddings.models import autocast, autocast_dtype

    device = plan.device
    precision = plan.config.precision
    model.train()
    loss_sum, seen = 0.0, 0
    bar = tqdm(
        plan.train_loader,
        desc=f"epoch {epoch + 1}" + (f"/{plan.epochs}" if plan.epochs else ""),
        leave=False,
        disable=not progress,
    )
    for batch in bar:
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(str(device), precision):
            logits = forward_logits(model, images)
            loss = loss_fn(logits, masks)
            if not trained_on:
                trained_on.update(
                    device=str(logits.device),
                    logits_dtype=str(logits.dtype).removeprefix("torch."),
                    autocast_dtype=autocast_dtype(logits.device.type),
                )
        loss.backward()
        optimizer.step()
        step += 1
        if plan.draws is not None:
            plan.draws.after_step(step, masks, logits)
        loss_sum += float(loss.detach()) * images.shape[0]
        seen += images.shape[0]
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        step_schedulers(schedulers, "step", {})
        if plan.max_steps is not None and step >= plan.max_steps:
            break
    bar.close()
    return loss_sum, seen, step


# The metrics table, the best checkpoint and the last one, in the output folder.
OUTPUT_NAMES = ("metrics.csv", "best.pt", "last.pt")


def run_training(plan: TrainPlan, progress: bool = False) -> TrainResult:
    """Train as `plan` says; return the metrics, checkpoints and model."""
    cfg = plan.config
    seed_everything(cfg.seed)
    prepare_output_dir(plan.output_dir)
    metrics_path, best_path, last_path = (plan.output_dir / n for n in OUTPUT_NAMES)

    model, loss_fn, optimizer, schedulers = build_parts(plan)
    if plan.class_weights is not None:
        write_class_weights(plan.class_weights, plan.output_dir / CLASS_WEIGHTS_FILE)
    taus = tau_values(cfg.prior_correction)
    offsets = np.outer(taus, plan.log_prior_ratio)

    rows: list[dict[str, Any]] = []
    best = {"epoch": -1, "miou": -math.inf, "iou": np.full(plan.n_classes, np.nan)}
    best_confusion = np.zeros((plan.n_classes, plan.n_classes), dtype=np.int64)
    step = 0
    epoch = 0
    trained_on: dict[str, Any] = {}
    sampler = plan.train_loader.sampler
    while (plan.epochs is None or epoch < plan.epochs) and (
        plan.max_steps is None or step < plan.max_steps
    ):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        started = time.perf_counter()
        loss_sum, seen, step = _train_epoch(
            plan, model, loss_fn, optimizer, schedulers, epoch, step, progress, trained_on
        )
        train_seconds = time.perf_counter() - started
        val_loss, confusions = evaluate(
            model,
            plan.val_loader,
            loss_fn,
            plan.n_classes,
            plan.ignore_index,
            plan.device,
            progress,
            logit_offsets=offsets,
            precision=cfg.precision,
        )
        confusion = confusions[0]
        iou = iou_from_confusion(confusion)
        miou = mean_iou(iou)
        row = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": loss_sum / seen if seen else float("nan"),
            "val_loss": val_loss,
            **validation_metrics(confusions, taus),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "train_patches": seen,
            "train_seconds": round(train_seconds, 3),
            **(plan.draws.take_drawn_shares() if plan.draws is not None else {}),
        }
        rows.append(row)
        write_metrics(rows, metrics_path)
        save_checkpoint(
            checkpoint_payload(plan, model, optimizer, epoch + 1, step, iou, trained_on), last_path
        )
        score = miou if math.isfinite(miou) else -math.inf
        if best["epoch"] < 0 or score > best["miou"]:
            best = {"epoch": epoch + 1, "miou": score, "iou": iou}
            best_confusion = confusion
            # The same bytes as last.pt: link rather than serialise the model a second time.
            atomic_copy(last_path, best_path)
        train_loss = row["train_loss"]
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, mIoU %.4f",
            *(epoch + 1, train_loss, val_loss, miou),
        )
        epoch_metrics = {"val_loss": val_loss, "miou": miou, "train_loss": train_loss}
        step_schedulers(schedulers, "epoch", epoch_metrics)
        epoch += 1

    return train_result(plan, rows, best, best_confusion, step, model, trained_on)


def run_plan(plan: TrainPlan, progress: bool = False, resume: str | None = None) -> TrainResult:
    """Train as `plan` says with its engine (Lightning's Trainer, or the plain loop)."""
    if plan.config.engine == "loop":
        if resume is not None:
            raise ConfigError("--resume needs engine: lightning (the plain loop cannot resume)")
        return run_training(plan, progress=progress)
    from patchbalance.train.engine import run_lightning

    return run_lightning(plan, progress=progress, resume=resume)


def train_from_config(
    config: Mapping[str, Any],
    base_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    resume: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Return the result of training as the configuration mapping says.

    Relative paths in `config` (tables, `output_dir`) are resolved against `base_dir` (default:
    the current folder). `resume` is a checkpoint (`last.pt`) of a run to continue. The Python
    entry point behind `patchbalance train`.
    """
    plan = plan_training(config, base_dir)
    return run_plan(plan, progress, None if resume is None else os.fspath(resume))
