"""Records from a PostgreSQL table: the `dataset_explorer` tile table, one row per patch.

The table is read through a server-side (named) cursor in batches of `input.fetch_size`, inside
a READ ONLY, REPEATABLE READ transaction: `where_clause` is SQL by design, and the transaction is
what stops it from changing data. Table, schema and column names are only ever quoted
identifiers. The password never appears in a message (`postgres_connection`); the select list
is planned from the catalog in `postgres_query`.

What the table may add to the records (each optional):
- `class_dist` (JSON/JSONB or JSON text, class value as a string key -> proportion of the valid
  pixels): with `use_table_stats`, class pixel counts come from it and masks are not read for
  statistics. Counts are `round(proportion x valid pixels)`, where valid pixels are
  `patch_size² x (1 - nodata_ratio)` when the table has a numeric `nodata_ratio` column (NULL
  counts as 0), else `patch_size²`.
- `uniqueness_score` (numeric, NULL = unknown): with `use_table_stats`, replaces the uniqueness
  stage.
- `embedding_column` (a pgvector `vector` or a float array): replaces embedding extraction.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from patchbalance.config import BalancedDatasetConfig, InputConfig
from patchbalance.errors import InputError
from patchbalance.sources.local import validate_records
from patchbalance.sources.postgres_connection import (
    Target,
    _psycopg,
    connect,
    connection_settings,
    scrub,
)
from patchbalance.sources.postgres_query import (
    FLOAT_TYPES,
    INTEGER_TYPES,
    RECORD_COLUMN_KEYS,
    Column,
    Plan,
    build_query,
    clean_where,
    make_plan,
    table_columns,
)
from patchbalance.sources.records import SourceRecords

log = logging.getLogger(__name__)

CURSOR_NAME = "patchbalance_records"


# --------------------------------------------------------------------------------------------
# Streaming


class BatchAccumulator:
    """Turns fetched row batches into column arrays, one batch at a time.

    Rows are converted and dropped batch by batch, so the raw rows of at most one batch exist at
    any time; `max_batch_rows` records the largest batch seen.
    """

    def __init__(self, plan: Plan, label: str, expected_rows: int | None) -> None:
        self.plan = plan
        self.label = label
        self.frames: list[pd.DataFrame] = []
        self.rows = 0
        self.batches = 0
        self.max_batch_rows = 0
        self.class_batches: list[tuple[np.ndarray, np.ndarray]] = []
        self.null_class_dist = 0
        self.uniqueness: list[np.ndarray] = []
        self.embeddings: np.ndarray | None = None
        self.embedding_chunks: list[np.ndarray] = []
        self.expected_rows = expected_rows
        self._passed = [i for i, column in enumerate(plan.columns) if column.name != plan.embedding]

    def add(self, rows: list[tuple]) -> None:
        """Convert one batch of rows into column arrays."""
        n = len(rows)
        self.batches += 1
        self.max_batch_rows = max(self.max_batch_rows, n)
        columns = list(zip(*rows, strict=True))
        frame = pd.DataFrame({self.plan.names[i]: columns[i] for i in self._passed}, index=range(n))
        self.frames.append(frame)
        if self.plan.class_dist is not None:
            self._add_class_dist(columns[self.plan.position(self.plan.class_dist)], frame)
        if self.plan.uniqueness is not None:
            values = columns[self.plan.position(self.plan.uniqueness)]
            # NULL -> NaN ("unknown"; the pipeline gives those patches the median).
            self.uniqueness.append(np.array(values, dtype=np.float64))
        if self.plan.embedding is not None:
            self._add_embeddings(columns[self.plan.position(self.plan.embedding)])
        self.rows += n

    def _add_class_dist(self, texts: tuple, frame: pd.DataFrame) -> None:
        if self.null_class_dist:
            self.null_class_dist += sum(text is None for text in texts)
            return
        nulls = sum(text is None for text in texts)
        if nulls:
            self.null_class_dist = nulls
            self.class_batches = []
            return
        # One JSON parse per batch, not per row.
        try:
            parsed = json.loads("[" + ",".join(texts) + "]")
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{self.label}: column '{self.plan.class_dist}' holds invalid JSON near row "
                f"{self.rows + 1}: {exc.msg}"
            ) from None
        if not all(isinstance(item, dict) for item in parsed):
            raise InputError(
                f"{self.label}: column '{self.plan.class_dist}' must hold JSON objects "
                '(class value -> proportion, e.g. {"1": 0.25, "3": 0.75})'
            )
        proportions = pd.DataFrame.from_records(parsed, index=range(len(parsed)))
        keys = _class_keys(proportions.columns, self.label, self.plan.class_dist)
        try:
            values = proportions.to_numpy(dtype=np.float64, na_value=0.0)
        except (TypeError, ValueError):
            raise InputError(
                f"{self.label}: column '{self.plan.class_dist}' has a non-numeric proportion "
                f"near row {self.rows + 1}; values must be numbers between 0 and 1"
            ) from None
        bad = ~np.isfinite(values) | (values < 0) | (values > 1 + 1e-6)
        if bad.any():
            row = self.rows + int(np.flatnonzero(bad.any(axis=1))[0]) + 1
            raise InputError(
                f"{self.label} row {row}: column '{self.plan.class_dist}' has a proportion "
                "outside [0, 1]; class_dist holds each class's share of the valid pixels"
            )
        size = pd.to_numeric(frame["patch_size"], errors="coerce").to_numpy(
            dtype=np.float64, na_value=0.0
        )
        valid = size * size
        if self.plan.nodata_ratio is not None:
            ratio = pd.to_numeric(frame[self.plan.nodata_ratio], errors="coerce").to_numpy(
                dtype=np.float64, na_value=0.0
            )
            valid = valid * (1.0 - np.clip(np.nan_to_num(ratio), 0.0, 1.0))
        counts = np.rint(values * valid[:, None]).astype(np.int64)
        self.class_batches.append((keys, counts))

    def _add_embeddings(self, vectors: tuple) -> None:
        if any(vector is None for vector in vectors):
            row = self.rows + next(i for i, v in enumerate(vectors) if v is None) + 1
            raise InputError(
                f"{self.label} row {row}: column '{self.plan.embedding}' is NULL; every patch "
                "needs an embedding (or leave input.embedding_column unset to compute them)"
            )
        try:
            block = np.asarray(vectors, dtype=np.float32)
        except ValueError:
            raise InputError(
                f"{self.label}: column '{self.plan.embedding}' holds vectors of different "
                f"lengths near row {self.rows + 1}; every embedding needs the same dimension"
            ) from None
        if block.ndim != 2 or block.shape[1] == 0:
            raise InputError(
                f"{self.label}: column '{self.plan.embedding}' must hold one flat, non-empty "
                "vector per row"
            )
        if self.embeddings is None and self.expected_rows is not None:
            self.embeddings = np.empty((self.expected_rows, block.shape[1]), dtype=np.float32)
        if self.embeddings is not None:
            if block.shape[1] != self.embeddings.shape[1]:
                raise InputError(
                    f"{self.label}: column '{self.plan.embedding}' holds vectors of different "
                    f"lengths ({self.embeddings.shape[1]} and {block.shape[1]})"
                )
            self.embeddings[self.rows : self.rows + len(block)] = block
        else:
            self.embedding_chunks.append(block)

    def class_counts(self, classes: list[int] | None, nodata_class: int | None):
        """Return (class_values, counts (N, C)) from the batches, or (None, None)."""
        if self.plan.class_dist is None or self.null_class_dist or not self.rows:
            return None, None
        found = np.unique(np.concatenate([keys for keys, _ in self.class_batches]))
        if classes is not None:
            values = np.array(sorted(classes), dtype=np.int64)
        else:
            values = found[found != nodata_class] if nodata_class is not None else found
        counts = np.zeros((self.rows, len(values)), dtype=np.int64)
        start = 0
        for keys, block in self.class_batches:
            # Keys outside `values` (not in `classes`, or the nodata class) count as nodata.
            where = np.searchsorted(values, keys)
            where = np.minimum(where, max(len(values) - 1, 0))
            known = (values[where] == keys) if len(values) else np.zeros(len(keys), bool)
            counts[start : start + len(block), where[known]] = block[:, known]
            start += len(block)
        return values, counts


def _class_keys(columns: pd.Index, label: str, column: str) -> np.ndarray:
    keys = []
    for key in columns:  # a handful of class keys per batch
        try:
            value = float(key)
        except (TypeError, ValueError):
            value = np.nan
        if not np.isfinite(value) or value != int(value):
            raise InputError(
                f"{label}: column '{column}' has the key {key!r}; class_dist keys must be "
                'integer class values as strings (e.g. "3"); set input.use_table_stats: false '
                "to compute statistics from the masks instead"
            )
        keys.append(int(value))
    return np.asarray(keys, dtype=np.int64)


def _finish_frame(frames: list[pd.DataFrame], columns: list[Column], names: list[str]):
    records = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    for column, name in zip(columns, names, strict=False):
        if name not in records.columns:
            continue
        values = records[name]
        if column.type_name in INTEGER_TYPES and values.dtype.kind != "i":
            # NULLs in an integer column: keep integers, with missing values.
            records[name] = pd.array(pd.to_numeric(values, errors="coerce"), dtype="Int64")
        elif column.type_name in FLOAT_TYPES | {"numeric"} and values.dtype.kind != "f":
            records[name] = pd.to_numeric(values, errors="coerce").astype(np.float64)
        elif column.category == "B" and values.dtype.kind != "b":
            records[name] = values.astype("boolean")
    return records


# --------------------------------------------------------------------------------------------
# The source


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _read_table(conn, source: InputConfig, table, label: str, where: str | None, target: Target):
    """Return (plan, accumulator) after streaming the table through a named cursor."""
    from psycopg import sql

    columns = table_columns(conn, table.as_string(conn))
    if columns is None:
        hint = ""
        if "." in (source.table or "") and not source.db_schema:
            hint = "; to name a schema, use input.schema rather than a dotted table name"
        raise InputError(
            f"{label} not found in database '{target.database}' on {target.address}; "
            f"check input.table (and input.schema){hint}"
        )
    plan = make_plan(source, columns, label)
    order = [
        getattr(source, key) for key in RECORD_COLUMN_KEYS.values() if key != "mask_path_column"
    ]
    expected = None
    if plan.embedding is not None:
        # Same snapshot as the cursor (REPEATABLE READ), so the vectors can be preallocated.
        count = sql.SQL("SELECT count(*) FROM {}").format(table)
        if where is not None:
            count += sql.SQL(" WHERE ({})").format(sql.SQL(where))
        expected = int(conn.execute(count).fetchone()[0])
    accumulator = BatchAccumulator(plan, label, expected)
    with conn.cursor(name=CURSOR_NAME) as cursor:
        cursor.itersize = source.fetch_size
        cursor.execute(build_query(table, plan, where, order))
        while rows := cursor.fetchmany(source.fetch_size):
            accumulator.add(rows)
            del rows  # only one batch of raw rows at a time
    return plan, accumulator


def _where_text(where: str) -> str:
    return where if len(where) <= 80 else where[:77] + "..."


def _table_embeddings(accumulator: BatchAccumulator, plan: Plan, label: str) -> np.ndarray | None:
    """Return the (N, D) embeddings read from the table, or None; NaN or inf is an error."""
    embeddings = accumulator.embeddings
    if embeddings is None and accumulator.embedding_chunks:
        embeddings = np.concatenate(accumulator.embedding_chunks)
    if embeddings is not None and not np.isfinite(embeddings).all():
        row = int(np.flatnonzero(~np.isfinite(embeddings).all(axis=1))[0]) + 1
        raise InputError(
            f"{label} row {row}: column '{plan.embedding}' holds NaN or infinite values"
        )
    return embeddings


def records_from_postgres(config: BalancedDatasetConfig) -> SourceRecords:
    """Return the records of `input.table` (and the statistics the table already holds).

    Raises `InputError` with one line for an unreachable server, failed authentication, an
    unknown database, table or column, a where_clause that PostgreSQL rejects (or that tries to
    write), and an empty result.
    """
    psycopg = _psycopg()
    from psycopg import sql

    source = config.input
    table_name = source.table or ""
    parts = [source.db_schema, table_name] if source.db_schema else [table_name]
    table = sql.Identifier(*parts)
    where = clean_where(source.where_clause)
    conninfo, target, secrets = connection_settings(source)
    label = f"PostgreSQL table {'.'.join(_quote(part) for part in parts)}"

    with connect(conninfo, target, secrets) as conn:
        try:
            plan, accumulator = _read_table(conn, source, table, label, where, target)
        except psycopg.Error as exc:
            raise InputError(_query_message(exc, label, where, target, secrets)) from None

    if accumulator.rows == 0:
        if where is not None:
            raise InputError(
                f'{label} returned no rows for input.where_clause "{_where_text(where)}"; '
                "check the filter"
            )
        raise InputError(f"{label} is empty; it holds no patches")
    log.info(
        "read %d rows from %s on %s (database %s) in %d batch(es)",
        accumulator.rows,
        label,
        target.address,
        target.database,
        accumulator.batches,
    )

    passed = [c for c in plan.columns if c.name != plan.embedding]
    names = [plan.names[plan.columns.index(column)] for column in passed]
    records = _finish_frame(accumulator.frames, passed, names)
    accumulator.frames = []
    records = validate_records(records, label, config.base_dir)

    class_values, class_counts = accumulator.class_counts(
        config.clustering.classes, config.exclusion.nodata_class
    )
    if accumulator.null_class_dist:
        log.warning(
            "%s: %d row(s) have no %s, so mask statistics are computed from the masks for "
            "every patch",
            label,
            accumulator.null_class_dist,
            plan.class_dist,
        )
    uniqueness = np.concatenate(accumulator.uniqueness) if accumulator.uniqueness else None
    embeddings = _table_embeddings(accumulator, plan, label)
    notes: dict[str, object] = {
        "source": label,
        "rows": accumulator.rows,
        "fetch_size": source.fetch_size,
        "batches": accumulator.batches,
        "max_batch_rows": accumulator.max_batch_rows,
        "statistics_from_table": class_counts is not None,
        "uniqueness_from_table": uniqueness is not None,
        "embeddings_from_table": embeddings is not None,
    }
    if accumulator.null_class_dist:
        notes["rows_without_class_dist"] = accumulator.null_class_dist
    return SourceRecords(
        records=records,
        class_values=class_values,
        class_counts=class_counts,
        uniqueness=uniqueness,
        embeddings=embeddings,
        notes=notes,
    )


def _query_message(
    exc: Exception, label: str, where: str | None, target: Target, secrets: list[str]
) -> str:
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) or str(exc)
    message = scrub(primary, secrets)
    state = getattr(exc, "sqlstate", None)
    if state == "25006":  # read_only_sql_transaction
        return (
            f"input.where_clause tried to change data in {label}: {message}; the source only "
            "reads, so where_clause must be a filter condition (nothing was changed)"
        )
    if state == "42501":  # insufficient_privilege
        return f"user '{target.user}' may not read {label}: {message}; ask for GRANT SELECT on it"
    if where is not None and state is not None and state[:2] in ("42", "22", "0A"):
        # Syntax errors, unknown columns or functions, bad casts: the only SQL we did not write.
        return f"input.where_clause was rejected by PostgreSQL: {message} (in {label})"
    if isinstance(exc, _psycopg().OperationalError) and state is None:
        return f"lost the connection to PostgreSQL at {target.address} while reading {label}: {message}"
    return f"reading {label} failed in PostgreSQL: {message}"
