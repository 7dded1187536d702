"""Benchmark: mask statistics (masks_only) against a naive per-patch reader, SPEC §9.

Writes tiled, deflate-compressed GeoTIFF masks (several rasters, >= 20,000 windows of 256 px by
default), then times on the same windows, in the same run:

  naive        open the raster for every patch, read the window, np.unique(return_counts)
  decode-only  one open dataset per raster, read every window in block order, nothing else
  patchbalance the statistics stage (grouped, block-ordered, threaded, bincount)

and prints patches/s, the throughput ratio patchbalance/naive (bar: >= 5x) and the CPU time per
window of patchbalance against decode-only (bar: within 2x).

    python bench/mask_stats.py                       # 8 rasters, 20,000 windows
    python bench/mask_stats.py --rasters 2 --side 5120 # a quick look
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from PIL import Image
from rasterio.windows import Window

from geotiff import DUBAI_DATA, MASK_NODATA, mask_to_classes, write_geotiff
from patchbalance.balancing.stats import compute_mask_statistics
from patchbalance.windows import block_order

NODATA = MASK_NODATA


def dubai_class_masks(folder: Path) -> list[np.ndarray]:
    """Return the real Dubai masks as uint8 class-index arrays (255 = not annotated)."""
    # Some masks are palette PNGs; Pillow expands both kinds to RGB.
    return [
        mask_to_classes(np.asarray(Image.open(path).convert("RGB")), str(path))
        for path in sorted(folder.glob("tile_*/masks/*.png"))
    ]


def synthetic_masks(seed: int) -> list[np.ndarray]:
    """Return blob-shaped synthetic class masks, for when the real data is not at hand."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(12):
        field = ndimage.gaussian_filter(rng.standard_normal((1024, 1024)), 12)
        masks.append(
            np.digitize(field, np.quantile(field, [0.5, 0.65, 0.8, 0.9, 0.97])).astype(np.uint8)
        )
    return masks


def write_mask(path: Path, side: int, sources: list[np.ndarray], seed: int) -> None:
    """Write a side x side mosaic of the source masks (random flips), tiled 256 and deflated."""
    rng = np.random.default_rng(seed)
    mosaic = np.full((side, side), NODATA, dtype=np.uint8)
    row = 0
    while row < side:
        col, row_height = 0, 0
        while col < side:
            piece = sources[rng.integers(len(sources))]
            if rng.random() < 0.5:
                piece = piece[:, ::-1]
            if rng.random() < 0.5:
                piece = piece[::-1]
            height, width = min(piece.shape[0], side - row), min(piece.shape[1], side - col)
            mosaic[row : row + height, col : col + width] = piece[:height, :width]
            col += width
            row_height = max(row_height, height)
        row += row_height
    write_geotiff(path, mosaic, nodata=NODATA)


def records_for(paths: list[Path], side: int, size: int, limit: int, seed: int) -> pd.DataFrame:
    frames = []
    for path in paths:
        rows, cols = np.meshgrid(
            np.arange(0, side - size + 1, size), np.arange(0, side - size + 1, size), indexing="ij"
        )
        frames.append(
            pd.DataFrame(
                {
                    "image_path": str(path),
                    "mask_path": str(path),
                    "row_off": rows.ravel(),
                    "col_off": cols.ravel(),
                    "patch_size": size,
                }
            )
        )
    records = pd.concat(frames, ignore_index=True)
    # Shuffle, as a real records table is not in file order; the readers must cope.
    records = records.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return records.iloc[:limit].reset_index(drop=True)


def naive(records: pd.DataFrame) -> int:
    """The upstream way: open per patch, np.unique per window."""
    classes = 0
    for path, row, col, size in records[
        ["mask_path", "row_off", "col_off", "patch_size"]
    ].itertuples(index=False):
        with rasterio.open(path) as dataset:
            window = dataset.read(1, window=Window(col, row, size, size))
        values, _ = np.unique(window, return_counts=True)
        classes += len(values)
    return classes


