"""The statistics of a comparison: paired gains with bootstrap intervals, curves, plateaus.

Every arm trains with the same seeds as the baseline, so a gain is measured seed by seed (the
difference of two runs that drew from the same random streams) and its 95 % interval is a
percentile bootstrap over the seeds' differences.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

BOOTSTRAP_RESAMPLES = 10_000
TAUS = (0.0, 1.0)
METRICS = ("iou", "precision", "recall")


def paired_bootstrap(
    differences: np.ndarray, seed: int, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float]:
    """Return the 95 % percentile bootstrap interval of the mean of paired `differences`.

    Each resample draws as many differences as there are, with replacement, from a
    `numpy.random.default_rng(seed)` stream; the interval is the 2.5th and 97.5th percentile of
    the resampled means.
    """
    differences = np.asarray(differences, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, differences.size, size=(resamples, differences.size))
    low, high = np.percentile(differences[picks].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def paired_gain(arm: pd.Series, baseline: pd.Series, seed: int) -> dict[str, Any]:
    """Return the mean gain of `arm` over `baseline` (both indexed by seed) with its interval.

    `wins` counts the seeds whose gain rounds above 0 at one decimal of a percentage point.
    """
    gain = (arm - baseline).dropna()
    if gain.empty:
        nan = float("nan")
        return {"mean": nan, "low": nan, "high": nan, "n": 0, "wins": 0, "per_seed": {}}
    values = gain.to_numpy(dtype=np.float64)
    low, high = paired_bootstrap(values, seed)
    return {
        "mean": float(values.mean()),
        "low": low,
        "high": high,
        "n": int(values.size),
        "wins": int((np.round(values * 100, 1) > 0).sum()),
        "per_seed": {str(int(s)): float(g) for s, g in gain.items()},
    }


def _class_order(runs: pd.DataFrame) -> list[str]:
    return sorted({c for c in runs["class"].unique() if c != "miou"}, key=int) + ["miou"]


def summarise(
    runs: pd.DataFrame,
    arms: list[str],
    baseline: str,
    budgets: dict[str, int],
    seed: int,
    taus: tuple[float, ...] = TAUS,
) -> dict[str, Any]:
    """Return per budget and tau, per arm and class: the means, the per-seed IoU, and the gain.

    The keys are `<budget>_tau<tau>` (e.g. `long_tau0`), each `{"step", "arms": {arm: {class:
    {iou, precision, recall, per_seed_iou, gain_iou}}}}`; the baseline has no `gain_iou`.
    """
    out: dict[str, Any] = {}
    classes = _class_order(runs)
    for budget, step in budgets.items():
        for tau in taus:
            at = runs[(runs["step"] == step) & (runs["tau"] == tau)]
            table: dict[str, Any] = {}
            for arm in arms:
                entry: dict[str, Any] = {}
                for c in classes:
                    subset = at[(at["arm"] == arm) & (at["class"] == c)].set_index("seed")
                    base = at[(at["arm"] == baseline) & (at["class"] == c)].set_index("seed")
                    entry[c] = {metric: float(subset[metric].mean()) for metric in METRICS}
                    entry[c]["per_seed_iou"] = {
                        str(int(s)): float(v) for s, v in subset["iou"].items()
                    }
                    if arm != baseline:
                        entry[c]["gain_iou"] = paired_gain(subset["iou"], base["iou"], seed)
                table[arm] = entry
            out[f"{budget}_tau{tau:g}"] = {"step": int(step), "arms": table}
    return out


def learning_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Return per arm and validation step the mean, sample std and count of mIoU (tau 0)."""
    rows = runs[(runs["class"] == "miou") & (runs["tau"] == 0)]
    return rows.groupby(["arm", "step"])["iou"].agg(["mean", "std", "count"]).reset_index()


def plateau_check(curve: pd.DataFrame, tolerance: float) -> dict[str, Any]:
    """Return whether a mean mIoU curve (columns step, mean) has stopped rising, and why.

    A straight line is fitted to the last half of the validation points (at least three); the
    curve has plateaued when that line rises less than `tolerance` over its span. A fit rather
    than the last two points, because single validations are noisy.
    """
    if len(curve) < 3:
        return {"reached": False, "rise": None, "note": "too few validation points to judge"}
    tail = curve.iloc[-max(3, (len(curve) + 1) // 2) :]
    steps, means = tail["step"].to_numpy(float), tail["mean"].to_numpy(float)
    rise = float(np.polyfit(steps, means, 1)[0] * (steps[-1] - steps[0]))
    flat = rise < tolerance
    return {
        "reached": bool(flat),
        "rise": rise,
        "note": (
            f"mIoU over steps {int(steps[0])}-{int(steps[-1])}: the fitted line rises "
            f"{rise * 100:+.2f} points ({'<' if flat else '>='} {tolerance * 100:.1f}): "
            + ("plateaued" if flat else "still rising; this budget is not a plateau")
        ),
    }


def _points(value: float) -> float:
    """Return an IoU difference in points, rounded as the tables print it (0.1 point)."""
    return round(value * 100, 1) + 0.0


def verdict(
    summary: dict[str, Any], arms: list[str], baseline: str, classes: list[int]
) -> dict[str, Any]:
    """Return, per arm, whether it raises the classes of interest without lowering mIoU.

    At the long budget and tau 0, an arm helps when the IoU gain of every class of interest has
    a 95 % interval above 0 and its mIoU gain's interval is not wholly below 0. Bounds are read
    at the precision the tables print (0.1 IoU points): a class whose IoU moves from 0 to 0.001 %
    has not been raised.
    """
    table = summary["long_tau0"]["arms"]
    result: dict[str, Any] = {"helps": [], "does_not_help": [], "arms": {}}
    for arm in arms:
        if arm == baseline:
            continue
        gains = {str(c): table[arm][str(c)]["gain_iou"] for c in classes}
        miou = table[arm]["miou"]["gain_iou"]
        raised = [c for c, g in gains.items() if g["n"] and _points(g["low"]) > 0]
        raises = bool(gains) and len(raised) == len(gains)
        lowers = bool(miou["n"]) and _points(miou["high"]) < 0
        helps = raises and not lowers
        result["arms"][arm] = {
            "raises_classes_of_interest": raises,
            "classes_raised": [int(c) for c in raised],
            "lowers_miou": lowers,
            "helps": helps,
        }
        result["helps" if helps else "does_not_help"].append(arm)
    return result
