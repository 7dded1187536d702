"""`loss.class_weights` and summed loss terms of `patchbalance train` (SPEC §7)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from segmentation_models_pytorch.losses import DiceLoss
from typer.testing import CliRunner

from data_fixtures import write_training_tables
from patchbalance.cli import app
from patchbalance.data import CSVWindowedSegmentationDataset
from patchbalance.errors import ConfigError
from patchbalance.train.loss import parse_class_weights, training_class_weights
from patchbalance.train.run import build_loss, build_model, plan_training
from train_fixtures import SMALL_MODEL, small_config

runner = CliRunner()

# Two rows, three classes (raw values 10, 20, 30); class 30 has no pixel, and px_255 (nodata)
# is no class. Uniform shares: (30 + 10, 10 + 0, 0) / 50 = (0.8, 0.2, 0).
HAND_TABLE = {
    "px_10": [30, 10],
    "px_20": [10, 0],
    "px_30": [0, 0],
    "px_255": [7, 7],
    "sampler_weight": [1.0, 3.0],
}
# Under the draw weights (1, 3): (30 + 3 * 10, 10, 0) / 70 = (6/7, 1/7, 0).
UNIFORM_SHARE = (0.8, 0.2)
WEIGHTED_SHARE = (6 / 7, 1 / 7)


def hand_dataset(tmp_path: Path, rows: dict | None = None) -> CSVWindowedSegmentationDataset:
    frame = pd.DataFrame(rows or HAND_TABLE)
    frame["image_path"] = "image.tif"  # never read: the weights need only the table
    frame["mask_path"] = "mask.tif"
    frame["row_off"], frame["col_off"], frame["patch_size"] = 0, 0, 4
    frame.to_csv(tmp_path / "hand.csv", index=False)
    return CSVWindowedSegmentationDataset(tmp_path / "hand.csv", 3, class_values=[10, 20, 30])


def weights_of(value, tmp_path, weighted=False, **options):
    spec = parse_class_weights({"class_weights": value, **options}, 3)
    return training_class_weights(spec, hand_dataset(tmp_path), 3, weighted)


def present_then_filled(present: list[float], cap: float = 50.0) -> list[float]:
    """The two present classes' weights, then the absent class at the larger one; clipped."""
    return [min(w, cap) for w in (*present, max(present))]


def test_inverse_and_median_frequency_match_a_hand_computation(tmp_path):
    # w ∝ 1/f = (1.25, 5); sum f w = 1 + 1 = 2, so w = (0.625, 2.5). The median of (0.8, 0.2)
    # is 0.5: 0.5 / f = (0.625, 2.5), the same after normalisation.
    for scheme in ("inverse_frequency", "median_frequency"):
        result = weights_of(scheme, tmp_path)
        np.testing.assert_allclose(result.weights, [0.625, 2.5, 2.5])
        np.testing.assert_allclose(result.class_share, [0.8, 0.2, 0.0])
        assert result.absent == [2] and result.clipped == [] and not result.weighted


def test_inverse_sqrt_matches_a_hand_computation(tmp_path):
    roots = [math.sqrt(f) for f in UNIFORM_SHARE]
    # w_c = f_c^(-1/2) / sum_c' f_c' f_c'^(-1/2) = 1 / (sqrt(f_c) * sum_c' sqrt(f_c')).
    expected = [1 / (root * sum(roots)) for root in roots]
    result = weights_of("inverse_sqrt", tmp_path)
    np.testing.assert_allclose(result.weights, present_then_filled(expected))
    assert result.class_share @ result.weights == pytest.approx(1.0)


def test_effective_number_matches_a_hand_computation_in_pixels(tmp_path):
    beta = 0.9
    pixels = (40, 10)  # class pixels of the two rows
    raw = [(1 - beta) / (1 - beta**n) for n in pixels]
    mean = sum(f * w for f, w in zip(UNIFORM_SHARE, raw, strict=True))
    result = weights_of(f"effective_number:{beta}", tmp_path)
    np.testing.assert_allclose(result.weights, present_then_filled([w / mean for w in raw]))
    assert result.to_dict()["beta"] == 0.9


def test_weighted_draws_change_the_shares_and_the_weights_as_the_formula_says(tmp_path):
    result = weights_of("inverse_frequency", tmp_path, weighted=True)
    np.testing.assert_allclose(result.class_share, [*WEIGHTED_SHARE, 0.0])
    # 1 / (2 f) with f = (6/7, 1/7).
    np.testing.assert_allclose(result.weights, [7 / 12, 3.5, 3.5])
    assert result.weighted and result.to_dict()["class_share_source"] == "weighted_sampler"
    # n_c in pixels under the draws: the share times the 50 labelled pixels of the rows.
    beta = 0.99
    raw = [(1 - beta) / (1 - beta ** (f * 50)) for f in WEIGHTED_SHARE]
    mean = sum(f * w for f, w in zip(WEIGHTED_SHARE, raw, strict=True))
    result = weights_of(f"effective_number:{beta}", tmp_path, weighted=True)
    np.testing.assert_allclose(result.weights, present_then_filled([w / mean for w in raw]))


