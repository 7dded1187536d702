"""`output.postgres_table` against the suite's throwaway PostgreSQL server (postgres_server.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds

from patchbalance.balancing.pipeline import run_build
from patchbalance.balancing.plan import plan_text
from patchbalance.config import config_from_mapping
from patchbalance.errors import ConfigError, OutputError
from postgres_server import (
    READER,
    READER_PASSWORD,
    postgres_server_fixture,  # noqa: F401 - registers the fixture
)
from rasters import record, write_pair

PATCH = 16
SOURCE = "tiles_for_output"
SCHEMA = "balanced results"  # a space and an upper-case name below: identifiers are quoted
NAME = 'Tiles "balanced"'


def _mask(rng: np.random.Generator) -> np.ndarray:
    cells = rng.choice(4, size=(8, 8), p=[0.5, 0.3, 0.15, 0.05])
    return np.kron(cells, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)


@pytest.fixture(scope="module")
def source(tmp_path_factory, postgres_server):
    """Two 64 px GeoTIFF pairs and their 32 patches in table `tiles_for_output` (PostGIS on)."""
    import psycopg

    folder = tmp_path_factory.mktemp("pg_output")
    rng = np.random.default_rng(5)
    rows = []
    for index in range(2):
        pair = write_pair(folder, f"scene_{index}", _mask(rng))
        rows += [
            record(*pair, r, c, PATCH) for r in range(0, 64, PATCH) for c in range(0, 64, PATCH)
        ]
    records = pd.DataFrame(rows)
    records.insert(0, "tile_id", np.arange(len(records)) + 1)
    records["split"] = np.where(np.arange(len(records)) % 4 == 0, "val", "train")
    with postgres_server.connect() as conn:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
        except psycopg.Error as exc:
            reason = f"PostGIS is not installed on this server (.ci/postgres.sh installs it): {exc}"
            if os.environ.get("CI"):
                pytest.fail(f"CI is set, so the PostGIS tests must not skip: {reason}")
            pytest.skip(reason)
        conn.execute(
            f"CREATE TABLE {SOURCE} (tile_id integer PRIMARY KEY, file_path text, mask_path text, "
            "row_off integer, col_off integer, patch_size integer, split text)"
        )
        with (
            conn.cursor() as cursor,
            cursor.copy(
                f"COPY {SOURCE} (tile_id, file_path, mask_path, row_off, col_off, patch_size, split) "
                "FROM STDIN"
            ) as copy,
        ):
            for row in records.itertuples(index=False):
                copy.write_row(row)
        # The reader may create tables only in the results schema.
        conn.execute(f'CREATE SCHEMA "{SCHEMA}" AUTHORIZATION {READER}')
    return folder, records


def _snapshot(postgres_server, table: str) -> tuple:
    with postgres_server.connect() as conn:
        content = conn.execute(
            f"SELECT md5(string_agg(t::text, ',' ORDER BY tile_id)), count(*) FROM {table} t"
        ).fetchone()
        columns = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = %s ORDER BY ordinal_position",
            (table,),
        ).fetchall()
    return content, columns


def _config(folder: Path, input_block: dict, **postgres_table):
    return config_from_mapping(
        {
            "input": input_block,
            "clustering": {"k_min": 2, "k_max": 4},
            "num_workers": 1,
            "output": {"csv_path": "out/table.csv", "postgres_table": postgres_table},
        },
        base_dir=folder,
    )


def _read_back(postgres_server, schema: str, name: str, dbname: str = "tiles") -> pd.DataFrame:
    from psycopg import sql

    with postgres_server.connect(dbname) as conn, conn.cursor() as cursor:
        cursor.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, name)))
        names = [column.name for column in cursor.description]
        frame = pd.DataFrame(cursor.fetchall(), columns=names)
    return frame


def _window_polygon(path: str, row_off: int, col_off: int, size: int) -> shapely.Polygon:
    with rasterio.open(path) as dataset:
        return shapely.box(*window_bounds(Window(col_off, row_off, size, size), dataset.transform))


def test_the_balanced_table_is_copied_with_postgis_footprints_and_the_source_is_untouched(
    source, postgres_server
):
    folder, records = source
    before = _snapshot(postgres_server, SOURCE)
    config = _config(
        folder, postgres_server.input_block(SOURCE), schema=SCHEMA, name=NAME
    )  # connection keys from the input (the reader, whose transactions there are READ ONLY)
    assert f'"{SCHEMA}"."{NAME}"' in plan_text(config)
    result = run_build(config)
    table = result.table
    assert result.summary["postgres_table"] == {
        "table": f"{SCHEMA}.{NAME}",
        "rows": len(records),
        "footprint_srid": 32640,
        "replaced": False,
    }

    written = _read_back(postgres_server, SCHEMA, NAME)
    assert list(written.columns) == [*table.columns, "footprint"]
    written = written.sort_values("tile_id").reset_index(drop=True)
    expected = table.sort_values("tile_id").reset_index(drop=True)
    for column in table.columns:
        got, want = written[column], expected[column]
        if column == "class_dist_json":
            assert [g for g in got] == [json.loads(w) for w in want]
        elif pd.api.types.is_float_dtype(want):
            np.testing.assert_array_equal(got.astype(float).to_numpy(), want.to_numpy())
        else:
            assert [None if pd.isna(v) else v for v in got] == [
                None if pd.isna(v) else v for v in want
            ], column

    with postgres_server.connect() as conn:
        geometry = conn.execute(
            f"SELECT tile_id, ST_AsBinary(footprint), ST_SRID(footprint) FROM "
            f'"{SCHEMA}"."Tiles ""balanced""" ORDER BY tile_id'
        ).fetchall()
        column_type = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
            "to_regclass(%s) AND attname = 'footprint'",
            (f'"{SCHEMA}"."Tiles ""balanced"""',),
        ).fetchone()[0]
        indexes = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
            (SCHEMA, NAME),
        ).fetchall()
    assert column_type == "geometry(Polygon,32640)"
    assert any("USING gist (footprint)" in row[0] for row in indexes)
    for (tile_id, wkb, srid), patch in zip(geometry, expected.itertuples(), strict=True):
        assert tile_id == patch.tile_id and srid == 32640
        polygon = shapely.from_wkb(bytes(wkb))
        want = _window_polygon(patch.image_path, patch.row_off, patch.col_off, patch.patch_size)
        assert shapely.equals_exact(shapely.normalize(polygon), shapely.normalize(want), 1e-9)

    # A second run with the default if_exists: fail stops before any work, with a clear error.
    with pytest.raises(OutputError, match=r"already exists; set output.postgres_table.if_exists"):
        run_build(_config(folder, postgres_server.input_block(SOURCE), schema=SCHEMA, name=NAME))
    replaced = run_build(
        _config(
            folder,
            postgres_server.input_block(SOURCE),
            schema=SCHEMA,
            name=NAME,
            if_exists="replace",
        )
    )
    assert replaced.summary["postgres_table"]["replaced"] is True
    assert len(_read_back(postgres_server, SCHEMA, NAME)) == len(records)
    # Naming the source itself is refused even with replace.
    with pytest.raises(OutputError, match="names the source table"):
        run_build(
            _config(
                folder,
                postgres_server.input_block(SOURCE),
                schema="public",
                name=SOURCE,
                if_exists="replace",
            )
        )
    assert _snapshot(postgres_server, SOURCE) == before


