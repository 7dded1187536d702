"""The statistics of `patchbalance compare`: Student-t intervals, wins, groups, plateau, verdict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from patchbalance.compare.statistics import (
    paired_gain,
    paired_t_interval,
    plateau_check,
    seeds_to_resolve,
    summarise,
    verdict,
)

# Two-sided 95 % Student-t quantiles from a printed table: t(0.975, df).
T_TABLE = {1: 12.706, 2: 4.303, 16: 2.120, 17: 2.110}


def test_the_interval_is_the_mean_plus_minus_t_times_the_standard_error():
    # Differences 1, 2, 3: mean 2, sample standard deviation 1.
    low, high = paired_t_interval(np.array([1.0, 2.0, 3.0]))
    half = T_TABLE[2] * 1.0 / np.sqrt(3)
    assert (low, high) == pytest.approx((2 - half, 2 + half), rel=1e-3)


def test_one_seed_has_no_interval():
    assert np.isnan(paired_t_interval(np.array([0.2]))).all()
    gain = paired_gain(pd.Series([0.5], index=[42]), pd.Series([0.3], index=[42]))
    assert gain["n"] == 1 and gain["mean"] == pytest.approx(0.2)
    assert np.isnan(gain["low"]) and np.isnan(gain["high"]) and gain["seeds_to_resolve"] is None


@pytest.mark.parametrize("n", [3, 5, 10])
def test_the_interval_covers_a_null_gain_95_percent_of_the_time(n):
    draws = np.random.default_rng([2026, n]).normal(0.0, 0.03, size=(2000, n))
    bounds = np.array([paired_t_interval(row) for row in draws])
    covered = np.mean((bounds[:, 0] <= 0) & (bounds[:, 1] >= 0))
    assert 0.935 <= covered <= 0.965


def test_a_gain_of_exactly_zero_is_not_a_win():
    seeds = [42, 43, 44]
    arm = pd.Series([0.5, 0.6, 0.7], index=seeds)
    base = pd.Series([0.5, 0.5, 0.8], index=seeds)  # gains 0, +0.1, -0.1
    gain = paired_gain(arm, base)
    assert gain["wins"] == 1 and gain["n"] == 3
    assert gain["per_seed"] == pytest.approx({"42": 0.0, "43": 0.1, "44": -0.1})


def test_seeds_to_resolve_is_the_fewest_seeds_whose_interval_excludes_zero():
    # Mean 1, sd 2: 17 seeds give 2.120 * 2 / sqrt(17) = 1.028 > 1, 18 give 0.995 < 1.
    assert T_TABLE[16] * 2 / np.sqrt(17) > 1 > T_TABLE[17] * 2 / np.sqrt(18)
    assert seeds_to_resolve(1.0, 2.0) == 18
    assert seeds_to_resolve(-1.0, 2.0) == 18
    assert seeds_to_resolve(0.0, 2.0) is None
    assert seeds_to_resolve(1e-6, 1.0) == 1001  # more than the 1000 searched
    assert seeds_to_resolve(0.01, 0.0) == 2


def curve(means: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"step": np.arange(1, len(means) + 1) * 100, "mean": means})


def test_the_plateau_check_fits_the_latest_validation_points():
    # A line through (200, 0.5), (300, 0.5), (400, 0.9): slope 0.002 per step, 0.4 over 200.
    rising = plateau_check(curve([0.5, 0.5, 0.5, 0.9]), tolerance=0.01)
    assert not rising["reached"] and rising["rise"] == pytest.approx(0.4)
    # Three points: all of them.
    assert plateau_check(curve([0.5, 0.5, 0.9]), 0.01)["rise"] == pytest.approx(0.4)
    flat = plateau_check(curve([0.1, 0.5, 0.5, 0.5]), tolerance=0.01)
    assert flat["reached"] and flat["rise"] == pytest.approx(0.0, abs=1e-12)
    assert not plateau_check(curve([0.5, 0.9]), 0.01)["reached"]


def gain(low: float, high: float, n: int = 5) -> dict:
    return {"mean": (low + high) / 2, "low": low, "high": high, "n": n, "seeds_to_resolve": 9}


def long_summary(arms: dict[str, dict[str, dict]]) -> dict:
    return {"long_tau0": {"arms": {arm: {c: {"gain_iou": g} for c, g in rows.items()}
                                   for arm, rows in arms.items()}}}  # fmt: skip


def test_an_arm_that_raises_one_of_two_classes_of_interest_does_not_help():
    summary = long_summary(
        {
            "one": {"2": gain(0.02, 0.05), "3": gain(-0.01, 0.04), "miou": gain(0.0, 0.02)},
            "both": {"2": gain(0.02, 0.05), "3": gain(0.01, 0.04), "miou": gain(0.0, 0.02)},
        }
    )
    judged = verdict(summary, ["base", "one", "both"], "base", [2, 3])
    assert judged["judged"] and judged["helps"] == ["both"]
    assert judged["does_not_help"] == ["one"]
    assert judged["arms"]["one"]["classes_raised"] == [2]
    assert judged["arms"]["one"]["unresolved"] == {"3": 9, "miou": 9}


def test_fewer_than_five_seeds_judge_no_arm():
    summary = long_summary({"arm": {"3": gain(0.02, 0.05, 4), "miou": gain(0.0, 0.02, 4)}})
    judged = verdict(summary, ["base", "arm"], "base", [3])
    assert not judged["judged"] and judged["n_seeds"] == 4
    assert judged["helps"] == judged["does_not_help"] == []
    assert judged["arms"]["arm"]["helps"] is None


def runs_frame(iou: dict[tuple[str, int, str], float]) -> pd.DataFrame:
    rows = [
        {"arm": arm, "seed": seed, "step": 10, "tau": 0.0, "class": c, "iou": value,
         "precision": value, "recall": value}
        for (arm, seed, c), value in iou.items()
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_group_rows_average_the_classes_per_seed_before_pairing():
    values = {
        # seed 1: class 1 has no IoU for the arm (absent and never predicted)
        ("base", 1, "0"): 0.80, ("base", 1, "1"): 0.40, ("base", 1, "2"): 0.10,
        ("base", 2, "0"): 0.70, ("base", 2, "1"): 0.50, ("base", 2, "2"): 0.20,
        ("arm", 1, "0"): 0.60, ("arm", 1, "1"): np.nan, ("arm", 1, "2"): 0.30,
        ("arm", 2, "0"): 0.70, ("arm", 2, "1"): 0.30, ("arm", 2, "2"): 0.25,
    }  # fmt: skip
    summary = summarise(runs_frame(values), ["base", "arm"], "base", {"long": 10}, [2], (0.0,))
    arm = summary["long_tau0"]["arms"]["arm"]
    # rest = classes 0 and 1: arm per seed 0.60 (class 1 left out), 0.50; base 0.60, 0.60.
    assert arm["rest"]["per_seed_iou"] == pytest.approx({"1": 0.60, "2": 0.50})
    assert arm["rest"]["gain_iou"]["per_seed"] == pytest.approx({"1": 0.0, "2": -0.10})
    assert arm["rest"]["gain_iou"]["mean"] == pytest.approx(-0.05)
    assert arm["interest"]["gain_iou"]["mean"] == pytest.approx((0.20 + 0.05) / 2)
    assert arm["interest"]["gain_iou"]["wins"] == 2
    assert "gain_iou" not in summary["long_tau0"]["arms"]["base"]["rest"]
