"""Run the CUDA paths of patchbalance once, each figure beside its baseline; write gpu.json/md.

Steps, in order, each under its own time limit and the whole under `--budget` seconds:

1. data: demo-style GeoTIFF mosaics and a records table (20,000 windows of 224 px).
2. embeddings, DINOv2 ViT-S/14 and ViT-B/14 with random weights: a real `build-balanced-dataset`
   run (mode embeddings, use_gpu, bf16) against the same model's forward-only throughput.
3. kNN: the `exact` uniqueness backend at 155,000 x 768, k = 5, against faiss-cpu IndexFlatIP.
4. CoreSet: cb and fd at 155,000 patches with `device: cuda` against `device: cpu`.
5. train: `patchbalance train` steps/s with bf16 autocast against fp32.

Each CUDA path is checked from inside the product: the device of the tensors it used, as the
product records it (embeddings `computed_on`, uniqueness `device`, cb `cb_backend` plus the
CUDA memory the step allocated, train `trained_on`). The exit status is 1 when a step failed or
timed out, a CUDA path ran elsewhere, or a result disagreed with its baseline (neighbours,
picks) or wrote no metrics. `--cpu --small` runs every step tiny on the CPU.

    bash bench/gpu/run.sh OUT_DIR [--cpu] [--small]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "bench")]

from report import write_report  # noqa: E402
from sizes import FULL, SMALL, Sizes  # noqa: E402
from steps import Context, coreset_step, embeddings_step, knn_step, train_step  # noqa: E402

DEFAULT_BUDGET_S = 420
# A step is not started with less time than this left.
MIN_STEP_S = 5
# Results that must agree with their baseline, or the path is wrong however fast it is.
AGREEMENTS = {
    "knn": [("neighbours_identical",)],
    "coreset": [("cb", "same_picks"), ("fd", "same_picks")],
    "train": [("metrics_written",)],
}
# Steps that make their own data; the others read the rasters of step `data`.
SYNTHETIC_STEPS = ("data", "knn", "coreset")


class StepTimeout(Exception):
    """A step ran past its time limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `StepTimeout` in the main thread once `seconds` have passed (checked between calls
    into C: a single long faiss or BLAS call finishes first)."""

    def expire(signum: int, frame: Any) -> None:
        raise StepTimeout(f"ran past its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def data_step(ctx: Context) -> dict[str, Any]:
    """Write the rasters and records; return their counts."""
    from scenes import write_check_data

    records = write_check_data(ctx.work / "data", ctx.sizes, ctx.cores)
    ctx.records = records
    ctx.records_path = ctx.work / "data" / "records.csv"
    return {
        "patches": len(records),
        "patch": ctx.sizes.patch,
        "stride": ctx.sizes.stride,
        "rasters": int(records["image_path"].nunique()),
        "raster_side": ctx.sizes.raster_side,
    }


def environment(device: str) -> dict[str, Any]:
    """Return the machine, library versions and commit the figures come from."""
    import torch

    import patchbalance

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "patchbalance": patchbalance.__version__,
        "patchbalance_from": str(Path(patchbalance.__file__).parent),
        "device_under_test": device,
    }
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        info["commit"] = commit.stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


def _run_step(name: str, step: Callable[[Context], dict], ctx: Context, limit: float) -> dict:
    """Return the step's result with `status`, `seconds` and, on failure, the error."""
    print(f"[{name}] start (limit {limit:.0f} s)", flush=True)
    started = time.perf_counter()
    try:
        with time_limit(limit):
            result = step(ctx)
        result["status"] = "ok"
    except StepTimeout as exc:
        result = {"status": "timed out", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, then the next step runs
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.perf_counter() - started, 2)
    print(f"[{name}] {result['status']} in {result['seconds']} s", flush=True)
    return result


def _steps(sizes: Sizes) -> list[tuple[str, Callable[[Context], dict]]]:
    steps: list[tuple[str, Callable[[Context], dict]]] = [("data", data_step)]
    for model in sizes.models:
        steps.append((f"embeddings_{model.key}", partial(embeddings_step, model=model)))
    steps += [("knn", knn_step), ("coreset", coreset_step), ("train", train_step)]
    return steps


def verdict(report: dict[str, Any]) -> list[str]:
    """Return one line per problem: a step that did not finish, a path that ran elsewhere."""
    problems = []
    for name, result in report["steps"].items():
        if result.get("status") != "ok":
            problems.append(f"{name}: {result.get('status')}: {result.get('error', '')}".strip())
        for check, seen in result.get("device_checks", {}).items():
            if not seen["ok"]:
                problems.append(
                    f"{name}: {check} ran on {seen['seen']!r}, expected {seen['expected']!r}"
                )
        for path in AGREEMENTS.get(name, ()):
            value = result
            for key in path:
                value = value.get(key, {}) if isinstance(value, dict) else {}
            if result.get("status") == "ok" and value is not True:
                problems.append(f"{name}: {'.'.join(path)} is {value!r}, not true")
    if report["device_under_test"] == "cuda" and not report["environment"]["cuda_available"]:
        problems.insert(0, "CUDA is not available on this machine")
    return problems


def _save(report: dict[str, Any], out: Path) -> None:
    report["problems"] = verdict(report)
    report["ok"] = not report["problems"]
    temporary = out / "gpu.json.tmp"
    temporary.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, out / "gpu.json")
    try:
        write_report(report, out / "gpu.md")
    except Exception:  # noqa: BLE001 - gpu.json holds every figure; the page must not stop the run
        traceback.print_exc()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where gpu.json and gpu.md go")
    parser.add_argument("--cpu", action="store_true", help="check the CPU paths, not CUDA")
    parser.add_argument("--small", action="store_true", help="tiny sizes (the CPU test)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds in all")
    parser.add_argument("--coreset-budget", type=float, help="cb/fd budget (fraction)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    sizes = SMALL if args.small else FULL
    if args.coreset_budget:
        sizes = dataclasses.replace(sizes, coreset_budget=args.coreset_budget)
    device = "cpu" if args.cpu else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="patchbalance-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device_under_test": device,
        "small": args.small,
        "budget_s": args.budget,
        "environment": environment(device),
        "steps": {},
    }
    setup = args.out / "setup.json"
    if setup.is_file():
        report["setup"] = json.loads(setup.read_text(encoding="utf-8"))
    ctx = Context(work=work, sizes=sizes, device=device, cores=os.cpu_count() or 1)
    print(f"patchbalance GPU check: device {device}, work {work}", flush=True)
    try:
        for name, step in _steps(sizes):
            left = args.budget - (time.perf_counter() - started)
            if device == "cuda" and not report["environment"]["cuda_available"]:
                report["steps"][name] = {"status": "skipped", "error": "no CUDA"}
            elif ctx.records is None and name not in SYNTHETIC_STEPS:
                report["steps"][name] = {"status": "skipped", "error": "no data (step data)"}
            elif left < MIN_STEP_S:
                report["steps"][name] = {"status": "skipped", "error": "the time budget ran out"}
            else:
                report["steps"][name] = _run_step(name, step, ctx, min(sizes.budgets[name], left))
            report["seconds"] = round(time.perf_counter() - started, 2)
            _save(report, args.out)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    for line in report["problems"]:
        print(f"PROBLEM: {line}", flush=True)
    print(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
