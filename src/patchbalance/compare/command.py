"""`patchbalance compare CONFIG.yaml`: the comparison run end to end, its results written."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from patchbalance.atomic import atomic_writer
from patchbalance.balanced_table import read_balanced_table
from patchbalance.compare.config import (
    UNIFORM,
    UNIFORM_BUILD,
    ArmConfig,
    ComparePlan,
    load_compare_config,
)
from patchbalance.compare.engine import CompareInterrupted, CompareRuns, run_compare_runs
from patchbalance.compare.preflight import preflight
from patchbalance.compare.results import verdict_text, write_results
from patchbalance.compare.statistics import (
    class_groups,
    learning_curves,
    plateau_check,
    summarise,
    verdict,
)
from patchbalance.config.secrets import mask_secrets
from patchbalance.errors import MissingDependencyError
from patchbalance.table import SAMPLER_WEIGHT

log = logging.getLogger(__name__)


def _sampling(runs: CompareRuns) -> dict[str, Any]:
    out = {}
    for arm, table in runs.tables.items():
        figures = table.figures.to_dict()
        figures["n_drawable"] = _drawable(table)
        figures["notes"] = table.notes
        out[arm] = figures
    return out


def _drawable(table: Any) -> int:
    """Return how many rows of an arm's table can be drawn (`excluded` read by the one rule)."""
    balanced = read_balanced_table(table.path, columns=[SAMPLER_WEIGHT])
    return int((balanced.drawn_weights(warn=False) > 0).sum())


def compare_results(plan: ComparePlan, runs: CompareRuns) -> dict[str, Any]:
    """Return the results mapping (what results.json holds) of a finished comparison."""
    config = plan.config
    arms = list(runs.tables)
    budgets = {"short": config.short_budget, "long": config.steps}
    interest = runs.classes_of_interest
    summary = summarise(runs.runs, arms, plan.baseline, budgets, interest)
    curves = learning_curves(runs.runs)
    classes = sorted(int(c) for c in runs.runs["class"].unique() if c != "miou")
    names = {str(c): f"class {c}" for c in classes}
    names.update({str(k): v for k, v in (config.class_names or {}).items()})
    by_arm = {arm: curves[curves["arm"] == arm] for arm in arms}
    return {
        "settings": mask_secrets(config.model_dump(mode="json")),
        "baseline": plan.baseline,
        "arms": arms,
        "seeds": plan.seeds,
        "budgets": budgets,
        "classes": classes,
        "class_names": names,
        "classes_of_interest": interest,
        "groups": class_groups(classes, interest),
        "sampling": _sampling(runs),
        "summary": summary,
        "learning_curves": {
            arm: [
                {"step": int(r.step), "mean": float(r.mean), "std": float(r.std)}
                for r in frame.itertuples()
            ]
            for arm, frame in by_arm.items()
        },
        "plateau": {
            arm: plateau_check(frame, config.plateau_tolerance) for arm, frame in by_arm.items()
        },
        "verdict": verdict(summary, arms, plan.baseline, interest),
        "run_seconds": runs.run_seconds,
        "trained_on": runs.trained_on,
        "trained": runs.trained,
        "reused": runs.reused,
    }


def _write_runs(plan: ComparePlan, runs: pd.DataFrame) -> None:
    with atomic_writer(plan.output_dir / "runs.csv", "w") as stream:
        runs.to_csv(stream, index=False)


def run_compare(plan: ComparePlan, progress: bool = False) -> dict[str, Any]:
    """Run the comparison of `plan`; write results.json, results.md, results.html; return them."""
    started = time.perf_counter()
    preflight(plan)
    try:
        runs = run_compare_runs(plan, progress)
    except CompareInterrupted as stop:
        # Keep what finished: its runs stay reusable, and runs.csv shows them now.
        _write_runs(plan, stop.runs)
        done = stop.runs[["arm", "seed"]].drop_duplicates() if len(stop.runs) else stop.runs
        log.warning(
            "interrupted: %d of %d runs finished; %s holds them, and the same command resumes",
            len(done),
            stop.total,
            plan.output_dir / "runs.csv",
        )
        raise
    _write_runs(plan, runs.runs)
    results = compare_results(plan, runs)
    results["seconds"] = time.perf_counter() - started
    page = None
    try:
        from patchbalance.compare.html import render_compare_html

        page = render_compare_html(results)
    except MissingDependencyError as exc:  # matplotlib is an optional extra
        log.warning("skipped the HTML page: %s", exc)
    paths = write_results(results, plan.output_dir, page)
    results["outputs"] = {k: str(v) for k, v in paths.items()}
    return results


def _seeds_text(seeds: list[int], shown: int = 10) -> str:
    """Return "42, 43, 44" or, for many seeds, "42, 43, ... 1041 (1000 seeds)"."""
    if len(seeds) <= shown:
        return ", ".join(map(str, seeds))
    return f"{', '.join(map(str, seeds[: shown - 1]))}, ... {seeds[-1]} ({len(seeds)} seeds)"


def plan_text(plan: ComparePlan) -> str:
    """Return what a comparison will do (what `--dry-run` prints)."""
    config = plan.config
    runs = len(plan.arms) * config.seeds
    lines = [
        f"{len(plan.arms)} arms x {config.seeds} seeds = {runs} trainings of {config.steps} "
        f"steps, validation every {config.eval_every} (short budget {config.short_budget})",
        f"seeds: {_seeds_text(plan.seeds)}; baseline: {plan.baseline}; "
        f"{config.jobs} at a time, {config.threads} thread(s) each",
    ]
    specs = {UNIFORM: ArmConfig(build=UNIFORM_BUILD), **config.arms}
    for name in plan.arms:
        spec = specs[name]
        shown = mask_secrets(spec.model_dump(exclude_defaults=True))
        parts = [f"{key}: {value}" for key, value in shown.items()]
        lines.append(f"  {name}: {'; '.join(parts) or 'the configs as they are'}")
    lines.append(f"outputs: {plan.output_dir}")
    return "\n".join(lines)


def run_compare_command(
    config_path: Path, overrides: list[str], progress: bool, dry_run: bool = False
) -> str:
    """Run `patchbalance compare CONFIG`; return the verdict and where the results are."""
    plan = load_compare_config(config_path, overrides)
    if dry_run:
        preflight(plan)
        return "dry run: nothing built or trained\n" + plan_text(plan)
    results = run_compare(plan, progress=progress)
    trained, reused = len(results["trained"]), len(results["reused"])
    lines = [
        f"{len(results['arms'])} arms x {len(results['seeds'])} seeds: {trained} runs trained, "
        f"{reused} reused, {results['seconds'] / 60:.1f} min",
        verdict_text(results),
        "",
        *(f"{kind}: {path}" for kind, path in results["outputs"].items()),
    ]
    return "\n".join(lines)
