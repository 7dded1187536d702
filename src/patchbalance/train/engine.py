"""`run_lightning`: a `patchbalance train` run on PyTorch Lightning's `Trainer` (SPEC §7).

The plan's datasets feed a `BalancedDataModule` (weighted draws, a disjoint slice per rank), its
model, loss and optimizer a `SegmentationModule`; the `pl_trainer:` block and the `callbacks:`
list configure the `Trainer` (`train.trainer_options`). After every validation, rank 0 writes
the metrics CSV (rows reduced over the ranks) and `last.pt`, a Lightning checkpoint that also
holds the plain loop's keys (`model_state_dict`, `epoch`, `miou`, ...); `best.pt` is a copy of
the best one by mIoU. `--resume last.pt` (or `pl_trainer.ckpt_path`) continues the run: model,
optimizer, loop position, metric history and the sampler's draws.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback, Trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException

from patchbalance.atomic import atomic_copy
from patchbalance.errors import ConfigError
from patchbalance.lightning import BalancedDataModule
from patchbalance.train.components import seed_everything
from patchbalance.train.loss import CLASS_WEIGHTS_FILE, write_class_weights
from patchbalance.train.outputs import (
    TrainResult,
    prepare_output_dir,
    train_result,
    write_metrics,
)
from patchbalance.train.plan import TrainPlan
from patchbalance.train.schedules import TrainingDraws
from patchbalance.train.segmentation_module import SegmentationModule
from patchbalance.train.trainer_options import trainer_options

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


class RunOutputs(Callback):
    """After each validation: metrics CSV (rank 0), `last.pt`, and `best.pt` when it is the best.

    Args:
        output_dir: the run's folder.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        """Write the outputs of the validation that just ended."""
        if trainer.sanity_checking or not getattr(pl_module, "new_row", False):
            return
        pl_module.new_row = False
        last = self.output_dir / LAST_CHECKPOINT
        partial = self.output_dir / f".{LAST_CHECKPOINT}.partial"
        # Every rank takes part in the save; rank 0 writes, then renames (atomic).
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            write_metrics(pl_module.rows, self.output_dir / METRICS_FILE)
            os.replace(partial, last)
            if pl_module.best_is_last:
                atomic_copy(last, self.output_dir / BEST_CHECKPOINT)
        trainer.strategy.barrier("patchbalance-outputs")


class SamplerScheduleHooks(Callback):
    """Counts every trained batch's class pixels and applies the `sampler_schedule` per step.

    The calls of the plain loop (`TrainingDraws.after_step` after each optimizer step), with
    the counts and the adaptive schedule's confusion matrix summed over the ranks.

    Args:
        draws: the run's `TrainingDraws` (its sampler is bound to the training loader's).
    """

    def __init__(self, draws: TrainingDraws) -> None:
        self.draws = draws
        self._step = 0

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        """Bind the schedule to the loader's sampler and the sums to the ranks."""
        self._step = trainer.global_step
        self.draws.sampler = trainer.datamodule.sampler
        device = pl_module.device

        def reduce(values: np.ndarray) -> np.ndarray:
            tensor = torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)
            return trainer.strategy.reduce(tensor, reduce_op="sum").cpu().numpy()

        self.draws.reduce = reduce

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the batch; after an optimizer step, apply the schedule."""
        self.draws.count(batch["mask"], outputs["logits"])
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            self.draws.apply(self._step)


def data_module(plan: TrainPlan) -> BalancedDataModule:
    """Return the data module of `plan`: its datasets and `data_loader` blocks."""
    cfg = plan.config
    return BalancedDataModule(
        plan.train_dataset,
        plan.val_dataset,
        batch_size=cfg.hyperparameters.batch_size,
        train_loader=cfg.train_dataset.get("data_loader") or {},
        val_loader=cfg.val_dataset.get("data_loader") or {},
        seed=cfg.seed,
    )


def build_trainer(
    plan: TrainPlan, progress: bool, resume: str | None
) -> tuple[Trainer, str | None]:
    """Return the `Trainer` of `plan` and the checkpoint to resume from (or None)."""
    if not progress:
        # Lightning's start-up notes (accelerators, tips) are not part of a quiet run.
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    options = trainer_options(plan.config, resume)
    kwargs = {"enable_progress_bar": progress, **options.kwargs}
    callbacks = [*options.callbacks, RunOutputs(plan.output_dir)]
    if plan.draws is not None:
        callbacks.append(SamplerScheduleHooks(plan.draws))
    try:
        trainer = Trainer(callbacks=callbacks, **kwargs)
    except (TypeError, ValueError, MisconfigurationException) as exc:
        # Lightning's own checks of the values: one line naming the block.
        raise ConfigError(f"pl_trainer: {' '.join(str(exc).split())}") from exc
    ckpt_path = options.ckpt_path
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise ConfigError(f"--resume / pl_trainer.ckpt_path: {ckpt_path} is not a file")
    return trainer, ckpt_path


def run_lightning(
    plan: TrainPlan, progress: bool = False, resume: str | None = None
) -> TrainResult:
    """Train as `plan` says on Lightning's `Trainer`; return the metrics, checkpoints and model.

    Args:
        plan: the run's plan.
        progress: show Lightning's progress bar.
        resume: a checkpoint of an earlier run of the same configuration to continue.

    Returns:
        The result; on ranks other than 0 of a multi-process run the same object (its rows are
        the reduced ones), though only rank 0 wrote the files.
    """
    seed_everything(plan.config.seed)
    prepare_output_dir(plan.output_dir)
    trainer, ckpt_path = build_trainer(plan, progress, resume)
    module = SegmentationModule(plan)
    if plan.class_weights is not None and trainer.is_global_zero:
        write_class_weights(plan.class_weights, plan.output_dir / CLASS_WEIGHTS_FILE)
    with warnings.catch_warnings():
        # Lightning cannot see that our data module resumes the draws mid-epoch itself.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended")
        # A checkpoint holds the config and numpy metrics, not only tensors: the user names it.
        trainer.fit(module, datamodule=data_module(plan), ckpt_path=ckpt_path, weights_only=False)
    result = train_result(
        plan,
        module.rows,
        module.best,
        module.best_confusion,
        trainer.global_step,
        module.model,
        module.trained_on,
    )
    result.rank = trainer.global_rank
    return result
