"""Embedding extraction (SPEC §3.5, §10): reuse the keyed cache, compute only what is missing.

Flow of `extract_embeddings`:

1. Resolve the model without the network (`models.resolve_model`).
2. Look every patch key up in the cache (`parquet_path`): rows whose key and metadata match are
   reused; only the rest is computed. A cache made with other settings is ignored (and the log
   says which setting differs).
3. The missing windows are computed in this process or, when the run has a Dask cluster, on its
   workers (`workers.embed_partition`, partitions of one raster in block order). In this process
   a torch DataLoader reads and preprocesses the windows in worker processes (each opens every
   raster once) while the model runs batches in the main process. Either way only this process
   writes the cache: new rows are checkpointed next to it as they arrive (every
   `checkpoint_every` batches), so a killed run or a lost worker loses no finished vector.
4. The cache is rewritten atomically with the old and the new rows.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbalance.compute import Compute
from patchbalance.config import EmbeddingsConfig
from patchbalance.embeddings.cache import ComputedVectors, EmbeddingCache, cache_metadata
from patchbalance.embeddings.models import (
    ModelSource,
    autocast,
    autocast_dtype,
    check_image_size,
    choose_device,
    load_backbone,
    normalisation,
    require_torch,
    resolve_model,
)
from patchbalance.embeddings.preprocess import (
    RasterPlan,
    WindowDataset,
    check_bands_setting,
    raster_plan,
    unreadable_window_error,
)
from patchbalance.embeddings.workers import compute_on_workers
from patchbalance.errors import InputError
from patchbalance.table import KEY_COLUMNS, empty_keys, normalised_keys
from patchbalance.windows import RasterInfo

log = logging.getLogger(__name__)


@dataclass
class EmbeddingResult:
    """Embeddings of the patches, aligned with the input records, and run figures."""

    vectors: np.ndarray  # float32 (n, D); row i belongs to records row i
    summary: dict[str, Any] = field(default_factory=dict)


def _cached_rows(
    keys: pd.DataFrame, config: EmbeddingsConfig, metadata: dict[str, Any]
) -> tuple[EmbeddingCache | None, pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Return the cache, its reusable keys and vectors, the run's vectors and which were found."""
    dim = int(metadata["dim"])
    n = len(keys)
    vectors = np.zeros((n, dim), dtype=np.float32)
    found = np.zeros(n, dtype=bool)
    if not config.parquet_path:
        return None, empty_keys(), np.empty((0, dim), np.float32), vectors, found
    cache = EmbeddingCache(Path(config.parquet_path), metadata)
    cache.check_writable()
    cached_keys, cached_vectors = cache.load()
    if len(cached_keys) and n:
        position = pd.MultiIndex.from_frame(cached_keys).get_indexer(pd.MultiIndex.from_frame(keys))
        found = position >= 0
        vectors[found] = cached_vectors[position[found]]
    return cache, cached_keys, cached_vectors, vectors, found


def extract_embeddings(
    records: pd.DataFrame,
    config: EmbeddingsConfig,
    seed: int,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
    infos: dict[str, RasterInfo] | None = None,
    compute: Compute | None = None,
) -> EmbeddingResult:
    """Return one embedding per record (row i for records row i), reusing the cache.

    Args:
        records: image_path, row_off, col_off and patch_size of the active patches.
        config: the `embeddings:` block, paths resolved.
        seed: seeds the pixel sample of the percentile stretch.
        progress: draw a progress bar.
        on_batch: called as `on_batch(batch_number, patches)` after each computed batch (on a
            cluster: after each partition that arrives), after any checkpoint; a hook for
            progress reporting and tests.
        infos: the rasters as already probed; their windows are taken to lie inside them and
            are not probed again (rasters missing from it are probed and checked here).
        compute: where the run's work runs; with a Dask cluster the missing windows are
            computed on its workers. None or in-process: a DataLoader in this process.

    Returns:
        The vectors and the summary's `embeddings` block.
    """
    start = time.perf_counter()
    missing_columns = [name for name in KEY_COLUMNS if name not in records.columns]
    if missing_columns:
        raise InputError(f"embeddings need the record columns {missing_columns}")
    require_torch()
    check_bands_setting(config)
    source = resolve_model(config)
    check_image_size(config, source)
    mean, std = normalisation(source)
    metadata = cache_metadata(config, source, seed, mean, std)
    keys = normalised_keys(records)
    cache, cached_keys, cached_vectors, vectors, found = _cached_rows(keys, config, metadata)
    todo = np.flatnonzero(~found)
    distributed = compute is not None and compute.distributed
    summary = _summary(config, source, metadata, cache, len(keys), int(found.sum()))
    if distributed:
        summary.update(scheduler=compute.scheduler, workers=compute.workers)
    else:
        summary["device"], summary["precision"] = choose_device(config)

    extraction_seconds = 0.0
    if len(todo):
        todo_keys = keys.iloc[todo].reset_index(drop=True)
        plan = raster_plan(todo_keys, config, seed, infos)
        computed = ComputedVectors(todo_keys, todo, vectors, cache)
        started = time.perf_counter()
        if distributed:
            summary.update(
                compute_on_workers(
                    computed, plan, config, source, metadata, compute, progress, on_batch
                )
            )
        else:
            summary["num_workers"] = _compute_here(
                computed, plan, config, source, summary, progress, on_batch
            )
        extraction_seconds = time.perf_counter() - started
        computed_keys, computed_vectors = computed.result()
        summary["computed"] = len(todo)
        if cache is not None:
            cache.write(
                normalised_keys(pd.concat([cached_keys, computed_keys], ignore_index=True)),
                np.concatenate([cached_vectors, computed_vectors], axis=0),
            )
    elif cache is not None and (cache.invalid_reason or cache.has_checkpoints):
        cache.write(cached_keys, cached_vectors)

    summary["patches_per_second"] = (
        round(len(todo) / extraction_seconds, 2) if len(todo) and extraction_seconds > 0 else None
    )
    summary["seconds"] = round(time.perf_counter() - start, 3)
    log.info("embeddings: %s", extraction_text(summary))
    return EmbeddingResult(vectors=vectors, summary=summary)


