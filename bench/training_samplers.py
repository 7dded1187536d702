"""Benchmark: one epoch's weighted draw for 10^6 and 2 x 10^7 rows, ours vs torch's sampler.

Times drawing and iterating `num_samples = N` indices with replacement, as a DataLoader does
once per epoch:
- `torch.utils.data.WeightedRandomSampler` (torch.multinomial; refuses more than 2^24 rows),
- `NumpyWeightedRandomSampler` (numpy multinomial counts + shuffle; any number of rows),
- `DistributedWeightedSampler` for rank 0 of 4 (the global draw, then a quarter of it).
Weights are lognormal with 5 % zeros, like a balanced table with excluded rows. Each figure is
the best of `--repeats` runs; the ratio is torch's time over ours (> 1: ours is faster).

    python bench/training_samplers.py
    python bench/training_samplers.py --sizes 1000000 --repeats 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from patchbalance.data import (
    TORCH_MULTINOMIAL_MAX_CATEGORIES,
    DistributedWeightedSampler,
    NumpyWeightedRandomSampler,
)


def best_of(repeats: int, run: Callable[[], int]) -> tuple[float, int]:
    """Return the shortest wall time of `run` over `repeats` calls, and its last result."""
    best, result = float("inf"), 0
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def consume(sampler) -> int:
    """Iterate the sampler as a DataLoader would; return the number of indices."""
    count = 0
    for _ in sampler:
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 20_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, torch threads {torch.get_num_threads()}"
    )
    for n in args.sizes:
        rng = np.random.default_rng(0)
        weights = rng.lognormal(0.0, 1.0, n)
        weights[rng.random(n) < 0.05] = 0.0
        print(f"\nN = {n:,} rows, {n:,} draws with replacement")
        torch_time = None
        if n <= TORCH_MULTINOMIAL_MAX_CATEGORIES:
            sampler = WeightedRandomSampler(torch.from_numpy(weights.copy()), n)
            torch_time, count = best_of(args.repeats, lambda s=sampler: consume(s))
            print(f"  torch WeightedRandomSampler   {torch_time:8.3f} s  ({count:,} indices)")
        else:
            print("  torch WeightedRandomSampler   refuses: more than 2^24 categories")
        ours = NumpyWeightedRandomSampler(weights, n, seed=0)
        ours_time, count = best_of(args.repeats, lambda s=ours: consume(s))
        draw_time, _ = best_of(args.repeats, lambda s=ours: s.draw().size)
        print(f"  NumpyWeightedRandomSampler    {ours_time:8.3f} s  ({count:,} indices)")
        print(f"    of which the draw itself    {draw_time:8.3f} s")
        ddp = DistributedWeightedSampler(weights, n, seed=0, num_replicas=4, rank=0)
        ddp_time, count = best_of(args.repeats, lambda s=ddp: consume(s))
        print(
            f"  DistributedWeightedSampler    {ddp_time:8.3f} s  ({count:,} indices, rank 0 of 4)"
        )
        if torch_time is not None:
            print(f"  ratio torch / ours            {torch_time / ours_time:8.2f}")


if __name__ == "__main__":
    main()
