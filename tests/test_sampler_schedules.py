"""Samplers whose weights change mid-run, and the sampler schedules of `patchbalance train`."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from data_fixtures import write_training_tables
from patchbalance.data.samplers import DistributedWeightedSampler, NumpyWeightedRandomSampler
from patchbalance.errors import ConfigError
from patchbalance.sampling.class_target import class_target_weights
from patchbalance.train.run import plan_training, run_training
from patchbalance.train.schedules import (
    AdaptiveSchedule,
    TrainingDraws,
    anneal_fraction,
    anneal_probabilities,
    gap_scaled_target,
)
from train_fixtures import small_config

WEIGHTS = np.array([0.0, 1.0, 2.0, 3.0, 0.0, 4.0, 5.0, 6.0])


def take(iterator, n: int) -> list[int]:
    return [next(iterator) for _ in range(n)]


def test_set_weights_keeps_what_was_drawn_and_draws_the_rest_from_the_new_weights():
    reference = list(NumpyWeightedRandomSampler(WEIGHTS, num_samples=40, seed=7))
    sampler = NumpyWeightedRandomSampler(WEIGHTS, num_samples=40, seed=7)
    iterator = iter(sampler)
    head = take(iterator, 15)
    only_row_2 = np.zeros(WEIGHTS.size)
    only_row_2[2] = 1.0
    sampler.set_weights(only_row_2)
    tail = list(iterator)
    assert head == reference[:15]
    assert tail == [2] * 25
    # The next epoch draws from the new weights from its top.
    assert list(sampler) == [2] * 40


def test_state_dict_resumes_mid_epoch_after_a_weight_change():
    def run(stop_at: int | None):
        sampler = NumpyWeightedRandomSampler(WEIGHTS, num_samples=30, seed=3)
        drawn = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            iterator = iter(sampler)
            drawn += take(iterator, 10)
            sampler.set_weights(WEIGHTS[::-1] + 1.0)
            for index in iterator:
                drawn.append(index)
                if stop_at is not None and len(drawn) == stop_at:
                    return drawn, sampler.state_dict()
        return drawn, None

    full, _ = run(None)
    head, state = run(stop_at=47)  # epoch 1, after its weight change
    resumed = NumpyWeightedRandomSampler(WEIGHTS, num_samples=30, seed=99)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # an engine sets the epoch again; the saved position stands
    assert head + list(resumed) == full


def test_distributed_ranks_changing_weights_at_one_step_slice_one_global_draw():
    new = np.arange(WEIGHTS.size, dtype=float) + 1.0
    whole = DistributedWeightedSampler(WEIGHTS, 21, seed=5, num_replicas=1, rank=0)
    iterator = iter(whole)
    global_draw = take(iterator, 8)
    whole.set_weights(new)
    global_draw += list(iterator)
    ranks = []
    for rank in range(2):
        sampler = DistributedWeightedSampler(WEIGHTS, 21, seed=5, num_replicas=2, rank=rank)
        iterator = iter(sampler)
        drawn = take(iterator, 4)
        sampler.set_weights(new)
        ranks.append(drawn + list(iterator))
    assert isinstance(whole, DistributedSampler)
    assert len(ranks[0]) == len(ranks[1]) == 11
    # Positions rank, rank + 2, ... of the global draw (padded to 22 with its first index).
    padded = global_draw + global_draw[8:9]
    assert ranks[0] == padded[0::2] and ranks[1] == padded[1::2]


def _rank_draws(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sampler = DistributedWeightedSampler(WEIGHTS, 40, seed=11)
        iterator = iter(sampler)
        drawn = take(iterator, 6)
        # Each rank computes the new weights itself: the same values, as a schedule would.
        sampler.set_weights(np.linspace(1.0, 2.0, WEIGHTS.size))
        drawn += list(iterator)
        np.save(Path(folder) / f"rank{rank}.npy", np.asarray(drawn))
    finally:
        torch.distributed.destroy_process_group()


def test_set_weights_on_two_gloo_processes_gives_the_single_process_global_draw(tmp_path):
    with socket.socket() as probe:  # a port no other test's process group holds
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank_draws, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npy").tolist() for r in range(2)]
    whole = DistributedWeightedSampler(WEIGHTS, 40, seed=11, num_replicas=1, rank=0)
    iterator = iter(whole)
    expected = take(iterator, 12)
    whole.set_weights(np.linspace(1.0, 2.0, WEIGHTS.size))
    expected += list(iterator)
    assert ranks[0] == expected[0::2] and ranks[1] == expected[1::2]


def test_anneal_moves_in_a_straight_line_from_the_table_to_uniform_over_active_rows():
    table = np.array([0.0, 6.0, 2.0, 2.0])
    assert anneal_fraction(70, 100, 0.7) == 0.0
    assert anneal_fraction(85, 100, 0.7) == pytest.approx(0.5)
    assert anneal_fraction(100, 100, 0.7) == 1.0
    np.testing.assert_allclose(anneal_probabilities(table, 0.0), [0, 0.6, 0.2, 0.2])
    np.testing.assert_allclose(anneal_probabilities(table, 1.0), [0, 1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(
        anneal_probabilities(table, 0.5), [0, 0.3 + 1 / 6, 0.1 + 1 / 6, 0.1 + 1 / 6]
    )


def test_gap_scaled_targets_favour_the_weak_classes():
    target = np.array([0.5, 0.3, 0.2])
    iou = np.array([0.9, 0.5, 0.0])
    # (1 - IoU)^2: 0.01, 0.25, 1 -> 0.005, 0.075, 0.2, renormalised.
    np.testing.assert_allclose(
        gap_scaled_target(target, iou, 2.0), np.array([0.005, 0.075, 0.2]) / 0.28
    )
    np.testing.assert_allclose(gap_scaled_target(target, np.ones(3), 1.0), target)


def test_an_adaptive_update_re_solves_the_targets_from_the_training_iou():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 100, size=(60, 3)).astype(float)
    counts[:, 2] = np.where(rng.random(60) < 0.2, 40.0, 0.0)
    table = np.ones(60)
    table[0] = 0.0  # an excluded row stays undrawn
    sampler = NumpyWeightedRandomSampler(table, 16, seed=1)
    schedule = AdaptiveSchedule(name="adaptive", every=2, gamma=1.0, min_ess=0.0)
    draws = TrainingDraws(3, 255, schedule, sampler, table, counts, total_steps=10)
    masks = torch.tensor([[[0, 0], [1, 2]]]).repeat(4, 1, 1)
    logits = torch.zeros(4, 3, 2, 2)
    logits[:, 0] = 1.0  # the model predicts class 0 everywhere
    draws.after_step(1, masks, logits)
    assert draws.updates == []
    draws.after_step(2, masks, logits)
    # Class 0: TP 16, FP 16 -> IoU 0.5; classes 1 and 2 are never predicted: IoU 0.
    np.testing.assert_allclose(draws.iou, [0.5, 0.0, 0.0])
    active = counts[1:]
    uniform = active.sum(axis=0) / active.sum()
    base = np.sqrt(uniform) / np.sqrt(uniform).sum()
    expected = class_target_weights(active, gap_scaled_target(base, draws.iou, 1.0))
    assert sampler.weights[0] == 0.0
    np.testing.assert_allclose(sampler.weights[1:], expected.probabilities, rtol=1e-6)
    assert draws.take_drawn_shares() == pytest.approx(
        {"drawn_share_0": 0.5, "drawn_share_1": 0.25, "drawn_share_2": 0.25}
    )


def _strongly_weighted_table(folder: Path) -> tuple[Path, Path, np.ndarray]:
    """Return a training table whose weights draw almost only its first active row."""
    train_table, val_table = write_training_tables(folder)
    table = pd.read_csv(train_table)
    weights = np.full(len(table), 0.002)
    weights[0] = 0.0
    weights[1] = 1.0
    table["sampler_weight"] = weights
    table.to_csv(train_table, index=False)
    pixels = np.zeros(4)
    for row in table.iloc[1:].itertuples():
        with rasterio.open(row.mask_path) as src:
            rows = (row.row_off, row.row_off + row.patch_size)
            mask = src.read(1, window=(rows, (row.col_off, row.col_off + row.patch_size)))
        pixels += np.bincount(mask[mask < 4].ravel(), minlength=4)[:4]
    return train_table, val_table, pixels / pixels.sum()


def _config(train_table: Path, val_table: Path, output_dir: Path, schedule) -> dict:
    """Return the small training config: 3 epochs of 40 weighted draws, with `schedule`."""
    config = small_config(train_table, val_table, output_dir)
    config["train_dataset"]["data_loader"]["weighted_sampler_num_samples"] = 40
    config["hyperparameters"] = {"batch_size": 4, "epochs": 3, "lr": 0.01}
    return {**config, "sampler_schedule": schedule}


def test_anneal_in_train_moves_the_drawn_shares_toward_the_uniform_shares(tmp_path):
    train_table, val_table, uniform = _strongly_weighted_table(tmp_path)
    config = _config(train_table, val_table, tmp_path / "out", {"name": "anneal", "start": 0.3})
    plan = plan_training(config)
    run_training(plan)
    written = pd.read_csv(tmp_path / "out" / "metrics.csv")
    shares = written[[f"drawn_share_{c}" for c in range(4)]].to_numpy()
    assert len(written) == 3 and np.allclose(shares.sum(axis=1), 1.0)
    distance = np.abs(shares - uniform).sum(axis=1)
    assert distance[-1] < distance[0]
    # After the last step the draw is uniform over the active rows.
    final = plan.train_loader.sampler.weights
    np.testing.assert_allclose(final, np.r_[0.0, np.full(len(final) - 1, 1 / (len(final) - 1))])


def test_a_schedule_needs_the_weighted_sampler_and_a_known_name(tmp_path):
    train_table, val_table = write_training_tables(tmp_path)
    config = _config(train_table, val_table, tmp_path / "out", {"name": "anneal", "start": 0.5})
    config["train_dataset"]["data_loader"]["weighted_sampler"] = False
    with pytest.raises(ConfigError, match="sampler_schedule .*weighted_sampler is false"):
        plan_training(config)
    config = _config(train_table, val_table, tmp_path / "out", {"name": "cosine"})
    with pytest.raises(ConfigError, match="sampler_schedule"):
        plan_training(config)
    config = _config(train_table, val_table, tmp_path / "out", {"name": "anneal", "start": 1.5})
    with pytest.raises(ConfigError, match="sampler_schedule.*start"):
        plan_training(config)
