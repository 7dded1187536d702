"""Ranks, the sampling methods of SPEC §3.7 and weight normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from data_fixtures import method_scores as sampling_scores
from patchbalance.errors import InputError
from patchbalance.sampling.scores import (
    average_rank,
    cluster_balanced_scores,
    inverse_frequency_scores,
    normalise_weights,
    repeat_factor_scores,
    sampler_weights,
)


def test_average_rank_gives_ties_the_same_rank():
    np.testing.assert_allclose(
        average_rank(np.array([0.5, 0.1, 0.5, 0.9])), [2.5 / 4, 1 / 4, 2.5 / 4, 1.0]
    )


def test_tied_composition_scores_get_equal_weights():
    composition = np.array([0.1, 0.1, 0.1, 0.5, 0.5, 1.0])
    for method in ("composition_only", "rank_max", "rank_add", "rank_multiply", "multiplicative"):
        scores, _ = sampling_scores(
            method, composition, np.zeros(6), np.ones((6, 2)), np.full(6, 4.0)
        )
        weights = normalise_weights(scores)
        assert weights[0] == weights[1] == weights[2], method
        assert weights[3] == weights[4], method
        assert weights[5] > weights[3] > weights[0], method


def test_rank_methods_reduce_to_composition_rank_without_uniqueness_and_say_so():
    composition = np.array([0.2, 0.5, 1.0])
    scores, notes = sampling_scores(
        "rank_max", composition, np.zeros(3), np.ones((3, 1)), np.ones(3)
    )
    np.testing.assert_allclose(scores, [1 / 3, 2 / 3, 1.0])
    assert "composition signal alone" in notes["reduced"]


def test_rank_methods_combine_both_ranks_with_uniqueness():
    composition = np.array([1.0, 2.0, 3.0, 4.0])  # ranks .25 .5 .75 1
    uniqueness = np.array([0.4, 0.3, 0.2, 0.1])  # ranks 1 .75 .5 .25
    args = (composition, np.zeros(4), np.ones((4, 1)), np.ones(4))
    rank_max, _ = sampling_scores("rank_max", *args, uniqueness=uniqueness)
    rank_add, _ = sampling_scores("rank_add", *args, uniqueness=uniqueness)
    rank_multiply, _ = sampling_scores("rank_multiply", *args, uniqueness=uniqueness)
    np.testing.assert_allclose(rank_max, [1.0, 0.75, 0.75, 1.0])
    np.testing.assert_allclose(rank_add, [0.625, 0.625, 0.625, 0.625])
    np.testing.assert_allclose(rank_multiply, [0.25, 0.375, 0.375, 0.25])


def test_cluster_balanced_gives_every_cluster_the_same_total_weight():
    cluster = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2])
    sizes = np.bincount(cluster)
    composition = 1.0 / sizes[cluster]
    weights = normalise_weights(cluster_balanced_scores(composition, cluster))
    totals = np.bincount(cluster, weights=weights)
    np.testing.assert_allclose(totals, totals[0])
    uniqueness = np.array([0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.5, 0.1, 0.7])
    weights_u = normalise_weights(cluster_balanced_scores(composition, cluster, uniqueness))
    np.testing.assert_allclose(np.bincount(cluster, weights=weights_u), totals[0])
    # Inside a cluster, weight is proportional to uniqueness.
    assert weights_u[6] / weights_u[7] == pytest.approx(5.0)


def test_repeat_factor_matches_a_hand_computation():
    # 4 patches of 100 px, min_pixels default 1 px (1 % of 100).
    counts = np.array(
        [
            [100, 0, 0],  # class 0 only
            [90, 10, 0],  # classes 0, 1
            [99, 0, 1],  # classes 0, 2 (1 px = 1 % of the window: present)
            [100, 0, 0],
        ]
    )
    factors, figures = repeat_factor_scores(counts, np.full(4, 100))
    # f = [1, .25, .25]; t = median = .25; r_c = max(1, sqrt(t / f_c)) = [1, 1, 1]
    np.testing.assert_allclose(figures["class_frequency"], [1.0, 0.25, 0.25])
    np.testing.assert_allclose(factors, [1, 1, 1, 1])
    factors, _ = repeat_factor_scores(counts, np.full(4, 100), repeat_threshold=1.0)
    # t = 1: r = [1, 2, 2] -> patches containing class 1 or 2 get 2.
    np.testing.assert_allclose(factors, [1, 2, 2, 1])
    factors, _ = repeat_factor_scores(counts, np.full(4, 100), min_pixels=5, repeat_threshold=1.0)
    np.testing.assert_allclose(factors, [1, 2, 1, 1])  # 1 px of class 2 is below 5 px


def test_inverse_frequency_matches_a_hand_computation():
    proportions = np.array([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [1.0, 0.0]])
    # g = [0.875, 0.125]
    expected = np.array([1 / 0.875, 0.5 / 0.875 + 0.5 / 0.125, 1 / 0.875, 1 / 0.875])
    np.testing.assert_allclose(inverse_frequency_scores(proportions), expected)
    expected_sqrt = np.array([1, 0.5 + 0.5 * np.sqrt(0.875 / 0.125), 1, 1]) / np.sqrt(0.875)
    np.testing.assert_allclose(inverse_frequency_scores(proportions, sqrt=True), expected_sqrt)


def test_weights_have_mean_one_over_active_and_excluded_are_exactly_zero():
    active = np.array([True, False, True, True, False])
    weights = sampler_weights(active, normalise_weights(np.array([1.0, 2.0, 5.0])))
    assert weights[active].mean() == pytest.approx(1.0)
    assert weights[1] == 0.0 and weights[4] == 0.0


def test_power_zero_gives_uniform_weights_and_power_two_sharpens():
    scores = np.array([0.25, 0.5, 1.0])
    np.testing.assert_allclose(normalise_weights(scores, power=0.0), 1.0)
    sharp = normalise_weights(scores, power=2.0)
    assert sharp[2] / sharp[0] == pytest.approx(16.0)


def test_max_weight_caps_and_keeps_mean_one():
    scores = np.array([100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    weights = normalise_weights(scores, max_weight=3.0)
    assert weights.max() <= 3.0 + 1e-9
    assert weights.mean() == pytest.approx(1.0)
    assert weights[0] == pytest.approx(3.0)
    np.testing.assert_allclose(weights[1:], (10 - 3) / 9)


def test_max_weight_on_a_long_tail_is_exact_where_rounds_of_clamping_gave_up():
    # A geometric tail: clamping and renormalising in turn needs many rounds; the cap is exact.
    scores = 0.5 ** np.arange(60.0)
    notes: dict = {}
    weights = normalise_weights(scores, max_weight=1.5, notes=notes)
    assert weights.max() == pytest.approx(1.5)
    assert weights.mean() == pytest.approx(1.0, rel=1e-12)
    assert notes == {}


def test_a_cap_that_cannot_keep_the_mean_at_one_says_so():
    # One patch of four has a weight above 0: capped at 2, the mean can only be 0.5.
    notes: dict = {}
    weights = normalise_weights(np.array([5.0, 0.0, 0.0, 0.0]), max_weight=2.0, notes=notes)
    np.testing.assert_allclose(weights, [2.0, 0.0, 0.0, 0.0])
    assert notes["max_weight"] == (
        "max_weight 2 cannot hold with a mean weight of 1: only 1 of 4 active patches have a "
        "weight above 0; they were capped at 2, so the mean weight is 0.5 (raise max_weight to "
        "at least 4 for a mean of 1)"
    )


def test_all_zero_scores_are_an_error():
    with pytest.raises(InputError, match="score of 0"):
        normalise_weights(np.zeros(4))


def test_a_new_sampling_method_is_one_function_and_one_parameters_model(tmp_path):
    """A method added through the registry, with one parameter, is accepted by the config,
    reads its parameter, and a wrong type is an error naming the key."""
    from patchbalance.balancing.pipeline import run_build
    from patchbalance.config import config_from_mapping
    from patchbalance.errors import ConfigError
    from patchbalance.sampling.registry import (
        SAMPLING_METHODS,
        MethodParams,
        register_sampling_method,
    )
    from rasters import record, write_pair

    class ToyParams(MethodParams):
        floor: float = 0.1

    @register_sampling_method("toy_last_class", params=ToyParams)
    def toy(signals, params):
        # Weight a patch by its share of the last class, plus a floor so every patch is drawn.
        return signals.proportions[:, -1] + params.floor, {"toy": True}

    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:32, :32] = 2  # one window all class 2
    mask[32:, 32:] = 1
    image_path, mask_path = write_pair(tmp_path, "a", mask)
    records = [record(image_path, mask_path, r, c, 32) for r in (0, 32) for c in (0, 32)]

    def build(**weights):
        config = config_from_mapping(
            {
                "sampling_method": "toy_last_class",
                "input": {"patch_records": records},
                "clustering": {"k_min": 2, "k_max": 2},
                "weights": weights,
                "output": {"csv_path": str(tmp_path / "t.csv")},
            },
            base_dir=tmp_path,
        )
        return run_build(config).table["sampler_weight"].to_numpy()

    try:
        default, floored = build(), build(floor=1.0)
        with pytest.raises(ConfigError, match=r"'weights\.floor'.*valid number"):
            build(floor="high")
        with pytest.raises(ConfigError, match=r"unknown key 'weights\.flor'; did you mean"):
            build(flor=1.0)
    finally:
        del SAMPLING_METHODS["toy_last_class"]
    # Scores 1 + floor for the class-2 window, floor for the other three; mean 1 over four.
    np.testing.assert_allclose(default, np.array([1.1, 0.1, 0.1, 0.1]) * 4 / 1.4)
    np.testing.assert_allclose(floored, np.array([2.0, 1.0, 1.0, 1.0]) * 4 / 5.0)


def test_a_method_key_of_another_method_is_checked_but_not_used():
    """Upstream's flat keys stay accepted under any method; each is checked by its owner."""
    from patchbalance.config import config_from_mapping
    from patchbalance.errors import ConfigError

    def config(**block):
        block = {"input": {"records_path": "r.csv"}, "output": {"csv_path": "o.csv"}, **block}
        return config_from_mapping({"balanced_dataset": block})

    weights = {"sqrt": True, "target_share": "balanced", "min_pixels": 4}
    inverse = config(sampling_method="inverse_frequency", weights=weights).weights.params
    assert inverse.model_dump() == {"sqrt": True}
    target = config(weights=weights).weights.params
    assert target.model_dump() == {"target_share": "balanced", "min_ess": 0.1}
    with pytest.raises(ConfigError, match=r"'weights\.sqrt'.*boolean"):
        config(weights={"sqrt": "maybe"})  # class_target's build, inverse_frequency's key


