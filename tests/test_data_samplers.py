"""Weighted samplers: exact frequencies, zero weights, 2^24+ rows and DDP slices on gloo."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.stats import chisquare
from torch.utils.data import WeightedRandomSampler

from patchbalance.data import (
    TORCH_MULTINOMIAL_MAX_CATEGORIES,
    DistributedWeightedSampler,
    NumpyWeightedRandomSampler,
    build_dataloader,
    build_weighted_sampler,
    validate_weights,
)
from patchbalance.errors import InputError

WEIGHTS = np.array([0.0, 1.0, 2.0, 3.0, 0.0, 4.0, 10.0, 0.5])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, float("nan"), 2.0, float("nan")], r"NaN in 2 row\(s\) \(rows 2, 4\)"),
        ([1.0, 2.0, -0.5], r"negative in 1 row\(s\) \(row 3\)"),
        ([1.0, float("inf")], "infinite in 1 row"),
        ([0.0, 0.0, 0.0], "0 in all 3 rows"),
    ],
)
def test_bad_weights_are_errors_naming_the_rows(weights, message):
    with pytest.raises(InputError, match=message):
        validate_weights(weights)


def test_draw_frequencies_match_the_weights_and_zero_weights_never_appear():
    sampler = NumpyWeightedRandomSampler(WEIGHTS, num_samples=50_000, seed=1)
    draws = np.concatenate([np.fromiter(iter(sampler), dtype=np.int64) for _ in range(4)])
    counts = np.bincount(draws, minlength=WEIGHTS.size)
    assert counts[WEIGHTS == 0].sum() == 0
    positive = WEIGHTS > 0
    expected = draws.size * WEIGHTS[positive] / WEIGHTS.sum()
    assert chisquare(counts[positive], expected).pvalue > 1e-3


def test_without_replacement_draws_distinct_positive_rows_in_weighted_order():
    sampler = NumpyWeightedRandomSampler(WEIGHTS, num_samples=6, replacement=False, seed=2)
    assert sorted(sampler) == [1, 2, 3, 5, 6, 7]
    # The first of each draw follows the weights (successive draws without replacement).
    first = np.array([next(iter(sampler)) for _ in range(4000)])
    counts = np.bincount(first, minlength=WEIGHTS.size)
    positive = WEIGHTS > 0
    assert counts[~positive].sum() == 0
    expected = first.size * WEIGHTS[positive] / WEIGHTS.sum()
    assert chisquare(counts[positive], expected).pvalue > 1e-3
    with pytest.raises(InputError, match="only 6 rows have a weight > 0"):
        NumpyWeightedRandomSampler(WEIGHTS, num_samples=7, replacement=False)


def test_seed_and_epoch_fix_the_draw_and_epochs_differ():
    a = NumpyWeightedRandomSampler(WEIGHTS, num_samples=100, seed=5)
    b = NumpyWeightedRandomSampler(WEIGHTS, num_samples=100, seed=5)
    first_a, second_a = list(a), list(a)
    assert first_a == list(b) and second_a == list(b)
    assert first_a != second_a
    b.set_epoch(0)
    assert list(b) == first_a


def test_more_than_2_pow_24_rows_draws_valid_indices_at_the_right_frequency():
    n = TORCH_MULTINOMIAL_MAX_CATEGORIES + 1
    weights = np.ones(n, dtype=np.float32)
    heavy = np.array([0, n // 2, n - 1])  # the last index is past torch's limit
    weights[heavy] = 2.0**22
    # torch's own sampler cannot draw from this many rows: the reason ours exists.
    with pytest.raises(RuntimeError, match="2\\^24"):
        next(iter(WeightedRandomSampler(torch.from_numpy(weights), 10)))
    draws_n = 200_000
    sampler = build_weighted_sampler(weights, num_samples=draws_n, seed=0)
    assert isinstance(sampler, NumpyWeightedRandomSampler)
    draws = sampler.draw()
    assert draws.size == draws_n and draws.min() >= 0 and draws.max() <= n - 1
    p_heavy = 2.0**22 / (n - 3 + 3 * 2.0**22)
    tolerance = 5 * np.sqrt(draws_n * p_heavy * (1 - p_heavy))
    for row in heavy:
        assert abs(np.count_nonzero(draws == row) - draws_n * p_heavy) < tolerance


def test_distributed_slices_pad_and_drop_like_distributed_sampler():
    weights = np.arange(1.0, 8.0)
    reference = NumpyWeightedRandomSampler(weights, num_samples=7, seed=4)
    reference.set_epoch(3)
    global_draw = reference.draw()
    padded = [
        DistributedWeightedSampler(weights, 7, seed=4, num_replicas=3, rank=r) for r in range(3)
    ]
    dropped = [
        DistributedWeightedSampler(weights, 7, seed=4, num_replicas=3, rank=r, drop_last=True)
        for r in range(3)
    ]
    for sampler in (*padded, *dropped):
        sampler.set_epoch(3)
    assert all(len(s) == 3 for s in padded) and all(len(s) == 2 for s in dropped)
    interleaved = np.stack([s.rank_indices() for s in padded], axis=1).ravel()
    np.testing.assert_array_equal(interleaved, np.concatenate([global_draw, global_draw[:2]]))
    interleaved = np.stack([s.rank_indices() for s in dropped], axis=1).ravel()
    np.testing.assert_array_equal(interleaved, global_draw[:6])


class IndexDataset(torch.utils.data.Dataset):
    """Items are their own index; weights as a patch table would give them."""

    def __init__(self, weights: np.ndarray) -> None:
        self.sampler_weights = weights

    def __len__(self) -> int:
        return len(self.sampler_weights)

    def __getitem__(self, index: int) -> int:
        return index


def _distributed_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        loader = build_dataloader(
            IndexDataset(WEIGHTS),
            {"weighted_sampler": True, "weighted_sampler_num_samples": 11},
            batch_size=1,
            seed=9,
        )
        assert isinstance(loader.sampler, DistributedWeightedSampler)
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            indices = np.array([int(batch) for batch in loader], dtype=np.int64)
            np.save(os.path.join(out_dir, f"rank{rank}_epoch{epoch}.npy"), indices)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_draw_disjoint_slices_whose_union_is_the_global_draw(tmp_path):
    mp.spawn(
        _distributed_worker,
        args=(2, str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    draws = []
    for epoch in (0, 1):
        ranks = [np.load(tmp_path / f"rank{r}_epoch{epoch}.npy") for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == 6  # 11 draws padded to 12
        single = NumpyWeightedRandomSampler(WEIGHTS, num_samples=11, seed=9)
        single.set_epoch(epoch)
        expected = single.draw()
        # Rank r holds positions r, r + 2, ... of the global draw: disjoint, and together the
        # whole draw (plus one padding index, the draw's first).
        union = np.stack(ranks, axis=1).ravel()
        np.testing.assert_array_equal(union[:11], expected)
        assert union[11] == expected[0]
        assert not np.isin(union, np.flatnonzero(WEIGHTS == 0)).any()
        draws.append(union)
    assert not np.array_equal(draws[0], draws[1])
