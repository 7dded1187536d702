"""The statistics of a comparison: paired gains with Student-t intervals, curves, plateaus.

Every arm trains with the same seeds as the baseline, so a gain is measured seed by seed (the
difference of two runs that drew from the same random streams). Its 95 % interval is the paired
Student-t interval of the mean difference, with n - 1 degrees of freedom: over a handful of
seeds it holds its level, where a percentile bootstrap over the seeds covers 51 % at 2 seeds and
85 % at 5 (`bench/interval_coverage.py` measures both).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95
TAUS = (0.0, 1.0)
METRICS = ("iou", "precision", "recall")
# Below this many paired seeds no arm is judged: intervals over fewer are too wide to mean much
# and, for the percentile bootstrap that came before, far too narrow.
MIN_SEEDS_TO_JUDGE = 5
# The largest number of seeds `seeds_to_resolve` searches; beyond it the answer is "more than".
RESOLVE_CAP = 1000
INTEREST, REST, MIOU = "interest", "rest", "miou"
GROUPS = (INTEREST, REST)


def t_quantile(n: int) -> float:
    """Return the two-sided 95 % Student-t quantile for the mean of `n` values (n - 1 df)."""
    return float(stats.t.ppf(0.5 + LEVEL / 2, n - 1))


def paired_t_interval(differences: np.ndarray) -> tuple[float, float]:
    """Return the 95 % Student-t interval of the mean of paired `differences`.

    mean ± t(0.975, n - 1) · s / √n with s the sample standard deviation; (NaN, NaN) for fewer
    than two differences, which have no spread to measure.
    """
    differences = np.asarray(differences, dtype=np.float64)
    n = differences.size
    if n < 2:
        return float("nan"), float("nan")
    mean = differences.mean()
    half = t_quantile(n) * differences.std(ddof=1) / np.sqrt(n)
    return float(mean - half), float(mean + half)


def seeds_to_resolve(mean: float, sd: float, cap: int = RESOLVE_CAP) -> int | None:
    """Return the fewest seeds whose 95 % interval would exclude 0, at this mean and spread.

    The smallest n >= 2 with t(0.975, n - 1) · sd / √n < |mean|: how many seeds would resolve an
    interval that spans 0 if the observed mean and standard deviation held. `cap + 1` means
    more than `cap`; None when the mean is 0 or a figure is not a number (nothing resolves it).
    """
    if not (np.isfinite(mean) and np.isfinite(sd)) or mean == 0:
        return None
    n = np.arange(2, cap + 1)
    half = stats.t.ppf(0.5 + LEVEL / 2, n - 1) * sd / np.sqrt(n)
    resolved = np.flatnonzero(half < abs(mean))
    return int(n[resolved[0]]) if resolved.size else cap + 1


def paired_gain(arm: pd.Series, baseline: pd.Series) -> dict[str, Any]:
    """Return the mean gain of `arm` over `baseline` (both indexed by seed) with its interval.

    Keys: `mean`, `low` and `high` (the 95 % Student-t interval; NaN with one seed), `n`,
    `sd` (of the per-seed gains), `wins` (the seeds whose gain rounds above 0 at one decimal of
    a percentage point: a gain of exactly 0 is no win), `per_seed`, `method` and
    `seeds_to_resolve` (see `seeds_to_resolve`).
    """
    gain = (arm - baseline).dropna()
    values = gain.to_numpy(dtype=np.float64)
    nan = float("nan")
    mean = float(values.mean()) if values.size else nan
    sd = float(values.std(ddof=1)) if values.size > 1 else nan
    low, high = paired_t_interval(values)
    return {
        "mean": mean,
        "low": low,
        "high": high,
        "n": int(values.size),
        "sd": sd,
        "wins": int((np.round(values * 100, 1) > 0).sum()),
        "per_seed": {str(int(s)): float(g) for s, g in gain.items()},
        "method": "student_t",
        "level": LEVEL,
        "seeds_to_resolve": seeds_to_resolve(mean, sd),
    }


def class_groups(classes: list[int], interest: list[int]) -> dict[str, list[int]]:
    """Return the classes of the `interest` and `rest` rows.

    `rest` is every evaluated class that is not of interest, catch-all classes included (a
    catch-all is left out of the default classes of interest, not out of the evaluation), so
    the two groups together are the classes that mIoU averages.
    """
    chosen = [int(c) for c in interest]
    return {INTEREST: chosen, REST: [int(c) for c in classes if int(c) not in chosen]}


def with_group_rows(runs: pd.DataFrame, interest: list[int]) -> pd.DataFrame:
    """Return `runs` with `interest` and `rest` rows: per arm, seed, step and tau, the mean
    IoU, precision and recall over the group's classes (classes without a value left out)."""
    classes = [int(c) for c in runs["class"].unique() if c not in (MIOU, *GROUPS)]
    frames = [runs]
    for group, members in class_groups(sorted(classes), interest).items():
        rows = runs[runs["class"].isin([str(c) for c in members])]
        means = rows.groupby(["arm", "seed", "step", "tau"], sort=False)[list(METRICS)].mean()
        frames.append(means.reset_index().assign(**{"class": group}))
    return pd.concat(frames, ignore_index=True)


