"""The PostgreSQL source against a real, throwaway PostgreSQL server (see postgres_server.py)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from patchbalance.balancing.pipeline import run_build
from patchbalance.cli import app
from patchbalance.config import config_from_mapping, load_config
from patchbalance.errors import InputError
from patchbalance.sources.postgres import records_from_postgres, scrub
from postgres_server import (
    DATABASE,
    READER,
    READER_PASSWORD,
    free_port,
    postgres_server_fixture,  # noqa: F401 - registers the fixture
)
from rasters import record, write_pair

EXAMPLE = Path(__file__).resolve().parents[1] / "conf" / "examples" / "balanced_postgres.yaml"
PATCH = 16
SIZE = 256
WRONG_PASSWORD = "Wr0ng-pa55-d41c"
CLUSTERING = {"k_min": 2, "k_max": 5, "n_init": 2}


def _scene_mask(rng: np.random.Generator, with_nodata: bool) -> np.ndarray:
    # 8 px cells of classes 0..3, a scattering of rare class 4, and some unlabelled pixels.
    cells = rng.choice(4, size=(SIZE // 8, SIZE // 8), p=[0.5, 0.25, 0.15, 0.1])
    mask = np.kron(cells, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
    mask[rng.integers(0, SIZE, 300), rng.integers(0, SIZE, 300)] = 4
    if with_nodata:
        mask[:20, 100:140] = 255
        mask[rng.integers(0, SIZE, 200), rng.integers(0, SIZE, 200)] = 255
    return mask


def _grid_counts(mask: np.ndarray, values: list[int]) -> np.ndarray:
    """Return (windows, len(values)) pixel counts of the PATCH grid, computed independently."""
    tiles = mask.reshape(SIZE // PATCH, PATCH, SIZE // PATCH, PATCH).swapaxes(1, 2)
    tiles = tiles.reshape(-1, PATCH * PATCH)
    return np.stack([(tiles == value).sum(axis=1) for value in values], axis=1)


@pytest.fixture(scope="module")
def scene(tmp_path_factory, postgres_server):
    """Four 256 px GeoTIFF pairs, 1,024 patches of 16 px; tables `tiles` and `tiles_stats`.

    Returns (folder, records DataFrame as stored, true class counts, class values).
    """
    folder = tmp_path_factory.mktemp("pg_scene")
    rng = np.random.default_rng(7)
    rows, counts = [], []
    values = [0, 1, 2, 3, 4]
    for index in range(4):
        mask = _scene_mask(rng, with_nodata=index % 2 == 0)
        image = rng.integers(40, 220, size=(3, SIZE, SIZE), dtype=np.uint8)
        if index == 1:
            image[:, 32:48, :40] = 0  # a black region: some windows get a black border
        write_pair(folder, f"scene_{index}", mask, image=image)
        counts.append(_grid_counts(mask, values))
        for r in range(0, SIZE, PATCH):
            for c in range(0, SIZE, PATCH):
                rows.append(
                    record(
                        Path("images") / f"scene_{index}.tif",
                        Path("masks") / f"scene_{index}.tif",
                        r,
                        c,
                        PATCH,
                    )
                )
    records = pd.DataFrame(rows)
    records.insert(0, "tile_id", np.arange(1, len(records) + 1) * 10)
    records["split"] = np.where(np.arange(len(records)) % 5 == 0, "val", "train")
    records["quality"] = np.round(rng.random(len(records)), 3)
    class_counts = np.concatenate(counts)
    valid = class_counts.sum(axis=1)
    nodata_ratio = 1.0 - valid / PATCH**2
    # class_dist as dataset_explorer stores it: share of the valid pixels, zero classes omitted.
    dists = [
        json.dumps(
            {str(v): float(n / total) for v, n in zip(values, row, strict=True) if n}
            if total
            else {}
        )
        for row, total in zip(class_counts, valid, strict=True)
    ]
    uniqueness = np.round(rng.random(len(records)), 4)
    null_uniqueness = np.arange(len(records)) % 9 == 4

    with postgres_server.connect() as conn:
        conn.execute(
            "CREATE TABLE tiles (tile_id integer PRIMARY KEY, file_path text NOT NULL, "
            "mask_path text, row_off integer, col_off integer, patch_size integer, "
            "split text, quality double precision)"
        )
        conn.execute(
            "CREATE TABLE tiles_stats (tile_id integer PRIMARY KEY, file_path text, "
            "mask_path text, row_off integer, col_off integer, patch_size integer, "
            "class_dist jsonb, nodata_ratio double precision, uniqueness_score double precision)"
        )
        with conn.cursor() as cursor:
            # Stored in reverse order: the source must not depend on the table's row order.
            with cursor.copy(
                "COPY tiles (tile_id, file_path, mask_path, row_off, col_off, patch_size, "
                "split, quality) FROM STDIN"
            ) as copy:
                for row in records.iloc[::-1].itertuples(index=False):
                    copy.write_row(row)
            with cursor.copy(
                "COPY tiles_stats (tile_id, file_path, mask_path, row_off, col_off, patch_size, "
                "class_dist, nodata_ratio, uniqueness_score) FROM STDIN"
            ) as copy:
                for i, row in enumerate(records.itertuples(index=False)):
                    copy.write_row(
                        (
                            row.tile_id,
                            row.image_path,
                            # Masks that do not exist: statistics must come from the table.
                            f"missing/{Path(row.mask_path).name}",
                            row.row_off,
                            row.col_off,
                            row.patch_size,
                            dists[i],
                            float(nodata_ratio[i]),
                            None if null_uniqueness[i] else float(uniqueness[i]),
                        )
                    )
    return {
        "folder": folder,
        "records": records,
        "counts": class_counts,
        "values": values,
        "nodata_ratio": nodata_ratio,
        "uniqueness": np.where(null_uniqueness, np.nan, uniqueness),
    }


def _config(folder: Path, input_block: dict, name: str, **extra) -> object:
    data = {
        "mode": "masks_only",
        "num_workers": 2,
        "input": input_block,
        "clustering": CLUSTERING,
        "output": {"csv_path": f"out/{name}.csv"},
        **extra,
    }
    return config_from_mapping(data, base_dir=folder)


def _key_sorted(records: pd.DataFrame) -> pd.DataFrame:
    # The source orders by the patch key, paths by bytes: the same order as Python's sort.
    return records.sort_values(["image_path", "row_off", "col_off", "patch_size"]).reset_index(
        drop=True
    )


# --------------------------------------------------------------------------------------------
# The source builds the same table as the same records given as a file


def test_table_from_postgres_equals_table_from_the_same_records_file(scene, postgres_server):
    folder = scene["folder"]
    records_path = folder / "records.csv"
    _key_sorted(scene["records"]).to_csv(records_path, index=False)

    from_postgres = run_build(_config(folder, postgres_server.input_block("tiles"), "pg"))
    from_file = run_build(_config(folder, {"records_path": "records.csv"}, "file"))

    table = from_postgres.table
    assert len(table) == 1024
    assert table["image_path"].str.startswith(str(folder)).all()  # resolved like the file's
    assert list(table.columns[:8]) == [
        "tile_id",
        "image_path",
        "mask_path",
        "row_off",
        "col_off",
        "patch_size",
        "split",
        "quality",
    ]
    pd.testing.assert_frame_equal(table, from_file.table)
    # Real work happened: masks were read, patches excluded, weights spread.
    assert table["excluded"].any() and not table["excluded"].all()
    assert table.loc[~table["excluded"], "sampler_weight"].std() > 0
    assert from_postgres.summary["sampling"] == from_file.summary["sampling"]


def test_where_clause_filters_rows_like_the_same_filter_in_pandas(scene, postgres_server):
    config = _config(
        scene["folder"],
        postgres_server.input_block("tiles", where_clause="WHERE split = 'val' AND row_off < 64;"),
        "where",
    )
    source = records_from_postgres(config)
    expected = scene["records"]
    expected = expected[(expected["split"] == "val") & (expected["row_off"] < 64)]
    assert sorted(source.records["tile_id"]) == sorted(expected["tile_id"])
    assert source.class_counts is None  # no class_dist column: masks give the statistics


# --------------------------------------------------------------------------------------------
# Statistics, uniqueness and embeddings from the table


def test_class_dist_in_the_table_replaces_reading_the_masks(scene, postgres_server):
    folder = scene["folder"]
    no_border_checks = {"exclude_border_nodata": False, "exclude_black_border": False}
    result = run_build(
        _config(
            folder, postgres_server.input_block("tiles_stats"), "stats", exclusion=no_border_checks
        )
    )
    table = result.table.set_index("tile_id").loc[scene["records"]["tile_id"]]
    # The mask paths in tiles_stats do not exist: had any been opened, its patches would
    # carry read_error.
    assert not (folder / "missing").exists()
    assert result.summary["read_errors"] == 0
    assert not table["exclusion_reason"].str.contains("read_error").any()
    counts = table[[f"px_{v}" for v in scene["values"]]].to_numpy(dtype=np.int64)
    np.testing.assert_array_equal(counts, scene["counts"])
    np.testing.assert_allclose(table["nodata_ratio"], scene["nodata_ratio"], atol=1e-12)

    # The same patches with the real masks read give the same statistics and weights.
    records = scene["records"].drop(columns=["split", "quality"])
    _key_sorted(records).to_csv(folder / "records_stats.csv", index=False)
    from_masks = run_build(
        _config(folder, {"records_path": "records_stats.csv"}, "masks", exclusion=no_border_checks)
    ).table
    from_table = result.table.drop(columns=["mask_path", "class_dist", "uniqueness_score"])
    pd.testing.assert_frame_equal(from_table, from_masks.drop(columns=["mask_path"]))


def test_null_uniqueness_in_the_table_becomes_the_median_and_is_counted(scene, postgres_server):
    no_border_checks = {"exclude_border_nodata": False, "exclude_black_border": False}
    result = run_build(
        _config(
            scene["folder"],
            postgres_server.input_block("tiles_stats"),
            "uniqueness",
            mode="embeddings",
            exclusion=no_border_checks,
        )
    )
    table = result.table.set_index("tile_id").loc[scene["records"]["tile_id"]]
    active = ~table["excluded"].to_numpy()
    stored = scene["uniqueness"]
    unknown = np.isnan(stored) & active
    known = ~np.isnan(stored) & active
    median = np.median(stored[known])
    got = table["uniqueness_score"].to_numpy()
    np.testing.assert_allclose(got[known], stored[known])
    np.testing.assert_allclose(got[unknown], median)
    assert result.summary["uniqueness"]["uniqueness_unknown_set_to_median"] == unknown.sum() > 0


def test_float_array_embeddings_come_from_the_table(postgres_server, tmp_path):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((30, 6)).astype(np.float32)
    with postgres_server.connect() as conn:
        conn.execute(
            "CREATE TABLE tiles_embedded (file_path text, mask_path text, row_off int, "
            "col_off int, patch_size int, embedding real[])"
        )
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO tiles_embedded VALUES ('a.tif', 'm.tif', %s, 0, 16, %s)",
                [(16 * i, vector.tolist()) for i, vector in enumerate(vectors)],
            )
    config = _config(
        tmp_path,
        postgres_server.input_block("tiles_embedded", embedding_column="embedding", fetch_size=7),
        "emb",
    )
    source = records_from_postgres(config)
    order = np.argsort(source.records["row_off"].to_numpy())
    np.testing.assert_array_equal(source.embeddings[order], vectors)
    assert source.embeddings.dtype == np.float32
    assert "embedding" not in source.records.columns
    assert source.notes["embeddings_from_table"] and source.notes["batches"] == 5


def test_pgvector_embeddings_come_from_the_table(postgres_server, tmp_path):
    import psycopg

    with postgres_server.connect() as conn:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.Error:
            pytest.skip(
                "the pgvector extension is not installed on this PostgreSQL server: Debian 12 "
                "has no pgvector server package (no postgresql-15-pgvector), so CI cannot "
                "install it"
            )
        conn.execute(
            "CREATE TABLE tiles_vector (file_path text, mask_path text, row_off int, "
            "col_off int, patch_size int, embedding vector(3))"
        )
        conn.execute(
            "INSERT INTO tiles_vector VALUES ('a.tif', 'm.tif', 0, 0, 16, '[1,2,3]'), "
            "('a.tif', 'm.tif', 16, 0, 16, '[4,5,6.5]')"
        )
    config = _config(
        tmp_path, postgres_server.input_block("tiles_vector", embedding_column="embedding"), "v"
    )
    source = records_from_postgres(config)
    np.testing.assert_array_equal(source.embeddings, [[1, 2, 3], [4, 5, 6.5]])


# --------------------------------------------------------------------------------------------
# Safety


@pytest.fixture(scope="module")
def small_table(postgres_server):
    """A 50-row table `small` plus a function that deletes from it when called."""
    with postgres_server.connect() as conn:
        conn.execute(
            "CREATE TABLE small AS SELECT 'a.tif'::text AS file_path, 'm.tif'::text AS mask_path,"
            " g * 16 AS row_off, 0 AS col_off, 16 AS patch_size FROM generate_series(0, 49) g"
        )
        conn.execute(
            "CREATE FUNCTION purge_small() RETURNS boolean LANGUAGE plpgsql AS "
            "$$ BEGIN DELETE FROM small; RETURN true; END $$"
        )
    return "small"


def _row_count(server, table: str = "small") -> int:
    with server.connect() as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_table_name_with_quote_and_drop_table_is_only_a_name(
    postgres_server, small_table, tmp_path
):
    hostile = 'small"; DROP TABLE small; --'
    config = _config(tmp_path, postgres_server.input_block(hostile), "x")
    with pytest.raises(InputError) as caught:
        records_from_postgres(config)
    assert str(caught.value) == (
        'PostgreSQL table "small""; DROP TABLE small; --" not found in database '
        f"'{DATABASE}' on 127.0.0.1:{postgres_server.port}; check input.table (and input.schema)"
    )
    assert _row_count(postgres_server) == 50


@pytest.mark.parametrize(
    ("where_clause", "message"),
    [
        (
            "purge_small()",
            'input.where_clause tried to change data in PostgreSQL table "small": cannot '
            "execute DELETE in a read-only transaction; the source only reads, so where_clause "
            "must be a filter condition (nothing was changed)",
        ),
        (
            "true); COMMIT; DELETE FROM small; SELECT (1",
            "input.where_clause was rejected by PostgreSQL: cannot insert multiple commands "
            'into a prepared statement (in PostgreSQL table "small")',
        ),
        (
            "row_off IN (WITH gone AS (DELETE FROM small RETURNING row_off) SELECT * FROM gone)",
            "input.where_clause was rejected by PostgreSQL: WITH clause containing a "
            'data-modifying statement must be at the top level (in PostgreSQL table "small")',
        ),
    ],
    ids=["function-that-deletes", "stacked-statements", "data-modifying-cte"],
)
def test_where_clause_that_deletes_fails_and_leaves_the_data_intact(
    postgres_server,
    small_table,
    tmp_path,
    where_clause,
    message,
):
    config = _config(
        tmp_path, postgres_server.input_block(small_table, where_clause=where_clause), "x"
    )
    with pytest.raises(InputError) as caught:
        records_from_postgres(config)
    assert str(caught.value) == message
    assert _row_count(postgres_server) == 50


def test_the_reader_role_could_delete_outside_a_read_only_transaction(postgres_server):
    # The control for the test above: the role has the rights, so only READ ONLY stopped it.
    import psycopg

    with postgres_server.connect() as conn:
        conn.execute("CREATE TABLE scratch AS SELECT generate_series(1, 5) AS n")
    reader = postgres_server.conninfo(user=READER, password=READER_PASSWORD)
    with psycopg.connect(reader) as conn:
        conn.execute("DELETE FROM scratch")
    assert _row_count(postgres_server, "scratch") == 0


def test_scrub_removes_passwords_from_messages():
    text = "failed: password=hunter22 host=x\n postgresql://u:pa55@h/db and 'Zq9-secret'"
    assert scrub(text, ["Zq9-secret"]) == (
        "failed: password=*** host=x postgresql://u:***@h/db and '***'"
    )


# --------------------------------------------------------------------------------------------
# Errors through the command line: exit 2, one line, never the password


def _write_config(path: Path, input_block: dict) -> Path:
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "balanced_dataset": {
                    "input": input_block,
                    "output": {"csv_path": str(path.parent / "out.csv")},
                }
            }
        )
    )
    return path


def _cli_error(config_path: Path, *extra: str) -> str:
    result = CliRunner().invoke(app, ["build-balanced-dataset", str(config_path), *extra])
    assert result.exit_code == 2, result.output
    assert READER_PASSWORD not in result.output
    assert WRONG_PASSWORD not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cli_reports_each_connection_and_table_problem_in_one_line(
    postgres_server,
    small_table,
    tmp_path,
):
    port = postgres_server.port
    closed_port = free_port()
    cases = [
        (
            {"password": WRONG_PASSWORD},
            f"error: PostgreSQL authentication failed for user '{READER}' on database "
            f"'{DATABASE}' at 127.0.0.1:{port}; check input.user and the password "
            "(input.password, PGPASSWORD or ~/.pgpass)",
        ),
        (
            {"database": "no_such_db"},
            f"error: PostgreSQL database 'no_such_db' does not exist on 127.0.0.1:{port}; "
            "check input.database",
        ),
        (
            {"port": closed_port},
            f"error: cannot reach the PostgreSQL server at 127.0.0.1:{closed_port}: Connection "
            "refused; check input.host and input.port, and that the server is running",
        ),
        (
            {"mask_path_column": "mask_file"},
            "error: PostgreSQL table \"small\" has no column 'mask_file' "
            "(input.mask_path_column); its columns are: file_path, mask_path, row_off, "
            "col_off, patch_size",
        ),
        (
            {"table": "no_such_table"},
            'error: PostgreSQL table "no_such_table" not found in database '
            f"'{DATABASE}' on 127.0.0.1:{port}; check input.table (and input.schema)",
        ),
        (
            {"where_clause": "row_off >"},
            "error: input.where_clause was rejected by PostgreSQL: syntax error at or near "
            '")" (in PostgreSQL table "small")',
        ),
        (
            {"where_clause": "row_off < 0"},
            'error: PostgreSQL table "small" returned no rows for input.where_clause '
            '"row_off < 0"; check the filter',
        ),
    ]
    for index, (change, expected) in enumerate(cases):
        block = {**postgres_server.input_block(small_table), **change}
        config_path = _write_config(tmp_path / f"case_{index}.yaml", block)
        assert _cli_error(config_path) == expected


def test_cli_never_shows_a_password_given_in_a_dsn(postgres_server, small_table, tmp_path):
    dsn = f"postgresql://{READER}:{WRONG_PASSWORD}@127.0.0.1:{postgres_server.port}/{DATABASE}"
    config_path = _write_config(tmp_path / "dsn.yaml", {"dsn": dsn, "table": small_table})
    line = _cli_error(config_path)
    assert line.startswith(f"error: PostgreSQL authentication failed for user '{READER}'")
    # Not in the driver's debug logging either.
    verbose = CliRunner().invoke(
        app, ["build-balanced-dataset", str(config_path), "--verbose", "--debug"]
    )
    assert verbose.exit_code == 2
    assert WRONG_PASSWORD not in verbose.output
    # A dsn that libpq cannot parse is reported without quoting any of it.
    config_path = _write_config(
        tmp_path / "bad_dsn.yaml", {"dsn": f"host=x password '{WRONG_PASSWORD}", "table": "t"}
    )
    assert _cli_error(config_path).startswith(
        "error: input.dsn is not a valid PostgreSQL connection string"
    )
    debug = CliRunner().invoke(app, ["build-balanced-dataset", str(config_path), "--debug"])
    assert debug.exit_code == 2
    assert WRONG_PASSWORD not in debug.output


def test_a_numeric_password_in_yaml_is_accepted_and_not_echoed(postgres_server, tmp_path):
    config_path = tmp_path / "numeric.yaml"
    config_path.write_text(
        "input:\n"
        f"  host: 127.0.0.1\n  port: {postgres_server.port}\n  user: {READER}\n"
        f"  database: {DATABASE}\n  table: small\n  password: 90817263\n"
        "output:\n  csv_path: out.csv\n"
    )
    line = _cli_error(config_path)
    assert "90817263" not in line
    assert "authentication failed" in line


# --------------------------------------------------------------------------------------------
# Passwords from the environment, streaming, the example configuration


def test_password_may_come_from_oc_env_or_from_libpq_environment(
    postgres_server,
    small_table,
    tmp_path,
    monkeypatch,
):
    block = postgres_server.input_block(small_table)
    block["password"] = "${oc.env:PATCHBALANCE_TEST_DB_PASSWORD}"
    monkeypatch.setenv("PATCHBALANCE_TEST_DB_PASSWORD", READER_PASSWORD)
    assert len(records_from_postgres(_config(tmp_path, block, "env")).records) == 50

    del block["password"]
    monkeypatch.setenv("PGPASSWORD", READER_PASSWORD)
    assert len(records_from_postgres(_config(tmp_path, block, "pgpassword")).records) == 50


def test_streaming_holds_at_most_one_batch_of_rows(postgres_server, tmp_path):
    with postgres_server.connect() as conn:
        conn.execute(
            "CREATE TABLE big AS SELECT 'images/scene_' || (g % 40) || '.tif' AS file_path, "
            "'masks/scene_' || (g % 40) || '.tif' AS mask_path, (g / 40) * 16 AS row_off, "
            "0 AS col_off, 16 AS patch_size, repeat('x', 200) AS note "
            "FROM generate_series(0, 9999) g"
        )

    def read(fetch_size: int) -> tuple[object, int]:
        config = _config(tmp_path, postgres_server.input_block("big", fetch_size=fetch_size), "big")
        tracemalloc.start()
        try:
            source = records_from_postgres(config)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return source, peak

    streamed, streamed_peak = read(100)
    assert len(streamed.records) == 10_000
    assert streamed.notes["batches"] == 100
    assert streamed.notes["max_batch_rows"] == 100
    whole, whole_peak = read(10_000)
    assert whole.notes["max_batch_rows"] == 10_000
    pd.testing.assert_frame_equal(streamed.records, whole.records)
    # Holding every raw row at once costs measurably more than one batch at a time.
    assert streamed_peak < 0.8 * whole_peak, (streamed_peak, whole_peak)


def test_example_config_runs_against_the_server(scene, postgres_server, tmp_path, monkeypatch):
    with postgres_server.connect() as conn:
        # A view with absolute paths: the example's folder is not the scene's.
        conn.execute(
            "CREATE VIEW example_tiles AS SELECT tile_id, %s || file_path AS file_path, "
            "%s || mask_path AS mask_path, row_off, col_off, patch_size, split "
            "FROM tiles".replace("%s", "'" + str(scene["folder"]).replace("'", "''") + "/'")
        )
    monkeypatch.setenv("PGPASSWORD", READER_PASSWORD)
    overrides = [
        "input.host=127.0.0.1",
        f"input.port={postgres_server.port}",
        f"input.database={DATABASE}",
        f"input.user={READER}",
        "input.table=example_tiles",
        "clustering.k_max=5",
        f"output.csv_path={tmp_path / 'example.csv'}",
        f"output.geojson_path={tmp_path / 'example.geojson'}",
    ]
    config = load_config(EXAMPLE, overrides)
    assert config.input.source_kind == "postgres"
    assert config.input.password == READER_PASSWORD  # ${oc.env:PGPASSWORD,""}

    runner = CliRunner()
    set_args = [arg for override in overrides for arg in ("--set", override)]
    plan = runner.invoke(app, ["build-balanced-dataset", str(EXAMPLE), "--dry-run", *set_args])
    assert plan.exit_code == 0, plan.output
    train = int((scene["records"]["split"] == "train").sum())
    assert f"patches: {train:,} from 8 raster files" in plan.stdout

    built = runner.invoke(app, ["build-balanced-dataset", str(EXAMPLE), "-q", *set_args])
    assert built.exit_code == 0, built.output
    table = pd.read_csv(tmp_path / "example.csv")
    assert len(table) == train and set(table["split"]) == {"train"}
    assert (tmp_path / "example.geojson").exists()
    assert READER_PASSWORD not in built.output + plan.output


# --------------------------------------------------------------------------------------------
# Embeddings stored in the table replace extraction in the whole build


def _table_with_vectors(postgres_server, scene, name: str, vectors: np.ndarray) -> None:
    records = scene["records"]
    with postgres_server.connect() as conn:
        conn.execute(
            f"CREATE TABLE {name} (file_path text, mask_path text, row_off int, col_off int, "
            "patch_size int, embedding real[])"
        )
        with (
            conn.cursor() as cursor,
            cursor.copy(
                f"COPY {name} (file_path, mask_path, row_off, col_off, patch_size, embedding) "
                "FROM STDIN"
            ) as copy,
        ):
            for row, vector in zip(records.itertuples(index=False), vectors, strict=True):
                copy.write_row(
                    (
                        row.image_path,
                        row.mask_path,
                        row.row_off,
                        row.col_off,
                        row.patch_size,
                        [float(v) for v in vector],
                    )
                )


def test_table_embeddings_give_the_uniqueness_of_an_independent_knn(scene, postgres_server):
    vectors = np.random.default_rng(11).standard_normal((len(scene["records"]), 8))
    vectors = vectors.astype(np.float32)
    _table_with_vectors(postgres_server, scene, "tiles_vectors", vectors)
    config = _config(
        scene["folder"],
        postgres_server.input_block("tiles_vectors", embedding_column="embedding"),
        "vectors",
        mode="embeddings",
        uniqueness={"k_neighbors": 3, "backend": "exact"},
    )
    result = run_build(config)
    assert result.summary["uniqueness"]["embeddings_from_source"] is True
    assert "embeddings" not in result.summary  # nothing was extracted
    keys = ["image_path", "row_off", "col_off"]
    table = result.table
    active = table[~table["excluded"]]
    # Independent kNN over the active rows, vectors joined by the patch key.
    lookup = {
        (str(scene["folder"] / p), r, c): i
        for i, (p, r, c) in enumerate(scene["records"][keys].itertuples(index=False, name=None))
    }
    rows = [lookup[key] for key in active[keys].itertuples(index=False, name=None)]
    unit = vectors[rows].astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    distance = 1.0 - unit @ unit.T
    np.fill_diagonal(distance, np.inf)
    expected = np.sort(distance, axis=1)[:, :3].mean(axis=1)
    np.testing.assert_allclose(active["uniqueness_score"], expected, atol=1e-5)


def test_a_nan_embedding_in_the_table_is_an_error_naming_the_patch(scene, postgres_server):
    vectors = np.random.default_rng(5).standard_normal((len(scene["records"]), 4))
    vectors = vectors.astype(np.float32)
    nan_rows = (scene["records"]["image_path"] == str(Path("images") / "scene_1.tif")).to_numpy()
    vectors[nan_rows, 2] = np.nan
    _table_with_vectors(postgres_server, scene, "tiles_nan_vectors", vectors)
    config = _config(
        scene["folder"],
        postgres_server.input_block("tiles_nan_vectors", embedding_column="embedding"),
        "nan",
        mode="embeddings",
    )
    # The source refuses it while streaming, naming the table row (in key order: scene_1's
    # first window follows scene_0's 256 windows).
    with pytest.raises(InputError, match=r"row 257: column 'embedding' holds NaN or infinite"):
        run_build(config)


def test_a_dsn_option_that_libpq_rejects_is_reported_with_libpq_s_reason(tmp_path):
    # libpq refuses the value before connecting, so no server is needed.
    config_path = _write_config(
        tmp_path / "sslmode.yaml",
        {"dsn": "host=127.0.0.1 port=1 dbname=d user=u sslmode=bogus", "table": "t"},
    )
    line = _cli_error(config_path)
    assert 'invalid sslmode value: "bogus"' in line, line
    assert "input.dsn" in line
    assert "cannot reach" not in line and "check input.host" not in line


def test_a_dsn_together_with_host_port_or_user_is_an_error_naming_the_keys(tmp_path):
    block = {"dsn": "host=db.example dbname=tiles", "host": "other", "user": "me", "table": "t"}
    line = _cli_error(_write_config(tmp_path / "both.yaml", block))
    assert line.startswith("error: input.dsn and input.host, input.user both say where"), line
    # A password key beside a dsn that holds none is how a secret stays out of the dsn.
    block = {"dsn": "host=127.0.0.1 port=1 dbname=d user=u sslmode=bogus", "password": "p4ss"}
    line = _cli_error(_write_config(tmp_path / "password.yaml", {**block, "table": "t"}))
    assert "invalid sslmode value" in line, line
