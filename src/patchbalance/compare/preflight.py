"""What a comparison checks before its first build, `--dry-run` included.

A comparison runs for hours; what would fail in its last training should fail before its first
build. Beside the outputs (`compare.files`), every arm's training is instantiated as far as it
can be without its table: the device, the loss with its terms and `class_weights`; and the
classes of interest must be classes of the train config. Errors name the arm.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from patchbalance.compare.files import check_compare_outputs
from patchbalance.errors import PatchbalanceError


@contextmanager
def naming_arm(name: str, where: str | None = None) -> Iterator[None]:
    """Prefix a user error raised in the block with the arm's name (and the config file)."""
    try:
        yield
    except PatchbalanceError as exc:
        if f"arm '{name}'" not in str(exc):
            prefix = f"{where}: " if where else ""
            exc.args = (f"{prefix}arm '{name}': {exc}",)
        raise


def check_arm_training(train: Mapping[str, Any]) -> None:
    """Raise `ConfigError` when an arm's train mapping names a device or a loss that fails.

    The loss is instantiated (a misspelt argument of its class fails here), its
    `class_weights` parsed against the train dataset's `n_classes`.
    """
    from patchbalance.train.components import build_loss, resolve_device
    from patchbalance.train.loss import parse_class_weights

    accelerator = (train.get("pl_trainer") or {}).get("accelerator")
    resolve_device(train.get("device"), accelerator)
    dataset = train.get("train_dataset") or {}
    build_loss(train.get("loss"), int(dataset.get("ignore_index", 255)))
    if dataset.get("n_classes") is not None:
        parse_class_weights(train.get("loss"), int(dataset["n_classes"]))


def preflight(plan: Any) -> None:
    """Raise a one-line user error for what would fail later: outputs, devices, losses, classes."""
    check_compare_outputs(plan)
    for name, arm in plan.arms.items():
        with naming_arm(name, plan.where):
            check_arm_training(arm.train)
