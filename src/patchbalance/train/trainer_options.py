"""The Lightning `Trainer` arguments of a `patchbalance train` run (SPEC §7).

The upstream YAML's `pl_trainer:` block is checked against `lightning.Trainer`'s signature (an
unknown key is a `ConfigError` naming it) and reconciled with patchbalance's own keys:

| ours                                 | `pl_trainer`             |
|--------------------------------------|--------------------------|
| `hyperparameters.epochs`             | `max_epochs`             |
| `hyperparameters.max_steps`          | `max_steps`              |
| `device` (cpu, cuda, cuda:N, auto)   | `accelerator`, `devices` |
| `hyperparameters.accelerator/devices`| `accelerator`, `devices` |
| `precision` (fp32, bf16)             | `precision`              |
| `output_dir`                         | `default_root_dir`       |

Where only one side gives a value, it is used; where both do and they disagree, the error names
both keys. `pl_trainer.ckpt_path` is the checkpoint to resume from (as `--resume`). A value that
is a `_target_` mapping (a logger, a profiler) and the top-level `callbacks:` list are
instantiated with Hydra, as upstream does.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from patchbalance.errors import ConfigError
from patchbalance.train.config import DEFAULT_EPOCHS, TrainConfig

# pl_trainer keys with our own meaning, beside the Trainer's arguments.
RESUME_KEY = "ckpt_path"
# Lightning's precision names that mean the same as ours.
PRECISION_SYNONYMS = {
    "fp32": {"32", "32-true", "fp32"},
    "bf16": {"bf16", "bf16-mixed"},
}
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}


@dataclass
class TrainerOptions:
    """What the Trainer is built with: its keyword arguments, callbacks and resume checkpoint."""

    kwargs: dict[str, Any]
    callbacks: list[Any] = field(default_factory=list)
    ckpt_path: str | None = None


def trainer_argument_names() -> list[str]:
    """Return the names of `lightning.Trainer`'s keyword arguments."""
    from lightning import Trainer

    return [name for name in inspect.signature(Trainer.__init__).parameters if name != "self"]


def _check_keys(block: Mapping[str, Any]) -> None:
    valid = [*trainer_argument_names(), RESUME_KEY]
    for key in block:
        if key == "callbacks":
            raise ConfigError(
                "pl_trainer.callbacks: give the callbacks as the top-level 'callbacks:' list"
            )
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown key 'pl_trainer.{key}': not a lightning.Trainer argument{hint}"
            )


def _agree(ours: tuple[str, Any], theirs: tuple[str, Any], same: bool | None = None) -> None:
    """Raise `ConfigError` naming both keys when two given values disagree."""
    (our_key, our_value), (their_key, their_value) = ours, theirs
    if our_value is None or their_value is None:
        return
    if same is None:
        same = our_value == their_value
    if not same:
        raise ConfigError(
            f"{our_key} is {our_value!r} but pl_trainer.{their_key} is {their_value!r}; "
            "give one of them, or the same value in both"
        )


def _device_accelerator(device: str | None) -> tuple[str | None, Any]:
    """Return `(accelerator, devices)` that `device` (cpu, cuda, cuda:N, auto) stands for."""
    if device is None:
        return None, None
    name = str(device).lower()
    if name == "auto":
        return "auto", None
    if name == "cpu":
        return "cpu", None
    if name.startswith("cuda"):
        index = name.partition(":")[2]
        return "gpu", ([int(index)] if index.isdigit() else None)
    raise ConfigError(f"device: {device!r} is not a torch device (use auto, cpu or cuda)")


def _accelerators_agree(ours: str, theirs: str) -> bool:
    gpu = {"gpu", "cuda"}
    return ours == theirs or (ours in gpu and theirs in gpu) or "auto" in (ours, theirs)


def _length(cfg: TrainConfig, block: dict[str, Any]) -> dict[str, Any]:
    hyper = cfg.hyperparameters
    _agree(("hyperparameters.epochs", hyper.epochs), ("max_epochs", block.get("max_epochs")))
    _agree(("hyperparameters.max_steps", hyper.max_steps), ("max_steps", block.get("max_steps")))
    max_epochs = block.get("max_epochs", hyper.epochs)
    max_steps = block.get("max_steps", hyper.max_steps)
    if max_epochs is None and max_steps is None:
        max_epochs = DEFAULT_EPOCHS
    return {
        "max_epochs": -1 if max_epochs is None else int(max_epochs),
        "max_steps": -1 if max_steps is None else int(max_steps),
    }