def decode_only(records: pd.DataFrame) -> int:
    """Read every window once, one open dataset per raster, block order; no statistics."""
    total = 0
    for path, group in records.groupby("mask_path"):
        order = block_order(group["row_off"].to_numpy(), group["col_off"].to_numpy(), (256, 256))
        with rasterio.open(path) as dataset:
            for row, col, size in group[["row_off", "col_off", "patch_size"]].to_numpy()[order]:
                total += dataset.read(1, window=Window(col, row, size, size)).shape[0]
    return total


def timed(function, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rasters", type=int, default=8)
    parser.add_argument("--side", type=int, default=12800, help="raster width and height (px)")
    parser.add_argument("--size", type=int, default=256, help="window size (px)")
    parser.add_argument("--windows", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--naive-sample",
        type=int,
        default=0,
        help="time the naive reader on this many windows only (0 = all)",
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for the rasters (default: temp)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        paths = [work / f"mask_{i}.tif" for i in range(args.rasters)]
        start = time.perf_counter()
        if DUBAI_DATA.is_dir():
            sources, origin = dubai_class_masks(DUBAI_DATA), "mosaics of the 72 real Dubai masks"
        else:
            sources, origin = synthetic_masks(0), "synthetic blob masks (Dubai data not found)"
        for i, path in enumerate(paths):
            if not path.exists():
                write_mask(path, args.side, sources, seed=i)
        print(f"masks: {origin}")
        print(
            f"rasters: {args.rasters} x {args.side}^2 px, tiled 256, deflate "
            f"({sum(p.stat().st_size for p in paths) / 1e6:.0f} MB, written in {time.perf_counter() - start:.0f} s)"
        )
        records = records_for(paths, args.side, args.size, args.windows, seed=0)
        n = len(records)
        print(
            f"windows: {n:,} of {args.size}x{args.size} px, {args.workers} worker thread(s), cores: {os.cpu_count()}"
        )

        # Warm the page cache so that no contender pays for the first disk read.
        decode_only(records)
        _, decode_wall, decode_cpu = timed(decode_only, records)
        nodata = {str(p): NODATA for p in paths}
        block_shapes = {str(p): (256, 256) for p in paths}

        def ours(workers: int):
            return compute_mask_statistics(
                records, np.arange(n), nodata, block_shapes=block_shapes, num_workers=workers
            )

        stats, ours_wall, ours_cpu = timed(ours, args.workers)
        # The same stage on one thread: its CPU time per window is free of thread contention.
        _, single_wall, single_cpu = timed(ours, 1)
        naive_records = records if not args.naive_sample else records.iloc[: args.naive_sample]
        _, naive_wall, naive_cpu = timed(naive, naive_records)
        naive_rate = len(naive_records) / naive_wall

        print(f"{'reader':<22}{'patches/s':>12}{'wall s':>10}{'CPU ms/window':>16}")
        for name, count, wall, cpu in (
            ("naive", len(naive_records), naive_wall, naive_cpu),
            ("decode-only", n, decode_wall, decode_cpu),
            (f"patchbalance {args.workers} thread(s)", n, ours_wall, ours_cpu),
            ("patchbalance 1 thread", n, single_wall, single_cpu),
        ):
            print(f"{name:<22}{count / wall:>12,.0f}{wall:>10.2f}{1000 * cpu / count:>16.3f}")
        print(f"throughput patchbalance / naive: {n / ours_wall / naive_rate:.2f}x (bar >= 5x)")
        print(
            "CPU per window patchbalance / decode-only: "
            f"{ours_cpu / decode_cpu:.2f}x with {args.workers} thread(s), "
            f"{single_cpu / decode_cpu:.2f}x on 1 thread (bar <= 2x)"
        )
        print(
            f"classes found: {stats.class_values.tolist()}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
        )


if __name__ == "__main__":
    main()
