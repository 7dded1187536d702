"""The `patchbalance train` configuration file (SPEC §7): its keys, validated, paths resolved.

The file follows the upstream training YAML: `train_dataset:` / `val_dataset:` blocks, `model:`,
`loss:`, `optimizer:`, optional `scheduler_list:`, `hyperparameters:`, plus `device`, `seed` and
`output_dir`. `load_train_config` validates a mapping and resolves its paths once: `output_dir`
and each dataset's `input_csv_path` and `root_dir`, against the configuration file's folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import Field, ValidationError

from patchbalance.config.loading import (
    Seed,
    StrictModel,
    describe_validation_error,
    omegaconf_message,
)
from patchbalance.config.secrets import mask_override, safe_cause
from patchbalance.data.arguments import check_dataset_numbers
from patchbalance.errors import ConfigError
from patchbalance.paths import resolve_path
from patchbalance.train.schedules import SamplerSchedule

UPSTREAM_ONLY_KEYS = ("pl_trainer", "callbacks", "metrics", "mode", "_target_", "test_dataset")
# The upstream keys that the Lightning engine uses.
LIGHTNING_KEYS = ("pl_trainer", "callbacks")
DEFAULT_EPOCHS = 10
# The keys of a dataset block that hold paths.
DATASET_PATH_KEYS = ("input_csv_path", "root_dir")


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
    devices: int = Field(default=1, ge=1)


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
    # Mixed precision: bf16 runs the forward passes and the loss under bf16 autocast.
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: Seed = 42
    output_dir: str = "train_output"
    # Logit adjustment at validation (SPEC §7): tau, or a list of tau; tau = 0 is always added.
    prior_correction: float | list[float] | None = None
    # Draw weights that change while the model trains (anneal, adaptive); None keeps the table's.
    sampler_schedule: SamplerSchedule | None = None
    # The engine: Lightning's Trainer (pl_trainer, callbacks) or the plain one-process loop.
    engine: Literal["lightning", "loop"] = "lightning"
    pl_trainer: dict[str, Any] | None = None
    callbacks: Any = None
    # Upstream keys; accepted, not used.
    metrics: Any = None
    mode: Any = None
    test_dataset: Any = None
    target: Any = Field(default=None, alias="_target_")


def _with_resolved_dataset_paths(block: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    resolved = dict(block)
    for key in DATASET_PATH_KEYS:
        if resolved.get(key) is not None:
            resolved[key] = os.fspath(resolve_path(str(resolved[key]), base_dir))
    return resolved


def load_train_config(
    data: Mapping[str, Any], base_dir: str | os.PathLike[str] | None, where: str = "<config>"
) -> TrainConfig:
    """Return the validated training configuration, its paths resolved against `base_dir`.

    Args:
        data: the configuration mapping, overrides merged and `${...}` resolved.
        base_dir: the folder relative paths are relative to (None: the current folder).
        where: names the configuration (its file) in error messages.

    Returns:
        The `TrainConfig`; `output_dir` and the datasets' `input_csv_path` and `root_dir`
        are absolute. Raises `ConfigError` naming the key for any invalid value.
    """
    try:
        config = TrainConfig.model_validate(dict(data))
    except ValidationError as exc:
        message = describe_validation_error(exc, TrainConfig, where, data=dict(data))
        raise ConfigError(message) from exc
    for block in ("train_dataset", "val_dataset"):
        try:
            check_dataset_numbers(getattr(config, block), block)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    return config.model_copy(
        update={
            "output_dir": os.fspath(resolve_path(config.output_dir, base)),
            "train_dataset": _with_resolved_dataset_paths(config.train_dataset, base),
            "val_dataset": _with_resolved_dataset_paths(config.val_dataset, base),
        }
    )


def resolve_config_mapping(
    raw: Mapping[str, Any], overrides: Sequence[str] = (), where: str = "<config>"
) -> dict[str, Any]:
    """Return `raw` with the `key.path=value` overrides merged in and `${...}` resolved."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"--set {mask_override(item)!r}: expected key.path=value, e.g. "
                "hyperparameters.lr=0.01"
            )
    try:
        conf = OmegaConf.create(dict(raw))
        if overrides:
            conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_container(conf, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(omegaconf_message(exc, where)) from safe_cause(exc)
