"""Writing the balanced table into a new PostgreSQL table (`output.postgres_table`).

The table goes next to the tiles, for the people whose patches live in a `dataset_explorer`
table. It is written on a connection of its own (the source's is READ ONLY and closed by then),
in one transaction: `CREATE TABLE`, `COPY` of every row and column, and, when the database has
PostGIS, a `footprint geometry(Polygon, <srid>)` column with a GiST index. `if_exists: fail`
(the default) refuses an existing table; `replace` drops it in the same transaction, so readers
see the old table or the new one, never half of one. The source table is never written: a target
that resolves to it is an error, whatever `if_exists` says. Every name is a quoted identifier.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import pandas as pd

from patchbalance.balancing.outputs import footprint_rings, polygon_wkb, wkb_hex
from patchbalance.config import BalancedDatasetConfig
from patchbalance.config.output import PostgresTableConfig
from patchbalance.config.secrets import scrub
from patchbalance.errors import OutputError
from patchbalance.sources.postgres_connection import (
    Target,
    _connect_message,
    _psycopg,
    connection_settings,
    read_only_session,
)
from patchbalance.windows import RasterInfo

log = logging.getLogger(__name__)

FOOTPRINT_COLUMN = "footprint"
# Rows per COPY chunk: the CSV text of one chunk is built by pandas, in C, not row by row.
_COPY_CHUNK = 50_000
_NULL = "\\N"
# The balanced table's JSON text column, stored as jsonb so SQL can query it.
JSON_COLUMNS = {"class_dist_json"}


@dataclass(frozen=True)
class Destination:
    """Where the balanced table goes, and how to connect there (never holds the password)."""

    conninfo: str
    target: Target
    secrets: list[str]
    schema: str
    name: str
    if_exists: str
    keys_from: str  # the config block the connection keys came from, for messages

    @property
    def label(self) -> str:
        """Return the table for messages: `schema.name on host:port/database`."""
        return (
            f'PostgreSQL table "{self.schema}"."{self.name}" on {self.target.address}/'
            f"{self.target.database}"
        )


def destination(config: BalancedDatasetConfig) -> Destination:
    """Return where `output.postgres_table` writes; connection keys default to the input's."""
    table: PostgresTableConfig = config.output.postgres_table  # type: ignore[assignment]
    keys = table if table.has_connection else config.input
    conninfo, target, secrets = connection_settings(keys)  # type: ignore[arg-type]
    return Destination(
        conninfo,
        target,
        secrets,
        table.db_schema,
        table.name,
        table.if_exists,
        "output.postgres_table" if table.has_connection else "input",
    )


def _connect(where: Destination):  # -> psycopg.Connection
    psycopg = _psycopg()
    try:
        conn = psycopg.connect(where.conninfo)
    except psycopg.Error as exc:
        message = _connect_message(str(exc), where.target, where.secrets)
        message = message.replace("input.", f"{where.keys_from}.")
        raise OutputError(f"output.postgres_table: {message}") from None
    # Explicitly writable: a role or database may default to read-only transactions.
    conn.read_only = False
    return conn


def _regclass(conn, schema: str | None, name: str) -> int | None:
    from psycopg import sql

    parts = [schema, name] if schema else [name]
    found = conn.execute(
        "SELECT to_regclass(%s)::oid", (sql.Identifier(*parts).as_string(conn),)
    ).fetchone()[0]
    return None if found is None else int(found)


def _check_target(conn, where: Destination, config: BalancedDatasetConfig) -> bool:
    """Raise `OutputError` when the target is the source or exists under `fail`, or its schema
    is missing or not writable; return whether the table exists."""
    schema = conn.execute(
        "SELECT has_schema_privilege(oid, 'USAGE'), has_schema_privilege(oid, 'CREATE') "
        "FROM pg_namespace WHERE nspname = %s",
        (where.schema,),
    ).fetchone()
    if schema is None:
        raise OutputError(
            f'{where.label}: the schema "{where.schema}" does not exist; create it (CREATE '
            "SCHEMA) or set output.postgres_table.schema to an existing one"
        )
    if not schema[0]:
        _no_create(where, "USAGE")
    existing = _regclass(conn, where.schema, where.name)
    source = config.input
    if existing is not None and source.source_kind == "postgres":
        _, source_target, _ = connection_settings(source)
        same_server = (source_target.address, source_target.database) == (
            where.target.address,
            where.target.database,
        )
        if same_server and existing == _regclass(conn, source.db_schema, source.table or ""):
            raise OutputError(
                f"output.postgres_table names the source table ({where.label}); the source is "
                "never written: choose another output.postgres_table.name"
            )
    if existing is not None and where.if_exists == "fail":
        raise OutputError(
            f"{where.label} already exists; set output.postgres_table.if_exists: replace to "
            "replace it, or choose another name"
        )
    if not schema[1]:
        _no_create(where, "CREATE")
    return existing is not None


def _no_create(where: Destination, privilege: str) -> NoReturn:
    raise OutputError(
        f'{where.label}: the user may not create tables in the schema "{where.schema}" '
        f"(no {privilege} privilege); grant it or choose another output.postgres_table.schema"
    )


