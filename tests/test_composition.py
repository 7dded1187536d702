"""Pseudo-count CLR, the elbow rule and composition clustering."""

from __future__ import annotations

import numpy as np
import pytest
from skbio.stats.composition import clr as skbio_clr

from patchbalance.balancing.composition import (
    clr,
    fit_composition_clusters,
    pseudo_count_proportions,
)
from patchbalance.config import ClusteringConfig
from patchbalance.errors import InputError
from patchbalance.kmeans import elbow_k


def test_clr_of_hand_worked_counts_matches_formula_and_scikit_bio():
    counts = np.array([[3, 1, 0]])
    q = np.array([3.5, 1.5, 0.5]) / 5.5  # (n + 0.5) / (4 + 0.5 * 3)
    np.testing.assert_allclose(pseudo_count_proportions(counts, 0.5), [q])
    expected = np.log(q) - np.log(q).mean()
    np.testing.assert_allclose(clr(counts, 0.5), [expected])
    np.testing.assert_allclose(clr(counts, 0.5), [skbio_clr(q)])


def test_clr_rows_sum_to_zero_and_stay_finite_with_absent_classes():
    counts = np.array([[4096, 0, 0, 0], [0, 0, 0, 4096], [10, 20, 0, 4066], [0, 0, 0, 0]])
    values = clr(counts, 0.5)
    assert np.all(np.isfinite(values))
    np.testing.assert_allclose(values.sum(axis=1), 0.0, atol=1e-12)
    # A patch with no valid pixel has uniform pseudo-proportions: its CLR is 0.
    np.testing.assert_allclose(values[3], 0.0, atol=1e-12)


def test_elbow_picks_the_point_farthest_from_the_chord():
    # Points normalised: x = 0, .25, .5, .75, 1; y = 1, .2, .1, .05, 0 -> farthest at k=2.
    ks = np.array([1, 2, 3, 4, 5])
    inertias = np.array([100.0, 20.0, 10.0, 5.0, 0.0])
    assert elbow_k(ks, inertias) == 2


def test_elbow_takes_largest_k_with_fewer_than_three_candidates():
    assert elbow_k(np.array([3, 4]), np.array([10.0, 5.0])) == 4


def test_elbow_takes_first_k_on_ties():
    # A straight line: every point is on the chord, distance 0 everywhere -> the first k.
    assert elbow_k(np.array([2, 3, 4, 5]), np.array([3.0, 2.0, 1.0, 0.0])) == 2


def _three_composition_types(rng: np.random.Generator, per_type: int = 60) -> np.ndarray:
    types = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.3, 0.3, 0.4]])
    rows = []
    for proportions in types:
        noisy = rng.dirichlet(proportions * 400, size=per_type)
        rows.append(np.round(noisy * 4096))
    return np.vstack(rows)


def test_elbow_finds_three_well_separated_composition_types():
    counts = _three_composition_types(np.random.default_rng(0))
    result = fit_composition_clusters(counts, ClusteringConfig(k_min=2, k_max=8), seed=42)
    assert result.k == 3
    assert sorted(result.sizes.tolist()) == [60, 60, 60]
    # Each true type lands in exactly one cluster.
    for start in (0, 60, 120):
        assert len(set(result.labels[start : start + 60].tolist())) == 1


def test_clusters_are_numbered_by_decreasing_size():
    rng = np.random.default_rng(1)
    counts = np.vstack(
        [_three_composition_types(rng, 10)[:10], _three_composition_types(rng, 40)[40:]]
    )
    result = fit_composition_clusters(counts, ClusteringConfig(k_selection="fixed", k=3), seed=0)
    assert result.sizes.tolist() == sorted(result.sizes.tolist(), reverse=True)
    np.testing.assert_allclose(result.composition_score, 1.0 / result.sizes[result.labels])


def test_k_range_is_clamped_to_the_number_of_distinct_compositions():
    counts = np.repeat(np.array([[100, 0], [0, 100], [50, 50]]), 5, axis=0)
    result = fit_composition_clusters(counts, ClusteringConfig(k_min=4, k_max=16), seed=42)
    assert result.k == 3
    assert any("clamped" in note for note in result.notes)


def test_fewer_than_two_active_patches_is_an_error():
    with pytest.raises(InputError, match="only 1 active patch"):
        fit_composition_clusters(np.array([[10, 5]]), ClusteringConfig(), seed=42)


def test_sweep_runs_on_a_seeded_subsample_above_sweep_sample():
    rng = np.random.default_rng(2)
    counts = np.vstack([_three_composition_types(rng, 100)])
    config = ClusteringConfig(k_min=2, k_max=6, sweep_sample=100)
    first = fit_composition_clusters(counts, config, seed=5)
    second = fit_composition_clusters(counts, config, seed=5)
    assert first.sweep_sample == 100
    assert first.k == second.k == 3
    np.testing.assert_array_equal(first.labels, second.labels)
