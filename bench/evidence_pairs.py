"""Paired gains of an evidence run, recomputed from its runs, as Markdown tables to paste.

`bench/evidence.py` (and `patchbalance compare`) report every arm against the baseline. This
script recomputes those gains from the per-seed values a work folder keeps, and compares any two
arms directly (does a CoreSet beat a random subset of the same size, does a stronger target beat
the default). Both arms of a pair trained with the same seeds, so their difference is paired
seed by seed, with the same 95 % Student-t interval (n - 1 degrees of freedom) as the compare
results:

    python bench/evidence_pairs.py WORK
    python bench/evidence_pairs.py WORK --pair coreset_cb30:random30 \\
        --pair class_target_p0.25_ess0.1:class_target_sqrt

WORK is an evidence or compare folder (its `runs.csv` and `results.json`). It prints, at the
long budget (or `--step`) and without prior correction: each arm's mean IoU; each arm's gain
over the baseline, then each `--pair` A:B's gain of A over B, on every class of interest, on
`interest` and `rest` (the mean IoU of the classes of interest and of the other classes, per
seed before pairing) and on mIoU, as "mean [low, high] (seeds better / seeds)"; how many seeds
would resolve each interval that spans 0; and for every arm whether its mean mIoU curve has
plateaued (a line fitted to the last half of the validation points rises less than
`--plateau-tolerance`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from patchbalance.compare.results import (
    SUMMARY_ROWS,
    class_label,
    gain_cell,
    markdown_text,
    percent,
    resolve_note,
)
from patchbalance.compare.statistics import (
    MIOU,
    learning_curves,
    paired_gain,
    plateau_check,
    spans_zero,
    with_group_rows,
)


def load_runs(work: Path) -> tuple[pd.DataFrame, dict]:
    """Return the runs (one row per arm, seed, step, tau, class) and the run's results.json."""
    missing = [name for name in ("runs.csv", "results.json") if not (work / name).is_file()]
    if missing:
        print(
            f"error: {work} has no {' or '.join(missing)}: point at the --work folder of a "
            "finished bench/evidence.py run (they are written when every run has finished)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    runs = pd.read_csv(work / "runs.csv")
    runs = runs.rename(columns={"method": "arm"})
    runs["class"] = runs["class"].astype(str)
    return runs, json.loads((work / "results.json").read_text())


def interest_of(results: dict[str, Any]) -> list[int]:
    """Return the classes of interest a results.json names (older ones: the rarest classes)."""
    return [int(c) for c in results.get("classes_of_interest") or results["rarest_classes"]]


def at_step(runs: pd.DataFrame, interest: list[int], step: int | None) -> pd.DataFrame:
    """Return the runs at `step` (default the last), tau 0, with the `interest`/`rest` rows."""
    step = int(runs["step"].max()) if step is None else step
    at = runs[(runs["step"] == step) & (runs["tau"] == 0)]
    return with_group_rows(at, interest)


def iou_table(at: pd.DataFrame, results: dict, rows: list[str]) -> list[str]:
    """Return a Markdown table of each arm's mean IoU (%) over the seeds on `rows`."""
    means = at.groupby(["arm", "class"], sort=False)["iou"].mean()
    lines = [
        "| arm | " + " | ".join(markdown_text(class_label(results, r)) for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for arm in at["arm"].unique():
        cells = [percent(means.get((arm, r), float("nan"))) for r in rows]
        lines.append(f"| {markdown_text(arm)} | " + " | ".join(cells) + " |")
    return lines


def gains_table(
    at: pd.DataFrame, results: dict, rows: list[str], pairs: list[tuple[str, str]]
) -> list[str]:
    """Return a Markdown table of A's paired gain over B on `rows`, one line per pair, and
    under it how many seeds would resolve each interval that spans 0."""
    lines = [
        "| A over B | " + " | ".join(markdown_text(class_label(results, r)) for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    notes = []
    for first, second in pairs:
        gains = {}
        for row in rows:
            selected = at[at["class"] == row]
            a = selected[selected["arm"] == first].set_index("seed")["iou"]
            b = selected[selected["arm"] == second].set_index("seed")["iou"]
            gains[row] = paired_gain(a, b)
        name = f"{markdown_text(first)} over {markdown_text(second)}"
        lines.append(f"| {name} | " + " | ".join(gain_cell(g) for g in gains.values()) + " |")
        unresolved = {r: g["seeds_to_resolve"] for r, g in gains.items() if spans_zero(g)}
        if unresolved:
            notes.append(f"- {name}: {resolve_note(results, unresolved)}")
    return lines + ([""] + notes if notes else [])


def report(
    runs: pd.DataFrame,
    results: dict,
    pairs: list[str],
    step: int | None,
    tolerance: float,
    every_class: bool = False,
) -> str:
    """Return the tables and plateau checks of an evidence folder as Markdown.

    The tables' columns are the classes of interest, or with `every_class` every class, then
    mIoU and the `interest` and `rest` rows.
    """
    interest = interest_of(results)
    baseline = results.get("baseline", "uniform")
    at = at_step(runs, interest, step)
    classes = interest
    if every_class:
        classes = sorted(int(c) for c in runs["class"].unique() if c.lstrip("-").isdigit())
    rows = [*(str(c) for c in classes), *SUMMARY_ROWS]
    arms = [arm for arm in at["arm"].unique() if arm != baseline]
    seeds = at[at["class"] == MIOU].groupby("arm")["seed"].nunique()
    counts = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()} to {seeds.max()}"
    lines = [
        f"Step {int(at['step'].iloc[0])}, τ = 0, {counts} seeds per arm; "
        "gains in IoU points, mean [95 % Student-t interval] (seeds better / seeds).",
        "",
        *iou_table(at, results, rows),
        "",
        *gains_table(at, results, rows, [(arm, baseline) for arm in arms]),
    ]
    if pairs:
        split = [tuple(pair.split(":", 1)) for pair in pairs]
        lines += ["", *gains_table(at, results, rows, split)]
    lines += ["", "Plateau (mean mIoU, τ = 0):", ""]
    curves = learning_curves(runs)
    for arm, curve in curves.groupby("arm", sort=False):
        curve = curve.sort_values("step")
        note = plateau_check(curve, tolerance)["note"]
        lines.append(f"- {markdown_text(arm)}: mIoU {percent(curve['mean'].iloc[-1])}; {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the gains, the paired comparisons and the plateau checks of an evidence folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="the evidence folder (runs.csv, results.json)")
    parser.add_argument("--pair", action="append", default=[], help="ARM_A:ARM_B (repeatable)")
    parser.add_argument("--step", type=int, help="the validation step (default: the last)")
    parser.add_argument("--plateau-tolerance", type=float, default=0.01)
    parser.add_argument(
        "--every-class", action="store_true", help="a column per class, not only those of interest"
    )
    args = parser.parse_args(argv)
    runs, results = load_runs(args.work)
    results.setdefault("class_names", {})
    print(report(runs, results, args.pair, args.step, args.plateau_tolerance, args.every_class))


if __name__ == "__main__":
    main()