def check_postgres_table(config: BalancedDatasetConfig) -> None:
    """Fail before any work when `output.postgres_table` cannot be written.

    Raises `OutputError` for an unreachable server, a schema that does not exist or takes no new
    table, a target that is the source table, or one that exists while `if_exists` is `fail`.
    """
    where = destination(config)
    psycopg = _psycopg()
    # Only checks: the session is read-only and rolled back, as the source's is.
    with read_only_session(_connect(where)) as conn:
        try:
            _check_target(conn, where, config)
        except psycopg.Error as exc:
            raise OutputError(f"{where.label}: {scrub(str(exc), where.secrets)}") from None


def sql_type(column: pd.Series) -> str:
    """Return the PostgreSQL type a balanced-table column is stored as."""
    if column.name in JSON_COLUMNS:
        return "jsonb"
    if pd.api.types.is_bool_dtype(column):
        return "boolean"
    if pd.api.types.is_integer_dtype(column):
        return "bigint"
    if pd.api.types.is_float_dtype(column):
        return "double precision"
    return "text"


def _postgis(conn) -> bool:
    row = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'postgis'").fetchone()
    if row is None:
        available = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'"
        ).fetchone()
        if available:
            log.info(
                "PostGIS is installed on the server but not enabled in this database "
                "(CREATE EXTENSION postgis); the table gets no footprint column"
            )
    return row is not None


def _footprints(
    table: pd.DataFrame, infos: dict[str, RasterInfo], label: str
) -> tuple[np.ndarray, int] | None:
    """Return (EWKB hex per row, NULL where unplaced; SRID), or None without any CRS."""
    rows, x, y, crs_text = footprint_rings(table, infos, None, label)
    if crs_text is None:
        return None
    from rasterio.crs import CRS

    srid = CRS.from_user_input(crs_text).to_epsg()
    if srid is None:
        log.warning("%s: CRS %s has no EPSG code; footprints get SRID 0", label, crs_text)
        srid = 0
    hex_text = np.full(len(table), None, dtype=object)
    hex_text[rows] = wkb_hex(polygon_wkb(x, y, srid))
    return hex_text, srid


def write_postgres_table(
    table: pd.DataFrame, infos: dict[str, RasterInfo], config: BalancedDatasetConfig
) -> dict[str, Any]:
    """Write `table` into a new PostgreSQL table with COPY; return what was written.

    Raises `OutputError` when the target exists under `if_exists: fail`, is the source table,
    or PostgreSQL refuses the write (nothing is left behind then: one transaction).
    """
    psycopg = _psycopg()
    from psycopg import sql

    where = destination(config)
    if FOOTPRINT_COLUMN in table.columns:
        raise OutputError(
            f"{where.label}: the balanced table already has a column '{FOOTPRINT_COLUMN}', "
            "the name of the geometry column; rename it in the input"
        )
    qualified = sql.Identifier(where.schema, where.name)
    columns = list(table.columns)
    definitions = [
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(sql_type(table[name])))
        for name in columns
    ]
    with _connect(where) as conn:
        try:
            with conn.transaction():
                replaced = _check_target(conn, where, config)
                footprints = _footprints(table, infos, where.label) if _postgis(conn) else None
                if footprints is not None:
                    definitions.append(
                        sql.SQL("{} geometry(Polygon, {})").format(
                            sql.Identifier(FOOTPRINT_COLUMN), sql.Literal(footprints[1])
                        )
                    )
                if replaced:
                    conn.execute(sql.SQL("DROP TABLE {}").format(qualified))
                conn.execute(
                    sql.SQL("CREATE TABLE {} ({})").format(
                        qualified, sql.SQL(", ").join(definitions)
                    )
                )
                names = columns + ([FOOTPRINT_COLUMN] if footprints is not None else [])
                copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv, NULL {})").format(
                    qualified,
                    sql.SQL(", ").join(sql.Identifier(name) for name in names),
                    sql.Literal(_NULL),
                )
                with conn.cursor() as cursor, cursor.copy(copy_sql) as copy:
                    for start in range(0, len(table), _COPY_CHUNK):
                        chunk = table.iloc[start : start + _COPY_CHUNK]
                        if footprints is not None:
                            chunk = chunk.assign(
                                **{FOOTPRINT_COLUMN: footprints[0][start : start + _COPY_CHUNK]}
                            )
                        copy.write(_csv(chunk))
                if footprints is not None:
                    index = sql.Identifier(f"{where.name}_{FOOTPRINT_COLUMN}_gist"[:63])
                    conn.execute(
                        sql.SQL("CREATE INDEX {} ON {} USING gist ({})").format(
                            index, qualified, sql.Identifier(FOOTPRINT_COLUMN)
                        )
                    )
        except psycopg.Error as exc:
            raise OutputError(
                f"cannot write {where.label}: {scrub(str(exc), where.secrets)}"
            ) from None
    log.info("wrote %d rows to %s", len(table), where.label)
    return {
        "table": f"{where.schema}.{where.name}",
        "rows": len(table),
        "footprint_srid": None if footprints is None else footprints[1],
        "replaced": replaced,
    }


def _csv(chunk: pd.DataFrame) -> str:
    # With NULL '\N', an unquoted empty field is an empty string, not NULL, as in the table.
    stream = io.StringIO()
    chunk.to_csv(stream, index=False, header=False, na_rep=_NULL, lineterminator="\n")
    return stream.getvalue()


def describe(config: BalancedDatasetConfig) -> str:
    """Return the output table for the dry-run plan and the summary."""
    return destination(config).label


__all__ = ["check_postgres_table", "describe", "write_postgres_table"]
