"""`patchbalance train`: metrics from a global confusion matrix, checkpoints, config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix
from typer.testing import CliRunner

from data_fixtures import write_table, write_training_tables
from patchbalance.cli import app
from patchbalance.data import CSVWindowedSegmentationDataset
from patchbalance.errors import ConfigError
from patchbalance.train.command import run_train_command
from patchbalance.train.run import (
    build_loss,
    build_model,
    confusion_matrix,
    iou_from_confusion,
    mean_iou,
    plan_training,
    train_from_config,
)
from train_fixtures import SMALL_MODEL, small_config

EXAMPLE = (
    Path(__file__).resolve().parents[1] / "conf" / "examples" / "weighted_sampler_segmentation.yaml"
)
runner = CliRunner()


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    return write_training_tables(tmp_path_factory.mktemp("scenes"))


def test_confusion_matrix_and_iou_match_a_hand_computed_example():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    predicted = np.array([[0, 1, 1], [2, 2, 0]])
    confusion = confusion_matrix(predicted, target, n_classes=4, ignore_index=255)
    expected = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(confusion, expected)
    iou = iou_from_confusion(confusion)
    # class 0: TP 1, FN 1, FP 0; class 1: TP 1, FN 1, FP 1; class 2: TP 1, FP 1; class 3 absent.
    np.testing.assert_allclose(iou[:3], [1 / 2, 1 / 3, 1 / 2])
    assert np.isnan(iou[3])
    assert mean_iou(iou) == pytest.approx(4 / 9)


def test_confusion_accumulates_over_batches_unlike_a_mean_of_batch_ious():
    # Batch 1 is all class 0 predicted right; batch 2 has one class-0 pixel predicted 1.
    batches = [(np.zeros(8, int), np.zeros(8, int)), (np.array([1, 0]), np.array([0, 0]))]
    total = sum(confusion_matrix(p, t, 2, None) for p, t in batches)
    assert iou_from_confusion(total)[0] == pytest.approx(9 / 10)
    per_batch = [iou_from_confusion(confusion_matrix(p, t, 2, None))[0] for p, t in batches]
    assert np.mean(per_batch) == pytest.approx(0.75)  # the number we must not report


def test_train_writes_metrics_with_per_class_iou_and_a_checkpoint_that_reproduces_them(
    tables, tmp_path
):
    train_table, val_table = tables
    result = train_from_config(small_config(train_table, val_table, tmp_path / "out"))
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert list(metrics["epoch"]) == [1] and list(metrics["step"]) == [2]
    assert {"train_loss", "val_loss", "miou", "iou_0", "iou_1", "iou_2", "iou_3"} <= set(metrics)
    assert result.steps == 2 and result.best_epoch == 1
    assert "mIoU" in result.summary_text and str(result.checkpoint_path) in result.summary_text

    # Recompute the validation IoU independently: the saved weights, the whole validation set
    # as one batch, sklearn's confusion matrix over every labelled pixel.
    checkpoint = torch.load(result.checkpoint_path, weights_only=False)
    model = build_model(SMALL_MODEL, in_channels=3, n_classes=4)
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    val = CSVWindowedSegmentationDataset(val_table, n_classes=4)
    items = [val[i] for i in range(len(val))]
    with torch.no_grad():
        predicted = model(torch.stack([i["image"] for i in items])).argmax(1).numpy().ravel()
    target = torch.stack([i["mask"] for i in items]).numpy().ravel()
    labelled = target != 255
    confusion = sklearn_confusion_matrix(target[labelled], predicted[labelled], labels=range(4))
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    row = metrics.iloc[0]
    np.testing.assert_allclose([row[f"iou_{c}"] for c in range(4)], iou, equal_nan=True)
    assert row["miou"] == pytest.approx(np.nanmean(iou))
    assert checkpoint["miou"] == pytest.approx(row["miou"]) and checkpoint["step"] == 2


def test_training_with_a_seed_is_deterministic(tables, tmp_path):
    train_table, val_table = tables
    first = train_from_config(small_config(train_table, val_table, tmp_path / "a"))
    second = train_from_config(small_config(train_table, val_table, tmp_path / "b"))
    columns = ["train_loss", "val_loss", "miou"]
    pd.testing.assert_frame_equal(first.metrics[columns], second.metrics[columns])


def test_max_steps_stops_inside_an_epoch_and_epochs_bound_the_run(tables, tmp_path):
    train_table, val_table = tables
    config = small_config(train_table, val_table, tmp_path / "out")
    config["hyperparameters"] = {"batch_size": 4, "epochs": 2, "max_steps": 100}
    config["train_dataset"]["data_loader"]["weighted_sampler_num_samples"] = 4
    result = train_from_config(config)
    assert list(result.metrics["step"]) == [1, 2]  # two epochs of one batch each
    last = torch.load(tmp_path / "out" / "last.pt", weights_only=False)
    best = torch.load(tmp_path / "out" / "best.pt", weights_only=False)
    assert last["epoch"] == 2 and best["epoch"] == result.best_epoch
    assert best["miou"] == pytest.approx(result.metrics["miou"].max())


def test_training_records_the_device_and_dtype_its_steps_ran_in(tables, tmp_path):
    train_table, val_table = tables
    fp32 = train_from_config(small_config(train_table, val_table, tmp_path / "fp32"))
    assert fp32.trained_on == {"device": "cpu", "logits_dtype": "float32", "autocast_dtype": None}
    assert "trained on cpu\n" in fp32.summary_text
    config = small_config(train_table, val_table, tmp_path / "bf16")
    config["precision"] = "bf16"
    bf16 = train_from_config(config)
    expected = {"device": "cpu", "logits_dtype": "bfloat16", "autocast_dtype": "bfloat16"}
    assert bf16.trained_on == expected
    assert "trained on cpu, bfloat16 autocast" in bf16.summary_text
    assert torch.load(bf16.last_checkpoint_path, weights_only=False)["trained_on"] == expected
    assert np.isfinite(bf16.metrics[["train_loss", "val_loss"]].to_numpy()).all()
    config["precision"] = "fp16"
    with pytest.raises(ConfigError, match="precision"):
        plan_training(config)


def test_cli_weighted_sampler_on_a_table_without_sampler_weight_exits_2_with_one_line(
    tables, tmp_path
):
    train_table, val_table = tables
    frame = pd.read_csv(train_table).drop(columns=["sampler_weight"])
    unweighted = write_table(frame, tmp_path / "unweighted.csv")
    config_path = tmp_path / "train.yaml"
    config_path.write_text(
        yaml.safe_dump(small_config(unweighted, val_table, tmp_path / "out")), encoding="utf-8"
    )
    result = runner.invoke(app, ["train", str(config_path)])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1 and "weighted_sampler: true needs a 'sampler_weight' column" in errors[0]
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_config_keys_are_errors_with_the_closest_valid_key(tables, tmp_path):
    train_table, val_table = tables
    config = small_config(train_table, val_table, tmp_path / "out")
    config["hyperparameters"]["epoch"] = 1
    with pytest.raises(
        ConfigError, match="unknown key 'hyperparameters.epoch'; did you mean 'epochs'"
    ):
        plan_training(config)
    config = small_config(train_table, val_table, tmp_path / "out")
    config["train_dataset"]["n_clases"] = 4
    with pytest.raises(ConfigError, match="'train_dataset.n_clases'; did you mean 'n_classes'"):
        plan_training(config)


def test_patch_size_the_model_cannot_take_is_a_config_error(tmp_path):
    train_table, val_table = write_training_tables(tmp_path / "scenes", size=80, patch=20)
    config = small_config(train_table, val_table, tmp_path / "out")
    # Linknet needs sides divisible by its output stride (8 with 3 stages); smp's Unet pads.
    config["model"] = {
        "_target_": "segmentation_models_pytorch.Linknet",
        "encoder_name": "resnet18",
        "encoder_depth": 3,
    }
    with pytest.raises(ConfigError, match="model: Wrong input shape height=20, width=20"):
        train_from_config(config)


def test_upstream_config_keys_and_dataset_path_are_accepted(tables, tmp_path):
    train_table, val_table = tables
    config = small_config(train_table, val_table, tmp_path / "out")
    upstream = (
        "pytorch_segmentation_models_trainer.dataset_loader.dataset.CSVWindowedSegmentationDataset"
    )
    config["train_dataset"]["_target_"] = upstream
    config["hyperparameters"] = {"num_epochs": 2, "learning_rate": 1e-4, "batch_size": 4}
    config["optimizer"] = {
        "_target_": "torch.optim.AdamW",
        "lr": "${hyperparameters.learning_rate}",
    }
    config["pl_trainer"] = {"max_epochs": "${hyperparameters.num_epochs}"}
    config["callbacks"] = [{"_target_": "pytorch_lightning.callbacks.ModelCheckpoint"}]
    plan = plan_training(config)
    assert isinstance(plan.train_dataset, CSVWindowedSegmentationDataset)
    assert plan.epochs == 2 and plan.config.hyperparameters.lr == 1e-4
    assert plan.resolved["optimizer"]["lr"] == 1e-4
    # The validation set takes n_classes from the training set.
    assert plan.val_dataset.n_classes == 4
    with pytest.raises(ConfigError, match="loss: cannot instantiate.*upstream trainer's classes"):
        build_loss(
            {"_target_": "pytorch_segmentation_models_trainer.custom_losses.loss.SCELoss"}, 255
        )


def test_example_config_trains_on_the_demo_data(tmp_path):
    from patchbalance.balancing.pipeline import run_build
    from patchbalance.config import load_config
    from patchbalance.demo import write_demo_dataset

    paths = write_demo_dataset(tmp_path / "demo")
    run_build(load_config(paths["config"]), progress=False)
    overrides = [
        f"train_dataset.input_csv_path={paths['table']}",
        f"val_dataset.input_csv_path={paths['val']}",
        f"output_dir={tmp_path / 'train'}",
        "hyperparameters.max_steps=2",
        "hyperparameters.batch_size=2",
        "val_dataset.n_first_rows_to_read=4",
    ]
    plan_text = run_train_command(EXAMPLE, overrides, dry_run=True, progress=False)
    assert "sampler: WeightedRandomSampler, 192 draws per epoch" in plan_text
    assert not (tmp_path / "train").exists()
    weighted_loss = [*overrides, "loss.class_weights=median_frequency"]
    plan_text = run_train_command(EXAMPLE, weighted_loss, dry_run=True, progress=False)
    assert "loss.class_weights median_frequency (pixel shares under the weighted" in plan_text
    text = run_train_command(EXAMPLE, overrides, dry_run=False, progress=False)
    metrics = pd.read_csv(tmp_path / "train" / "metrics.csv")
    assert list(metrics["step"]) == [2]
    assert metrics[[f"iou_{c}" for c in range(4)]].notna().any(axis=None)
    assert "best epoch 1: mIoU" in text and (tmp_path / "train" / "best.pt").is_file()


@pytest.mark.parametrize("target", ["a_file", "/proc/train_output"])
def test_cli_unwritable_output_dir_exits_2_before_any_table_is_read(tables, tmp_path, target):
    train_table, val_table = tables
    (tmp_path / "a_file").write_text("a file, not a folder")
    output_dir = tmp_path / target
    if target.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    # The tables do not exist: read first, the error would be about them.
    config = small_config(tmp_path / "nope.csv", val_table, output_dir)
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = runner.invoke(app, ["train", str(config_path)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(output_dir) in errors[0], result.stderr
    assert ("is a file, not a folder" if target == "a_file" else "cannot write") in errors[0]


def test_cli_train_warns_once_about_excluded_rows_with_a_weight_and_never_draws_them(
    tables, tmp_path
):
    train_table, val_table = tables
    frame = pd.read_csv(train_table)
    assert frame.loc[0, "excluded"] and len(frame) == 8
    frame.loc[0, "sampler_weight"] = 5.0  # an excluded row edited by hand
    edited = write_table(frame, tmp_path / "edited.csv")
    config_path = tmp_path / "train.yaml"
    config_path.write_text(
        yaml.safe_dump(small_config(edited, val_table, tmp_path / "out")), encoding="utf-8"
    )
    result = runner.invoke(app, ["train", str(config_path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("marked excluded but have sampler_weight > 0") == 1, result.stderr
    assert "rows with sampler_weight > 0: 7" in result.stdout


class ConstantLogits(torch.nn.Module):
    """A 'model' whose class logits are the same given vector at every pixel."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def forward(self, images):
        batch, _, height, width = images.shape
        return self.logits[None, :, None, None].expand(batch, -1, height, width)