def test_weights_are_normalised_then_clipped_at_max_class_weight(tmp_path):
    result = weights_of("inverse_frequency", tmp_path, max_class_weight=2)
    np.testing.assert_allclose(result.weights, [0.625, 2.0, 2.0])
    assert result.clipped == [1, 2]
    assert result.to_dict()["pixel_weighted_mean"] == pytest.approx(0.8 * 0.625 + 0.2 * 2.0)


def test_excluded_rows_count_for_no_class_share(tmp_path):
    rows = {key: [*values, 1000] for key, values in HAND_TABLE.items()}
    rows["excluded"] = [False, False, True]
    spec = parse_class_weights({"class_weights": "inverse_frequency"}, 3)
    for weighted in (False, True):
        result = training_class_weights(spec, hand_dataset(tmp_path, rows), 3, weighted)
        share = UNIFORM_SHARE if not weighted else WEIGHTED_SHARE
        np.testing.assert_allclose(result.class_share, [*share, 0.0])


def test_given_lists_and_mappings_are_used_as_written(tmp_path):
    np.testing.assert_array_equal(weights_of([1, 70, 0.5], tmp_path).weights, [1, 70, 0.5])
    np.testing.assert_array_equal(weights_of({2: 4.0, "0": 0.5}, tmp_path).weights, [0.5, 1, 4])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("balanced", "unknown scheme 'balanced'"),
        ("effective_number:1.5", "beta must lie strictly between 0 and 1"),
        ("effective_number:0", "beta must lie strictly between 0 and 1"),
        ("effective_number", "needs a beta"),
        ([1.0, 2.0], "has 2 weights but there are 4 classes"),
        ([1.0, -2.0, 1.0, 1.0], r"loss.class_weights\[1\] must be a finite number >= 0"),
        ({7: 2.0}, "names class 7, which is not a class index 0..3"),
    ],
)
def test_cli_bad_class_weights_exit_2_with_one_line_before_training(
    tmp_path, value, message, tables
):
    train_table, val_table = tables
    config = small_config(train_table, val_table, tmp_path / "out")
    config["loss"] = {"class_weights": value}
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = runner.invoke(app, ["train", str(config_path)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loss.class_weights" in errors[0], result.stderr
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """The training tables of test_train, the train table given px_ counts of its masks."""
    folder = tmp_path_factory.mktemp("scenes")
    train_table, val_table = write_training_tables(folder)
    frame = pd.read_csv(train_table)
    dataset = CSVWindowedSegmentationDataset(train_table, n_classes=4)
    masks = np.stack([dataset[i]["mask"].numpy() for i in range(len(dataset))])
    for c in range(4):
        frame[f"px_{c}"] = (masks == c).sum(axis=(1, 2))
    frame.to_csv(train_table, index=False)
    return train_table, val_table


def test_loss_errors_name_the_term_or_the_missing_cross_entropy():
    with pytest.raises(ConfigError, match=r"loss.terms\[1\].name must be cross_entropy or dice"):
        build_loss({"terms": [{"name": "cross_entropy"}, {"name": "focal"}]}, 255)
    with pytest.raises(ConfigError, match="class_weights go to the cross-entropy"):
        build_loss({"terms": [{"name": "dice"}], "class_weights": "inverse_sqrt"}, 255)
    with pytest.raises(ConfigError, match="loss.weight and loss.class_weights both set"):
        build_loss({"weight": [1, 2], "class_weights": "inverse_sqrt"}, 255)
    with pytest.raises(ConfigError, match="put ignore_index inside a term"):
        build_loss({"terms": [{"name": "dice"}], "ignore_index": 0}, 255)


def hand_loss(logits, target, class_weights, dice_factor, ignore_index=255):
    """Weighted cross-entropy written out, plus dice_factor times smp's DiceLoss."""
    labelled = target != ignore_index
    log_p = torch.log_softmax(logits.double(), dim=1).permute(0, 2, 3, 1)[labelled]
    labels = target[labelled]
    w = torch.as_tensor(class_weights, dtype=torch.float64)[labels]
    cross_entropy = -(w * log_p[torch.arange(labels.numel()), labels]).sum() / w.sum()
    dice = DiceLoss(mode="multiclass", ignore_index=ignore_index)(logits, target)
    return float(cross_entropy) + dice_factor * float(dice)


def test_a_sum_of_cross_entropy_and_dice_equals_the_hand_computed_sum():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 4, 5, 5), generator=generator)
    target = torch.randint(0, 4, (2, 5, 5), generator=generator)
    target[0, :2, :2] = 255
    block = {"terms": [{"name": "cross_entropy"}, {"name": "dice", "factor": 0.5}]}
    loss = build_loss(block, 255, class_weights=np.array([0.5, 1.0, 2.0, 4.0]))
    expected = hand_loss(logits, target, [0.5, 1.0, 2.0, 4.0], 0.5)
    assert float(loss(logits, target)) == pytest.approx(expected, rel=1e-5)


