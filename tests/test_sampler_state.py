"""Draws that resume: a run stopped mid-epoch and resumed draws the rows of the uninterrupted run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from data_fixtures import write_training_tables
from lightning_runs import read_drawn_rows, tiny_config
from patchbalance.train.run import train_from_config

# 16 draws of batch 4: 4 steps per epoch, so step 6 is inside the second epoch.
NUM_SAMPLES, BATCH = 16, 4


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    return write_training_tables(tmp_path_factory.mktemp("scenes"))


def run(tables, out, rows, max_steps, resume=None):
    mapping = tiny_config(*tables, out, NUM_SAMPLES, BATCH, rows_folder=rows)
    mapping["hyperparameters"]["max_steps"] = max_steps
    return train_from_config(mapping, resume=resume)


def drawn(rows_folder) -> list[list[int]]:
    return read_drawn_rows(rows_folder)["rows"].to_list()


def test_a_run_stopped_after_6_steps_and_resumed_to_12_draws_the_rows_of_a_12_step_run(
    tables, tmp_path
):
    whole = run(tables, tmp_path / "whole", tmp_path / "whole_rows", 12)
    first = run(tables, tmp_path / "part", tmp_path / "part_rows", 6)
    assert first.steps == 6
    resumed = run(
        tables, tmp_path / "part", tmp_path / "part_rows", 12, resume=tmp_path / "part" / "last.pt"
    )
    assert resumed.steps == 12 == whole.steps
    rows = drawn(tmp_path / "part_rows")
    assert len(rows) == 12  # 12 batches, none drawn twice, none skipped
    assert rows == drawn(tmp_path / "whole_rows")
    # The metric history goes on: the rows before the stop, then the resumed ones.
    metrics = pd.read_csv(tmp_path / "part" / "metrics.csv")
    assert list(metrics["step"]) == [4, 6, 8, 12]
    assert list(whole.metrics["step"]) == [4, 8, 12]
    # Same draws, same optimizer state: the same model at step 12.
    final = {
        name: torch.load(tmp_path / name / "last.pt", weights_only=False)
        for name in ("whole", "part")
    }
    for key, value in final["whole"]["model_state_dict"].items():
        np.testing.assert_allclose(final["part"]["model_state_dict"][key], value, rtol=1e-6)
