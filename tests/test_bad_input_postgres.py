"""Round four, PostgreSQL: the source never keeps anything a `where_clause` did (real server)."""

from __future__ import annotations

import pytest

from patchbalance.balancing.postgres_table import check_postgres_table
from patchbalance.config import config_from_mapping
from patchbalance.errors import OutputError
from patchbalance.sources.postgres import records_from_postgres
from postgres_server import (
    READER,
    READER_PASSWORD,
    postgres_server_fixture,  # noqa: F401 - registers the fixture
)

TABLE = "lo_probe"


@pytest.fixture(scope="module")
def probe_table(postgres_server):
    """A 10-row tile table that the reader role may read and write."""
    with postgres_server.connect() as conn:
        conn.execute(
            f"CREATE TABLE {TABLE} AS SELECT 'a.tif'::text AS file_path, 'm.tif'::text AS "
            "mask_path, g * 16 AS row_off, 0 AS col_off, 16 AS patch_size "
            "FROM generate_series(0, 9) g"
        )
    return TABLE


def _large_objects(server) -> int:
    with server.connect() as conn:
        return int(conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()[0])


def _read(server, folder, **input_extra):
    config = config_from_mapping(
        {
            "input": server.input_block(TABLE, **input_extra),
            "clustering": {"k_min": 2, "k_max": 3},
            "output": {"csv_path": "out/t.csv"},
        },
        base_dir=folder,
    )
    return records_from_postgres(config)


def test_a_where_clause_that_creates_large_objects_leaves_none(
    postgres_server, probe_table, tmp_path
):
    before = _large_objects(postgres_server)
    source = _read(postgres_server, tmp_path, where_clause="lo_create(0) > 0")
    assert len(source.records) == 10
    assert _large_objects(postgres_server) == before


def test_a_where_clause_that_unlinks_large_objects_deletes_nothing(
    postgres_server, probe_table, tmp_path
):
    import psycopg

    with postgres_server.connect() as conn:
        oid = conn.execute("SELECT lo_create(0)").fetchone()[0]
        # Owned by the reader, so that only the rollback can keep it from unlinking it.
        conn.execute(f"ALTER LARGE OBJECT {oid} OWNER TO {READER}")
    unlink = "row_off >= 0 OR (SELECT count(lo_unlink(oid)) FROM pg_largeobject_metadata) >= 0"
    source = _read(postgres_server, tmp_path, where_clause=unlink)
    assert len(source.records) == 10
    with postgres_server.connect() as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM pg_largeobject_metadata WHERE oid = %s", (oid,)
            ).fetchone()[0]
            == 1
        )
    # The control: the reader role can unlink it when its transaction is committed.
    with psycopg.connect(postgres_server.conninfo(user=READER, password=READER_PASSWORD)) as conn:
        conn.execute("SELECT lo_unlink(%s)", (oid,))
    assert _large_objects(postgres_server) == 0


def test_the_output_table_check_runs_read_only_and_keeps_nothing(
    postgres_server, probe_table, tmp_path, monkeypatch
):
    import psycopg

    seen: list[bool] = []
    connect = psycopg.connect

    def spying_connect(*args, **kwargs):
        conn = connect(*args, **kwargs)
        original = conn.execute

        def execute(query, *rest, **named):
            seen.append(bool(conn.read_only))
            return original(query, *rest, **named)

        conn.execute = execute
        return conn

    monkeypatch.setattr(psycopg, "connect", spying_connect)
    config = config_from_mapping(
        {
            "input": postgres_server.input_block(TABLE),
            "clustering": {"k_min": 2, "k_max": 3},
            "output": {"csv_path": "out/t.csv", "postgres_table": {"name": "balanced_probe"}},
        },
        base_dir=tmp_path,
    )
    # PostgreSQL 15 gives no CREATE in `public` to other roles: the check says so, read-only.
    with pytest.raises(OutputError, match="no CREATE privilege"):
        check_postgres_table(config)
    assert seen and all(seen)
