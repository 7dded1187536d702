"""`run_compare`: builds every arm once, trains every arm x seed, and gathers the metrics.

Each run trains through `patchbalance.train.train_from_config`, the code behind `patchbalance
train`, with the arm's merged train config and these settings of the comparison: the seed, the
arm's table, weighted draws of `eval_every x batch_size` patches per "epoch" (so validation on
the whole `val_dataset` comes every `eval_every` steps: the learning curve), `steps /
eval_every` epochs, and prior correction tau = 1 beside tau = 0. A run is finished when its
completion marker matches its settings and its metrics file holds every validation; a finished
run is reused, any other run folder is cleared and trained again.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from patchbalance.atomic import atomic_writer
from patchbalance.compare.config import LENGTH_KEYS, ComparePlan, digest
from patchbalance.compare.statistics import TAUS
from patchbalance.compare.tables import DONE, ArmTable, build_arm_table, rarest_classes
from patchbalance.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class RunJob:
    """One arm x seed training run."""

    arm: str
    seed: int
    config: dict[str, Any]
    run_dir: Path
    epochs: int
    key: str
    threads: int

    def finished(self) -> bool:
        """Return True when the run's marker matches its settings and its metrics are complete."""
        marker, metrics = self.run_dir / DONE, self.run_dir / "metrics.csv"
        if not marker.is_file() or not metrics.is_file():
            return False
        try:
            same = json.loads(marker.read_text()).get("key") == self.key
            return same and len(pd.read_csv(metrics)) == self.epochs
        except (OSError, ValueError, pd.errors.ParserError):
            return False


@dataclass
class CompareRuns:
    """What the builds and the trainings produced."""

    tables: dict[str, ArmTable]
    classes_of_interest: list[int]
    runs: pd.DataFrame
    run_seconds: dict[str, float]
    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    trained_on: dict[str, Any] = field(default_factory=dict)  # per run: device and precision


def run_config(plan: ComparePlan, arm: str, seed: int, table: Path) -> dict[str, Any]:
    """Return the train mapping of one run: the arm's config with the comparison's settings."""
    config = plan.config
    mapping = copy.deepcopy(plan.arms[arm].train)
    hyper = {
        k: v for k, v in (mapping.get("hyperparameters") or {}).items() if k not in LENGTH_KEYS
    }
    hyper["epochs"] = config.steps // config.eval_every
    batch_size = int(hyper.get("batch_size", 8))
    train_dataset = dict(mapping["train_dataset"])
    loader = dict(train_dataset.get("data_loader") or {})
    loader.update(
        weighted_sampler=True,
        weighted_sampler_num_samples=config.eval_every * batch_size,
        weighted_sampler_replacement=True,
    )
    train_dataset.update(input_csv_path=str(table), data_loader=loader)
    given = mapping.get("prior_correction")
    taus = [] if given is None else (given if isinstance(given, list) else [given])
    # Named, so that a run finished by another engine (other draws) is not reused for this one.
    mapping.setdefault("engine", "lightning")
    mapping.update(
        hyperparameters=hyper,
        train_dataset=train_dataset,
        seed=seed,
        output_dir=str(plan.output_dir / "runs" / arm / f"seed{seed}"),
        prior_correction=sorted({float(t) for t in [*taus, *TAUS] if t}),
    )
    return mapping