def test_an_unknown_sampling_method_names_the_closest_registered_one():
    from patchbalance.config import config_from_mapping
    from patchbalance.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'rank_max'"):
        config_from_mapping(
            {
                "sampling_method": "rank_mx",
                "input": {"patch_records": []},
                "output": {"csv_path": "t.csv"},
            }
        )


def test_a_sampling_method_changed_after_loading_gets_its_own_parameters(tmp_path):
    """The Python API may change `sampling_method` on a loaded config: the build then uses the
    new method's parameters, not those validated for the old one."""
    from patchbalance.balancing.pipeline import run_build
    from patchbalance.config import config_from_mapping
    from rasters import record, write_pair

    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:32, :32] = 2
    mask[32:, 32:] = 1
    image_path, mask_path = write_pair(tmp_path, "a", mask)
    records = [record(image_path, mask_path, r, c, 32) for r in (0, 32) for c in (0, 32)]
    config = config_from_mapping(
        {
            "input": {"patch_records": records},
            "clustering": {"k_min": 2, "k_max": 2},
            "weights": {"sqrt": True, "min_ess": 0.2},
            "output": {"csv_path": str(tmp_path / "t.csv")},
        },
        base_dir=tmp_path,
    )
    assert config.weights.params.model_dump() == {"target_share": "sqrt", "min_ess": 0.2}
    config.sampling_method = "inverse_frequency"
    result = run_build(config, write=False)
    assert config.weights.params.model_dump() == {"sqrt": True}
    assert "min_ess" not in result.summary["weights"]
    assert result.table["sampler_weight"].mean() == pytest.approx(1.0)