def test_prior_correction_shifts_the_logits_by_tau_times_the_log_prior_ratio():
    from patchbalance.train.run import evaluate

    # Raw logits (2.0, 1.5): class 0 wins. log prior ratio (-1, +1): at tau 0.5 the logits are
    # (1.5, 2.0) and class 1 wins; at tau 0.2 they are (1.8, 1.7) and class 0 still wins.
    masks = torch.tensor([[[0, 1], [1, 1]]])
    loader = [{"image": torch.zeros((1, 3, 2, 2)), "mask": masks}]
    offsets = np.outer([0.0, 0.2, 0.5], [-1.0, 1.0])

    _, confusions = evaluate(
        ConstantLogits([2.0, 1.5]), loader, torch.nn.CrossEntropyLoss(), 2, 255, "cpu",
        logit_offsets=offsets,
    )  # fmt: skip

    np.testing.assert_array_equal(confusions[0], [[1, 0], [3, 0]])  # all predicted 0
    np.testing.assert_array_equal(confusions[1], [[1, 0], [3, 0]])
    np.testing.assert_array_equal(confusions[2], [[0, 1], [0, 3]])  # all predicted 1


def test_log_prior_ratio_for_training_comes_from_the_table_shares(tmp_path):
    from patchbalance.train.run import class_log_prior_ratio

    # Uniform shares (class 0, class 2): (160, 40) / 200 = (0.8, 0.2). Weighted (0.5, 1.5):
    # (50 + 90, 60) / 200 = (0.7, 0.3).
    table = pd.DataFrame(
        {"px_0": [100, 60], "px_2": [0, 40], "excluded": False, "sampler_weight": [0.5, 1.5]}
    )
    table.to_csv(tmp_path / "t.csv", index=False)
    dataset = type("D", (), {"input_csv_path": tmp_path / "t.csv", "class_values": [0, 2]})()

    ratio = class_log_prior_ratio(dataset, 2, weighted=True)

    np.testing.assert_allclose(ratio, [np.log(0.8 / 0.7), np.log(0.2 / 0.3)])
    np.testing.assert_array_equal(class_log_prior_ratio(dataset, 2, weighted=False), [0, 0])


