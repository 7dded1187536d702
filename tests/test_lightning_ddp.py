"""`patchbalance train` under DDP: two real processes on the gloo backend, weighted draws kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.stats import chisquare

from lightning_runs import TINY_MODEL, read_drawn_rows, tiny_config, write_weighted_table
from patchbalance.data import CSVWindowedSegmentationDataset, DistributedWeightedSampler
from patchbalance.train.components import build_model
from patchbalance.train.metrics import confusion_matrix, iou_from_confusion

# Known weights: row 7 is never drawn, row 6 is drawn 8 times as often as row 0.
WEIGHTS = np.array([1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 8.0, 0.0])
NUM_SAMPLES = 400
EPOCHS = 2
SEED = 7


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    train_table, val_table = write_weighted_table(folder, WEIGHTS)
    mapping = tiny_config(
        train_table,
        val_table,
        folder / "out",
        NUM_SAMPLES,
        batch_size=50,
        rows_folder=folder / "rows",
    )
    mapping["seed"] = SEED
    mapping["pl_trainer"] = {
        "accelerator": "cpu",
        "devices": 2,
        "strategy": "ddp",
        "max_epochs": EPOCHS,
        # Lightning's default for its own users: our samplers are DistributedSamplers, so it
        # leaves them as they are (any other sampler it would wrap and slice again).
        "use_distributed_sampler": True,
    }
    config = folder / "train.yaml"
    config.write_text(yaml.safe_dump(mapping))
    tests = Path(__file__).resolve().parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests), *sys.path]),
        "OMP_NUM_THREADS": "1",
    }
    outcome = subprocess.run(
        [sys.executable, "-m", "patchbalance.cli", "train", str(config), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    return folder, val_table, outcome.stdout


def test_two_ranks_draw_disjoint_slices_of_one_global_weighted_draw_per_epoch(ddp_run):
    folder, _, _ = ddp_run
    ranks = [read_drawn_rows(folder / "rows", rank) for rank in (0, 1)]
    draws = []
    for epoch in range(EPOCHS):
        slices = [np.concatenate(r.loc[r["epoch"] == epoch, "rows"].to_list()) for r in ranks]
        assert [len(s) for s in slices] == [NUM_SAMPLES // 2] * 2
        # The global draw of (seed, epoch), as one process would draw it: rank r holds
        # positions r, r + 2, ... of it.
        sampler = DistributedWeightedSampler(
            WEIGHTS, NUM_SAMPLES, seed=SEED, num_replicas=1, rank=0
        )
        sampler.set_epoch(epoch)
        expected = sampler.global_draw()
        np.testing.assert_array_equal(slices[0], expected[0::2])
        np.testing.assert_array_equal(slices[1], expected[1::2])
        draws.append(np.concatenate(slices))
    assert not np.array_equal(draws[0], draws[1])  # epochs differ
    counts = np.bincount(np.concatenate(draws), minlength=len(WEIGHTS))
    assert counts[WEIGHTS == 0].sum() == 0
    drawable = WEIGHTS > 0
    expected_counts = WEIGHTS[drawable] / WEIGHTS.sum() * counts.sum()
    assert chisquare(counts[drawable], expected_counts).pvalue > 1e-3


def test_ddp_metrics_are_written_once_from_every_ranks_share_of_validation(ddp_run):
    folder, val_table, stdout = ddp_run
    metrics = pd.read_csv(folder / "out" / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    assert list(metrics["train_patches"]) == [NUM_SAMPLES] * EPOCHS  # summed over the ranks
    assert stdout.count("best epoch") == 1 and "2 processes (ddp)" in stdout
    # One process over the whole validation set with the saved weights gives the same IoU.
    checkpoint = torch.load(folder / "out" / "last.pt", weights_only=False)
    model = build_model(TINY_MODEL, in_channels=3, n_classes=4)
    model.load_state_dict(checkpoint["model_state_dict"])
    val = CSVWindowedSegmentationDataset(val_table, n_classes=4)
    items = [val[i] for i in range(len(val))]
    with torch.no_grad():
        predicted = model(torch.stack([i["image"] for i in items])).argmax(1)
    confusion = confusion_matrix(predicted, torch.stack([i["mask"] for i in items]), 4, 255)
    iou = iou_from_confusion(confusion.numpy())
    row = metrics.iloc[-1]
    np.testing.assert_allclose([row[f"iou_{c}"] for c in range(4)], iou, equal_nan=True)
