"""The plan of a `patchbalance train` run: datasets, loaders, device and length, built not run.

`plan_training` validates the configuration (paths resolved once, in `train.config`), builds
both datasets and their loaders, and checks what can be checked before the first step; the
plan's `describe` is what `--dry-run` prints.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchbalance.atomic import check_writable_folder
from patchbalance.errors import ConfigError
from patchbalance.table import dataset_excluded, drawn_weights
from patchbalance.train.components import (
    DEFAULT_MODEL,
    build_dataset,
    build_loss,
    build_model,
    build_optimizer,
    build_schedulers,
    resolve_device,
)
from patchbalance.train.config import (
    DEFAULT_EPOCHS,
    LIGHTNING_KEYS,
    UPSTREAM_ONLY_KEYS,
    TrainConfig,
    load_train_config,
    resolve_config_mapping,
)
from patchbalance.train.loss import (
    ClassWeights,
    dataset_class_counts,
    parse_class_weights,
    training_class_weights,
)
from patchbalance.train.metrics import class_log_prior_ratio
from patchbalance.train.schedules import AdaptiveSchedule, TrainingDraws

log = logging.getLogger(__name__)

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
    class_weights: ClassWeights | None = None
    # The drawn class shares and the sampler schedule (see `train.schedules`).
    draws: TrainingDraws | None = None

    def describe(self) -> str:
        """Return the plan as text (what `--dry-run` prints)."""
        sampler = self.train_loader.sampler
        weights = getattr(self.train_dataset, "sampler_weights", None)
        lines = [
            f"train: {len(self.train_dataset)} patches from {self.train_dataset.input_csv_path}",
        ]
        if weights is not None and type(sampler).__name__ != "RandomSampler":
            # Counted as the sampler draws: an excluded row never is, whatever its weight.
            excluded = dataset_excluded(self.train_dataset)
            drawable = drawn_weights(weights, excluded, warn=False) > 0
            lines.append(f"  rows with sampler_weight > 0: {int(np.count_nonzero(drawable))}")
        lines += [
            f"  sampler: {type(sampler).__name__}, {len(sampler)} draws per epoch, "
            f"{len(self.train_loader)} batches of {self.train_loader.batch_size}",
            f"validation: {len(self.val_dataset)} patches from {self.val_dataset.input_csv_path}",
            f"classes: {self.n_classes} (ignore index {self.ignore_index}), "
            f"input bands: {self.in_channels}",
            f"model: {self.resolved.get('model', {}).get('_target_', DEFAULT_MODEL['_target_'])}",
            *([self.class_weights.describe()] if self.class_weights is not None else []),
            *(
                [f"sampler_schedule: {self.config.sampler_schedule.model_dump()}"]
                if self.config.sampler_schedule is not None
                else []
            ),
            f"device: {self.device}"
            + (", bf16 autocast" if self.config.precision == "bf16" else ""),
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


def _check_datasets(train_dataset: Any, val_dataset: Any) -> int:
    """Return the class count, once the two datasets agree on it and their rasters exist."""
    n_classes = int(getattr(train_dataset, "n_classes", 0))
    if getattr(val_dataset, "n_classes", n_classes) != n_classes:
        raise ConfigError(
            f"val_dataset.n_classes ({val_dataset.n_classes}) differs from "
            f"train_dataset.n_classes ({n_classes})"
        )
    missing = [
        *getattr(train_dataset, "missing_files", list)(),
        *getattr(val_dataset, "missing_files", list)(),
    ]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConfigError(f"raster not found: {missing[0]}{more}; check the tables' paths")
    from patchbalance.data.table_checks import (
        check_classes_have_labels,
        check_windows_inside_rasters,
    )

    for where, dataset in (("train_dataset", train_dataset), ("val_dataset", val_dataset)):
        # Found now, not when the row is drawn (or, for a class, never).
        check_windows_inside_rasters(dataset, where=where)
        check_classes_have_labels(dataset)
    return n_classes


def _log_ignored_keys(resolved: Mapping[str, Any], cfg: TrainConfig) -> None:
    """Say once which upstream keys the run's engine does not use."""
    used = LIGHTNING_KEYS if cfg.engine == "lightning" else ()
    ignored = [
        key for key in UPSTREAM_ONLY_KEYS if resolved.get(key) is not None and key not in used
    ]
    if ignored:
        log.info(
            "ignoring upstream keys that patchbalance train does not use: %s", ", ".join(ignored)
        )


def _datasets(cfg: TrainConfig) -> tuple[Any, Any, Any, Any]:
    """Return the training dataset and loader block, then the validation ones."""
    train_dataset, train_loader_block = build_dataset(cfg.train_dataset, "train_dataset")
    inherited = {
        key: cfg.train_dataset[key] for key in SHARED_LABEL_KEYS if key in cfg.train_dataset
    }
    val_dataset, val_loader_block = build_dataset(cfg.val_dataset, "val_dataset", inherited)
    centred = int(getattr(val_dataset, "class_centred_rows", 0))
    if centred:
        # Windows centred on rare classes over-weight them in every validation figure.
        log.warning(
            "val_dataset %s holds %d class-centred window(s) (its placement column); validation "
            "figures over-weight the rare classes: cut validation tables with input.placement: grid",
            val_dataset.input_csv_path,
            centred,
        )
    return train_dataset, train_loader_block, val_dataset, val_loader_block


