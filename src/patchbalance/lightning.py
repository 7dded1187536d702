"""`BalancedDataModule`: the weighted training loader and the plain validation loader for Lightning.

For users who bring their own `LightningModule` (extra `[train]`)::

    from lightning import Trainer
    from patchbalance.lightning import BalancedDataModule

    data = BalancedDataModule.from_tables(
        "balanced_train.csv", "val.csv", n_classes=4, batch_size=8, seed=42
    )
    Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp").fit(model, datamodule=data)

The training loader draws rows by the table's `sampler_weight` (`weighted_sampler: true` unless
the `data_loader` block says otherwise). Under DDP it uses `DistributedWeightedSampler`, a
`torch.utils.data.DistributedSampler` subclass, so Lightning leaves it alone: every rank draws
the same global sample of an epoch and keeps a disjoint slice. (Handed a plain
`WeightedRandomSampler` under DDP, Lightning wraps it in its `DistributedSamplerWrapper`: each
rank then draws its own independent weighted sample of the full size and keeps every
world-size-th index of it, so the ranks' draws are neither disjoint nor one global draw, and each
rank's epoch is a 1/world-size slice of a draw the seed does not tie across ranks.) The
validation loader reads every row once, in table order, each rank a disjoint share without the
padding `DistributedSampler` adds, so metrics summed over the ranks count each pixel once.

The position of the draw is part of the module's `state_dict`, which Lightning saves in its
checkpoints: a run resumed from a checkpoint taken inside an epoch draws the rows the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from patchbalance.data import build_dataloader

DEFAULT_TRAIN_LOADER = {"weighted_sampler": True}


class BalancedDataModule(LightningDataModule):
    """Weighted, DDP-aware training loader and unweighted validation loader over two datasets.

    Args:
        train_dataset: the training dataset (its table has a `sampler_weight` column when the
            loader is weighted), e.g. a `CSVWindowedSegmentationDataset` of a balanced table.
        val_dataset: the validation dataset.
        batch_size: patches per batch on each rank.
        train_loader: the training `data_loader` block (SPEC §7 keys; default weighted).
        val_loader: the validation `data_loader` block (never weighted, never shuffled).
        seed: the seed of the draws, the same on every rank.
    """

    def __init__(
        self,
        train_dataset: Any,
        val_dataset: Any,
        batch_size: int = 8,
        train_loader: Mapping[str, Any] | None = None,
        val_loader: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.batch_size = int(batch_size)
        self.train_loader_block = dict(
            DEFAULT_TRAIN_LOADER if train_loader is None else train_loader
        )
        self.val_loader_block = dict(val_loader or {})
        self.seed = int(seed)
        self.sampler: Any = None
        self._loader_batch_size = self.batch_size
        self._sampler_state: dict[str, Any] | None = None

    @classmethod
    def from_tables(
        cls,
        train_table: str | os.PathLike[str],
        val_table: str | os.PathLike[str],
        n_classes: int,
        batch_size: int = 8,
        seed: int = 0,
        train_loader: Mapping[str, Any] | None = None,
        val_loader: Mapping[str, Any] | None = None,
        **dataset_arguments: Any,
    ) -> BalancedDataModule:
        """Return the module over a balanced table and a validation table.

        Args:
            train_table: the balanced table (CSV or Parquet with `sampler_weight`).
            val_table: the validation table.
            n_classes: the number of classes of the masks.
            batch_size: patches per batch on each rank.
            seed: the seed of the draws.
            train_loader: the training `data_loader` block (default weighted).
            val_loader: the validation `data_loader` block.
            **dataset_arguments: further `CSVWindowedSegmentationDataset` arguments, given
                to both datasets (e.g. `augmentation_list` goes to training only when given
                in the `train_dataset` block of a YAML; here it applies to both).
        """
        from patchbalance.data import CSVWindowedSegmentationDataset

        train = CSVWindowedSegmentationDataset(
            train_table, n_classes=n_classes, **dataset_arguments
        )
        val = CSVWindowedSegmentationDataset(val_table, n_classes=n_classes, **dataset_arguments)
        return cls(train, val, batch_size, train_loader, val_loader, seed)

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any] | str | os.PathLike[str], base_dir: str | None = None
    ) -> BalancedDataModule:
        """Return the module of a train YAML's `train_dataset` / `val_dataset` blocks.

        Args:
            config: the train configuration mapping, or the path of its YAML file.
            base_dir: the folder relative paths are relative to (default: the file's folder,
                or the current folder for a mapping).
        """
        from patchbalance.config.loading import read_yaml_mapping
        from patchbalance.train.components import build_dataset
        from patchbalance.train.config import load_train_config, resolve_config_mapping
        from patchbalance.train.plan import SHARED_LABEL_KEYS

        if not isinstance(config, Mapping):
            path = Path(config)
            base_dir = base_dir or os.fspath(path.resolve().parent)
            config = read_yaml_mapping(path)
        cfg = load_train_config(resolve_config_mapping(config), base_dir)
        train, train_block = build_dataset(cfg.train_dataset, "train_dataset")
        inherited = {k: cfg.train_dataset[k] for k in SHARED_LABEL_KEYS if k in cfg.train_dataset}
        val, val_block = build_dataset(cfg.val_dataset, "val_dataset", inherited)
        return cls(train, val, cfg.hyperparameters.batch_size, train_block, val_block, cfg.seed)

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)

    def train_dataloader(self) -> DataLoader:
        """Return the training loader: weighted draws, a disjoint slice of them per rank."""
        world_size, _ = self._replicas()
        loader = build_dataloader(
            self.train_dataset,
            self.train_loader_block,
            self.batch_size,
            seed=self.seed,
            training=True,
            distributed=world_size > 1,
            stateful=True,
        )
        self.sampler = loader.sampler
        self._loader_batch_size = loader.batch_size
        if self._sampler_state is not None and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
        return loader

    def val_dataloader(self) -> DataLoader:
        """Return the validation loader: every row once, in order; a disjoint share per rank."""
        loader = build_dataloader(
            self.val_dataset, self.val_loader_block, self.batch_size, seed=self.seed, training=False
        )
        world_size, rank = self._replicas()
        if world_size == 1:
            return loader
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        sampler = UnrepeatedDistributedSampler(
            self.val_dataset, num_replicas=world_size, rank=rank, shuffle=False
        )
        return _with_sampler(loader, sampler)

    def state_dict(self) -> dict[str, Any]:
        """Return the training sampler's state (seed, epoch, position), for checkpoints.

        The position is that of the batches trained on in this epoch, not the sampler's own
        count, which runs ahead of training by the batches a loader fetches in advance.
        """
        if self.sampler is None or not hasattr(self.sampler, "state_dict"):
            return {}
        state = self.sampler.state_dict()
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            state["position"] = min(state["position"], done * self._loader_batch_size)
        return {"sampler": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the training sampler's state from a checkpoint (applied to the next loader)."""
        self._sampler_state = state_dict.get("sampler")
        if self._sampler_state is not None and self.sampler is not None:
            self.sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None


def _with_sampler(loader: DataLoader, sampler: Any) -> DataLoader:
    """Return a copy of `loader` that reads in the order of `sampler`."""
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )
