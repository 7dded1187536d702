"""Embeddings on Dask workers (SPEC §10): one partition of one raster's windows per task.

`embed_partition` runs in a worker process. It loads the model once per process (kept in
`_LOADED`, keyed by what identifies the model, so later tasks reuse it), opens the raster once
for the partition, reads, preprocesses and embeds its windows in batches of `batch_size`, and
returns the vectors to the client, which alone writes the cache. On a machine with GPUs each
worker takes one of them, chosen by its name, so the workers spread over the GPUs.

`compute_on_workers` is the client's side: it cuts the missing windows into partitions
(`CLUSTER_PARTITION_WINDOWS` each), hands them to `Compute.as_completed` and checkpoints the
vectors as partitions arrive.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rasterio.errors import RasterioError

from patchbalance.config import EmbeddingsConfig
from patchbalance.embeddings.cache import ComputedVectors
from patchbalance.embeddings.models import (
    Backbone,
    ModelSource,
    autocast,
    choose_device,
    load_backbone,
)
from patchbalance.embeddings.preprocess import (
    RasterPlan,
    RasterScaling,
    preprocess_window,
    unreadable_window_error,
)
from patchbalance.windows import gdal_message, open_raster, read_window, read_window_mask

if TYPE_CHECKING:
    import rasterio

    from patchbalance.compute import Compute

# Windows per task on a Dask cluster: enough batches that loading and scheduling are small
# next to the forward passes, few enough that the workers share a large raster.
CLUSTER_PARTITION_WINDOWS = 1024

# The model this worker process has loaded: model key -> (backbone, device, precision). The
# lock keeps the threads of a multi-threaded worker from loading it twice.
_LOADED: dict[str, tuple[Backbone, str, str]] = {}
_LOADING = threading.Lock()


@dataclass(frozen=True)
class EmbeddingTask:
    """The windows of one raster to embed on a worker, in reading order, and the model to use.

    Args:
        config: the `embeddings:` block.
        source: where the model's files are (a folder the workers can read).
        model_key: identifies the loaded model (weights, backbone, image size, pooling).
        path: the raster.
        scaling: how its pixels become model input.
        row_off: the windows' row offsets.
        col_off: their column offsets.
        size: their sizes (patch_size).
    """

    config: EmbeddingsConfig
    source: ModelSource
    model_key: str
    path: str
    scaling: RasterScaling
    row_off: np.ndarray
    col_off: np.ndarray
    size: np.ndarray


@dataclass
class PartitionEmbeddings:
    """The vectors of one task's windows (row i: window i) and where they were computed."""

    vectors: np.ndarray  # float32 (n, D); rows of unreadable windows are zero
    worker: str
    device: str
    precision: str
    loaded_model: bool  # whether this task loaded the model (the worker's first task)
    errors: dict[int, str] = field(default_factory=dict)  # window position -> GDAL message


def worker_name() -> str:
    """Return this Dask worker's name, or "client" outside a worker."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return "client"


def worker_device(config: EmbeddingsConfig, name: str) -> tuple[str, str]:
    """Return `(device, precision)` for the worker `name`: one GPU of this machine's, or the CPU.

    A worker named by a number (as a `LocalCluster` names them) takes GPU `number % count`;
    another name is hashed (CRC-32, the same in every process). A worker that sees one GPU
    (e.g. pinned with CUDA_VISIBLE_DEVICES) takes that one.
    """
    device, precision = choose_device(config)
    if device == "cuda":
        import torch

        count = max(1, torch.cuda.device_count())
        slot = int(name) if name.isdigit() else zlib.crc32(name.encode())
        device = f"cuda:{slot % count}"
    return device, precision


def _backbone(task: EmbeddingTask, name: str) -> tuple[Backbone, str, str, bool]:
    """Return this process's model for the task, its device and precision, and if it loaded now."""
    with _LOADING:
        loaded = _LOADED.get(task.model_key)
        if loaded is not None:
            return (*loaded, False)
        device, precision = worker_device(task.config, name)
        backbone = load_backbone(task.config, task.source)
        backbone.module.to(device)
        _LOADED.clear()  # one model per worker process: a new one replaces the last
        _LOADED[task.model_key] = (backbone, device, precision)
        return backbone, device, precision, True


