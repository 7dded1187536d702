"""`patchbalance train`: a segmentation model trained with the weighted sampler (SPEC §7).

The configuration follows the upstream training YAML: `train_dataset:` / `val_dataset:` blocks
(a `_target_` dataset class, its arguments and a `data_loader:` sub-block), `model:`, `loss:`,
`optimizer:`, optional `scheduler_list:`, `hyperparameters: {batch_size, epochs or max_steps,
lr}`, plus `device` (`auto` = CUDA when present), `seed` and `output_dir`. Upstream keys that
only drive PyTorch Lightning (`pl_trainer`, `callbacks`, `metrics`, `mode`, the top-level
`_target_`) are accepted and ignored, with one log line.

Each epoch: the mean training loss, then on the whole validation set the loss and a confusion
matrix accumulated over every labelled pixel (pixels equal to the ignore index are left out),
from which per-class IoU = TP / (TP + FP + FN) and mIoU = the mean over classes that occur in the
labels or the predictions. The metrics CSV is rewritten (atomically) after every epoch; the best
checkpoint (by validation mIoU) and the last one are saved atomically too.

`train_from_config(mapping, base_dir)` is the Python entry point; `run_train_command` serves
the command line. The configuration's keys are in `train_config`, the parts a run is built from
in `components`, and the plan (datasets, loaders, device) in `plan`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbalance.atomic import atomic_copy, atomic_write_with
from patchbalance.config.loading import read_yaml_mapping
from patchbalance.errors import ConfigError, OutputError
from patchbalance.train.components import (  # noqa: F401 - build_loss, build_optimizer, build_schedulers are part of the train API
    DEFAULT_MODEL,
    build_dataset,
    build_loss,
    build_model,
    build_optimizer,
    build_schedulers,
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
    precision_recall_from_confusion,
    tau_values,
    validation_metrics,
)
from patchbalance.train.plan import TrainPlan, plan_training

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Atomic outputs


def _save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    import torch

    atomic_write_with(path, lambda temporary: torch.save(payload, temporary))


def _write_metrics(rows: list[dict[str, Any]], path: Path) -> None:
    frame = pd.DataFrame(rows)
    atomic_write_with(path, lambda temporary: frame.to_csv(temporary, index=False))


@dataclass
class TrainResult:
    """What a training run produced."""

    metrics: pd.DataFrame
    best_epoch: int
    best_miou: float
    best_iou: np.ndarray
    best_confusion: np.ndarray
    steps: int
    checkpoint_path: Path
    last_checkpoint_path: Path
    metrics_path: Path
    model: Any
    class_labels: list[str] = field(default_factory=list)
    summary_text: str = ""
    # Where the training steps ran, read from the first step's logits: device, logits dtype
    # and the autocast dtype in force (None without autocast).
    trained_on: dict[str, Any] = field(default_factory=dict)


def _forward(model: Any, images: Any) -> Any:
    try:
        return model(images)
    except RuntimeError as exc:
        if str(exc).startswith("Wrong input shape"):
            # smp's check that the patch size suits the encoder depth: a config problem.
            raise ConfigError(f"model: {' '.join(str(exc).split())}") from exc
        raise


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
                logits = _forward(model, images)
                loss = loss_fn(logits, masks)
            if torch.isfinite(loss):
                loss_sum += float(loss) * images.shape[0]
                loss_count += images.shape[0]
            for t, offset in enumerate(offsets):
                shifted = logits + offset[None, :, None, None] if t or offset.any() else logits
                confusion[t] += confusion_matrix(
                    shifted.argmax(dim=1), masks, n_classes, ignore_index
                )
    mean_loss = loss_sum / loss_count if loss_count else float("nan")
    result = confusion.cpu().numpy()
    return mean_loss, (result[0] if logit_offsets is None else result)


def _class_labels(dataset: Any, n_classes: int) -> list[str]:
    values = getattr(dataset, "class_values", None)
    if values:
        return [f"{i} (value {v})" for i, v in enumerate(values)]
    return [str(i) for i in range(n_classes)]


def _prepare_output_dir(output_dir: Path) -> None:
    """Create `output_dir`; raise `OutputError` when it cannot be created or written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"output_dir {output_dir}: cannot create it: {exc}") from exc
    if not os.access(output_dir, os.W_OK):
        raise OutputError(f"output_dir {output_dir} is not writable; choose another folder")


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
            logits = _forward(model, images)
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


def _checkpoint(
    plan: TrainPlan,
    model: Any,
    optimizer: Any,
    epoch: int,
    step: int,
    iou: np.ndarray,
    trained_on: dict[str, Any],
) -> dict[str, Any]:
    """Return what a checkpoint holds after `epoch` (1-based): states, metrics and config."""
    return {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "miou": mean_iou(iou),
        "iou": iou.tolist(),
        "n_classes": plan.n_classes,
        "ignore_index": plan.ignore_index,
        "in_channels": plan.in_channels,
        "class_values": getattr(plan.train_dataset, "class_values", None),
        "config": plan.resolved,
        "trained_on": trained_on,
    }