def _loaders(
    cfg: TrainConfig, train_dataset: Any, train_block: Any, val_dataset: Any, val_block: Any
) -> tuple[Any, Any]:
    """Return the training loader (weighted, stateful under a schedule) and the validation one."""
    from patchbalance.data import build_dataloader

    hyper = cfg.hyperparameters
    train_loader = build_dataloader(
        train_dataset,
        train_block,
        hyper.batch_size,
        seed=cfg.seed,
        training=True,
        stateful=cfg.sampler_schedule is not None,
    )
    val_loader = build_dataloader(
        val_dataset, val_block, hyper.batch_size, seed=cfg.seed, training=False
    )
    if len(train_loader) == 0:
        raise ConfigError(
            f"the training loader yields no batch: {len(train_loader.sampler)} patches per epoch "
            f"with batch_size {train_loader.batch_size} and drop_last: true; lower the batch size"
        )
    return train_loader, val_loader


def plan_training(
    config: Mapping[str, Any],
    base_dir: str | os.PathLike[str] | None = None,
    where: str = "<config>",
    overrides: Sequence[str] = (),
) -> TrainPlan:
    r"""Return the validated plan of a run: datasets, loaders, device and lengths, built not run.

    `config` is the mapping as written; `overrides` (`key.path=value`) are merged in and `${...}`
    resolved here, once (a second pass would turn an escaped `\${x}` into an interpolation).
    """
    base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    resolved = resolve_config_mapping(config, overrides, where)
    cfg = load_train_config(resolved, base, where)
    output_dir = Path(cfg.output_dir)
    # Found unwritable now, not after the first epoch's checkpoint.
    check_writable_folder(output_dir, "output_dir")
    _log_ignored_keys(resolved, cfg)

    train_dataset, train_loader_block, val_dataset, val_loader_block = _datasets(cfg)
    n_classes = _check_datasets(train_dataset, val_dataset)
    ignore_index = int(getattr(train_dataset, "ignore_index", 255))

    hyper = cfg.hyperparameters
    train_loader, val_loader = _loaders(
        cfg, train_dataset, train_loader_block, val_dataset, val_loader_block
    )
    epochs = hyper.epochs
    if epochs is None and hyper.max_steps is None:
        epochs = DEFAULT_EPOCHS
    in_channels = (
        train_dataset.image_band_count()
        if hasattr(train_dataset, "image_band_count")
        else int(cfg.model.get("in_channels", 3))
    )
    # build_dataloader has checked that the flag is a bool.
    weighted = bool((train_loader_block or {}).get("weighted_sampler", False))
    ratio = np.zeros(n_classes)
    if cfg.prior_correction is not None:
        ratio = class_log_prior_ratio(train_dataset, n_classes, weighted)
    # Instantiated now, so that a misspelt loss argument fails in --dry-run; built again later.
    build_loss(cfg.loss, ignore_index)
    class_weights_spec = parse_class_weights(cfg.loss, n_classes)
    class_weights = (
        None
        if class_weights_spec is None
        else training_class_weights(class_weights_spec, train_dataset, n_classes, weighted)
    )
    draws = training_draws(cfg, train_dataset, train_loader, weighted, n_classes, epochs)
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
        class_weights=class_weights,
        draws=draws,
    )


def total_steps(epochs: int | None, max_steps: int | None, batches_per_epoch: int) -> int:
    """Return the optimizer steps a run takes: `max_steps`, or fewer when the epochs end first."""
    by_epochs = None if epochs is None else epochs * batches_per_epoch
    return min(s for s in (by_epochs, max_steps) if s is not None)


def training_draws(
    cfg: TrainConfig,
    train_dataset: Any,
    train_loader: Any,
    weighted: bool,
    n_classes: int,
    epochs: int | None,
) -> TrainingDraws:
    """Return the run's drawn-share counter with its `sampler_schedule` (checked here)."""
    from patchbalance.data.loader import dataset_weights

    ignore_index = int(getattr(train_dataset, "ignore_index", 255))
    schedule = cfg.sampler_schedule
    if schedule is None:
        return TrainingDraws(n_classes, ignore_index)
    if not weighted:
        raise ConfigError(
            "sampler_schedule changes the weighted sampler's weights, and "
            "train_dataset.data_loader.weighted_sampler is false; set it to true or remove "
            "sampler_schedule"
        )
    counts = None
    if isinstance(schedule, AdaptiveSchedule):
        counts = dataset_class_counts(train_dataset, n_classes)
    return TrainingDraws(
        n_classes,
        ignore_index,
        schedule,
        sampler=train_loader.sampler,
        table_weights=dataset_weights(train_dataset),
        class_counts=counts,
        total_steps=total_steps(epochs, cfg.hyperparameters.max_steps, len(train_loader)),
    )


def build_parts(plan: TrainPlan) -> tuple[Any, Any, Any, list[Any]]:
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
