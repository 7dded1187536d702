"""Helpers of the Lightning engine tests: a tiny run configuration and a record of drawn rows.

`IndexedDataset` and `RecordDrawnRows` are named by `_target_` in the configurations, so that a
`patchbalance train` process (DDP ranks included) records which table rows each rank drew.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightning import Callback

from data_fixtures import grid_rows, write_scene, write_table
from patchbalance.data import CSVWindowedSegmentationDataset

# A 1x1 convolution: a model whose steps cost next to nothing.
TINY_MODEL = {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 1}


class IndexedDataset(CSVWindowedSegmentationDataset):
    """The windowed dataset, whose items also carry their table row (`row`)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        item["row"] = index
        return item


class RecordDrawnRows(Callback):
    """Append each training batch's rows, with the epoch and rank, to `folder/rows_<rank>.jsonl`."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "rows": batch["row"].tolist(),
        }
        with open(self.folder / f"rows_{trainer.global_rank}.jsonl", "a") as stream:
            stream.write(json.dumps(record) + "\n")


def read_drawn_rows(folder: Path, rank: int = 0) -> pd.DataFrame:
    """Return the batches a rank recorded: one row per batch with epoch, step and rows."""
    lines = (folder / f"rows_{rank}.jsonl").read_text().splitlines()
    return pd.DataFrame([json.loads(line) for line in lines])


def write_weighted_table(folder: Path, weights: np.ndarray, patch: int = 8) -> tuple[Path, Path]:
    """Write a training table of `len(weights)` windows with these weights, and a val table."""
    size = patch * int(np.ceil(np.sqrt(len(weights))))
    image, mask, _, _ = write_scene(folder, "train", size=size, seed=5)
    train = grid_rows(image, mask, size, patch).iloc[: len(weights)].copy()
    train["sampler_weight"] = weights
    image, mask, _, _ = write_scene(folder, "val", size=2 * patch, seed=6)
    val = grid_rows(image, mask, 2 * patch, patch)
    return write_table(train, folder / "train.csv"), write_table(val, folder / "val.csv")


def tiny_config(
    train_table: Path,
    val_table: Path,
    output_dir: Path,
    num_samples: int,
    batch_size: int,
    rows_folder: Path | None = None,
) -> dict[str, Any]:
    """Return a train configuration of the 1x1 model over the tables, drawing by weight."""
    callbacks = (
        []
        if rows_folder is None
        else [{"_target_": "lightning_runs.RecordDrawnRows", "folder": str(rows_folder)}]
    )
    return {
        "train_dataset": {
            "_target_": "lightning_runs.IndexedDataset",
            "input_csv_path": str(train_table),
            "n_classes": 4,
            "data_loader": {
                "weighted_sampler": True,
                "weighted_sampler_num_samples": num_samples,
                "num_workers": 0,
            },
        },
        "val_dataset": {"input_csv_path": str(val_table), "data_loader": {"num_workers": 0}},
        "model": dict(TINY_MODEL),
        "hyperparameters": {"batch_size": batch_size, "lr": 0.01},
        "seed": 7,
        "output_dir": str(output_dir),
        "callbacks": callbacks,
    }
