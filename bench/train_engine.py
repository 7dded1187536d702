"""Benchmark: wall time of one `patchbalance train` run on Lightning's Trainer vs the plain loop.

Writes the demo data and builds its balanced table, then trains the example configuration
(`conf/examples/weighted_sampler_segmentation.yaml`: smp Unet on resnet18, batch 8, the
weighted sampler, flips and rotations) for `--steps` steps with validation every
`--eval-every` steps, once with `engine: loop` and once with `engine: lightning`, alternating,
`--repeats` times, after one untimed step of each. Each time is the whole `train_from_config`
call (building the datasets, model and trainer included), as wall time and as the process's
CPU time (less sensitive to other work on a shared machine; with `--workers 0` the loader runs
in the process). Prints each time, the median of each engine and the ratios
lightning / loop (the bar: at most 1.15).

    OMP_NUM_THREADS=1 python bench/train_engine.py
    OMP_NUM_THREADS=1 python bench/train_engine.py --steps 60 --eval-every 20 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

from patchbalance.train.run import train_from_config
from training_loader import build_demo

EXAMPLE = (
    Path(__file__).resolve().parents[1]
    / "conf"
    / "examples"
    / ("weighted_sampler_segmentation.yaml")
)


def run_config(paths: dict, args: argparse.Namespace, engine: str, out: Path) -> dict:
    """Return the example configuration on the demo data, shortened as `args` says."""
    config = yaml.safe_load(EXAMPLE.read_text())
    batch_size = config["hyperparameters"]["batch_size"]
    config["hyperparameters"] = {
        "batch_size": batch_size,
        "epochs": args.steps // args.eval_every,
        "lr": 1e-3,
    }
    config["optimizer"]["lr"] = 1e-3
    config["device"] = "cpu"
    config["engine"] = engine
    config["output_dir"] = str(out)
    loader = config["train_dataset"]["data_loader"]
    loader.update(
        num_workers=args.workers, weighted_sampler_num_samples=args.eval_every * batch_size
    )
    config["train_dataset"]["input_csv_path"] = str(paths["table"])
    config["val_dataset"]["input_csv_path"] = str(paths["val"])
    config["val_dataset"]["data_loader"]["num_workers"] = args.workers
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (
        ("--steps", 40),
        ("--eval-every", 20),
        ("--repeats", 3),
        ("--workers", 0),
    ):
        parser.add_argument(name, type=int, default=default)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    paths = build_demo(args.out)
    out = paths["table"].parent
    print(
        f"demo data, example config: {args.steps} steps of batch 8, validation every "
        f"{args.eval_every} steps, {args.workers} loader workers, torch threads "
        f"{torch.get_num_threads()}"
    )
    # One untimed step of each engine first: imports and first-call costs fall on no run.
    for engine in ("loop", "lightning"):
        warm = run_config(paths, args, engine, out / f"{engine}_warmup")
        warm["hyperparameters"] = {**warm["hyperparameters"], "epochs": None, "max_steps": 1}
        train_from_config(warm)
    times: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeats):
        for engine in ("loop", "lightning"):
            config = run_config(paths, args, engine, out / f"{engine}{repeat}")
            wall, cpu = time.perf_counter(), time.process_time()
            result = train_from_config(config)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            times.setdefault((engine, "wall"), []).append(wall)
            times.setdefault((engine, "cpu"), []).append(cpu)
            print(
                f"  {engine:<9} run {repeat + 1}: wall {wall:6.1f} s, cpu {cpu:6.1f} s, "
                f"best mIoU {result.best_miou:.4f}"
            )
    for clock in ("wall", "cpu"):
        loop, lightning = (
            statistics.median(times[(name, clock)]) for name in ("loop", "lightning")
        )
        print(
            f"median {clock}: loop {loop:.1f} s, lightning {lightning:.1f} s, "
            f"ratio {lightning / loop:.3f}"
        )


if __name__ == "__main__":
    main()
