"""The query of the PostgreSQL source: which columns to select, checked against the catalog.

Table, schema and column names are only ever quoted identifiers; `where_clause` is SQL by design
(the READ ONLY transaction of the reader stops it from changing data).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from patchbalance.config import InputConfig
from patchbalance.errors import InputError

log = logging.getLogger(__name__)

# Record column -> the `input` key that names its table column.
RECORD_COLUMN_KEYS = {
    "image_path": "image_path_column",
    "mask_path": "mask_path_column",
    "row_off": "row_off_column",
    "col_off": "col_off_column",
    "patch_size": "patch_size_column",
}
NODATA_RATIO_COLUMN = "nodata_ratio"
# PostgreSQL type names (pg_type.typname) read as integers, floats, numbers or JSON.
INTEGER_TYPES = {"int2", "int4", "int8"}
FLOAT_TYPES = {"float4", "float8"}
NUMERIC_TYPES = INTEGER_TYPES | FLOAT_TYPES | {"numeric"}
JSON_TYPES = {"json", "jsonb"}


@dataclass(frozen=True)
class Column:
    """A column of the table as the catalog describes it."""

    name: str
    type_name: str  # pg_type.typname, e.g. int4, text, jsonb, vector, _float4
    category: str  # pg_type.typcategory: N numeric, S string, B boolean, A array, U user, ...
    element: str | None  # the element type of an array


def table_columns(conn, qualified: str) -> list[Column] | None:
    """Return the table's columns in order, or None when no such table or view exists."""
    rows = conn.execute(
        """
        SELECT a.attname, t.typname, t.typcategory, e.typname
        FROM pg_attribute a
        JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A'
        WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (qualified,),
    ).fetchall()
    if not rows and conn.execute("SELECT to_regclass(%s)", (qualified,)).fetchone()[0] is None:
        return None
    return [
        Column(name, type_name, category, element) for name, type_name, category, element in rows
    ]


@dataclass
class Plan:
    """What to select and how each selected column becomes part of the result."""

    columns: list[Column]  # selected table columns, in select-list order
    names: list[str]  # their names in the records (record names for the mapped ones)
    class_dist: str | None  # table column used for statistics
    uniqueness: str | None
    embedding: str | None
    nodata_ratio: str | None

    def position(self, column: str | None) -> int | None:
        """Return where `column` sits in the select list."""
        if column is None:
            return None
        return [c.name for c in self.columns].index(column)


def _column_list(columns: list[Column]) -> str:
    return ", ".join(column.name for column in columns)


def _record_columns(
    source: InputConfig,
    by_name: dict[str, Column],
    label: str,
    missing: Callable[[str, str], InputError],
) -> dict[str, str]:
    """Return {table column: record column} for the key columns, each checked for its type."""
    mapped: dict[str, str] = {}
    for record_name, key in RECORD_COLUMN_KEYS.items():
        name = getattr(source, key)
        if name not in by_name:
            raise missing(name, key)
        expected = "S" if record_name.endswith("_path") else "N"
        if by_name[name].category != expected:
            kind = "text" if expected == "S" else "a number"
            raise InputError(
                f"{label}: column '{name}' (input.{key}) is {by_name[name].type_name}, "
                f"it must be {kind}"
            )
        mapped[name] = record_name
    if len(set(mapped.values())) != len(RECORD_COLUMN_KEYS):
        raise InputError(
            f"{label}: one table column is named for two record columns; check input.*_column"
        )
    return mapped


def make_plan(source: InputConfig, columns: list[Column], label: str) -> Plan:
    """Return the select plan; raise `InputError` for a missing or unusable column."""
    by_name = {column.name: column for column in columns}

    def missing(name: str, key: str) -> InputError:
        return InputError(
            f"{label} has no column '{name}' (input.{key}); its columns are: "
            f"{_column_list(columns)}"
        )

    mapped = _record_columns(source, by_name, label, missing)

    def optional(key: str, usable, what: str) -> str | None:
        name = getattr(source, key)
        if name is None:
            return None
        if name not in by_name:
            if key in source.model_fields_set:
                raise missing(name, key)
            return None  # a default name the table does not have: simply not used
        column = by_name[name]
        if not usable(column):
            raise InputError(
                f"{label}: column '{name}' (input.{key}) is {column.type_name}; it must be {what}"
            )
        return name

    class_dist = optional(
        "class_dist_column",
        lambda c: c.type_name in JSON_TYPES or c.category == "S",
        "JSON/JSONB (or JSON text)",
    )
    uniqueness = optional(
        "uniqueness_score_column", lambda c: c.type_name in NUMERIC_TYPES, "a number"
    )
    embedding = optional(
        "embedding_column",
        lambda c: c.type_name == "vector" or (c.category == "A" and c.element in NUMERIC_TYPES),
        "a pgvector vector or a float array",
    )
    if not source.use_table_stats:
        # Without table statistics these are ordinary columns that pass through.
        class_dist = uniqueness = None
    nodata_ratio = None
    ratio_column = by_name.get(NODATA_RATIO_COLUMN)
    if class_dist is not None and ratio_column is not None:
        nodata_ratio = NODATA_RATIO_COLUMN if ratio_column.type_name in NUMERIC_TYPES else None

    selected, names = [], []
    taken = set(RECORD_COLUMN_KEYS)
    for column in columns:
        if column.name == embedding:
            continue  # the vectors travel as an array, not as a table column
        if column.name in mapped:
            names.append(mapped[column.name])
        elif column.name in taken:
            log.info("%s: column '%s' is not passed through (a record column)", label, column.name)
            continue
        else:
            names.append(column.name)
        selected.append(column)
    if embedding is not None:
        selected.append(by_name[embedding])
        names.append(embedding)
    return Plan(selected, names, class_dist, uniqueness, embedding, nodata_ratio)


def _select_expression(column: Column, plan: Plan):  # -> sql.Composable
    from psycopg import sql

    field = sql.Identifier(column.name)
    if column.name == plan.embedding:
        return sql.SQL("{}::real[]").format(field)
    if column.type_name == "numeric":
        return sql.SQL("{}::float8").format(field)
    if column.category in ("N", "S", "B") and column.type_name not in ("money",):
        return field
    # Dates, JSON, arrays, geometries, ...: pass through as their text form.
    return sql.SQL("{}::text").format(field)


def clean_where(clause: str | None) -> str | None:
    if clause is None:
        return None
    clause = clause.strip().rstrip(";").strip()
    clause = re.sub(r"^where\s+", "", clause, flags=re.IGNORECASE)
    return clause or None


def build_query(
    table,
    plan: Plan,
    where: str | None,
    order: list[str],
):  # -> sql.Composed
    """Return SELECT <columns> FROM <table> [WHERE (<where>)] ORDER BY <key columns>."""
    from psycopg import sql

    fields = sql.SQL(", ").join(_select_expression(column, plan) for column in plan.columns)
    query = sql.SQL("SELECT {} FROM {}").format(fields, table)
    if where is not None:
        # where_clause is SQL by design; the READ ONLY transaction keeps it from writing.
        query += sql.SQL(" WHERE ({})").format(sql.SQL(where))
    path, *numbers = order
    # A fixed order (paths by bytes, as Python sorts them) makes runs reproducible.
    query += sql.SQL(' ORDER BY {} COLLATE "C", {}').format(
        sql.Identifier(path), sql.SQL(", ").join(sql.Identifier(n) for n in numbers)
    )
    return query
