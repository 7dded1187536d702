"""How often a "95 %" interval of a mean paired gain holds the true gain, over a few seeds.

    python bench/interval_coverage.py                 # 2,000 sets at 2, 3, 5 and 10 seeds
    python bench/interval_coverage.py --sets 5000 --seeds 2 3 4 5 8

Each set is `n` per-seed differences drawn from a normal distribution whose mean is 0 (an arm
that neither helps nor hurts); an interval covers when it holds 0. Two intervals are measured
on the same sets: the percentile bootstrap over the seeds that `patchbalance compare` used to
report (10,000 resamples, the 2.5th and 97.5th percentile of the resampled means), and the
paired Student-t interval it reports now (`patchbalance.compare.statistics.paired_t_interval`).
It prints a Markdown table, with the share of sets whose interval lies wholly above 0 (a null
arm that would look as if it helped; 2.5 % at the nominal level).
"""

from __future__ import annotations

import argparse

import numpy as np

from patchbalance.compare.statistics import paired_t_interval

RESAMPLES = 10_000


def percentile_bootstrap(
    differences: np.ndarray, rng: np.random.Generator, resamples: int = RESAMPLES
) -> tuple[float, float]:
    """Return the 95 % percentile bootstrap interval of the mean of `differences` (retired)."""
    picks = rng.integers(0, differences.size, size=(resamples, differences.size))
    low, high = np.percentile(differences[picks].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def coverage(n: int, sets: int, seed: int) -> dict[str, float]:
    """Return, for `sets` sets of `n` null differences, each interval's coverage and the share
    of its intervals wholly above 0."""
    rng = np.random.default_rng([seed, n])
    draws = rng.normal(0.0, 1.0, size=(sets, n))
    bootstrap = np.array([percentile_bootstrap(row, rng) for row in draws])
    student = np.array([paired_t_interval(row) for row in draws])
    out = {}
    for name, bounds in (("bootstrap", bootstrap), ("student_t", student)):
        out[name] = float(np.mean((bounds[:, 0] <= 0) & (bounds[:, 1] >= 0)))
        out[f"{name}_above"] = float(np.mean(bounds[:, 0] > 0))
    return out


def main(argv: list[str] | None = None) -> None:
    """Print the coverage table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=2000, help="simulated sets per seed count")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 5, 10])
    parser.add_argument("--seed", type=int, default=0, help="random seed of the simulation")
    args = parser.parse_args(argv)
    print(f"{args.sets:,} sets of normal differences with mean 0 per row (seed {args.seed})")
    print()
    print("| seeds | percentile bootstrap covers | wholly above 0 | Student-t covers | above 0 |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.seeds:
        c = coverage(n, args.sets, args.seed)
        print(
            f"| {n} | {c['bootstrap']:.1%} | {c['bootstrap_above']:.1%} | "
            f"{c['student_t']:.1%} | {c['student_t_above']:.1%} |"
        )


if __name__ == "__main__":
    main()
