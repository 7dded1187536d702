"""class_target (SPEC §3.8) and uniform_mix (SPEC §3.7 step 3)."""

from __future__ import annotations

import numpy as np
import pytest

from data_fixtures import method_scores as sampling_scores
from patchbalance.build.class_target import class_target_weights, parse_target_share
from patchbalance.build.weights import normalise_weights
from patchbalance.config import WeightsConfig
from patchbalance.errors import ConfigError
from patchbalance.table import class_share, effective_sample_size

# Three patches of 100 pixels: all class 0, all class 1, half and half.
HAND_POOL = np.array([[100.0, 0.0], [0.0, 100.0], [50.0, 50.0]])


def test_hand_worked_pool_equals_the_closed_form():
    # a_i1 = n_i1 - 0.3 n_i = (70, -30, 20) and a_i2 = -a_i1, so pi ∝ x^(7, -3, 2) with
    # x = exp(10 (l1 - l2)); the share condition reduces to 0.7 y^2 + 0.2 y - 0.3 = 0, y = x^5.
    y = (-0.2 + np.sqrt(0.2**2 + 4 * 0.7 * 0.3)) / (2 * 0.7)
    expected = np.array([y**1.4, y**-0.6, y**0.4])
    expected /= expected.sum()

    result = class_target_weights(HAND_POOL, np.array([0.3, 0.7]))

    np.testing.assert_allclose(result.probabilities, expected, rtol=1e-9)
    np.testing.assert_allclose(result.reached, [0.3, 0.7], atol=1e-12)
    assert result.alpha == 1.0 and not result.notes
    # lambda is fixed up to a constant; the difference is what the closed form gives.
    assert result.lambdas[0] - result.lambdas[1] == pytest.approx(np.log(y) / 50, rel=1e-9)


def random_pool(seed: int = 0, n: int = 3000) -> np.ndarray:
    """Return imbalanced class counts of 64 x 64 windows: class 0 common, class 5 rare."""
    rng = np.random.default_rng(seed)
    return np.round(rng.dirichlet([3.0, 1.0, 0.5, 0.3, 0.2, 0.1], size=n) * 4096)


@pytest.mark.parametrize("spec", ["sqrt", "balanced", "power:0.25", {0: 0.1}])
def test_feasible_targets_are_met_within_1e_6(spec):
    counts = random_pool()
    counts = counts[counts.sum(axis=1) > 0]
    uniform = class_share(counts, np.ones(len(counts)))
    target = parse_target_share(spec, uniform, list(range(6)))

    result = class_target_weights(counts, target)

    assert result.alpha == 1.0
    np.testing.assert_allclose(class_share(counts, result.probabilities), target, atol=1e-6)
    assert result.probabilities.sum() == pytest.approx(1.0)


def test_target_share_specs_follow_their_formulas():
    uniform = np.array([0.64, 0.32, 0.04, 0.0])
    values = [0, 1, 2, 5]
    sqrt = np.sqrt(uniform) / np.sqrt(uniform).sum()

    np.testing.assert_allclose(parse_target_share("sqrt", uniform, values), sqrt)
    np.testing.assert_allclose(parse_target_share("balanced", uniform, values), [1 / 3] * 3 + [0])
    np.testing.assert_allclose(parse_target_share("power:1", uniform, values), uniform)
    # Class 2 gets 0.2; classes 0 and 1 share the remaining 0.8 as 2 : 1.
    np.testing.assert_allclose(
        parse_target_share({2: 0.2}, uniform, values), [0.8 * 2 / 3, 0.8 / 3, 0.2, 0.0]
    )
    with pytest.raises(ConfigError, match="class 7"):
        parse_target_share({7: 0.2}, uniform, values)


def test_an_infeasible_target_reports_the_reachable_maximum_and_the_shares_reached():
    # No patch is more than 60 % class 1: a 90 % target cannot be reached.
    counts = np.array([[100.0, 0.0], [40.0, 60.0], [70.0, 30.0]])

    result = class_target_weights(counts, np.array([0.1, 0.9]))
    summary = result.to_summary([0, 1])

    assert result.alpha < 1.0 and result.notes
    assert summary["share_reachable_max"] == {"0": 1.0, "1": 0.6}
    assert summary["target_requested"] == {"0": 0.1, "1": 0.9}
    # The target moved toward uniform to just inside the reachable edge, and was reached there.
    np.testing.assert_allclose(result.reached, result.target, atol=1e-6)
    assert 0.59 < result.reached[1] < 0.6
    np.testing.assert_allclose(list(summary["share_reached"].values()), result.reached, atol=1e-6)


def test_min_ess_holds():
    counts = random_pool(seed=1)
    counts = counts[counts.sum(axis=1) > 0]
    uniform = class_share(counts, np.ones(len(counts)))
    target = parse_target_share("balanced", uniform, list(range(6)))
    free = class_target_weights(counts, target)
    assert effective_sample_size(free.probabilities) < 0.9 * len(counts)

    held = class_target_weights(counts, target, min_ess=0.9)

    assert held.ess >= 0.9 * len(counts) * (1 - 1e-9)
    assert held.ess == pytest.approx(0.9 * len(counts), rel=1e-3)
    assert 0 < held.alpha < 1
    np.testing.assert_allclose(held.reached, held.target, atol=1e-6)


def test_the_result_does_not_depend_on_the_row_order():
    counts = random_pool(seed=2, n=500)
    counts = counts[counts.sum(axis=1) > 0]
    target = parse_target_share("sqrt", class_share(counts, np.ones(len(counts))), list(range(6)))
    order = np.random.default_rng(3).permutation(len(counts))

    straight = class_target_weights(counts, target).probabilities
    shuffled = class_target_weights(counts[order], target).probabilities

    np.testing.assert_allclose(shuffled, straight[order], rtol=1e-7)


def test_class_target_through_sampling_scores_records_the_summary_figures():
    scores, notes = sampling_scores(
        "class_target",
        composition_score=np.ones(3),
        cluster_id=np.zeros(3),
        counts=HAND_POOL,
        window_pixels=np.full(3, 100.0),
        target_share={4: 0.3},
        class_values=[4, 9],
    )

    figures = notes["class_target"]
    assert figures["target"] == {"4": 0.3, "9": 0.7}
    assert figures["share_reached"] == {"4": 0.3, "9": 0.7}
    assert set(figures) >= {"lambda_per_pixel", "effective_sample_size", "share_uniform"}
    assert scores.sum() == pytest.approx(1.0)


def test_uniform_mix_keeps_a_share_of_uniform_draws_and_the_mean_at_one():
    scores = np.array([1.0, 1.0, 4.0, 14.0])  # normalised: 0.2, 0.2, 0.8, 2.8

    mixed = normalise_weights(scores, uniform_mix=0.25)

    np.testing.assert_allclose(mixed, 0.75 * np.array([0.2, 0.2, 0.8, 2.8]) + 0.25)
    assert mixed.mean() == pytest.approx(1.0)
    # The cap applies after the mix: 0.75 * 2.8 + 0.25 = 2.35 is capped at 2.
    capped = normalise_weights(scores, uniform_mix=0.25, max_weight=2.0)
    assert capped.max() == pytest.approx(2.0) and capped.mean() == pytest.approx(1.0)


@pytest.mark.parametrize("bad", ["sqrtt", "power:2", "power:x", {1: 1.5}, {1: 0.7, 2: 0.6}])
def test_a_bad_target_share_is_a_configuration_error(bad):
    with pytest.raises(ValueError, match="target_share|power|share"):
        WeightsConfig(target_share=bad)
