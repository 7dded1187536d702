"""Benchmark: peak memory of a masks_only build against the number of patches, SPEC §9.

Bar: peak memory grows linearly with N and stays under 2 GB for 155,000 patches. Each size runs
`build_balanced_dataset` in a fresh process (so peaks do not mix) on records drawn from the same
tiled GeoTIFF masks, and the script prints the peak resident set size per size, the growth per
1,000 patches between the smallest and largest run, and how far the middle sizes sit from the
straight line through the ends.

    python bench/memory.py                       # N = 20k, 40k, 80k, 155k
    python bench/memory.py --sizes 5000 10000    # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from rasterio.transform import from_origin

from geotiff import write_geotiff

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from patchbalance.config import config_from_mapping
    from patchbalance.balancing.pipeline import run_build
    block, base = json.loads(sys.argv[1]), sys.argv[2]
    start = time.perf_counter()
    result = run_build(config_from_mapping(block, base_dir=base))
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": time.perf_counter() - start, "active": result.summary["n_active"]}))
    """
)


def write_masks(folder: Path, count: int, side: int) -> list[Path]:
    """Write `count` tiled, deflated uint8 masks of side x side px with blocky classes."""
    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        coarse = rng.integers(0, 6, size=(side // 16, side // 16), dtype=np.uint8)
        mask = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)
        path = folder / f"mask_{i}.tif"
        transform = from_origin(300_000 + 10_000 * i, 2_780_000, 1, 1)
        write_geotiff(path, mask, transform, nodata=255)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 40_000, 80_000, 155_000])
    parser.add_argument(
        "--patch", type=int, default=32, help="window size (px); memory is per patch"
    )
    args = parser.parse_args()

    largest = max(args.sizes)
    side = 4096
    per_raster = (side // args.patch) ** 2
    rasters = -(-largest // per_raster)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        paths = write_masks(folder, rasters, side)
        rows, cols = np.meshgrid(
            np.arange(0, side, args.patch), np.arange(0, side, args.patch), indexing="ij"
        )
        grid = pd.concat(
            [
                pd.DataFrame(
                    {
                        "image_path": str(p),
                        "mask_path": str(p),
                        "row_off": rows.ravel(),
                        "col_off": cols.ravel(),
                        "patch_size": args.patch,
                    }
                )
                for p in paths
            ],
            ignore_index=True,
        )
        print(
            f"{rasters} masks of {side}^2 px, windows of {args.patch} px; masks_only, "
            "black-border check off (no images)"
        )
        print(f"{'patches':>10}{'peak MB':>10}{'seconds':>10}")
        results = []
        for n in sorted(args.sizes):
            records = folder / f"records_{n}.parquet"
            grid.iloc[:n].to_parquet(records)
            block = {
                "input": {"records_path": str(records)},
                "exclusion": {"exclude_black_border": False},
                "output": {"csv_path": str(folder / f"out_{n}.parquet")},
            }
            out = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(block), str(folder)],
                capture_output=True,
                text=True,
                check=True,
            )
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            results.append((n, figures["peak_mb"]))
            print(f"{n:>10,}{figures['peak_mb']:>10.0f}{figures['seconds']:>10.1f}")
    (n0, m0), (n1, m1) = results[0], results[-1]
    slope = (m1 - m0) / (n1 - n0)
    print(
        f"growth: {1000 * slope:.2f} MB per 1,000 patches; baseline (interpreter, libraries) "
        f"~{m0 - slope * n0:.0f} MB"
    )
    for n, m in results[1:-1]:
        print(f"  N={n:,}: {m - (m0 + slope * (n - n0)):+.0f} MB from the straight line")
    print(f"peak at N={n1:,}: {m1:.0f} MB (bar < 2048 MB)")


if __name__ == "__main__":
    main()
