"""Validation metrics of `patchbalance train`: a global confusion matrix, per-class IoU,
precision and recall, and the class prior correction (SPEC §7).

The correction adds tau * log_prior_ratio (SPEC §5, from the training table) to the class logits;
metrics for tau = 0 keep the plain column names, others get a `_tau<value>` suffix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from patchbalance.errors import ConfigError

log = logging.getLogger(__name__)


def confusion_matrix(
    predicted: Any, target: Any, n_classes: int, ignore_index: int | None = 255
) -> Any:
    """Return the `(n_classes, n_classes)` int64 confusion matrix (rows: true, columns: predicted).

    Works on torch tensors (on their device) or numpy arrays. Pixels whose target is
    `ignore_index` or outside `0 .. n_classes - 1` are left out.
    """
    import torch

    if isinstance(target, np.ndarray):
        return confusion_matrix(
            torch.from_numpy(np.asarray(predicted)),
            torch.from_numpy(target),
            n_classes,
            ignore_index,
        ).numpy()
    target = target.reshape(-1).long()
    predicted = predicted.reshape(-1).long()
    valid = (target >= 0) & (target < n_classes)
    if ignore_index is not None:
        valid &= target != ignore_index
    pairs = target[valid] * n_classes + predicted[valid]
    return torch.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def offset_confusions(
    logits: Any, target: Any, offsets: Any, n_classes: int, ignore_index: int | None
) -> Any:
    """Return the (T, C, C) confusion matrices of one batch, one per row of logit `offsets`.

    Args:
        logits: (N, C, H, W) class logits (torch).
        target: (N, H, W) labels.
        offsets: (T, C) tensor on the logits' device, added to the logits before the argmax.
        n_classes: C.
        ignore_index: the label of no class, left out.
    """
    import torch

    return torch.stack(
        [
            confusion_matrix(
                (logits + offset[None, :, None, None] if t or offset.any() else logits).argmax(1),
                target,
                n_classes,
                ignore_index,
            )
            for t, offset in enumerate(offsets)
        ]
    )


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Return per-class IoU = TP / (TP + FP + FN); NaN for a class absent from labels and predictions."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / union, np.nan)


def precision_recall_from_confusion(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return per-class precision TP / (TP + FP) and recall TP / (TP + FN); NaN where undefined."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, true_positive / predicted, np.nan)
        recall = np.where(actual > 0, true_positive / actual, np.nan)
    return precision, recall


def tau_values(prior_correction: float | Sequence[float] | None) -> list[float]:
    """Return the sorted distinct tau values of `prior_correction`, 0 always among them."""
    if prior_correction is None:
        given: list[float] = []
    elif isinstance(prior_correction, int | float):
        given = [float(prior_correction)]
    else:
        given = [float(t) for t in prior_correction]
    return sorted({0.0, *given})


def tau_suffix(tau: float) -> str:
    """Return the metrics column suffix of a tau: empty for 0, else `_tau<value>`."""
    return "" if tau == 0 else f"_tau{tau:g}"


def class_log_prior_ratio(dataset: Any, n_classes: int, weighted: bool) -> np.ndarray:
    """Return log_prior_ratio (SPEC §5) per class index, from the training table's counts.

    Class index j is the table's `px_<class_values[j]>` column when the dataset names its
    class values, else `px_<j>`. Without a weighted sampler the prior is not shifted: zeros.
    """
    from patchbalance.balanced_table import read_balanced_table
    from patchbalance.sampling.figures import balanced_figures
    from patchbalance.table import class_columns

    ratio = np.zeros(n_classes)
    if not weighted:
        log.info("prior_correction: the training loader draws uniformly, so the correction is 0")
        return ratio
    # The rows the dataset kept, as the loss's class weights read them.
    table = read_balanced_table(
        Path(dataset.input_csv_path), rows=getattr(dataset, "row_numbers", None)
    )
    if not class_columns(table.frame)[0]:
        raise ConfigError(
            f"prior_correction needs the class pixel counts (px_<class> columns) of a balanced "
            f"table, and {dataset.input_csv_path} has none; train on a table from "
            "build-balanced-dataset, or remove prior_correction"
        )
    figures = balanced_figures(table)
    values = getattr(dataset, "class_values", None) or list(range(n_classes))
    by_value = dict(zip(figures.class_values, figures.log_prior_ratio, strict=True))
    for j, value in enumerate(values[:n_classes]):
        ratio[j] = by_value.get(int(value), 0.0)
    return ratio


def mean_iou(iou: np.ndarray) -> float:
    """Return the mean IoU over the classes that have one (NaN when none has)."""
    present = np.asarray(iou)[~np.isnan(iou)]
    return float(present.mean()) if present.size else float("nan")


def validation_metrics(confusions: np.ndarray, taus: list[float]) -> dict[str, float]:
    """Return mIoU and per-class IoU, precision and recall for each tau's confusion matrix.

    tau = 0 (the first) keeps the plain names (`miou`, `iou_3`); others get `_tau<value>`.
    """
    row: dict[str, float] = {}
    for tau, confusion in zip(taus, confusions, strict=True):
        suffix = tau_suffix(tau)
        iou = iou_from_confusion(confusion)
        precision, recall = precision_recall_from_confusion(confusion)
        row[f"miou{suffix}"] = mean_iou(iou)
        row.update({f"iou_{i}{suffix}": float(v) for i, v in enumerate(iou)})
        row.update({f"precision_{i}{suffix}": float(v) for i, v in enumerate(precision)})
        row.update({f"recall_{i}{suffix}": float(v) for i, v in enumerate(recall)})
    return row
