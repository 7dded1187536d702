"""Paired comparisons between two arms of one evidence run, and each arm's plateau check.

`bench/evidence.py` reports every arm against the uniform baseline. Some questions compare two
arms directly: does a CoreSet beat a random subset of the same size, does a stronger target
beat the default. Both arms trained with the same seeds, so their difference is paired seed by
seed, with the same 95 % bootstrap interval (10,000 resamples, seeded by the first seed):

    python bench/evidence_pairs.py WORK --pair coreset_cb30:random30 \\
        --pair class_target_p0.25_ess0.1:class_target_sqrt

WORK is an evidence folder (its `runs.csv` and `results.json`). It prints, at the long budget
and without prior correction, A's gain over B on the two rarest classes and on mIoU, and for
every arm whether its mean mIoU curve has plateaued (a line fitted to the last half of the
validation points rises less than `--plateau-tolerance`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from patchbalance.compare.statistics import learning_curves, paired_gain, plateau_check


def load_runs(work: Path) -> tuple[pd.DataFrame, dict]:
    """Return the runs (one row per arm, seed, step, tau, class) and the run's results.json."""
    runs = pd.read_csv(work / "runs.csv")
    runs = runs.rename(columns={"method": "arm"})
    runs["class"] = runs["class"].astype(str)
    return runs, json.loads((work / "results.json").read_text())


def pair_rows(runs: pd.DataFrame, pair: str, classes: list[str], names: dict) -> list[str]:
    """Return one printed line per class of interest and mIoU: A's paired gain over B."""
    first, second = pair.split(":")
    step = int(runs["step"].max())
    at = runs[(runs["step"] == step) & (runs["tau"] == 0)]
    seed = int(runs["seed"].min())
    lines = []
    for cls in [*classes, "miou"]:
        rows = at[at["class"] == cls]
        a = rows[rows["arm"] == first].set_index("seed")["iou"]
        b = rows[rows["arm"] == second].set_index("seed")["iou"]
        gain = paired_gain(a, b, seed)
        label = "mIoU" if cls == "miou" else names.get(cls, cls)
        lines.append(
            f"  {label:<22} {gain['mean'] * 100:+6.1f} [{gain['low'] * 100:+.1f}, "
            f"{gain['high'] * 100:+.1f}] ({gain['wins']}/{gain['n']} seeds better)"
        )
    return [f"{first} over {second}, step {step}:", *lines]


def main(argv: list[str] | None = None) -> None:
    """Print the paired comparisons and the plateau checks of an evidence folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="the evidence folder (runs.csv, results.json)")
    parser.add_argument("--pair", action="append", default=[], help="ARM_A:ARM_B (repeatable)")
    parser.add_argument("--plateau-tolerance", type=float, default=0.01)
    args = parser.parse_args(argv)
    runs, results = load_runs(args.work)
    names = {str(k): v for k, v in results.get("class_names", {}).items()}
    classes = [str(c) for c in results["rarest_classes"]]
    for pair in args.pair:
        print("\n".join(pair_rows(runs, pair, classes, names)))
    curves = learning_curves(runs)
    print("plateau (mean mIoU, tau 0):")
    for arm, curve in curves.groupby("arm", sort=False):
        note = plateau_check(curve.sort_values("step"), args.plateau_tolerance)["note"]
        last = curve.sort_values("step")["mean"].iloc[-1]
        print(f"  {arm:<48} mIoU {last * 100:5.1f}; {note}")


if __name__ == "__main__":
    main()
