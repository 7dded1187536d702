"""Benchmark: the PostgreSQL source on a 155,000-row `dataset_explorer` tile table.

Starts a throwaway PostgreSQL cluster (as the tests do; or use `--dsn` for an existing server
whose user may create a table), COPYs 155,000 rows in with psycopg's `copy`, then measures:

1. rows/s streamed by the source (`records_from_postgres`, server-side cursor, fetch_size
   10,000, class_dist parsed into class counts), against a plain named-cursor fetch of the same
   query that converts nothing (the baseline, measured side by side);
2. the whole build from the table with `use_table_stats: true` and the border checks off, so the
   masks are never opened (their paths point at files that do not exist); the images are small,
   real GeoTIFFs, probed once each for size and CRS.

    python bench/postgres_source.py [--rows 155000] [--repeat 3] [--dsn "host=... dbname=..."]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TABLE = "bench_tiles"
PATCH = 32
IMAGE = 2048
CLASSES = 6


def _tile_table(rows: int, folder: Path, rng: np.random.Generator) -> tuple[pd.DataFrame, int]:
    """Return the tile table: a grid of PATCH px windows over IMAGE px rasters, with stats."""
    per_image = (IMAGE // PATCH) ** 2
    images = -(-rows // per_image)
    index = np.arange(rows)
    image_id = index // per_image
    cell = index % per_image
    proportions = rng.dirichlet(np.full(CLASSES, 0.3), size=rows)
    proportions[proportions < 0.02] = 0.0
    proportions /= proportions.sum(axis=1, keepdims=True)
    keys = [str(c) for c in range(CLASSES)]
    dists = [
        json.dumps({keys[c]: round(float(row[c]), 6) for c in np.flatnonzero(row)})
        for row in proportions
    ]
    table = pd.DataFrame(
        {
            "tile_id": index + 1,
            "file_path": [str(folder / f"images/scene_{i:03d}.tif") for i in image_id],
            "mask_path": [str(folder / f"missing_masks/scene_{i:03d}.tif") for i in image_id],
            "row_off": (cell // (IMAGE // PATCH)) * PATCH,
            "col_off": (cell % (IMAGE // PATCH)) * PATCH,
            "patch_size": PATCH,
            "split": np.where(index % 10 == 0, "val", "train"),
            "class_dist": dists,
            "nodata_ratio": np.round(rng.random(rows) * 0.1, 4),
            "uniqueness_score": np.round(rng.random(rows), 5),
        }
    )
    return table, images


def _write_images(folder: Path, images: int) -> None:
    import rasterio
    from rasterio.transform import from_origin

    (folder / "images").mkdir(parents=True, exist_ok=True)
    data = np.full((3, IMAGE, IMAGE), 120, dtype=np.uint8)
    for i in range(images):
        with rasterio.open(
            folder / f"images/scene_{i:03d}.tif",
            "w",
            driver="GTiff",
            width=IMAGE,
            height=IMAGE,
            count=3,
            dtype="uint8",
            crs="EPSG:32640",
            transform=from_origin(300_000 + i * IMAGE, 2_780_000, 1.0, 1.0),
            tiled=True,
            compress="deflate",
        ) as dataset:
            dataset.write(data)


def _copy_in(conninfo: str, table: pd.DataFrame) -> float:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(
            f"CREATE TABLE {TABLE} (tile_id integer PRIMARY KEY, file_path text, mask_path text, "
            "row_off integer, col_off integer, patch_size integer, split text, class_dist jsonb, "
            "nodata_ratio double precision, uniqueness_score double precision)"
        )
        start = time.perf_counter()
        with conn.cursor() as cursor, cursor.copy(f"COPY {TABLE} FROM STDIN") as copy:
            for begin in range(0, len(table), 20_000):
                buffer = io.StringIO()
                table.iloc[begin : begin + 20_000].to_csv(
                    buffer, sep="\t", header=False, index=False, quoting=3, escapechar="\\"
                )
                copy.write(buffer.getvalue())
        seconds = time.perf_counter() - start
        conn.execute(f"ANALYZE {TABLE}")
    return seconds


def _raw_fetch(conninfo: str, fetch_size: int) -> tuple[int, float]:
    """The baseline: the same ordered query through a named cursor, rows only, no conversion."""
    import psycopg

    start = time.perf_counter()
    rows = 0
    with psycopg.connect(conninfo) as conn:
        conn.read_only = True
        with conn.cursor(name="baseline") as cursor:
            cursor.execute(
                f"SELECT tile_id, file_path, mask_path, row_off, col_off, patch_size, split, "
                f"class_dist::text, nodata_ratio, uniqueness_score FROM {TABLE} "
                'ORDER BY file_path COLLATE "C", row_off, col_off, patch_size'
            )
            while batch := cursor.fetchmany(fetch_size):
                rows += len(batch)
    return rows, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=155_000)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many streams")
    parser.add_argument("--fetch-size", type=int, default=10_000)
    parser.add_argument("--dsn", default=None, help="an existing server (default: throwaway)")
    args = parser.parse_args()

    from psycopg.conninfo import conninfo_to_dict

    from patchbalance.balancing.pipeline import run_build
    from patchbalance.config import config_from_mapping
    from patchbalance.sources.postgres import records_from_postgres

    server = None
    if args.dsn is None:
        from postgres_server import find_postgres_bin, start_cluster

        bin_dir = find_postgres_bin()
        if bin_dir is None:
            sys.exit("no PostgreSQL server binaries found; run .ci/postgres.sh or pass --dsn")
        server = start_cluster(bin_dir)
        conninfo = server.conninfo()
    else:
        conninfo = args.dsn
    settings = conninfo_to_dict(conninfo)
    input_block = {
        "host": settings.get("host"),
        "port": int(settings["port"]) if settings.get("port") else None,
        "database": settings.get("dbname"),
        "user": settings.get("user"),
        "password": settings.get("password"),
        "table": TABLE,
        "fetch_size": args.fetch_size,
    }
    input_block = {key: value for key, value in input_block.items() if value is not None}

    try:
        with tempfile.TemporaryDirectory(prefix="pb-bench-pg-") as tmp:
            folder = Path(tmp)
            rng = np.random.default_rng(0)
            table, images = _tile_table(args.rows, folder, rng)
            _write_images(folder, images)
            copy_s = _copy_in(conninfo, table)
            print(f"rows: {args.rows:,} over {images} images of {IMAGE} px, patch {PATCH} px")
            print(f"COPY in: {copy_s:.2f} s ({args.rows / copy_s:,.0f} rows/s)")
            del table

            config = config_from_mapping(
                {
                    "mode": "masks_only",
                    "input": input_block,
                    "exclusion": {"exclude_border_nodata": False, "exclude_black_border": False},
                    "output": {"csv_path": str(folder / "out/balanced.parquet")},
                },
                base_dir=folder,
            )
            source_times, raw_times = [], []
            for _ in range(args.repeat):
                rows, seconds = _raw_fetch(conninfo, args.fetch_size)
                raw_times.append(seconds)
                start = time.perf_counter()
                source = records_from_postgres(config)
                source_times.append(time.perf_counter() - start)
                assert len(source.records) == rows == args.rows
                assert source.class_counts is not None and source.uniqueness is not None
            raw_s, source_s = min(raw_times), min(source_times)
            print(
                f"baseline named-cursor fetch (no conversion): {raw_s:.2f} s "
                f"({args.rows / raw_s:,.0f} rows/s)"
            )
            print(
                f"source (records + class counts + uniqueness): {source_s:.2f} s "
                f"({args.rows / source_s:,.0f} rows/s); {raw_s / source_s:.2f}x the baseline's "
                f"rate, batches of {source.notes['max_batch_rows']:,} rows"
            )
            del source

            start = time.perf_counter()
            result = run_build(config)
            build_s = time.perf_counter() - start
            summary = result.summary
            timings = ", ".join(f"{k} {v:.2f}s" for k, v in summary["timings_s"].items())
            print(
                f"build with use_table_stats (masks never opened): {build_s:.2f} s total; "
                f"{summary['n_active']:,} active, read errors {summary['read_errors']}, "
                f"k={summary['clustering']['k']}"
            )
            print(f"  stages: {timings}")
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"peak RSS of this process: {peak_mb:,.0f} MB")
    finally:
        if server is not None:
            from postgres_server import stop_cluster

            stop_cluster(server)


if __name__ == "__main__":
    main()
