"""`run_compare`: builds every arm once, trains every arm x seed, and gathers the metrics.

Each run trains through `patchbalance.train.train_from_config`, the code behind `patchbalance
train`, with the arm's merged train config and these settings of the comparison: the seed, the
arm's table, weighted draws of `eval_every x batch_size` patches per "epoch" (so validation on
the whole `val_dataset` comes every `eval_every` steps: the learning curve), `steps /
eval_every` epochs, and prior correction tau = 1 beside tau = 0. A run is finished when its
completion marker matches its settings, its files and inputs (`compare.reuse`); a finished
run is reused, any other run folder is cleared and trained again.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import re
import shutil
import signal
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from patchbalance.atomic import atomic_writer, file_sha256
from patchbalance.compare.config import LENGTH_KEYS, ComparePlan, check_class_keys, digest
from patchbalance.compare.files import train_input_paths
from patchbalance.compare.preflight import naming_arm
from patchbalance.compare.reuse import (
    FILES,
    INPUTS,
    TABLE,
    file_hashes,
    input_fingerprint,
    metrics_problem,
    read_marker,
    recorded_problem,
)
from patchbalance.compare.statistics import TAUS
from patchbalance.compare.tables import DONE, ArmTable, build_arm_table, rarest_classes

log = logging.getLogger(__name__)

METRICS = "metrics.csv"


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
    table_sha256: str = ""  # the arm's table the run trains on
    table_reused: bool = True  # whether that table is a finished build reused as it was
    inputs: dict[str, Any] = field(default_factory=dict)  # `compare.reuse.input_fingerprint`

    @property
    def name(self) -> str:
        """Return "ARM/seedN"."""
        return f"{self.arm}/seed{self.seed}"

    def finished(self) -> bool:
        """Return True when the run can be reused (`compare.reuse`); log why a marked one can't."""
        marker = read_marker(self.run_dir / DONE)
        if marker is None or marker.get("key") != self.key:
            return False
        problem = self._reuse_problem(marker)
        if problem:
            log.warning("run %s: %s; training it again", self.name, problem)
        return problem is None

    def _reuse_problem(self, marker: dict[str, Any]) -> str | None:
        recorded = marker.get(TABLE)  # None in markers written before tables were hashed
        if not (self.table_reused if recorded is None else recorded == self.table_sha256):
            return "its arm's table is not the one it trained on"
        return recorded_problem(self.run_dir, marker, self.inputs) or metrics_problem(
            self.run_dir / METRICS, self.epochs
        )


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
        with naming_arm(job.arm):
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
        TABLE: job.table_sha256,
        FILES: file_hashes(job.run_dir, [METRICS]),
        INPUTS: job.inputs,
    }
    with atomic_writer(job.run_dir / DONE, "w") as stream:
        json.dump(marker, stream, default=str)
    return seconds


def _jobs(plan: ComparePlan, tables: dict[str, ArmTable]) -> list[RunJob]:
    jobs = []
    train_base = Path(plan.configs.get("train", Path.cwd())).parent
    # Arm by arm, so that an interrupted comparison leaves whole arms.
    for arm, table in tables.items():
        table_sha256 = file_sha256(table.path)
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
                    table_sha256=table_sha256,
                    table_reused=table.reused,
                    inputs=input_fingerprint(train_input_paths(config, train_base)),
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

    def record(job: RunJob, spent: float) -> None:
        seconds[job.name] = spent
        log.info(
            "[%d/%d] %s: %.0f s",
            len(seconds) - len(jobs) + len(pending),
            len(pending),
            job.name,
            spent,
        )

    if workers == 1:
        for job in pending:
            record(job, train_run(job))
    else:
        train_in_pool(pending, workers, record)
    return seconds, [job.name for job in pending]


def _ignore_interrupts() -> None:
    """Let a worker finish its training when the terminal's Ctrl-C reaches its process group."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_in_pool(
    pending: list[Any], workers: int, record: Callable, train: Callable = train_run
) -> None:
    """Call `train(job)` for every job in `workers` processes, a job given only to a free one.

    `record(job, result)` is called in this process as each finishes.

    On an interrupt (Ctrl-C, `kill -INT`) no other run starts: the running ones finish and are
    recorded, then `KeyboardInterrupt` goes on up.
    """
    # Spawned, not forked: the builds may have run torch in this process, and a forked child
    # of a process that used OpenMP threads can hang.
    context = multiprocessing.get_context("spawn")
    queue, running = list(pending), {}
    with ProcessPoolExecutor(workers, context, initializer=_ignore_interrupts) as pool:
        try:
            while queue or running:
                while queue and len(running) < workers:
                    job = queue.pop(0)
                    running[pool.submit(train, job)] = job
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    record(running.pop(future), future.result())
        except KeyboardInterrupt:
            log.warning(
                "interrupted: finishing the %d running training(s) and starting none of the %d "
                "queued",
                len(running),
                len(queue),
            )
            for future in as_completed(running):
                if future.exception() is None:
                    record(running[future], future.result())
            raise


def run_metrics(run_dir: Path, arm: str, seed: int) -> pd.DataFrame:
    """Return one row per (step, tau, class) of a run's metrics.csv: IoU, precision, recall."""
    metrics = pd.read_csv(run_dir / METRICS)
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

    Raises `ConfigError` before any training when a class of interest, a catch-all class or a
    named class is not a class of the baseline's table.
    """
    with naming_arm(plan.baseline, plan.where):
        baseline = build_arm_table(plan, plan.baseline, progress)
    interest = plan.config.classes_of_interest or rarest_classes(
        baseline.figures, plan.config.catch_all
    )
    check_class_keys(plan.config, baseline.figures.class_values, plan.where, "the baseline's table")
    tables = {plan.baseline: baseline}
    for name in plan.arms:
        if name != plan.baseline:
            with naming_arm(name, plan.where):
                tables[name] = build_arm_table(plan, name, progress)
    return tables, list(interest)


class CompareInterrupted(KeyboardInterrupt):
    """An interrupted comparison, with the metrics of the runs that had finished."""

    def __init__(self, runs: pd.DataFrame, total: int) -> None:
        super().__init__()
        self.runs = runs
        self.total = total


def _gathered(jobs: list[RunJob]) -> pd.DataFrame:
    """Return the metrics of `jobs`, one row per (run, step, tau, class)."""
    frames = [run_metrics(job.run_dir, job.arm, job.seed) for job in jobs]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def run_compare_runs(plan: ComparePlan, progress: bool = False) -> CompareRuns:
    """Build every arm, train every arm x seed (reusing finished work), gather the metrics."""
    tables, interest = build_all(plan, progress)
    jobs = _jobs(plan, tables)
    try:
        seconds, trained = train_all(plan, jobs)
    except KeyboardInterrupt:
        finished = [job for job in jobs if job.finished()]
        raise CompareInterrupted(_gathered(finished), len(jobs)) from None
    runs = _gathered(jobs)
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