def test_without_postgis_the_table_has_no_footprint_column(source, postgres_server):
    folder, records = source
    with postgres_server.connect("postgres") as conn:
        conn.execute("CREATE DATABASE plain")
    rows = records.rename(columns={"tile_id": "patch_id"}).to_dict("records")
    config = _config(
        folder,
        {"patch_records": rows},
        dsn=postgres_server.conninfo("plain"),
        name="balanced",
    )
    result = run_build(config)
    assert result.summary["postgres_table"]["footprint_srid"] is None
    written = _read_back(postgres_server, "public", "balanced", dbname="plain")
    assert list(written.columns) == list(result.table.columns)
    assert len(written) == len(records)
    np.testing.assert_array_equal(
        written.sort_values("patch_id")["sampler_weight"].to_numpy(),
        result.table.sort_values("patch_id")["sampler_weight"].to_numpy(),
    )


def test_postgres_table_without_connection_keys_needs_a_postgres_input(tmp_path):
    with pytest.raises(ConfigError, match="postgres_table needs connection keys"):
        _config(tmp_path, {"records_path": "r.csv"}, name="balanced")
    with pytest.raises(ConfigError, match="if_exists"):
        _config(tmp_path, {"records_path": "r.csv"}, dsn="host=x", name="b", if_exists="append")


def test_a_missing_schema_is_an_error_before_any_stage_runs(postgres_server, tmp_path):
    # The rasters do not exist: had any stage run, the error would be about them.
    records = [record(tmp_path / "gone.tif", tmp_path / "gone_mask.tif", 0, 0, PATCH)]
    config = _config(
        tmp_path,
        {"patch_records": records},
        dsn=postgres_server.conninfo(),
        schema="nowhere",
        name="balanced",
    )
    with pytest.raises(
        OutputError, match=r'schema "nowhere" does not exist.*postgres_table\.schema'
    ):
        run_build(config)
    assert not (tmp_path / "out" / "table.csv").exists()


def test_a_schema_the_user_may_not_create_in_is_an_error_before_any_stage(
    postgres_server, tmp_path
):
    with postgres_server.connect() as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS locked")  # the reader has no CREATE there
    records = [record(tmp_path / "gone.tif", tmp_path / "gone_mask.tif", 0, 0, PATCH)]
    config = _config(
        tmp_path,
        {"patch_records": records},
        dsn=postgres_server.conninfo(user=READER, password=READER_PASSWORD),
        schema="locked",
        name="balanced",
    )
    with pytest.raises(OutputError, match=r'may not create tables in the schema "locked"'):
        run_build(config)