def test_metrics_have_iou_precision_and_recall_for_tau_0_and_each_tau(tables, tmp_path):
    train_table, val_table = tables
    # prior_correction needs a balanced table's class counts; any counts do for the columns.
    table = pd.read_csv(train_table)
    for c in range(4):
        table[f"px_{c}"] = (np.arange(len(table)) % (c + 2)) * 10 + 1
    table.to_csv(tmp_path / "train.csv", index=False)
    config = small_config(tmp_path / "train.csv", val_table, tmp_path / "out")
    config["prior_correction"] = [1.0, 0.5]

    train_from_config(config)

    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    for suffix in ("", "_tau0.5", "_tau1"):
        expected = {f"miou{suffix}"} | {
            f"{m}_{c}{suffix}" for m in ("iou", "precision", "recall") for c in range(4)
        }
        assert expected <= set(metrics.columns), suffix
    assert 0.0 <= metrics["miou_tau1"].iloc[0] <= 1.0
    config["train_dataset"]["input_csv_path"] = str(train_table)  # no px_ columns
    with pytest.raises(ConfigError, match="prior_correction needs the class pixel counts"):
        plan_training(config)


def _train_yaml(tmp_path: Path, train_table: Path, val_table: Path, **dataset) -> Path:
    config = small_config(train_table, val_table, tmp_path / "out")
    config["train_dataset"].update(dataset)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("which", ["train", "val"])
