"""The CoreSet scorers on hand-built pools with known answers (SPEC §6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy
from threadpoolctl import threadpool_limits

from patchbalance.coreset import scorers
from patchbalance.coreset.scorers import (
    class_balance_order,
    class_balance_scores,
    feature_activation_scores,
    feature_diversity_order,
    label_complexity_scores,
    label_complexity_then_diversity_order,
    order_scores,
    resolve_cb_device,
    round_robin_order,
    top_by_score,
    vendi_score,
)
from patchbalance.errors import ConfigError

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # KMeans' OpenMP threads spin-wait; on a busy shared machine one thread is far faster.
    with threadpool_limits(1):
        yield


def reference_class_balance(features: np.ndarray, budget: int) -> list[int]:
    """The cb greedy straight from its definition, one candidate at a time (slow, obvious)."""
    total = np.zeros(features.shape[1])
    picked: list[int] = []
    for _ in range(budget):
        best, best_entropy = -1, -np.inf
        for i in range(len(features)):
            if i in picked:
                continue
            value = scipy_entropy(total + features[i])  # scipy normalises the vector itself
            if value > best_entropy:
                best, best_entropy = i, value
        picked.append(best)
        total += features[best]
    return picked


def dirichlet_pool(n: int, seed: int, alpha=(3.0, 0.4, 0.8, 0.2, 0.1)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    proportions = rng.dirichlet(alpha, size=n)
    proportions[proportions < 0.02] = 0.0  # most patches miss some classes, as in real masks
    return proportions / proportions.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# lc


def test_label_complexity_divides_entropy_by_the_pool_maximum():
    np.testing.assert_allclose(
        label_complexity_scores(np.array([0.5, 1.0, 0.25, 0.0])), [0.5, 1.0, 0.25, 0.0]
    )


def test_label_complexity_of_an_all_homogeneous_pool_is_zero():
    np.testing.assert_array_equal(label_complexity_scores(np.zeros(3)), np.zeros(3))


# --------------------------------------------------------------------------------------------
# cb


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_cb_first_pick_is_the_patch_with_the_most_even_class_mix(backend):
    features = np.array(
        [[1.0, 0.0, 0.0], [0.8, 0.2, 0.0], [0.5, 0.5, 0.0], [0.4, 0.3, 0.3], [0.6, 0.2, 0.2]]
    )
    order = class_balance_order(features, 1, backend=backend, device="cpu")
    assert order.tolist() == [3]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_cb_second_pick_completes_the_first_towards_uniform(backend):
    # After [0.9, 0.1, 0], the patch rich in class 2 (the missing one) evens the mix most.
    features = np.array([[0.9, 0.1, 0.0], [0.5, 0.5, 0.0], [0.0, 0.2, 0.8], [0.2, 0.0, 0.0]])
    features[3] = [1.0, 0.0, 0.0]
    order = class_balance_order(features, 2, backend=backend, device="cpu")
    assert order.tolist() == [1, 2]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_cb_follows_the_definition_step_by_step(backend):
    features = dirichlet_pool(60, seed=3)
    expected = reference_class_balance(features, 25)
    assert class_balance_order(features, 25, backend=backend, device="cpu").tolist() == expected


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_cb_with_spatial_columns_follows_the_definition(backend):
    # Appended coordinates make the row totals differ: the general (non-constant T) path.
    rng = np.random.default_rng(5)
    features = np.hstack([dirichlet_pool(50, seed=4), rng.random((50, 2))])
    expected = reference_class_balance(features, 20)
    assert class_balance_order(features, 20, backend=backend, device="cpu").tolist() == expected


@pytest.mark.parametrize("spatial", [False, True])
def test_cb_numpy_and_torch_paths_pick_the_same_patches(spatial):
    features = dirichlet_pool(600, seed=11)
    if spatial:
        features = np.hstack([features, np.random.default_rng(12).random((600, 2))])
    numpy_order = class_balance_order(features, 200, backend="numpy")
    torch_order = class_balance_order(features, 200, backend="torch", device="cpu")
    np.testing.assert_array_equal(numpy_order, torch_order)


def test_cb_selection_is_more_class_balanced_than_random_subsets():
    # Imbalanced pool: class 0 dominates, classes 3 and 4 are rare.
    features = dirichlet_pool(800, seed=21, alpha=(4.0, 0.5, 0.3, 0.08, 0.05))
    budget = 160
    chosen = class_balance_order(features, budget)
    chosen_entropy = scipy_entropy(features[chosen].sum(axis=0))
    rng = np.random.default_rng(0)
    random_entropies = [
        scipy_entropy(features[rng.choice(800, budget, replace=False)].sum(axis=0))
        for _ in range(50)
    ]
    assert chosen_entropy > max(random_entropies)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_cb_breaks_ties_by_position(backend):
    features = np.tile([[0.5, 0.5]], (5, 1))
    assert class_balance_order(features, 3, backend=backend, device="cpu").tolist() == [0, 1, 2]


def test_cb_scores_fall_with_the_greedy_step_and_are_zero_for_the_rest():
    np.testing.assert_allclose(class_balance_scores(np.array([2, 0]), 5), [0.75, 0, 1.0, 0, 0])
    np.testing.assert_allclose(class_balance_scores(np.array([0]), 1), [1.0])


def test_cb_device_cpu_uses_numpy_and_unknown_devices_are_errors():
    assert resolve_cb_device("cpu") == ("numpy", None)
    with pytest.raises(ConfigError, match="not supported"):
        resolve_cb_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cb_device_cuda_without_cuda_is_an_error_and_null_falls_back_to_numpy():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_cb_device("cuda")
    assert resolve_cb_device(None) == ("numpy", None)


# --------------------------------------------------------------------------------------------
# fa


def test_feature_activation_matches_hand_computed_gamma():
    embeddings = np.array([[0.0, 1.0], [0.0, 0.2], [1.0, 3.0], [0.5, 0.5]], dtype=np.float32)
    # (mean, population std) per row: (0.5, 0.5), (0.1, 0.1), (2, 1), (0.5, 0).
    eps = scorers.FA_EPSILON
    gamma = np.array(
        [
            -(1 - 0.5) * math.log(0.5 + eps),
            -(1 - 0.1) * math.log(0.1 + eps),
            -(1 - 2.0) * math.log(1.0 + eps),
            -(1 - 0.5) * math.log(0.0 + eps),
        ]
    )
    expected = 1 - (gamma - gamma.min()) / (gamma.max() - gamma.min())
    np.testing.assert_allclose(feature_activation_scores(embeddings), expected, rtol=1e-6)
    # The constant embedding has the largest gamma (log of eps), so the lowest score.
    assert feature_activation_scores(embeddings).argmin() == 3


# --------------------------------------------------------------------------------------------
# Vendi


def test_vendi_score_of_identical_vectors_is_one():
    assert vendi_score(np.tile([[0.3, -1.0, 2.0]], (7, 1))) == pytest.approx(1.0)


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_vendi_score_of_n_orthogonal_vectors_is_n(n):
    rotation, _ = np.linalg.qr(np.random.default_rng(n).normal(size=(12, 12)))
    vectors = rotation[:n] * np.arange(1, n + 1)[:, None]  # lengths do not matter (cosine)
    assert vendi_score(vectors) == pytest.approx(n)


def test_vendi_score_with_more_vectors_than_dimensions_counts_distinct_directions():
    # Four copies each of three orthogonal directions in 3-d: the d x d side is decomposed.
    vectors = np.repeat(np.eye(3), 4, axis=0)
    assert vendi_score(vectors) == pytest.approx(3.0)


# --------------------------------------------------------------------------------------------
# fd


def blobs(sizes: list[int], dim: int, seed: int, spread: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 10
    return np.vstack(
        [c + spread * rng.normal(size=(size, dim)) for c, size in zip(centres, sizes, strict=True)]
    ).astype(np.float32)


def test_round_robin_takes_one_per_cluster_per_round_nearest_first():
    labels = np.array([0, 0, 0, 1, 1, 2])
    distances = np.array([0.3, 0.1, 0.2, 0.5, 0.4, 0.9])
    assert round_robin_order(labels, distances).tolist() == [1, 4, 5, 2, 3, 0]


def test_fd_covers_every_cluster_before_taking_a_second_patch_from_any():
    data = blobs([10, 6, 3], dim=4, seed=1)
    truth = np.repeat([0, 1, 2], [10, 6, 3])
    result = feature_diversity_order(data, 3, 3, False, 0.005, seed=42)
    assert result.k == 3
    first_round = truth[result.order[:3]]
    assert sorted(first_round.tolist()) == [0, 1, 2]
    # Three full rounds exhaust the smallest blob; each blob gives exactly three.
    assert np.bincount(truth[result.order[:9]]).tolist() == [3, 3, 3]
    # Cluster 0 is the largest blob, and its members come nearest to the centroid first.
    largest = result.order[result.labels[result.order] == 0]
    assert set(largest.tolist()) == set(range(10))
    centre = data[:10].astype(np.float64).mean(axis=0)
    distances = np.linalg.norm(data[largest] - centre, axis=1)
    assert np.all(np.diff(distances) >= -1e-6)


def test_fd_elbow_finds_the_number_of_well_separated_groups():
    # Four equal groups at equal distances: inertia halves from k=2 to 3 and vanishes at 4.
    rng = np.random.default_rng(2)
    centres = 10 * np.eye(6)[:4]
    data = np.vstack([c + 0.05 * rng.normal(size=(20, 6)) for c in centres]).astype(np.float32)
    result = feature_diversity_order(data, 2, 9, False, 0.005, seed=42)
    assert result.rule == "elbow"
    assert result.k == 4
    assert sorted(result.sweep) == list(range(2, 10))


def test_fd_vendi_rule_stops_when_more_clusters_no_longer_change_diversity():
    # Four tight groups along orthogonal directions: up to k = 4 each new cluster removes a
    # direction from some cluster; beyond it the clusters are already uniform (Vendi ~ 1).
    rng = np.random.default_rng(3)
    directions = np.eye(8)[:4] * 5
    data = np.vstack([d + 1e-4 * rng.normal(size=(12, 8)) for d in directions]).astype(np.float32)
    result = feature_diversity_order(data, 2, 10, True, 0.005, seed=42)
    assert result.rule == "vendi"
    assert result.k == 4
    assert result.sweep[4] == pytest.approx(1.0, abs=1e-3)
    # The sweep stopped after three calm steps (k = 5, 6, 7) instead of running to 10.
    assert max(result.sweep) == 7


def test_fd_scores_run_from_one_to_zero_along_the_order():
    np.testing.assert_allclose(order_scores(np.array([2, 0, 1]), 3), [0.5, 0.0, 1.0])


# --------------------------------------------------------------------------------------------
# hybrids and selection helpers


def test_lc_fd_takes_the_first_m_by_fd_then_the_rest_by_lc():
    fd_order = np.array([3, 1, 4, 0, 2])
    complexity = np.array([0.1, 0.9, 0.5, 0.9, 0.2])
    order = label_complexity_then_diversity_order(fd_order, complexity, 2)
    # The rest {0, 2, 4} by lc: 2 (0.5), 4 (0.2), 0 (0.1).
    assert order.tolist() == [3, 1, 2, 4, 0]
    # m = 0 is pure lc; equal lc scores go by position.
    assert label_complexity_then_diversity_order(fd_order, complexity, 0).tolist() == [
        1,
        3,
        2,
        4,
        0,
    ]


def test_lc_fd_default_cutoff_is_ten_percent_of_the_pool():
    assert scorers.default_cutoff(77, None) == 8
    assert scorers.default_cutoff(5, 9) == 5


def test_top_by_score_breaks_ties_by_position():
    assert top_by_score(np.array([0.2, 0.9, 0.2, 0.9, 0.1]), 3).tolist() == [1, 3, 0]
