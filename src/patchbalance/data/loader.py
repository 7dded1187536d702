"""`build_dataloader`: a torch DataLoader from a dataset and the config's `data_loader` block.

The block takes the upstream keys `weighted_sampler` (default false),
`weighted_sampler_num_samples` (default: one per row) and `weighted_sampler_replacement`
(default true) plus the ordinary DataLoader keys (`shuffle`, `num_workers`, `pin_memory`,
`drop_last`, `prefetch_factor`, `persistent_workers`, `timeout`, `batch_size`, ...). With the
weighted sampler on, the weights come from the dataset's `sampler_weight` column and `shuffle` is
ignored (said once in the log). The sampler is torch's `WeightedRandomSampler` up to 2^24 rows,
`NumpyWeightedRandomSampler` above, and `DistributedWeightedSampler` when a process group is
initialised (or `distributed=True`). Validation and test loaders (`training=False`) never draw by
weight and never shuffle: they read every row once, in table order (a slice per rank under DDP).
"""

from __future__ import annotations

import difflib
import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler

from patchbalance.balanced_table import check_weights
from patchbalance.data.samplers import (
    TORCH_MULTINOMIAL_MAX_CATEGORIES,
    DistributedWeightedSampler,
    NumpyWeightedRandomSampler,
    _check_num_samples,
)
from patchbalance.errors import ConfigError, InputError
from patchbalance.table import SAMPLER_WEIGHT, dataset_excluded, drawn_weights

log = logging.getLogger(__name__)

SAMPLER_KEYS = ("weighted_sampler", "weighted_sampler_num_samples", "weighted_sampler_replacement")
LOADER_KEYS = (
    "batch_size",
    "shuffle",
    "num_workers",
    "pin_memory",
    "drop_last",
    "timeout",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
    "multiprocessing_context",
)


def _check_keys(block: Mapping[str, Any], where: str) -> None:
    valid = (*SAMPLER_KEYS, *LOADER_KEYS)
    for key in block:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown key '{where}.{key}'{hint}")


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"data_loader.{key} must be true or false, got {value!r}")


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id (base_seed drawn from the loader's
    # generator); numpy, random and the augmentations follow that seed, so runs repeat.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset if info is not None else None
    if dataset is not None and hasattr(dataset, "set_augmentation_seed"):
        dataset.set_augmentation_seed(seed)


def dataset_weights(dataset: Dataset) -> np.ndarray:
    """Return the validated sampler weights of `dataset` (its `sampler_weight` column).

    Rows the table marks `excluded` get weight 0; one warning counts those that had more.
    """
    if hasattr(dataset, "require_sampler_weights"):
        weights = dataset.require_sampler_weights()
    else:
        weights = getattr(dataset, "sampler_weights", None)
        if weights is None:
            raise InputError(
                f"{type(dataset).__name__} has no sampler weights; weighted_sampler: true needs "
                "a dataset read from a table with a 'sampler_weight' column"
            )
    if len(weights) != len(dataset):  # type: ignore[arg-type]
        raise InputError(
            f"{len(weights)} sampler weights for a dataset of {len(dataset)} rows"  # type: ignore[arg-type]
        )
    where = getattr(dataset, "input_csv_path", None)
    # An excluded row is never drawn, whatever weight the table gives it (as in `report`).
    excluded = dataset_excluded(dataset)
    weights = drawn_weights(weights, excluded, str(where) if where else None)
    return check_weights(
        weights,
        what=f"{where}: {SAMPLER_WEIGHT}" if where else SAMPLER_WEIGHT,
        rows=getattr(dataset, "row_numbers", None),
    )


def build_weighted_sampler(
    weights: np.ndarray,
    num_samples: int | None = None,
    replacement: bool = True,
    seed: int | None = None,
    distributed: bool | None = None,
    drop_last: bool = False,
    stateful: bool = False,
) -> Sampler[int]:
    """Return the weighted sampler that fits: torch's, the numpy one past 2^24 rows, or DDP's.

    `stateful` asks for one of ours even on one process (`NumpyWeightedRandomSampler`), whose
    weights can change mid-run (`set_weights`) and whose place can be saved and resumed.
    """
    weights = check_weights(weights)
    positive = int(np.count_nonzero(weights))
    num_samples = _check_num_samples(
        len(weights) if num_samples is None else num_samples, replacement, positive
    )
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        return DistributedWeightedSampler(
            weights,
            num_samples=num_samples,
            replacement=replacement,
            seed=0 if seed is None else seed,
            drop_last=drop_last,
        )
    if stateful:
        return NumpyWeightedRandomSampler(weights, num_samples, replacement, seed)
    if len(weights) > TORCH_MULTINOMIAL_MAX_CATEGORIES:
        log.info(
            "%d rows exceed torch.multinomial's 2^24 limit: drawing with numpy instead",
            len(weights),
        )
        return NumpyWeightedRandomSampler(weights, num_samples, replacement, seed)
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    return WeightedRandomSampler(
        torch.as_tensor(np.array(weights)),
        num_samples,
        replacement=replacement,
        generator=generator,
    )


def build_dataloader(
    dataset: Dataset,
    data_loader: Mapping[str, Any] | None,
    batch_size: int,
    seed: int | None = None,
    training: bool = True,
    distributed: bool | None = None,
    stateful: bool = False,
) -> DataLoader:
    """Return a DataLoader for `dataset` configured by the `data_loader` block.

    `training=False` (validation, test) never uses the weighted sampler. `seed` fixes the
    sampler's draws, the shuffle order and the workers' random state. `distributed=None` means:
    distributed when a torch.distributed process group is initialised. `stateful` makes the
    weighted sampler one of ours on one process too (see `build_weighted_sampler`).
    """
    block = dict(data_loader or {})
    _check_keys(block, "data_loader")
    weighted = _as_bool(block.pop("weighted_sampler", False), "weighted_sampler")
    num_samples = block.pop("weighted_sampler_num_samples", None)
    replacement = _as_bool(
        block.pop("weighted_sampler_replacement", True), "weighted_sampler_replacement"
    )
    batch_size = int(block.pop("batch_size", batch_size))
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    shuffle = block.pop("shuffle", None)
    if shuffle is not None:
        shuffle = _as_bool(shuffle, "shuffle")
    if int(block.get("num_workers", 0)) == 0:
        # DataLoader refuses these without workers; a config tuned for workers still runs.
        block.pop("prefetch_factor", None)
        block.pop("persistent_workers", None)

    sampler: Sampler[int] | None = None
    if not training:
        if weighted or shuffle:
            log.info("validation and test loaders read every row once, in order")
        weighted, shuffle = False, False
    if weighted:
        if shuffle:
            log.info("data_loader.shuffle is ignored: the weighted sampler orders the draws")
        shuffle = None
        sampler = build_weighted_sampler(
            dataset_weights(dataset),
            num_samples=num_samples,
            replacement=replacement,
            seed=seed,
            distributed=distributed,
            drop_last=bool(block.get("drop_last", False)),
            stateful=stateful,
        )
    elif distributed:
        sampler = DistributedSampler(
            dataset,
            shuffle=bool(shuffle) and training,
            seed=0 if seed is None else seed,
            drop_last=bool(block.get("drop_last", False)),
        )
        shuffle = None

    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    if (
        seed is not None
        and int(block.get("num_workers", 0)) == 0
        and hasattr(dataset, "set_augmentation_seed")
    ):
        dataset.set_augmentation_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=generator,
        worker_init_fn=_seed_worker,
        **block,
    )