def _summary(
    config: EmbeddingsConfig,
    source: ModelSource,
    metadata: dict[str, Any],
    cache: EmbeddingCache | None,
    patches: int,
    cache_hits: int,
) -> dict[str, Any]:
    """Return the summary's `embeddings` block before anything is computed.

    `device` and `precision` are filled in where the vectors are computed: here, or by the
    workers of a cluster (None when a cluster had nothing to compute).
    """
    summary: dict[str, Any] = {
        "backbone": source.backbone,
        "model_id": source.model_id,
        "revision": source.revision,
        "weights_sha256": metadata["weights_sha256"],
        "dim": int(metadata["dim"]),
        "image_size": config.image_size,
        "pooling": metadata["pooling"],
        "bands": metadata["bands"],
        "device": None,
        "precision": None,
        "computed_on": None,
        "batch_size": config.batch_size,
        "patches": patches,
        "computed": 0,
        "cache_hits": cache_hits,
        "cache_path": str(cache.path) if cache else None,
    }
    if cache is not None and cache.invalid_reason:
        summary["cache_invalidated"] = cache.invalid_reason
    return summary


def extraction_text(summary: dict[str, Any]) -> str:
    """Return how many embeddings a run computed and reused, e.g. for the end-of-run summary."""
    computed, reused = summary.get("computed", 0), summary.get("cache_hits", 0)
    if not computed:
        return f"all {reused:,} reused, nothing computed"
    rate = summary.get("patches_per_second")
    workers = len(summary.get("device_by_worker") or {})
    return (
        f"{computed:,} computed"
        + (f" at {rate:.1f} patches/s" if rate else "")
        + (f" on {workers} Dask worker{'s' if workers > 1 else ''}" if workers else "")
        + f", {reused:,} reused from the cache"
    )


def _compute_here(
    computed: ComputedVectors,
    plan: RasterPlan,
    config: EmbeddingsConfig,
    source: ModelSource,
    summary: dict[str, Any],
    progress: bool,
    on_batch: Callable[[int, int], None] | None,
) -> int:
    """Compute the missing vectors in this process with a DataLoader; return its worker count."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    keys = computed.todo_keys
    device, precision = summary["device"], summary["precision"]
    order = np.concatenate(plan.read_order(keys, len(keys)))
    loading = time.perf_counter()
    backbone = load_backbone(config, source)
    backbone.module.to(device)
    summary["model_load_seconds"] = round(time.perf_counter() - loading, 3)
    dataset = WindowDataset(
        plan.paths,
        plan.codes[order],
        keys["row_off"].to_numpy()[order],
        keys["col_off"].to_numpy()[order],
        keys["patch_size"].to_numpy()[order],
        plan.scalings,
        config.image_size,
        backbone.mean,
        backbone.std,
    )
    batches = -(-len(dataset) // config.batch_size)
    # More reader processes than cores only steal time from the model (torch warns too).
    workers = min(config.num_workers, batches, os.cpu_count() or 1)
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device == "cuda",
    )
    bar = tqdm(
        total=len(dataset), unit="patch", desc="embeddings", disable=not progress, leave=False
    )
    every = config.checkpoint_every * config.batch_size
    try:
        with torch.inference_mode():
            for batch_number, (items, batch, errors) in enumerate(loader, start=1):
                rows = order[items.numpy()]
                failed = [i for i, message in enumerate(errors) if message]
                if failed:
                    raise unreadable_window_error(keys, int(rows[failed[0]]), errors[failed[0]])
                batch = batch.to(device, non_blocking=True)
                with autocast(device, precision):
                    output = backbone.embed(batch)
                    if batch_number == 1:
                        _record_where_computed(summary, output)
                computed.take(rows, output.float().cpu().numpy(), every)
                bar.update(len(rows))
                if on_batch is not None:
                    on_batch(batch_number, len(rows))
    finally:
        # Never lose finished work: an error or an interrupt checkpoints what is done.
        computed.flush()
        bar.close()
    return workers


def _record_where_computed(summary: dict[str, Any], output: Any) -> None:
    """Record the device the model's output tensor is on and the autocast dtype in force.

    Read from the tensors themselves, inside the autocast context, so the summary shows where
    the vectors were computed, not only where they were meant to be.
    """
    summary["computed_on"] = str(output.device)
    summary["autocast_dtype"] = autocast_dtype(output.device.type)