def _class_order(runs: pd.DataFrame) -> list[str]:
    named = {MIOU, *GROUPS}
    return sorted({c for c in runs["class"].unique() if c not in named}, key=int) + [
        MIOU,
        *GROUPS,
    ]


def summarise(
    runs: pd.DataFrame,
    arms: list[str],
    baseline: str,
    budgets: dict[str, int],
    interest: list[int],
    taus: tuple[float, ...] = TAUS,
) -> dict[str, Any]:
    """Return per budget and tau, per arm and row: the means, the per-seed IoU, and the gain.

    The rows are the classes, `miou`, and the groups `interest` and `rest` (see
    `class_groups`), each group's IoU averaged per seed before the seeds are paired. The keys
    are `<budget>_tau<tau>` (e.g. `long_tau0`), each `{"step", "arms": {arm: {row: {iou,
    precision, recall, per_seed_iou, gain_iou}}}}`; the baseline has no `gain_iou`.
    """
    runs = with_group_rows(runs, interest)
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
                        entry[c]["gain_iou"] = paired_gain(subset["iou"], base["iou"])
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


def spans_zero(gain: dict[str, Any]) -> bool:
    """Return whether a gain's interval, read at the printed precision, holds 0."""
    if not gain["n"] or not np.isfinite(gain["low"]) or not np.isfinite(gain["high"]):
        return False
    return _points(gain["low"]) <= 0 <= _points(gain["high"])


def verdict(
    summary: dict[str, Any], arms: list[str], baseline: str, classes: list[int]
) -> dict[str, Any]:
    """Return, per arm, whether it raises the classes of interest without lowering mIoU.

    At the long budget and tau 0, an arm helps when the IoU gain of every class of interest has
    a 95 % interval above 0 and its mIoU gain's interval is not wholly below 0. Bounds are read
    at the precision the tables print (0.1 IoU points): a class whose IoU moves from 0 to 0.001 %
    has not been raised. With fewer than `MIN_SEEDS_TO_JUDGE` paired seeds nothing is judged
    (`judged` false, every arm's `helps` None). Each arm's `unresolved` maps the rows (classes
    of interest, `interest`, `rest`, `miou`) whose interval spans 0 to `seeds_to_resolve`.
    """
    table = summary["long_tau0"]["arms"]
    others = [arm for arm in arms if arm != baseline]
    n_seeds = min((table[arm][MIOU]["gain_iou"]["n"] for arm in others), default=0)
    judged = n_seeds >= MIN_SEEDS_TO_JUDGE
    result: dict[str, Any] = {
        "judged": judged,
        "n_seeds": n_seeds,
        "min_seeds": MIN_SEEDS_TO_JUDGE,
        "helps": [],
        "does_not_help": [],
        "arms": {},
    }
    for arm in others:
        gains = {str(c): table[arm][str(c)]["gain_iou"] for c in classes}
        miou = table[arm][MIOU]["gain_iou"]
        raised = [c for c, g in gains.items() if g["n"] and _points(g["low"]) > 0]
        raises = bool(gains) and len(raised) == len(gains)
        lowers = bool(miou["n"]) and _points(miou["high"]) < 0
        helps = raises and not lowers
        groups = {g: table[arm][g]["gain_iou"] for g in GROUPS if g in table[arm]}
        rows = {**gains, **groups, MIOU: miou}
        result["arms"][arm] = {
            "raises_classes_of_interest": raises,
            "classes_raised": [int(c) for c in raised],
            "lowers_miou": lowers,
            "helps": helps if judged else None,
            "unresolved": {row: g["seeds_to_resolve"] for row, g in rows.items() if spans_zero(g)},
        }
        if judged:
            result["helps" if helps else "does_not_help"].append(arm)
    return result
