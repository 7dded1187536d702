"""Each arm's training table: its build, run once, and an optional CoreSet over it.

A finished build is reused when the arm's merged configs are unchanged (a digest of them is
kept beside the table) and its table and inputs are those its marker recorded (`compare.reuse`); embeddings-mode arms share one embeddings cache, so each patch is
embedded once whatever the number of arms and seeds.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbalance.atomic import atomic_writer
from patchbalance.compare.config import (
    CORESET_DEFAULTS,
    RANDOM_SUBSET,
    Arm,
    ComparePlan,
    digest,
)
from patchbalance.compare.files import build_input_paths
from patchbalance.compare.reuse import (
    FILES,
    INPUTS,
    file_hashes,
    input_fingerprint,
    read_marker,
    recorded_problem,
    table_problem,
)
from patchbalance.errors import InputError
from patchbalance.sampling.figures import SamplingFigures, figures_from_table
from patchbalance.table import SAMPLER_WEIGHT, read_table, write_table

log = logging.getLogger(__name__)

DONE = "done.json"
# Settings that change how vectors are computed, not what they are: left out of the cache name.
EMBEDDING_RUNTIME_KEYS = (
    "batch_size",
    "num_workers",
    "use_gpu",
    "parquet_path",
    "checkpoint_every",
)


@dataclass
class ArmTable:
    """An arm's training table on disk and what its weights will do (SPEC §5)."""

    name: str
    path: Path
    figures: SamplingFigures
    reused: bool
    notes: dict[str, Any]
    key: str  # a digest of what made the table: a run trained on another table is not reused


def _build_mapping(plan: ComparePlan, arm: Arm, folder: Path) -> dict[str, Any]:
    """Return the arm's build mapping, writing its table into `folder` and nothing else."""
    mapping = copy.deepcopy(arm.build)
    output = dict(mapping.get("output") or {})
    output.update(
        csv_path=str(folder / "table.csv"),
        summary_path=str(folder / "table.summary.json"),
        footprints_path=None,
        postgres_table=None,
    )
    mapping["output"] = output
    embeddings = mapping.get("embeddings") or {}
    if mapping.get("mode") == "embeddings" and not embeddings.get("parquet_path"):
        settings = {k: v for k, v in embeddings.items() if k not in EMBEDDING_RUNTIME_KEYS}
        cache = plan.output_dir / "embeddings" / f"{digest(settings)}.parquet"
        mapping["embeddings"] = {**embeddings, "parquet_path": str(cache)}
    return mapping


def _finished(folder: Path, key: str, target: str, inputs: dict, arm: str) -> bool:
    """Return True when the build in `folder` can be reused (`compare.reuse`); log why not."""
    marker = read_marker(folder / DONE)
    if marker is None or marker.get("key") != key or not (folder / target).is_file():
        return False
    problem = recorded_problem(folder, marker, inputs) or table_problem(folder / target)
    if problem:
        log.warning("arm %s: %s; building it again", arm, problem)
    return problem is None


def _reused_table(
    folder: Path, target: str, arm: str
) -> tuple[pd.DataFrame, SamplingFigures] | None:
    """Return a finished build's table and figures, or None (logged) when it does not parse."""
    try:
        table = read_table(folder / target)
        return table, figures_from_table(table, where=str(folder / target))
    except InputError as exc:
        log.warning("arm %s: its finished table cannot be reused (%s); building it again", arm, exc)
        return None


def _mark_done(folder: Path, payload: dict[str, Any]) -> None:
    with atomic_writer(folder / DONE, "w") as stream:
        json.dump(payload, stream, indent=2, default=str)


def random_subset(table: pd.DataFrame, block: dict[str, Any], seed: int) -> pd.DataFrame:
    """Return `table` with a seeded random share of its pool selected and weighted 1, others 0.

    The pool and the budget follow `select-coreset` (SPEC §6): rows not excluded (nor
    low-entropy with `exclude_low_entropy`, default true), `budget` a fraction or a count.
    """
    from patchbalance.coreset.pool import budget_count, pool_mask

    pool, _ = pool_mask(table, bool(block.get("exclude_low_entropy", True)))
    rows = np.flatnonzero(pool)
    count = budget_count(
        float(block.get("budget", 0.3)), str(block.get("budget_mode", "fraction")), rows.size
    )
    chosen = np.random.default_rng(seed).choice(rows, size=count, replace=False)
    selected = np.zeros(len(table), dtype=bool)
    selected[chosen] = True
    out = table.copy()
    out["coreset_selected"] = selected
    out[SAMPLER_WEIGHT] = selected.astype(np.float64)
    return out


