"""The pool's embeddings for the embedding scorers: an array, a table column or the cache file.

Vectors from the embeddings cache (Parquet) are joined to the pool by the patch key, never by
position.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from patchbalance.coreset.config import CoresetConfig
from patchbalance.coreset.pool import check_unique_keys
from patchbalance.errors import InputError
from patchbalance.table import KEY_COLUMNS, key_label


def embedding_matrix(values: pd.Series, what: str) -> np.ndarray:
    """Return a (N, D) float32 matrix from a column of vectors (lists, arrays or JSON text)."""
    items = values.to_numpy(dtype=object)
    absent = values.isna().to_numpy()
    if absent.any():
        raise InputError(f"{what}: {int(absent.sum())} pool patch(es) have no embedding")
    if len(items) and isinstance(items[0], str):
        try:
            items = [json.loads(item) for item in items]
        except (json.JSONDecodeError, TypeError) as exc:
            raise InputError(
                f"{what}: embeddings stored as text must be JSON lists: {exc}"
            ) from exc
    try:
        matrix = (
            np.stack([np.asarray(item, dtype=np.float32) for item in items])
            if len(items)
            else np.empty((0, 0), np.float32)
        )
    except ValueError as exc:
        raise InputError(f"{what}: the embeddings do not all have the same length ({exc})") from exc
    if matrix.ndim != 2:
        raise InputError(f"{what}: each embedding must be a flat list of numbers")
    return matrix


def read_embeddings_cache(path: Path, column: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Return the patch keys and the (N, D) float32 vectors of an embeddings Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise InputError(f"{path}: embeddings file (parquet_path) not found")
    try:
        schema = pq.read_schema(path)
        names = set(schema.names)
        key_names = [name for name in KEY_COLUMNS if name in names]
        if not {"image_path", "row_off", "col_off"} <= set(key_names):
            raise InputError(
                f"{path}: the embeddings file needs the key columns image_path, row_off, col_off "
                "(and patch_size) to be joined with the table"
            )
        name = column if column in names else "embedding"
        if name not in names:
            raise InputError(f"{path}: no '{column}' column with the embeddings")
        table = pq.read_table(path, columns=[*key_names, name])
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file: {exc}".splitlines()[0]) from exc
    vectors_column = table.column(name).combine_chunks()
    kind = vectors_column.type
    if pa.types.is_fixed_size_list(kind):
        dim = kind.list_size
        flat = vectors_column.flatten().to_numpy(zero_copy_only=False)
        vectors = flat.astype(np.float32).reshape(-1, dim)
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pa.compute.list_value_length(vectors_column).to_numpy(zero_copy_only=False)
        if len(lengths) and (np.any(lengths != lengths[0]) or vectors_column.null_count):
            raise InputError(f"{path}: the '{name}' vectors do not all have the same length")
        dim = int(lengths[0]) if len(lengths) else 0
        flat = vectors_column.flatten().to_numpy(zero_copy_only=False)
        vectors = flat.astype(np.float32).reshape(-1, dim)
    else:
        vectors = embedding_matrix(table.column(name).to_pandas(), str(path))
    keys = table.select(key_names).to_pandas()
    keys["image_path"] = keys["image_path"].astype(str)
    for key in key_names[1:]:
        keys[key] = keys[key].to_numpy(dtype=np.int64)
    return keys, vectors


def join_embeddings(pool_keys: pd.DataFrame, path: Path, column: str) -> np.ndarray:
    """Return the cached embedding of each pool patch, joined by patch key (never by position)."""
    cache_keys, vectors = read_embeddings_cache(path, column)
    names = list(cache_keys.columns)
    check_unique_keys(cache_keys, str(path), "the embeddings file must hold each patch once")
    position = pd.MultiIndex.from_frame(cache_keys).get_indexer(
        pd.MultiIndex.from_frame(pool_keys[names])
    )
    missing = position < 0
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise InputError(
            f"{path}: {int(missing.sum())} of {len(pool_keys)} pool patches have no row in the "
            f"embeddings file (first: {key_label(pool_keys, first)}); point parquet_path at the "
            "embeddings cache of the build that wrote this table"
        )
    return vectors[position]


def pool_embeddings(
    table: pd.DataFrame,
    pool_rows: np.ndarray,
    pool_keys: pd.DataFrame,
    config: CoresetConfig,
    embeddings: np.ndarray | None,
) -> tuple[np.ndarray, str]:
    """Return the pool's embeddings (n_pool, D) and where they came from.

    In order: the `embeddings` array (aligned with the table's rows), the table's
    `embedding_column`, or the Parquet file `parquet_path` joined by the patch key.
    """
    if embeddings is not None:
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or len(embeddings) != len(table):
            raise InputError(
                f"embeddings must be an array of shape (rows of the table = {len(table)}, D), "
                f"got {embeddings.shape}"
            )
        return np.ascontiguousarray(embeddings[pool_rows], dtype=np.float32), "array"
    column = config.embedding_column
    if column and column in table.columns:
        values = table[column].iloc[pool_rows]
        return embedding_matrix(values, f"column '{column}'"), f"column {column}"
    if config.parquet_path:
        path = Path(config.parquet_path)
        return join_embeddings(pool_keys, path, column or "embedding"), str(path)
    if column:
        raise InputError(
            f"method {config.method} needs embeddings: the table has no column '{column}' "
            "and no parquet_path is set"
        )
    raise InputError(
        f"method {config.method} needs embeddings: set embedding_column (a column of the "
        "table) or parquet_path (the embeddings cache of build-balanced-dataset)"
    )
