"""The keyed embeddings cache (SPEC §3.5): one Parquet file of patch keys and float32 vectors.

Rows are keyed by the patch key (never by position); the file's metadata records the settings
that made the vectors, and a row is reused only when they match this run's. The CoreSet
selection reads the same file (`coreset.selection.read_embeddings_cache`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbalance.atomic import atomic_write_with, check_writable
from patchbalance.config import EmbeddingsConfig
from patchbalance.embeddings.models import (
    ModelSource,
    effective_pooling,
    embedding_dim,
    weights_sha256,
)
from patchbalance.errors import InputError, OutputError
from patchbalance.table import KEY_COLUMNS, empty_keys, key_label, key_sorted, normalised_keys

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
CACHE_METADATA_KEY = b"patchbalance.embeddings"
# Metadata entries that must match for a cached row to be reused. The model id, revision,
# device and precision are recorded for the reader but not compared: the weights' hash is what
# identifies the model, whichever folder or alias it was loaded through.
COMPARED_METADATA = (
    "format",
    "backbone",
    "weights_sha256",
    "dim",
    "bands",
    "scaling",
    "image_size",
    "pooling",
    "normalize_mean",
    "normalize_std",
    "patchbalance_version",
)


def _metadata_difference(cached: dict[str, Any], current: dict[str, Any]) -> str:
    differences = [
        f"{key} {cached.get(key)!r} -> {current.get(key)!r}"
        for key in COMPARED_METADATA
        if cached.get(key) != current.get(key)
    ]
    return ", ".join(differences)


class EmbeddingCache:
    """The keyed Parquet cache of §3.5 and its in-progress checkpoints.

    The cache is one Parquet file: columns image_path, row_off, col_off, patch_size and
    `embedding` (fixed-size list of float32), with the settings that made it in the file's
    metadata. While a run is in progress, new rows are checkpointed as small Parquet files in
    the folder `<cache name>.parts/` beside it (each written atomically, so a checkpoint costs
    only the new rows); the next load reads them too, and the final write merges them in.
    """

    def __init__(self, path: Path, metadata: dict[str, Any]) -> None:
        self.path = Path(path)
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self.metadata = json.loads(json.dumps(metadata))
        self.invalid_reason: str | None = None
        self._read_parts: list[Path] = []

    @property
    def has_checkpoints(self) -> bool:
        """Return whether `load` read checkpoint files that the final `write` merges in."""
        return bool(self._read_parts)

    def check_writable(self) -> None:
        """Raise `OutputError` unless the cache's folder exists (or can be made) and is writable."""
        check_writable(self.path, "the embeddings cache (embeddings.parquet_path)")

    def _read(self, path: Path) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any] | None]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise _unreadable(path, exc) from exc
        metadata = json.loads(_cache_metadata_entry(path, table.schema))
        embedding = table.column("embedding").combine_chunks()
        dim = embedding.type.list_size if pa.types.is_fixed_size_list(embedding.type) else None
        if dim is None or dim != self.metadata.get("dim"):
            return empty_keys(), np.empty((0, 0), np.float32), metadata
        vectors = embedding.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        keys = normalised_keys(table.select(list(KEY_COLUMNS)).to_pandas())
        return keys, vectors.reshape(-1, dim), metadata

    def load(self) -> tuple[pd.DataFrame, np.ndarray]:
        """Return the keys and vectors of every cached row whose metadata matches this run's."""
        dim = int(self.metadata["dim"])
        frames: list[pd.DataFrame] = []
        blocks: list[np.ndarray] = []
        if self.path.exists():
            keys, vectors, metadata = self._read(self.path)
            difference = _metadata_difference(metadata or {}, self.metadata)
            if difference:
                self.invalid_reason = difference
                log.warning(
                    "embeddings cache %s was made with other settings (%s); recomputing "
                    "every embedding",
                    self.path,
                    difference,
                )
            else:
                frames.append(keys)
                blocks.append(vectors)
        self._read_parts = sorted(self.parts_dir.glob("part-*.parquet"))
        for part in self._read_parts:
            try:
                keys, vectors, metadata = self._read(part)
            except InputError as exc:
                log.warning("skipping an unreadable embeddings checkpoint: %s", exc)
                continue
            if not _metadata_difference(metadata or {}, self.metadata):
                frames.append(keys)
                blocks.append(vectors)
        if not frames:
            return empty_keys(), np.empty((0, dim), np.float32)
        keys = pd.concat(frames, ignore_index=True)
        vectors = np.concatenate(blocks, axis=0)
        keep = ~pd.MultiIndex.from_frame(keys).duplicated(keep="last")
        return keys[keep].reset_index(drop=True), vectors[keep]

    def _table(self, keys: pd.DataFrame, vectors: np.ndarray) -> Any:
        import pyarrow as pa

        dim = int(self.metadata["dim"])
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        table = pa.table(
            {
                "image_path": pa.array(keys["image_path"].tolist(), type=pa.string()),
                "row_off": pa.array(keys["row_off"].to_numpy(np.int64)),
                "col_off": pa.array(keys["col_off"].to_numpy(np.int64)),
                "patch_size": pa.array(keys["patch_size"].to_numpy(np.int64)),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
            }
        )
        return table.replace_schema_metadata(
            {CACHE_METADATA_KEY: json.dumps(self.metadata).encode()}
        )

    def _write(self, path: Path, keys: pd.DataFrame, vectors: np.ndarray) -> None:
        import pyarrow.parquet as pq

        table = self._table(keys, vectors)
        try:
            atomic_write_with(path, lambda temporary: pq.write_table(table, temporary))
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the embeddings cache: {exc}") from exc

    def checkpoint(self, keys: pd.DataFrame, vectors: np.ndarray) -> None:
        """Write rows computed since the last checkpoint as a new part file (atomically)."""
        if len(keys) == 0:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{os.getpid()}.parquet"
        self._write(self.parts_dir / name, keys, vectors)

    def write(self, keys: pd.DataFrame, vectors: np.ndarray) -> None:
        """Atomically replace the cache with these rows and drop the checkpoints merged in."""
        keep = np.flatnonzero(~pd.MultiIndex.from_frame(keys).duplicated(keep="last"))
        # Sorted by key, so the same rows always make the same file.
        order = keep[key_sorted(keys.iloc[keep])]
        self._write(self.path, keys.iloc[order], vectors[order])
        for part in [*self._read_parts, *self.parts_dir.glob("part-*.parquet")]:
            part.unlink(missing_ok=True)
        if self.parts_dir.is_dir() and not any(self.parts_dir.iterdir()):
            self.parts_dir.rmdir()


