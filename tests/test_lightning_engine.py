"""`patchbalance train` on Lightning's Trainer: pl_trainer keys, callbacks, the plain loop beside it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from data_fixtures import write_training_tables
from lightning_runs import tiny_config
from patchbalance.cli import app
from patchbalance.errors import ConfigError
from patchbalance.train.plan import plan_training
from patchbalance.train.run import train_from_config
from patchbalance.train.trainer_options import trainer_options

runner = CliRunner()


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    return write_training_tables(tmp_path_factory.mktemp("scenes"))


def config(tables, out, num_samples=8, batch_size=4, **keys):
    train_table, val_table = tables
    mapping = tiny_config(train_table, val_table, out, num_samples, batch_size)
    mapping.update(keys)
    return mapping


def test_pl_trainer_max_epochs_and_callbacks_take_effect(tables, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    mapping = config(
        tables,
        tmp_path / "out",
        pl_trainer={"max_epochs": 2, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1},
        callbacks=[
            {
                "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                "dirpath": str(checkpoints),
                "monitor": "miou",
                "mode": "max",
                "save_top_k": 1,
                "filename": "best",
            },
            {
                "_target_": "lightning.pytorch.callbacks.EarlyStopping",
                "monitor": "val_loss",
                "patience": 10,
            },
        ],
    )
    result = train_from_config(mapping)
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    # max_epochs 2 of 2 batches each (8 draws of batch 4).
    assert list(metrics["epoch"]) == [1, 2] and list(metrics["step"]) == [2, 4]
    saved = torch.load(checkpoints / "best.ckpt", weights_only=False)
    assert saved["miou"] == pytest.approx(metrics["miou"].max(), nan_ok=True)
    assert saved["callbacks"]  # EarlyStopping and ModelCheckpoint states are in it
    assert any("EarlyStopping" in key for key in saved["callbacks"])
    assert result.steps == 4


def test_early_stopping_callback_ends_the_run_before_max_epochs(tables, tmp_path):
    mapping = config(
        tables,
        tmp_path / "out",
        pl_trainer={"max_epochs": 3},
        callbacks=[
            {
                "_target_": "lightning.pytorch.callbacks.EarlyStopping",
                "monitor": "val_loss",
                "stopping_threshold": 1.0e9,  # any finite loss is below it: stop at once
            }
        ],
    )
    result = train_from_config(mapping)
    assert list(result.metrics["epoch"]) == [1]


def test_accumulate_grad_batches_makes_one_step_of_two_batches(tables, tmp_path):
    mapping = config(
        tables, tmp_path / "out", num_samples=16, pl_trainer={"accumulate_grad_batches": 2}
    )
    mapping["hyperparameters"]["epochs"] = 1
    result = train_from_config(mapping)
    # 4 batches, one optimizer step per 2; all 16 patches count in the training loss.
    assert list(result.metrics["step"]) == [2]
    assert list(result.metrics["train_patches"]) == [16]


@pytest.mark.parametrize(
    ("ours", "theirs", "names"),
    [
        (
            {"hyperparameters": {"epochs": 3}},
            {"max_epochs": 2},
            ["hyperparameters.epochs", "pl_trainer.max_epochs"],
        ),
        (
            {"hyperparameters": {"max_steps": 5}},
            {"max_steps": 6},
            ["hyperparameters.max_steps", "pl_trainer.max_steps"],
        ),
        ({"device": "cpu"}, {"accelerator": "gpu"}, ["device", "pl_trainer.accelerator"]),
        ({"precision": "bf16"}, {"precision": "32-true"}, ["precision", "pl_trainer.precision"]),
    ],
)
def test_a_key_of_ours_and_a_pl_trainer_key_that_disagree_is_an_error_naming_both(
    tables, tmp_path, ours, theirs, names
):
    mapping = config(tables, tmp_path / "out", pl_trainer=theirs)
    for key, value in ours.items():
        mapping[key] = {**mapping[key], **value} if isinstance(value, dict) else value
    plan = plan_training(mapping)
    with pytest.raises(ConfigError) as error:
        trainer_options(plan.config)
    assert all(name.removeprefix("pl_trainer.") in str(error.value) for name in names)
    assert "pl_trainer." + names[1].removeprefix("pl_trainer.") in str(error.value)


def test_keys_given_once_are_used_and_the_same_value_twice_is_no_conflict(tables, tmp_path):
    mapping = config(
        tables,
        tmp_path / "out",
        device="cpu",
        precision="bf16",
        pl_trainer={
            "max_steps": 3,
            "accelerator": "cpu",
            "precision": "bf16-mixed",
            "gradient_clip_val": 0.5,
        },
    )
    mapping["hyperparameters"]["max_steps"] = 3
    options = trainer_options(plan_training(mapping).config)
    assert options.kwargs["max_steps"] == 3 and options.kwargs["max_epochs"] == -1
    assert options.kwargs["accelerator"] == "cpu" and options.kwargs["devices"] == 1
    assert options.kwargs["precision"] == "bf16-mixed"
    assert options.kwargs["gradient_clip_val"] == 0.5  # passed through


def test_cli_unknown_pl_trainer_key_exits_2_naming_it(tables, tmp_path):
    mapping = config(tables, tmp_path / "out", pl_trainer={"max_epoch": 2})
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(mapping))
    outcome = runner.invoke(app, ["train", str(path), "--quiet"])
    assert outcome.exit_code == 2
    lines = outcome.output.strip().splitlines()
    assert len(lines) == 1 and "pl_trainer.max_epoch" in lines[0] and "max_epochs" in lines[0]


def test_lightning_engine_reproduces_the_plain_loops_metrics_and_sampler_schedule(tables, tmp_path):
    # With a sampler_schedule both engines draw with the resumable sampler (the plain loop
    # draws with torch's otherwise): the same draws, schedule steps, model and validation.
    runs = {}
    for engine in ("loop", "lightning"):
        mapping = config(
            tables,
            tmp_path / engine,
            engine=engine,
            sampler_schedule={"name": "anneal", "start": 0.25},
        )
        mapping["hyperparameters"]["epochs"] = 2
        runs[engine] = train_from_config(mapping)
    loop, lightning = runs["loop"].metrics, runs["lightning"].metrics
    assert list(loop.columns) == list(lightning.columns)
    assert "drawn_share_3" in loop.columns
    values = [c for c in loop.columns if c not in ("train_seconds", "lr")]
    np.testing.assert_allclose(
        lightning[values].to_numpy(float), loop[values].to_numpy(float), rtol=1e-5, equal_nan=True
    )
