"""What a `patchbalance train` run leaves behind, whichever engine ran it (SPEC §7).

The result object, the checkpoint's contents, the metrics CSV and the final table: written the
same way by the Lightning engine (`train.engine`) and the plain loop (`train.run`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbalance.atomic import atomic_write_with
from patchbalance.errors import OutputError
from patchbalance.train.metrics import mean_iou
from patchbalance.train.plan import TrainPlan


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write `payload` to `path` with `torch.save`, atomically."""
    import torch

    atomic_write_with(path, lambda temporary: torch.save(payload, temporary))


def write_metrics(rows: list[dict[str, Any]], path: Path) -> None:
    """Write the metric rows (one per validation) to `path` as CSV, atomically."""
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
    # The process's rank in a multi-process run (only rank 0 writes the files).
    rank: int = 0


def class_labels(dataset: Any, n_classes: int) -> list[str]:
    values = getattr(dataset, "class_values", None)
    if values:
        return [f"{i} (value {v})" for i, v in enumerate(values)]
    return [str(i) for i in range(n_classes)]


def prepare_output_dir(output_dir: Path) -> None:
    """Create `output_dir`; raise `OutputError` when it cannot be created or written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"output_dir {output_dir}: cannot create it: {exc}") from exc
    if not os.access(output_dir, os.W_OK):
        raise OutputError(f"output_dir {output_dir} is not writable; choose another folder")


def checkpoint_payload(
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


def train_result(
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
        class_labels=class_labels(plan.val_dataset, plan.n_classes),
        trained_on=trained_on,
    )
    result.summary_text = summary_text(result)
    return result


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
        processes = where.get("processes")
        lines += [
            "",
            f"trained on {where['device']}"
            + (f", {mixed} autocast" if mixed else "")
            + (f", {processes} processes ({where.get('strategy')})" if processes else ""),
        ]
    lines += [
        "",
        f"best checkpoint: {result.checkpoint_path}",
        f"last checkpoint: {result.last_checkpoint_path}",
        f"metrics: {result.metrics_path}",
    ]
    return "\n".join(lines)