def _unreadable(path: Path, exc: Exception) -> InputError:
    return InputError(
        f"{path}: not a readable Parquet embeddings cache ({exc}); delete it or point "
        "embeddings.parquet_path elsewhere"
    )


def _cache_metadata_entry(path: Path, schema: Any) -> bytes:
    """Return the cache's metadata entry; raise `InputError` when `schema` is not a cache's."""
    raw = (schema.metadata or {}).get(CACHE_METADATA_KEY)
    if raw is None or not {*KEY_COLUMNS, "embedding"} <= set(schema.names):
        raise InputError(
            f"{path}: not a patchbalance embeddings cache (no embedding metadata or key "
            "columns); delete it or point embeddings.parquet_path elsewhere"
        )
    return raw


def cache_file_rows(path: Path) -> int:
    """Return how many rows the embeddings cache at `path` holds, reading only its footer.

    Raises `InputError` as a run would for a file that is no readable cache.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        footer = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, exc) from exc
    _cache_metadata_entry(path, footer.schema_arrow)
    return int(footer.metadata.num_rows)


def cache_metadata(
    config: EmbeddingsConfig, source: ModelSource, seed: int, mean: tuple, std: tuple
) -> dict[str, Any]:
    """Return the settings that identify embeddings made by this configuration."""
    from patchbalance.version import __version__

    if config.value_range is not None:
        other = f"value_range {list(config.value_range)}"
    else:
        # The sample behind the percentile stretch is drawn from the seed.
        other = f"2nd-98th percentile per raster (seed {seed})"
    return {
        "format": CACHE_FORMAT,
        "backbone": source.backbone,
        "model_id": source.model_id,
        "revision": source.revision,
        "weights_sha256": weights_sha256(source),
        "dim": embedding_dim(source, config.pooling),
        "bands": list(config.bands) if config.bands is not None else "first three (1 band x3)",
        "value_range": list(config.value_range) if config.value_range is not None else None,
        "scaling": f"uint8 / 255; other dtypes: {other}",
        "image_size": config.image_size,
        "pooling": effective_pooling(config),
        "normalize_mean": list(mean),
        "normalize_std": list(std),
        "patchbalance_version": __version__,
    }


class ComputedVectors:
    """The vectors computed in this run, kept in computation order and checkpointed to the cache.

    Args:
        todo_keys: the keys of the windows to compute.
        todo: the position of each of them in `vectors`.
        vectors: the run's (n, D) array, filled in as results arrive.
        cache: where checkpoints go (None: no cache).
    """

    def __init__(
        self,
        todo_keys: pd.DataFrame,
        todo: np.ndarray,
        vectors: np.ndarray,
        cache: EmbeddingCache | None,
    ) -> None:
        self.todo_keys = todo_keys
        self.todo = todo
        self.vectors = vectors
        self.cache = cache
        self.done_rows: list[np.ndarray] = []  # rows of `todo_keys` whose vectors are final
        self.pending_start = 0  # index into done_rows of the first row not yet checkpointed
        self.bad_rows: list[int] = []

    @property
    def pending(self) -> int:
        """Return the number of finished vectors not yet checkpointed."""
        return int(sum(len(rows) for rows in self.done_rows[self.pending_start :]))

    def add(self, rows: np.ndarray, output: np.ndarray) -> None:
        """Take in the vectors `output` of the rows `rows`; non-finite ones are set aside."""
        finite = np.isfinite(output).all(axis=1)
        self.vectors[self.todo[rows[finite]]] = output[finite]
        self.bad_rows.extend(rows[~finite].tolist())
        self.done_rows.append(rows[finite])

    def take(self, rows: np.ndarray, output: np.ndarray, checkpoint_after: int) -> None:
        """Take in the vectors of `rows` and checkpoint once `checkpoint_after` are waiting."""
        self.add(rows, output)
        if self.pending >= checkpoint_after:
            self.flush()

    def flush(self) -> None:
        """Checkpoint the vectors finished since the last checkpoint (a new part file)."""
        if self.cache is None or self.pending_start == len(self.done_rows):
            return
        rows = np.concatenate(self.done_rows[self.pending_start :])
        self.cache.checkpoint(self.todo_keys.iloc[rows], self.vectors[self.todo[rows]])
        self.pending_start = len(self.done_rows)

    def result(self) -> tuple[pd.DataFrame, np.ndarray]:
        """Return the keys and vectors computed, in computation order; raise if any was NaN."""
        if self.bad_rows:
            raise InputError(
                f"{len(self.bad_rows)} embedding(s) came out NaN or infinite (first: "
                f"{key_label(self.todo_keys, self.bad_rows[0])}); the model weights may be "
                "corrupt, or half precision overflowed (try embeddings.precision: fp32)"
            )
        rows = np.concatenate(self.done_rows) if self.done_rows else np.empty(0, np.int64)
        return self.todo_keys.iloc[rows].reset_index(drop=True), self.vectors[self.todo[rows]]
