"""class_target (SPEC §3.8) and uniform_mix (SPEC §3.7 step 3)."""

from __future__ import annotations

import numpy as np
import pytest

from data_fixtures import method_scores as sampling_scores
from patchbalance.errors import ConfigError
from patchbalance.measures import class_share, effective_sample_size
from patchbalance.sampling.class_target import class_target_weights, parse_target_share
from patchbalance.sampling.registry import ClassTargetParams
from patchbalance.sampling.scores import normalise_weights

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
    # The constant is the one with t . lambda = 0, whatever path the solver took.
    assert result.target @ result.lambdas == pytest.approx(0.0, abs=1e-15)


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
    # The largest reachable step is (0.6 - 0.3) / (0.9 - 0.3) = 0.5; the target stops 10 % of
    # that step inside the edge (0.3 + 0.45 * 0.6 = 0.57), and is reached there.
    assert result.alpha == pytest.approx(0.45, abs=1e-7)
    np.testing.assert_allclose(result.reached, result.target, atol=1e-6)
    assert result.reached[1] == pytest.approx(0.57, abs=1e-6)
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
        ClassTargetParams(target_share=bad)


def sliver_pool_config(folder, **weights):
    """Return a build config over 225 overlapping 64 px windows of one 512 px mask where class 2
    is 2 single pixels: no window is more than 1/4096 class 2, far below its sqrt target."""
    from patchbalance.config import config_from_mapping
    from rasters import record, write_pair

    mask = np.zeros((512, 512), dtype=np.uint8)
    mask[:, 300:] = 1
    mask[[40, 470], [40, 470]] = 2  # each in 4 of the overlapping windows
    pair = write_pair(folder, "sliver", mask)
    records = [record(*pair, r, c, 64) for r in range(0, 449, 32) for c in range(0, 449, 32)]
    block = {
        "input": {"patch_records": records},
        "clustering": {"k_selection": "fixed", "k": 3},
        "output": {"csv_path": str(folder / "out" / "table.csv")},
        "num_workers": 1,
        "compute": {"scheduler": "synchronous"},
    }
    if weights:
        block["weights"] = weights
    return config_from_mapping({"balanced_dataset": block}, base_dir=folder)


def test_the_default_on_an_unreachable_target_holds_its_ess_floor_and_warns(tmp_path):
    from patchbalance.balancing.pipeline import run_build

    result = run_build(sliver_pool_config(tmp_path), write=False)
    summary = result.summary

    assert summary["sampling_method"] == "class_target" and summary["sampling_method_is_default"]
    n_active = summary["n_active"]
    assert n_active == 225
    assert summary["sampling"]["effective_sample_size"] >= 0.1 * n_active * (1 - 1e-9)
    target = summary["weights"]["class_target"]
    assert target["share_reachable_max"]["2"] == pytest.approx(1 / 4096, abs=1e-6)
    assert target["target_requested"]["2"] > 8 * target["share_reachable_max"]["2"]
    assert target["step_toward_target"] < 1.0
    warnings = "\n".join(summary["warnings"])
    assert "outside what any weighting of these patches can reach" in warnings
    assert "until the effective sample size reached min_ess (10.0% of" in warnings
    assert "note: targets moved toward the uniform shares until" in result.summary_text


def test_without_the_floor_an_unreachable_target_stays_off_the_edge_and_warns_if_concentrated(
    tmp_path,
):
    from patchbalance.balancing.pipeline import run_build

    summary = run_build(sliver_pool_config(tmp_path, min_ess=0), write=False).summary

    target = summary["weights"]["class_target"]
    # The step stops 10 % inside the edge of what is reachable, so class 2 gets 90 % of the way
    # from its uniform share to the largest share any weighting gives it.
    uniform, largest = target["share_uniform"]["2"], target["share_reachable_max"]["2"]
    expected = uniform + 0.9 * (largest - uniform)
    assert target["share_reached"]["2"] == pytest.approx(expected, abs=2e-6)
    ess = summary["sampling"]["effective_sample_size"]
    assert ess < 0.05 * summary["n_active"]
    concentrated = [line for line in summary["warnings"] if "very concentrated" in line]
    assert len(concentrated) == 1
    assert f"an effective sample size of {ess:,.1f} of 225 active patches" in concentrated[0]
    repeats = summary["sampling"]["max_expected_repeats_per_epoch"]
    assert f"{repeats:,.2f} expected draws of" in concentrated[0]


def test_a_dual_solve_that_stops_short_says_so_in_the_summary(tmp_path, monkeypatch):
    import patchbalance.sampling.class_target as class_target
    from patchbalance.balancing.pipeline import run_build

    # No Newton step after the gradient-based start, which stops at a gradient near 1e-5.
    monkeypatch.setattr(class_target, "NEWTON_STEPS", 0)
    result = run_build(
        sliver_pool_config(tmp_path, target_share="balanced", min_ess=0), write=False
    )

    target = result.summary["weights"]["class_target"]
    assert target["dual_converged"] is False
    note = "the dual solve stopped after 0 Newton steps without converging"
    assert any(line.startswith(note) for line in target["notes"])
    assert any(note in line for line in result.summary["warnings"])
    assert note in result.summary_text


def test_a_failed_feasibility_solve_blames_the_solver_not_the_target(monkeypatch):
    import types

    import patchbalance.sampling.class_target as class_target

    failed = types.SimpleNamespace(status=4, message="Numerical difficulties encountered.")
    monkeypatch.setattr(class_target, "linprog", lambda *args, **kwargs: failed)
    counts = np.array([[100.0, 0.0], [40.0, 60.0], [70.0, 30.0]])

    result = class_target_weights(counts, np.array([0.1, 0.9]))

    assert result.alpha == 0.0
    np.testing.assert_allclose(result.probabilities, 1 / 3)
    assert result.notes == [
        "the linear program that finds the reachable shares failed (Numerical difficulties "
        "encountered.); the targets were not moved from the uniform shares, so the weights are "
        "uniform"
    ]
    assert not any("outside what any weighting" in note for note in result.notes)


def test_min_ess_defaults_to_the_floor_whether_class_target_is_named_or_the_default():
    from patchbalance.config import config_from_mapping

    def config(**block):
        block = {"input": {"records_path": "r.csv"}, "output": {"csv_path": "o.csv"}, **block}
        return config_from_mapping({"balanced_dataset": block})

    default, named = config(), config(sampling_method="class_target")
    assert (default.sampling_method, default.sampling_method_is_default) == ("class_target", True)
    assert (named.sampling_method, named.sampling_method_is_default) == ("class_target", False)
    assert default.weights.params.min_ess == named.weights.params.min_ess == 0.1
    assert default.weights.params.target_share == "sqrt"
    assert config(weights={"min_ess": 0}).weights.params.min_ess == 0  # 0 turns the floor off
    with pytest.raises(ConfigError, match="min_ess"):
        config(weights={"min_ess": -0.1})