def _placement(cfg: TrainConfig, block: dict[str, Any]) -> dict[str, Any]:
    """Return `accelerator` and `devices` from `device`, `hyperparameters` and `pl_trainer`."""
    hyper = cfg.hyperparameters
    accelerator, index = _device_accelerator(cfg.device)
    theirs = block.get("accelerator")
    for key, ours, value in (
        ("device", accelerator, cfg.device),
        ("hyperparameters.accelerator", hyper.accelerator, hyper.accelerator),
    ):
        if ours is not None and theirs is not None:
            same = _accelerators_agree(str(ours).lower(), str(theirs).lower())
            _agree((key, value), ("accelerator", theirs), same)
    if index is not None:
        _agree(
            ("device", cfg.device), ("devices", block.get("devices")), index == block.get("devices")
        )
    count = hyper.devices if "devices" in hyper.model_fields_set else None
    _agree(("hyperparameters.devices", count), ("devices", block.get("devices")))
    return {
        "accelerator": theirs or accelerator or hyper.accelerator or "auto",
        "devices": block.get("devices", index or count or 1),
    }


def _precision(cfg: TrainConfig, block: dict[str, Any]) -> Any:
    ours = cfg.precision if "precision" in cfg.model_fields_set else None
    theirs = block.get("precision")
    if ours is not None and theirs is not None:
        same = str(theirs).lower() in PRECISION_SYNONYMS[ours]
        _agree(("precision", ours), ("precision", theirs), same)
    return theirs if theirs is not None else LIGHTNING_PRECISION[cfg.precision]


def _instantiate_values(block: dict[str, Any]) -> dict[str, Any]:
    from patchbalance.data.dataset import instantiate_from_mapping

    return {
        key: instantiate_from_mapping(value, f"pl_trainer.{key}")
        if isinstance(value, Mapping) and "_target_" in value
        else value
        for key, value in block.items()
    }


def _default_logger(output_dir: str) -> Any:
    # Callbacks such as LearningRateMonitor need a logger; a CSV one adds no dependency.
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(output_dir, name="lightning_logs")


def build_callbacks(specs: Any) -> list[Any]:
    """Return the callbacks of the top-level `callbacks:` list (`_target_` mappings or objects)."""
    from patchbalance.data.dataset import instantiate_from_mapping

    if specs is None:
        return []
    if isinstance(specs, Mapping):
        # Hydra configs often key the callbacks by a name.
        specs = list(specs.values())
    if not isinstance(specs, list):
        raise ConfigError("callbacks must be a list of mappings with a '_target_' key")
    return [
        instantiate_from_mapping(spec, f"callbacks[{i}]") if isinstance(spec, Mapping) else spec
        for i, spec in enumerate(specs)
    ]


def trainer_options(cfg: TrainConfig, resume: str | None = None) -> TrainerOptions:
    """Return the Trainer's arguments from the `pl_trainer:` block and patchbalance's own keys.

    Args:
        cfg: the validated train configuration.
        resume: the checkpoint given with `--resume`, or None.

    Returns:
        The keyword arguments (defaults of a patchbalance run where neither side gives a
        value: no sanity validation, no model summary, checkpoints only from a
        `ModelCheckpoint` callback), the callbacks and the checkpoint to resume from.
    """
    from lightning.pytorch.callbacks import Checkpoint

    block = dict(cfg.pl_trainer or {})
    _check_keys(block)
    ckpt_path = block.pop(RESUME_KEY, None)
    _agree(("--resume", resume), (RESUME_KEY, ckpt_path))
    _agree(
        ("output_dir", cfg.output_dir if "output_dir" in cfg.model_fields_set else None),
        ("default_root_dir", block.get("default_root_dir")),
    )
    callbacks = build_callbacks(cfg.callbacks)
    reconciled = {
        **_length(cfg, block),
        **_placement(cfg, block),
        "precision": _precision(cfg, block),
    }
    defaults = {
        "default_root_dir": cfg.output_dir,
        "num_sanity_val_steps": 0,
        "enable_model_summary": False,
        # Lightning adds a ModelCheckpoint of its own unless told not to; last.pt is ours.
        "enable_checkpointing": any(isinstance(c, Checkpoint) for c in callbacks),
        # Our loaders are rank-aware already (DistributedSampler subclasses under DDP).
        "use_distributed_sampler": False,
        "logger": _default_logger(cfg.output_dir) if callbacks else False,
    }
    rest = {key: value for key, value in block.items() if key not in reconciled}
    kwargs = {**defaults, **_instantiate_values(rest), **reconciled}
    return TrainerOptions(kwargs, callbacks, resume or ckpt_path)