def test_a_window_past_its_raster_is_an_error_naming_the_row_before_training(
    tables, tmp_path, which
):
    train_table, val_table = tables
    frame = pd.read_csv(train_table if which == "train" else val_table)
    frame.loc[2, "col_off"] = 48  # 48 + 32 runs past the 64 px scene
    edited = write_table(frame, tmp_path / f"{which}.csv")
    paths = (edited, val_table) if which == "train" else (train_table, edited)
    result = runner.invoke(app, ["train", str(_train_yaml(tmp_path, *paths))])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert f"{which}.csv: row 3: the window (row_off 32, col_off 48, patch_size 32)" in errors[0]
    assert "which is 64x64 pixels" in errors[0]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_class_the_table_counts_beyond_n_classes_is_an_error_before_training(tables, tmp_path):
    train_table, val_table = tables
    frame = pd.read_csv(train_table)
    for value in range(4):
        frame[f"px_{value}"] = 100
    frame.loc[:, "px_3"] = 0
    frame.loc[5, "px_3"] = 7
    edited = write_table(frame, tmp_path / "counted.csv")
    result = runner.invoke(
        app, ["train", str(_train_yaml(tmp_path, edited, val_table)), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["train", str(_train_yaml(tmp_path, edited, val_table, n_classes=2)), "--dry-run"]
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "counted.csv: column 'px_2' counts pixels of class 2 in rows 1, 2" in errors[0]
    assert "n_classes is 2" in errors[0]
    # A class mapped to the ignore index on purpose is fine.
    mapped = _train_yaml(
        tmp_path, edited, val_table, n_classes=2, mask_class_mapping={2: 255, 3: 255}
    )
    result = runner.invoke(app, ["train", str(mapped), "--dry-run"])
    assert result.exit_code == 0, result.output


def test_a_validation_table_with_class_centred_windows_warns_with_their_count(
    tables, tmp_path, caplog
):
    train_table, val_table = tables
    frame = pd.read_csv(val_table)
    frame["placement"] = ["class:3" if i < 2 else "grid" for i in range(len(frame))]
    centred_val = tmp_path / "val_centred.csv"
    frame.to_csv(centred_val, index=False)

    with caplog.at_level("WARNING", logger="patchbalance.train.plan"):
        plan_training(small_config(train_table, val_table, tmp_path / "a"))
    assert not [r for r in caplog.records if "class-centred" in r.getMessage()]
    with caplog.at_level("WARNING", logger="patchbalance.train.plan"):
        plan_training(small_config(train_table, centred_val, tmp_path / "b"))
    warned = [r.getMessage() for r in caplog.records if "class-centred" in r.getMessage()]
    assert len(warned) == 1
    assert f"{centred_val} holds 2 class-centred window(s)" in warned[0]
    assert "input.placement: grid" in warned[0]


def test_the_command_resolves_its_configuration_once(tables, tmp_path):
    """An escaped interpolation (`\\${...}`) stays text: a second resolution would fail on it."""
    train_table, val_table = tables
    config = small_config(train_table, val_table, tmp_path / "out")
    config["output_dir"] = str(tmp_path / "out_\\${run}")
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = runner.invoke(app, ["train", str(config_path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "out_${run}" in result.stdout
