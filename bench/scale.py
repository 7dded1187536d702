"""Benchmark: masks_only builds at 1M, 2M and 10M patches, in-process threads against Dask.

Writes tiled (256 px), deflate-compressed GeoTIFF masks made of the real Dubai masks (as in
`bench/mask_stats.py`; synthetic blobs when the data is not at hand), and a Parquet
`records_path` of 256 px windows every `--stride` px over them (a stride below the window size
reaches millions of windows from a few files). Each build runs in a fresh process through the
library's `run_build`, writing a Parquet table, and the script prints, side by side in one run:

  - throughput of the mask-statistics stage and end to end, for the in-process `threads`
    scheduler at 1 (and 2) threads against a `LocalCluster` at 1 and 2 workers (bar: 2 workers
    >= 1.6x the one-thread in-process throughput);
  - the peak resident memory of the client (the build's process; workers are their own
    processes) per patch (bar: < 0.5 KB per patch at 10M);
  - the time of every stage, and the wall time at 10M (bar: < 40 minutes).

    python bench/scale.py                                   # 1M, 2M, 10M
    python bench/scale.py --sizes 200000 --compare-at 200000  # a quick look

`--methods rank_max default` builds each size with each sampling method side by side (`default`:
the configuration names none), and `--runs "threads, 1 thread"` keeps only the named runs.
`--source rasters` gives the build the rasters themselves (`input.rasters`, `patch_size`,
`stride`) instead of the records file, each size rounded up to whole rasters: there the default
adds class-centred windows, and `--methods default default_grid rank_max` sets it beside the
default method on the grid alone (`default_grid`: `placement: grid`) and `rank_max`.
`--masks rare` writes synthetic blob masks with a seventh class of scattered single pixels
(0.17 % of the pixels, never much of any window), where the default's sqrt target cannot be
reached.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd

from geotiff import DUBAI_DATA
from mask_stats import dubai_class_masks, synthetic_masks, write_mask

CHILD = textwrap.dedent(
    """
    import json, sys, time
    from patchbalance.config import config_from_mapping
    from patchbalance.balancing.pipeline import run_build
    block, base = json.loads(sys.argv[1]), sys.argv[2]
    start = time.perf_counter()
    result = run_build(config_from_mapping(block, base_dir=base))
    seconds = time.perf_counter() - start
    status = open("/proc/self/status").read().split("\\n")
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"peak_bytes": peak_kb * 1024, "seconds": seconds,
                      "n": result.summary["n_patches"], "active": result.summary["n_active"],
                      "timings": result.summary["timings_s"],
                      "method": result.summary["sampling_method"],
                      "ess_share": result.summary["sampling"]["effective_sample_size_share"],
                      "warnings": result.summary["warnings"],
                      "compute": result.summary["compute"],
                      "placement": result.summary.get("source", {}).get("placement")}))
    """
)

# (label, compute block, num_workers) of the runs compared at --compare-at.
COMPARED = (
    ("threads, 1 thread", {"scheduler": "threads"}, 1),
    ("threads, 2 threads", {"scheduler": "threads"}, 2),
    ("LocalCluster, 1 worker", {"scheduler": "local", "workers": 1}, 1),
    ("LocalCluster, 2 workers", {"scheduler": "local", "workers": 2}, 2),
)
SCALED = ("LocalCluster, 2 workers", {"scheduler": "local", "workers": 2}, 2)


def rare_masks(seed: int) -> list[np.ndarray]:
    """Return the synthetic blob masks with class 6 as scattered single pixels (0.17 %)."""
    rng = np.random.default_rng(seed)
    masks = synthetic_masks(seed)
    for mask in masks:
        mask[rng.random(mask.shape) < 0.0017] = 6
    return masks


def write_rasters(work: Path, count: int, side: int, masks: str = "dubai") -> list[Path]:
    """Write (or reuse) `count` side x side mosaics of the chosen masks; return their paths."""
    prefix = "mask" if masks == "dubai" else f"{masks}mask"
    paths = [work / f"{prefix}_{i}.tif" for i in range(count)]
    missing = [path for path in paths if not path.exists()]
    if missing:
        if masks == "rare":
            sources = rare_masks(0)
        else:
            sources = dubai_class_masks(DUBAI_DATA) if DUBAI_DATA.is_dir() else synthetic_masks(0)
        for path in missing:
            write_mask(path, side, sources, seed=int(path.stem.split("_")[1]))
    return paths


def write_records(path: Path, rasters: list[Path], n: int, side: int, size: int, stride: int):
    """Write the first `n` windows of the stride grid over `rasters` as a Parquet records file."""
    starts = np.arange(0, side - size + 1, stride, dtype=np.int64)
    per_raster = len(starts) ** 2
    frames, left = [], n
    for raster in rasters:
        take = min(left, per_raster)
        if take <= 0:
            break
        flat = np.arange(take)
        frames.append(
            pd.DataFrame(
                {
                    "image_path": pd.Categorical([str(raster)] * take),
                    "mask_path": pd.Categorical([str(raster)] * take),
                    "row_off": starts[flat // len(starts)],
                    "col_off": starts[flat % len(starts)],
                    "patch_size": np.int64(size),
                }
            )
        )
        left -= take
    records = pd.concat(frames, ignore_index=True)
    records["image_path"] = records["image_path"].astype(str)
    records["mask_path"] = records["mask_path"].astype(str)
    records.to_parquet(path, index=False, row_group_size=1_000_000)
    return len(records)


def build(
    work: Path, source: dict, compute: dict, num_workers: int, method: str = "default"
) -> dict:
    """Run one build of the `input` block `source` in a fresh process; return its measurements."""
    source = dict(source)
    if method == "default_grid":
        source["placement"] = "grid"
    block = {
        "mode": "masks_only",
        "num_workers": num_workers,
        "input": source,
        "clustering": {"k_selection": "elbow", "k_min": 4, "k_max": 12},
        # Masks only: the records name each mask as its image too, so no image is checked.
        "exclusion": {"exclude_black_border": False},
        "compute": compute,
        "output": {"csv_path": str(work / "balanced.parquet"), "include_excluded": True},
    }
    if method not in ("default", "default_grid"):
        block["sampling_method"] = method
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(block), str(work)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def show(label: str, result: dict, baseline: float | None, compared: bool) -> float:
    n = result["n"]
    stage = result["timings"]["mask_statistics"]
    rate = n / stage
    ratio = "-" if not compared else (f"{rate / baseline:.2f}x" if baseline else "1.00x")
    print(
        f"{label:<36}{n:>12,}{rate:>14,.0f}{ratio:>8}{n / result['seconds']:>14,.0f}"
        f"{result['seconds']:>10.1f}{result['peak_bytes'] / n:>12.0f}"
        f"{result['peak_bytes'] / 2**20:>10.0f}"
    )
    stages = ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items())
    print(f"{'':<36}stages (s): {stages}")
    print(f"{'':<36}{result['method']}: ESS {result['ess_share']:.1%} of the active patches")
    if result.get("placement"):
        windows = result["placement"]["class_windows"]
        added = ", ".join(f"class {value} {count}" for value, count in windows.items())
        print(f"{'':<36}class-centred windows: {added or 'none'}")
    for line in result["warnings"]:
        print(f"{'':<36}warning: {line}")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 2_000_000, 10_000_000])
    parser.add_argument("--compare-at", type=int, nargs="*", default=[1_000_000, 2_000_000])
    parser.add_argument("--side", type=int, default=16384, help="raster width and height (px)")
    parser.add_argument("--size", type=int, default=256, help="window size (px)")
    parser.add_argument("--stride", type=int, default=16, help="window stride (px)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the data")
    parser.add_argument("--methods", nargs="+", default=["default"], help="sampling methods")
    parser.add_argument("--runs", nargs="+", default=None, help="only these runs (labels)")
    parser.add_argument("--masks", choices=["dubai", "rare"], default="dubai")
    parser.add_argument("--source", choices=["records", "rasters"], default="records")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        per_raster = ((args.side - args.size) // args.stride + 1) ** 2
        count = math.ceil(max(args.sizes + args.compare_at) / per_raster)
        start = time.perf_counter()
        rasters = write_rasters(work, count, args.side, args.masks)
        origin = "mosaics of the real Dubai masks" if DUBAI_DATA.is_dir() else "synthetic masks"
        if args.masks == "rare":
            origin = "synthetic masks with a 0.17 % class of single pixels"
        size_mb = sum(p.stat().st_size for p in rasters) / 1e6
        print(
            f"masks: {count} x {args.side}^2 px {origin}, tiled 256, deflate ({size_mb:.0f} MB, "
            f"ready in {time.perf_counter() - start:.0f} s); windows {args.size} px every "
            f"{args.stride} px ({per_raster:,} per raster); cores: {os.cpu_count()}"
        )
        header = (
            f"{'run':<36}{'patches':>12}{'stats p/s':>14}{'ratio':>8}{'end-to-end p/s':>14}"
            f"{'wall s':>10}{'peak B/p':>12}{'peak MB':>10}"
        )
        for n in sorted(set(args.sizes) | set(args.compare_at)):
            if args.source == "rasters":
                pairs = rasters[: math.ceil(n / per_raster)]
                source = {
                    "rasters": [{"image_path": str(p), "mask_path": str(p)} for p in pairs],
                    "patch_size": args.size,
                    "stride": args.stride,
                }
            else:
                records = work / f"records_{args.masks}_{n}.parquet"
                if not records.exists():
                    write_records(records, rasters, n, args.side, args.size, args.stride)
                source = {"records_path": str(records)}
            runs = COMPARED if n in args.compare_at else (SCALED,)
            runs = [run for run in runs if args.runs is None or run[0] in args.runs]
            print(f"\n{n:,} patches")
            print(header)
            baseline = None
            for label, compute, workers in runs:
                for method in args.methods:
                    result = build(work, source, compute, workers, method)
                    run_label = label if len(args.methods) == 1 else f"{label}, {method}"
                    rate = show(run_label, result, baseline, n in args.compare_at)
                    baseline = baseline or rate


if __name__ == "__main__":
    main()