def _build_parts(plan: TrainPlan) -> tuple[Any, Any, Any, list[Any]]:
    """Return the model (on the plan's device), loss, optimizer and schedulers of `plan`."""
    import torch

    cfg = plan.config
    model = build_model(cfg.model, plan.in_channels, plan.n_classes, plan.base_dir)
    model = model.to(plan.device)
    class_weights = None if plan.class_weights is None else plan.class_weights.weights
    loss_fn = build_loss(cfg.loss, plan.ignore_index, class_weights)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn = loss_fn.to(plan.device)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.hyperparameters.lr)
    return model, loss_fn, optimizer, build_schedulers(cfg.scheduler_list, optimizer)


def _result(
    plan: TrainPlan,
    rows: list[dict[str, Any]],
    best: dict[str, Any],
    best_confusion: np.ndarray,
    steps: int,
    model: Any,
    trained_on: dict[str, Any],
) -> TrainResult:
    """Return the run's result from its metric rows and best epoch, with the summary text."""
    result = TrainResult(
        metrics=pd.DataFrame(rows),
        best_epoch=int(best["epoch"]),
        best_miou=float(best["miou"]) if math.isfinite(best["miou"]) else float("nan"),
        best_iou=np.asarray(best["iou"], dtype=np.float64),
        best_confusion=np.asarray(best_confusion),
        steps=steps,
        checkpoint_path=plan.output_dir / "best.pt",
        last_checkpoint_path=plan.output_dir / "last.pt",
        metrics_path=plan.output_dir / "metrics.csv",
        model=model,
        class_labels=_class_labels(plan.val_dataset, plan.n_classes),
        trained_on=trained_on,
    )
    result.summary_text = summary_text(result)
    return result


def run_training(plan: TrainPlan, progress: bool = False) -> TrainResult:
    """Train as `plan` says; return the metrics, checkpoints and model."""
    cfg = plan.config
    seed_everything(cfg.seed)
    _prepare_output_dir(plan.output_dir)
    metrics_path = plan.output_dir / "metrics.csv"
    best_path = plan.output_dir / "best.pt"
    last_path = plan.output_dir / "last.pt"

    model, loss_fn, optimizer, schedulers = _build_parts(plan)
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
        _write_metrics(rows, metrics_path)
        _save_checkpoint(
            _checkpoint(plan, model, optimizer, epoch + 1, step, iou, trained_on), last_path
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
            epoch + 1,
            train_loss,
            val_loss,
            miou,
        )
        epoch_metrics = {"val_loss": val_loss, "miou": miou, "train_loss": train_loss}
        step_schedulers(schedulers, "epoch", epoch_metrics)
        epoch += 1

    return _result(plan, rows, best, best_confusion, step, model, trained_on)


def _format(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def summary_text(result: TrainResult) -> str:
    """Return the final table: metrics per epoch, per-class IoU of the best epoch, output paths."""
    lines = ["epoch   step  train_loss  val_loss    mIoU"]
    for row in result.metrics.to_dict("records"):
        lines.append(
            f"{row['epoch']:>5} {row['step']:>6}  {_format(row['train_loss']):>10}  "
            f"{_format(row['val_loss']):>8}  {_format(row['miou']):>6}"
        )
    lines += ["", f"best epoch {result.best_epoch}: mIoU {_format(result.best_miou)}", "class  IoU"]
    for label, value in zip(result.class_labels, result.best_iou, strict=False):
        lines.append(f"  {label:<12} {_format(float(value))}")
    where = result.trained_on
    if where:
        mixed = where.get("autocast_dtype")
        lines += ["", f"trained on {where['device']}" + (f", {mixed} autocast" if mixed else "")]
    lines += [
        "",
        f"best checkpoint: {result.checkpoint_path}",
        f"last checkpoint: {result.last_checkpoint_path}",
        f"metrics: {result.metrics_path}",
    ]
    return "\n".join(lines)


def train_from_config(
    config: Mapping[str, Any],
    base_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Return the result of training as the configuration mapping says.

    Relative paths in `config` (tables, `output_dir`) are resolved against `base_dir` (default:
    the current folder). The Python entry point behind `patchbalance train`.
    """
    plan = plan_training(config, base_dir)
    return run_training(plan, progress=progress)


def run_train_command(
    config_path: Path, overrides: list[str], dry_run: bool, progress: bool
) -> str:
    """Run `patchbalance train CONFIG`; return the text to print (the plan, or the final table)."""
    config_path = Path(config_path)
    raw = read_yaml_mapping(config_path)
    resolved = resolve_config_mapping(raw, overrides, str(config_path))
    plan = plan_training(resolved, config_path.resolve().parent, where=str(config_path))
    if dry_run:
        return "dry run: nothing trained\n" + plan.describe()
    return run_training(plan, progress=progress).summary_text