def _select(
    table: pd.DataFrame, block: dict[str, Any], seed: int, cache: str | None
) -> tuple[pd.DataFrame, dict]:
    """Return the arm's CoreSet table (only the selected rows weighted) and its summary.

    The embedding-based methods read the arm's embeddings cache unless the block names vectors.
    """
    if block.get("method") == RANDOM_SUBSET:
        out = random_subset(table, block, seed)
        return out, {"method": RANDOM_SUBSET, "n_selected": int(out["coreset_selected"].sum())}
    from patchbalance.coreset import run_selection

    config = {"seed": seed, **CORESET_DEFAULTS, **block}
    config.update(input_csv_path="", output_csv_path="")
    if cache and not (config.get("parquet_path") or config.get("embedding_column")):
        config["parquet_path"] = cache
    result = run_selection(table, config)
    summary = {k: v for k, v in result.summary.items() if k != "timings_s"}
    return result.table, summary


def build_arm_table(plan: ComparePlan, name: str, progress: bool = False) -> ArmTable:
    """Return arm `name`'s training table, built (and CoreSet-selected) once, then reused."""
    from patchbalance.balancing.pipeline import run_build
    from patchbalance.config import config_from_mapping

    arm = plan.arms[name]
    folder = plan.output_dir / "builds" / name
    mapping = _build_mapping(plan, arm, folder)
    key = digest(
        {
            "build": {**mapping, "num_workers": None, "compute": None},
            "coreset": arm.coreset,
            "seed": plan.first_seed if arm.coreset is not None else None,
        }
    )
    target = "table.csv" if arm.coreset is None else "coreset.csv"
    inputs = input_fingerprint(
        {
            **build_input_paths(arm.build, arm.build_base),
            **build_input_paths(arm.coreset or {}, arm.build_base),
        }
    )
    finished = None
    if _finished(folder, key, target, inputs, name):
        finished = _reused_table(folder, target, name)
    if finished is not None:
        log.info("arm %s: reusing its finished build in %s", name, folder)
        table, figures = finished
        notes = json.loads((folder / DONE).read_text()).get("notes", {})
    else:
        log.info("arm %s: building its table", name)
        (folder / DONE).unlink(missing_ok=True)
        # Relative paths inside the records are relative to the build config's folder.
        config = config_from_mapping(mapping, base_dir=arm.build_base)
        built = run_build(config, progress=progress)
        table = built.table
        notes: dict[str, Any] = {}
        if "embeddings" in built.summary:
            notes["embeddings"] = built.summary["embeddings"]
        if arm.coreset is not None:
            cache = (mapping.get("embeddings") or {}).get("parquet_path")
            if mapping.get("mode") != "embeddings":
                cache = None
            table, notes["coreset"] = _select(table, arm.coreset, plan.first_seed, cache)
            write_table(table, folder / target)
        hashes = file_hashes(folder, [target])
        _mark_done(folder, {"key": key, "arm": name, "notes": notes, FILES: hashes, INPUTS: inputs})
        # The build's own figures, unless a CoreSet replaced its weights.
        figures = built.figures
        if arm.coreset is not None:
            figures = figures_from_table(table, where=str(folder / target))
    return ArmTable(name, folder / target, figures, finished is not None, notes, key)


def rarest_classes(figures: SamplingFigures, catch_all: list[int], count: int = 2) -> list[int]:
    """Return the `count` classes with the lowest pixel share of the pool, catch-alls left out.

    Classes that never occur in the pool are left out too: no weighting can raise them.
    """
    shares = dict(zip(figures.class_values, figures.uniform_share, strict=True))
    real = [c for c in sorted(shares) if c not in set(catch_all) and shares[c] > 0]
    return sorted(real, key=lambda c: shares[c])[:count]