def _read_inputs(
    dataset: rasterio.DatasetReader, task: EmbeddingTask, rows: range, backbone: Backbone
) -> tuple[list[int], list, dict[int, str]]:
    """Return the rows read, their model inputs, and the GDAL message of each failed read."""
    scaling, bands = task.scaling, list(task.scaling.bands)
    done: list[int] = []
    inputs = []
    errors: dict[int, str] = {}
    for i in rows:
        row, col, size = int(task.row_off[i]), int(task.col_off[i]), int(task.size[i])
        try:
            pixels = read_window(dataset, row, col, size, bands)
            valid = read_window_mask(dataset, row, col, size) > 0 if scaling.has_mask else None
        except (RasterioError, OSError) as exc:
            errors[i] = gdal_message(exc)
            continue
        image_size = task.config.image_size
        inputs.append(
            preprocess_window(pixels, valid, scaling, image_size, backbone.mean, backbone.std)
        )
        done.append(i)
    return done, inputs, errors


def embed_partition(task: EmbeddingTask) -> PartitionEmbeddings:
    """Return the embeddings of the task's windows, computed in batches of `batch_size`.

    A window whose read fails gets a zero vector and its GDAL message in `errors` (so the
    client names the patch); a raster that cannot be opened fails every window that way.
    """
    import torch

    name = worker_name()
    backbone, device, precision, loaded_model = _backbone(task, name)
    n = len(task.row_off)
    vectors = np.zeros((n, backbone.dim), dtype=np.float32)
    result = PartitionEmbeddings(vectors, name, device, precision, loaded_model)
    try:
        dataset = open_raster(task.path)
    except (RasterioError, OSError) as exc:
        result.errors = dict.fromkeys(range(n), gdal_message(exc))
        return result
    batch_size = task.config.batch_size
    with dataset, torch.inference_mode():
        for start in range(0, n, batch_size):
            rows, inputs, errors = _read_inputs(
                dataset, task, range(start, min(n, start + batch_size)), backbone
            )
            result.errors.update(errors)
            if not inputs:
                continue
            batch = torch.stack(inputs).to(device)
            with autocast(device, precision):
                output = backbone.embed(batch)
            vectors[rows] = output.float().cpu().numpy()
    return result


def compute_on_workers(
    computed: ComputedVectors,
    plan: RasterPlan,
    config: EmbeddingsConfig,
    source: ModelSource,
    metadata: dict[str, Any],
    compute: Compute,
    progress: bool,
    on_batch: Callable[[int, int], None] | None,
) -> dict[str, Any]:
    """Compute the missing vectors on the Dask workers; return where they ran, for the summary.

    Each task is one partition of one raster's windows in block order; its vectors come back
    here, and only here is the cache written (checkpointed every `checkpoint_every` batches'
    worth of windows), so a worker that dies loses no finished vector: Dask recomputes its
    partitions, and a rerun computes only what no checkpoint holds.
    """
    from tqdm.auto import tqdm

    keys = computed.todo_keys
    chunks = plan.read_order(keys, CLUSTER_PARTITION_WINDOWS)
    # The weights, how they are built and pooled: what a worker's loaded model is reused for.
    model_key = json.dumps(
        [metadata["weights_sha256"], source.backbone, str(source.folder), config.image_size,
         metadata["pooling"]]
    )  # fmt: skip
    tasks: list[EmbeddingTask | None] = [
        EmbeddingTask(
            config=config,
            source=source,
            model_key=model_key,
            path=plan.paths[int(plan.codes[rows[0]])],
            scaling=plan.scalings[plan.paths[int(plan.codes[rows[0]])]],
            row_off=keys["row_off"].to_numpy()[rows],
            col_off=keys["col_off"].to_numpy()[rows],
            size=keys["patch_size"].to_numpy()[rows],
        )
        for rows in chunks
    ]
    devices: dict[str, str] = {}
    precisions: set[str] = set()
    model_loads = 0
    every = config.checkpoint_every * config.batch_size
    bar = tqdm(total=len(keys), unit="patch", desc="embeddings", disable=not progress, leave=False)
    try:
        results = compute.as_completed(embed_partition, tasks)
        for number, (position, part) in enumerate(results, start=1):
            rows = chunks[position]
            tasks[position] = None  # sent and done: its arrays are no longer needed here
            if part.errors:
                first = min(part.errors)
                raise unreadable_window_error(keys, int(rows[first]), part.errors[first])
            computed.take(rows, part.vectors, every)
            devices[part.worker] = part.device
            precisions.add(part.precision)
            model_loads += part.loaded_model
            bar.update(len(rows))
            if on_batch is not None:
                on_batch(number, len(rows))
    finally:
        computed.flush()
        bar.close()
    return {
        "device": ", ".join(sorted(set(devices.values()))),
        "precision": ", ".join(sorted(precisions)),
        "device_by_worker": dict(sorted(devices.items())),
        "partitions": len(chunks),
        "model_loads": model_loads,
    }
