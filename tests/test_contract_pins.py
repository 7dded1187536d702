"""Pins on rules that small mistakes could break silently: each test fails on one such mistake."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from data_fixtures import method_scores
from patchbalance.atomic import atomic_writer, output_set
from patchbalance.balanced_table import BalancedTable
from patchbalance.sampling.class_target import class_target_weights
from patchbalance.table import class_columns
from patchbalance.train.loss import class_weights_from_counts, parse_class_weights


def test_class_target_solves_on_each_patchs_valid_pixels_not_its_window():
    # Patch 0 is a 100-pixel window with 40 nodata pixels: 60 valid pixels, all class 0.
    counts = np.array([[60.0, 0.0], [0.0, 100.0], [50.0, 50.0]])
    result = class_target_weights(counts, np.array([0.3, 0.7]))
    p = result.probabilities
    # Shares per epoch, computed here from the draw probabilities and the valid pixels.
    shares = (p @ counts) / (p @ counts.sum(axis=1))
    np.testing.assert_allclose(shares, [0.3, 0.7], atol=1e-6)
    np.testing.assert_allclose(result.reached, [0.3, 0.7], atol=1e-6)


def test_inverse_frequency_passes_weights_sqrt_to_its_scores():
    counts = np.array([[90.0, 10.0], [100.0, 0.0], [50.0, 50.0], [99.0, 1.0]])
    proportions = counts / counts.sum(axis=1, keepdims=True)
    mean_share = proportions.mean(axis=0)
    args = (np.ones(4), np.zeros(4, int), counts, np.full(4, 100.0))
    plain, _ = method_scores("inverse_frequency", *args)
    rooted, _ = method_scores("inverse_frequency", *args, sqrt=True)
    np.testing.assert_allclose(plain, proportions @ (1 / mean_share))
    np.testing.assert_allclose(rooted, proportions @ (1 / np.sqrt(mean_share)))


def test_active_rows_without_an_excluded_column_are_the_rows_of_weight_above_0():
    frame = pd.DataFrame({"sampler_weight": [1.0, 0.0, 2.0, 0.0]})
    table = BalancedTable(frame=frame, labels=np.arange(2, 6))
    np.testing.assert_array_equal(table.active(), [True, False, True, False])


def test_class_columns_are_ordered_by_class_value_not_as_text():
    frame = pd.DataFrame(columns=["px_10", "px_2", "image_path", "px_1", "px_0"])
    assert class_columns(frame) == (["px_0", "px_1", "px_2", "px_10"], [0, 1, 2, 10])


def test_a_class_weight_exactly_at_max_class_weight_is_not_reported_as_clipped():
    counts = np.array([[75.0, 25.0]])
    # inverse_frequency: raw 1/f = (4/3, 4), sum f w = 2, normalised to sum f w = 1: (2/3, 2).
    exact = parse_class_weights({"class_weights": "inverse_frequency", "max_class_weight": 2.0}, 2)
    result = class_weights_from_counts(exact, counts)
    np.testing.assert_allclose(result.weights, [2 / 3, 2.0])
    assert result.clipped == []
    lower = parse_class_weights({"class_weights": "inverse_frequency", "max_class_weight": 1.9}, 2)
    assert class_weights_from_counts(lower, counts).clipped == [1]


def test_an_output_set_syncs_every_file_before_the_first_is_moved_into_place(tmp_path, monkeypatch):
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os,
        "replace",
        lambda a, b: (calls.append(f"replace {os.path.basename(b)}"), real_replace(a, b))[1],
    )
    with output_set():
        for name in ("table.csv", "summary.json"):
            with atomic_writer(tmp_path / name) as stream:
                stream.write(name)
    moves = [c for c in calls if c.startswith("replace")]
    assert moves == ["replace table.csv", "replace summary.json"]
    first_move = calls.index(moves[0])
    assert calls[:first_move].count("fsync") >= 2
    assert (tmp_path / "summary.json").read_text() == "summary.json"