def train_run(job: RunJob) -> float:
    """Train one run from scratch (clearing what an interrupted try left); return its seconds."""
    import torch

    from patchbalance.train.run import train_from_config

    if job.run_dir.exists():
        shutil.rmtree(job.run_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        started = time.perf_counter()
        result = train_from_config(job.config)
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    marker = {
        "key": job.key,
        "arm": job.arm,
        "seed": job.seed,
        "seconds": seconds,
        "trained_on": getattr(result, "trained_on", {}),
    }
    with atomic_writer(job.run_dir / DONE, "w") as stream:
        json.dump(marker, stream, default=str)
    return seconds


def _jobs(plan: ComparePlan, tables: dict[str, ArmTable]) -> list[RunJob]:
    jobs = []
    # Arm by arm, so that an interrupted comparison leaves whole arms.
    for arm, table in tables.items():
        for seed in plan.seeds:
            config = run_config(plan, arm, seed, table.path)
            key = digest({"train": config, "table": table.key})
            jobs.append(
                RunJob(
                    arm=arm,
                    seed=seed,
                    config=config,
                    run_dir=Path(config["output_dir"]),
                    epochs=int(config["hyperparameters"]["epochs"]),
                    key=key,
                    threads=plan.config.threads,
                )
            )
    return jobs


def _on_gpu(plan: ComparePlan) -> bool:
    """Return True when the runs train on a GPU (they then run one at a time)."""
    device = str(plan.arms[plan.baseline].train.get("device") or "auto")
    if device == "auto":
        import torch

        return bool(torch.cuda.is_available())
    return device.startswith("cuda")


def train_all(plan: ComparePlan, jobs: list[RunJob]) -> tuple[dict[str, float], list[str]]:
    """Train every unfinished run (`jobs` at once on the CPU); return seconds and names trained."""
    finished = [job.finished() for job in jobs]
    pending = [job for job, done in zip(jobs, finished, strict=True) if not done]
    seconds: dict[str, float] = {}
    for job, done in zip(jobs, finished, strict=True):
        if done:
            marker = json.loads((job.run_dir / DONE).read_text())
            seconds[f"{job.arm}/seed{job.seed}"] = float(marker.get("seconds", 0.0))
    log.info(
        "training %d of %d runs (%d finished ones reused): %d steps each",
        len(pending),
        len(jobs),
        len(jobs) - len(pending),
        plan.config.steps,
    )
    workers = 1 if _on_gpu(plan) else min(plan.config.jobs, max(len(pending), 1))
    names = [f"{job.arm}/seed{job.seed}" for job in pending]
    if workers == 1:
        results = (train_run(job) for job in pending)
        for count, (name, spent) in enumerate(zip(names, results, strict=True), start=1):
            seconds[name] = spent
            log.info("[%d/%d] %s: %.0f s", count, len(pending), name, spent)
        return seconds, names
    # Spawned, not forked: the builds may have run torch in this process, and a forked child
    # of a process that used OpenMP threads can hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for count, (name, spent) in enumerate(
            zip(names, pool.map(train_run, pending), strict=True), start=1
        ):
            seconds[name] = spent
            log.info("[%d/%d] %s: %.0f s", count, len(pending), name, spent)
    return seconds, names


def run_metrics(run_dir: Path, arm: str, seed: int) -> pd.DataFrame:
    """Return one row per (step, tau, class) of a run's metrics.csv: IoU, precision, recall."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    classes = sorted(
        int(m.group(1)) for m in map(re.compile(r"iou_(\d+)$").match, metrics.columns) if m
    )
    frames = []
    for tau in TAUS:
        suffix = "" if tau == 0 else f"_tau{tau:g}"
        for c in [*classes, "miou"]:
            frames.append(
                pd.DataFrame(
                    {
                        "arm": arm,
                        "seed": seed,
                        "step": metrics["step"],
                        "tau": tau,
                        "class": str(c),
                        "iou": metrics[f"miou{suffix}" if c == "miou" else f"iou_{c}{suffix}"],
                        "precision": (
                            float("nan") if c == "miou" else metrics[f"precision_{c}{suffix}"]
                        ),
                        "recall": float("nan") if c == "miou" else metrics[f"recall_{c}{suffix}"],
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def build_all(plan: ComparePlan, progress: bool = False) -> tuple[dict[str, ArmTable], list[int]]:
    """Return every arm's table (the baseline's first) and the classes of interest.

    Raises `ConfigError` before any training when a class of interest is not a class of the
    baseline's table.
    """
    baseline = build_arm_table(plan, plan.baseline, progress)
    interest = plan.config.classes_of_interest or rarest_classes(
        baseline.figures, plan.config.catch_all
    )
    unknown = sorted(set(interest) - set(baseline.figures.class_values))
    if unknown:
        raise ConfigError(
            f"{plan.where}: classes_of_interest {unknown} are not classes of the baseline's "
            f"table (its classes: {baseline.figures.class_values})"
        )
    tables = {plan.baseline: baseline}
    for name in plan.arms:
        if name != plan.baseline:
            tables[name] = build_arm_table(plan, name, progress)
    return tables, list(interest)


def run_compare_runs(plan: ComparePlan, progress: bool = False) -> CompareRuns:
    """Build every arm, train every arm x seed (reusing finished work), gather the metrics."""
    tables, interest = build_all(plan, progress)
    jobs = _jobs(plan, tables)
    seconds, trained = train_all(plan, jobs)
    runs = pd.concat(
        [run_metrics(job.run_dir, job.arm, job.seed) for job in jobs], ignore_index=True
    )
    reused = [
        f"{job.arm}/seed{job.seed}" for job in jobs if f"{job.arm}/seed{job.seed}" not in trained
    ]
    trained_on = {
        f"{job.arm}/seed{job.seed}": json.loads((job.run_dir / DONE).read_text()).get(
            "trained_on", {}
        )
        for job in jobs
    }
    return CompareRuns(tables, interest, runs, seconds, trained, reused, trained_on)