CE_DICE_LOSS = """
loss:
  class_weights: median_frequency
  terms:
    - name: cross_entropy
      factor: 1.0
    - name: dice
      factor: 0.5
      mode: multiclass
"""


def test_cli_trains_cross_entropy_plus_dice_from_yaml_and_its_loss_is_the_weighted_sum(
    tables, tmp_path
):
    train_table, val_table = tables
    config = small_config(train_table, val_table, tmp_path / "out")
    config.update(yaml.safe_load(CE_DICE_LOSS))
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")

    dry = runner.invoke(app, ["train", str(config_path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "loss.class_weights median_frequency (pixel shares under the weighted" in dry.stdout
    result = runner.invoke(app, ["train", str(config_path), "-q"])
    assert result.exit_code == 0, result.output

    # The weights: median share over f, normalised, from the px_ counts under the draw weights
    # (excluded rows weigh 0).
    table = pd.read_csv(train_table)
    draws = np.where(table["excluded"], 0.0, table["sampler_weight"])
    pixels = np.array([(draws * table[f"px_{c}"]).sum() for c in range(4)])
    share = pixels / pixels.sum()
    raw = np.median(share) / share
    expected = raw / (share * raw).sum()
    saved = json.loads((tmp_path / "out" / "class_weights.json").read_text())
    assert saved["scheme"] == "median_frequency"
    assert saved["class_share_source"] == "weighted_sampler"
    np.testing.assert_allclose(saved["class_share"], share)
    np.testing.assert_allclose(saved["weights"], expected)
    assert (tmp_path / "out" / "metrics.csv").is_file()

    # The validation loss is CE with those weights + 0.5 Dice on the one validation batch.
    checkpoint = torch.load(tmp_path / "out" / "last.pt", weights_only=False)
    model = build_model(SMALL_MODEL, in_channels=3, n_classes=4)
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    val = CSVWindowedSegmentationDataset(val_table, n_classes=4)
    assert len(val) == config["hyperparameters"]["batch_size"]
    items = [val[i] for i in range(len(val))]
    with torch.no_grad():
        logits = model(torch.stack([i["image"] for i in items]))
    target = torch.stack([i["mask"] for i in items])
    assert (target == 255).any()  # the nodata corner is skipped by both terms
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    expected_loss = hand_loss(logits, target, expected, 0.5)
    assert metrics["val_loss"].iloc[0] == pytest.approx(expected_loss, rel=1e-5)


def test_single_cross_entropy_block_takes_the_class_weights(tables, tmp_path):
    train_table, val_table = tables
    config = small_config(train_table, val_table, tmp_path / "out")
    config["train_dataset"]["data_loader"]["weighted_sampler"] = False
    config["loss"] = {
        "_target_": "torch.nn.CrossEntropyLoss",
        "class_weights": [1.0, 2.0, 3.0, 4.0],
        "label_smoothing": 0.1,
    }
    plan = plan_training(config)
    loss = build_loss(config["loss"], plan.ignore_index, plan.class_weights.weights)
    assert isinstance(loss, torch.nn.CrossEntropyLoss)
    assert loss.ignore_index == 255 and loss.label_smoothing == 0.1
    np.testing.assert_array_equal(loss.weight.numpy(), [1, 2, 3, 4])


def test_raw_values_that_map_to_one_class_pool_their_pixels(tmp_path):
    frame = pd.DataFrame({"px_0": [30], "px_1": [5], "px_5": [5], "px_255": [9]})
    frame["image_path"], frame["mask_path"] = "image.tif", "mask.tif"
    frame["row_off"], frame["col_off"], frame["patch_size"] = 0, 0, 4
    frame.to_csv(tmp_path / "mapped.csv", index=False)
    dataset = CSVWindowedSegmentationDataset(tmp_path / "mapped.csv", 2, mask_class_mapping={5: 1})
    spec = parse_class_weights({"class_weights": "inverse_frequency"}, 2)
    result = training_class_weights(spec, dataset, 2, weighted=False)
    # Class 1 holds raw values 1 and 5: shares (30, 10) / 40; nodata (255) is no class.
    np.testing.assert_allclose(result.class_share, [0.75, 0.25])
    np.testing.assert_allclose(result.weights, [2 / 3, 2.0])
