"""Visual uniqueness: kNN backends, self-removal by index, recall of the approximate search."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from patchbalance.balancing.uniqueness import (
    _exact_numpy,
    choose_backend,
    compute_uniqueness,
    drop_self,
    exact_search,
    ivf_parameters,
    nearest_neighbors,
    normalise_rows,
)
from patchbalance.config import UniquenessConfig, config_from_mapping
from patchbalance.errors import ConfigError, InputError, MissingDependencyError


def brute_force_scores(vectors: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine distance to the k nearest others, from the full N x N matrix (float64)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = unit.astype(np.float64)
    distance = 1.0 - unit @ unit.T
    np.fill_diagonal(distance, np.inf)
    return np.sort(distance, axis=1)[:, :k].mean(axis=1)


def clustered(n: int, dim: int, centres: int, noise: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(centres, dim))
    labels = rng.integers(0, centres, size=n)
    return (centre[labels] + noise * rng.normal(size=(n, dim))).astype(np.float32)


@pytest.fixture
def random_vectors() -> np.ndarray:
    return np.random.default_rng(3).normal(size=(400, 24)).astype(np.float32)


def test_exact_scores_match_a_brute_force_mean_of_the_k_smallest_distances(random_vectors):
    result = compute_uniqueness(random_vectors, UniquenessConfig(backend="exact"), seed=0)
    np.testing.assert_allclose(result.scores, brute_force_scores(random_vectors, 5), atol=1e-6)
    assert result.scores.dtype == np.float64
    assert result.summary["backend"] == "exact"
    assert result.summary["k"] == 5
    # The device of the tensors the search used, not the one it asked for.
    torch = pytest.importorskip("torch")
    assert result.summary["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_exact_faiss_and_sklearn_agree_to_1e_5(random_vectors, backend):
    exact = compute_uniqueness(random_vectors, UniquenessConfig(backend="exact"), seed=0)
    other = compute_uniqueness(random_vectors, UniquenessConfig(backend=backend), seed=0)
    np.testing.assert_allclose(other.scores, exact.scores, atol=1e-5)
    assert other.summary["backend"] == backend
    assert "recall_at_k" not in other.summary  # exact backends need no recall estimate


def test_block_size_smaller_than_n_gives_the_same_neighbours_as_one_block(random_vectors):
    unit = normalise_rows(random_vectors)
    ids = np.arange(len(unit))
    one_idx, one_sim, _ = exact_search(unit, ids, 6, block_size=10_000)
    for block in (7, 64, 399):
        idx, sim, _ = exact_search(unit, ids, 6, block_size=block)
        np.testing.assert_array_equal(idx, one_idx)
        np.testing.assert_allclose(sim, one_sim, atol=1e-6)


def test_numpy_exact_search_matches_the_torch_one_with_tiling(random_vectors):
    unit = normalise_rows(random_vectors)
    ids = np.arange(len(unit))
    torch_idx, torch_sim, _ = exact_search(unit, ids, 6, block_size=50)
    numpy_idx, numpy_sim = _exact_numpy(unit, ids, 6, block_size=33)
    np.testing.assert_array_equal(numpy_idx, torch_idx)
    np.testing.assert_allclose(numpy_sim, torch_sim, atol=1e-6)


def test_an_outlier_gets_the_highest_score():
    vectors = clustered(300, 16, centres=3, noise=0.05)
    outlier = -vectors.mean(axis=0, keepdims=True) + np.random.default_rng(9).normal(size=(1, 16))
    vectors = np.vstack([vectors[:150], outlier.astype(np.float32), vectors[150:]])
    scores = compute_uniqueness(vectors, UniquenessConfig(backend="exact"), seed=0).scores
    assert int(np.argmax(scores)) == 150
    assert scores[150] > 5 * np.median(scores)


@pytest.mark.parametrize("backend", ["exact", "faiss", "sklearn", "hnsw", "faiss_ivf"])
def test_two_identical_vectors_find_each_other_at_distance_zero(backend):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(60, 8)).astype(np.float32)
    vectors[41] = vectors[7]
    config = UniquenessConfig(backend=backend, k_neighbors=1)
    indices, distances, _ = nearest_neighbors(normalise_rows(vectors), 1, backend, config, 0)
    assert indices[7, 0] == 41 and indices[41, 0] == 7
    np.testing.assert_allclose(distances[[7, 41], 0], 0.0, atol=1e-6)
    scores = compute_uniqueness(vectors, config, seed=0).scores
    np.testing.assert_allclose(scores[[7, 41]], 0.0, atol=1e-6)
    assert scores[np.setdiff1d(np.arange(60), [7, 41])].min() > 0.01


@pytest.mark.parametrize("backend", ["exact", "faiss", "sklearn", "hnsw", "faiss_ivf"])
def test_self_is_dropped_by_index_even_with_more_duplicates_than_neighbours(backend):
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(80, 8)).astype(np.float32)
    copies = [3, 10, 11, 30, 52, 53, 70]  # seven identical rows, k + 1 = 4
    vectors[copies] = vectors[3]
    config = UniquenessConfig(backend=backend, k_neighbors=3)
    indices, distances, _ = nearest_neighbors(normalise_rows(vectors), 3, backend, config, 0)
    assert not (indices == np.arange(80)[:, None]).any()
    assert set(indices[copies].ravel()) <= set(copies)
    np.testing.assert_allclose(distances[copies], 0.0, atol=1e-6)


def test_drop_self_removes_the_query_wherever_it_is_listed_else_the_farthest():
    query_ids = np.array([5, 6])
    indices = np.array([[9, 5, 2], [1, 2, 3]])  # query 5 listed second; query 6 absent
    similarities = np.array([[1.0, 1.0, 0.5], [1.0, 1.0, 0.9]], dtype=np.float32)
    kept_idx, kept_sim = drop_self(query_ids, indices, similarities)
    np.testing.assert_array_equal(kept_idx, [[9, 2], [1, 2]])
    np.testing.assert_allclose(kept_sim, [[1.0, 0.5], [1.0, 1.0]])


def test_hnsw_recall_at_5_is_at_least_0_95_on_clustered_data():
    vectors = clustered(3000, 32, centres=40, noise=0.3, seed=4)
    config = UniquenessConfig(backend="hnsw", k_neighbors=5)
    result = compute_uniqueness(vectors, config, seed=0)
    unit = normalise_rows(vectors).astype(np.float64)
    # Independent check on 300 queries against the full distance rows.
    sample = np.arange(0, 3000, 10)
    distance = 1.0 - unit[sample] @ unit.T
    distance[np.arange(len(sample)), sample] = np.inf
    kth = np.sort(distance, axis=1)[:, 4]
    indices, _, _ = nearest_neighbors(normalise_rows(vectors), 5, "hnsw", config, 0)
    found = np.take_along_axis(distance, indices[sample], axis=1)
    recall = (found <= kth[:, None] + 1e-6).sum() / (5 * len(sample))
    assert recall >= 0.95
    assert result.summary["recall_at_k"] >= 0.95
    assert result.summary["recall_queries"] == 1000
    exact = brute_force_scores(vectors, 5)
    assert np.corrcoef(result.scores, exact)[0, 1] > 0.99


@pytest.fixture(scope="module")
def overlapping_clusters() -> np.ndarray:
    """5,000 x 32 vectors in 20 wide clusters, so some true neighbours sit in other IVF lists."""
    return clustered(5000, 32, centres=20, noise=1.0, seed=5)


def test_faiss_ivf_finds_the_exact_neighbours_of_at_least_95_percent_of_rows(
    overlapping_clusters,
):
    unit = normalise_rows(overlapping_clusters)
    config = UniquenessConfig(backend="faiss_ivf", k_neighbors=5)
    exact_idx, exact_dist, _ = nearest_neighbors(unit, 5, "exact", config, 0)
    ivf_idx, ivf_dist, device = nearest_neighbors(unit, 5, "faiss_ivf", config, 0)
    assert device in ("cpu", "cuda") or device.startswith("cuda (")
    same_rows = (np.sort(ivf_idx, axis=1) == np.sort(exact_idx, axis=1)).all(axis=1)
    assert same_rows.mean() >= 0.95
    assert not (ivf_idx == np.arange(len(unit))[:, None]).any()
    # IVFFlat's distances are exact for what it finds, so a miss can only make a score larger.
    ivf_scores, exact_scores = ivf_dist.mean(axis=1), exact_dist.mean(axis=1)
    assert (ivf_scores >= exact_scores - 1e-6).all()
    assert np.abs(ivf_scores - exact_scores).mean() < 1e-3
    np.testing.assert_allclose(ivf_scores[same_rows], exact_scores[same_rows], atol=1e-6)


def test_faiss_ivf_summary_reports_recall_nlist_and_nprobe(overlapping_clusters):
    config = UniquenessConfig(backend="faiss_ivf", k_neighbors=5)
    result = compute_uniqueness(overlapping_clusters, config, seed=0)
    summary = result.summary
    assert summary["backend"] == "faiss_ivf"
    # auto: round(4 * sqrt(5000)) = 283 lists, lowered to 5000 // 39 = 128 for training.
    assert summary["nlist"] == 128 and summary["nlist_requested"] == "auto"
    assert summary["nprobe"] == 16 and "nprobe_requested" not in summary
    assert summary["recall_queries"] == 1000
    assert 0.95 <= summary["recall_at_k"] <= 1.0
    exact = brute_force_scores(overlapping_clusters, 5)
    assert np.corrcoef(result.scores, exact)[0, 1] > 0.999


def test_faiss_ivf_gives_the_same_scores_for_the_same_seed(overlapping_clusters):
    config = UniquenessConfig(backend="faiss_ivf", nlist=64, nprobe=4)
    first = compute_uniqueness(overlapping_clusters, config, seed=7)
    second = compute_uniqueness(overlapping_clusters, config, seed=7)
    np.testing.assert_array_equal(first.scores, second.scores)
    assert first.summary["recall_at_k"] == second.summary["recall_at_k"]


def test_ivf_parameters_follow_4_sqrt_n_with_39_training_points_per_list():
    auto = UniquenessConfig(backend="faiss_ivf")
    assert ivf_parameters(auto, 1_000_000) == (4000, 16)  # 4 * sqrt(10^6)
    assert ivf_parameters(auto, 200_000) == (1789, 16)  # 4 * 447.2
    assert ivf_parameters(auto, 10_000) == (256, 16)  # 400 lowered to 10,000 // 39
    assert ivf_parameters(auto, 300) == (7, 7)  # nprobe lowered to nlist
    assert ivf_parameters(auto, 30) == (1, 1)
    fixed = UniquenessConfig(backend="faiss_ivf", nlist=500, nprobe=32)
    assert ivf_parameters(fixed, 1_000_000) == (500, 32)
    assert ivf_parameters(fixed, 3_900) == (100, 32)


def test_faiss_ivf_lowers_an_nlist_too_large_for_the_patches_with_a_warning(caplog):
    vectors = clustered(400, 8, centres=4, noise=0.2)
    config = UniquenessConfig(backend="faiss_ivf", nlist=50, nprobe=20)
    with caplog.at_level(logging.WARNING):
        result = compute_uniqueness(vectors, config, seed=0)
    assert result.summary["nlist"] == 10 and result.summary["nlist_requested"] == 50
    assert result.summary["nprobe"] == 10 and result.summary["nprobe_requested"] == 20
    assert "uniqueness.nlist is 50" in caplog.text
    assert "uniqueness.nprobe is 20 but there are only 10 lists" in caplog.text
    # Every list is probed: the search is exact.
    np.testing.assert_allclose(result.scores, brute_force_scores(vectors, 5), atol=1e-5)


def uniqueness_from_mapping(tmp_path, **keys) -> UniquenessConfig:
    return config_from_mapping(
        {
            "input": {"records_path": "r.csv"},
            "output": {"csv_path": "t.csv"},
            "uniqueness": {"backend": "faiss_ivf", **keys},
        },
        base_dir=tmp_path,
    ).uniqueness


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"nlist": 0}, r"'uniqueness.nlist': nlist must be 'auto' or a positive integer, got 0"),
        ({"nlist": "many"}, r"'uniqueness.nlist': .* got 'many'"),
        ({"nlist": 2.5}, r"'uniqueness.nlist': .* got 2.5"),
        ({"nprobe": 0}, r"'uniqueness.nprobe': Input should be greater than or equal to 1"),
        ({"nprobe": "x"}, r"'uniqueness.nprobe': Input should be a valid integer"),
        ({"nlist": 16, "nprobe": 32}, r"nprobe \(32\) is larger than nlist \(16\)"),
    ],
)
def test_bad_nlist_or_nprobe_is_a_one_line_config_error_naming_the_key(tmp_path, keys, message):
    with pytest.raises(ConfigError, match=message) as info:
        uniqueness_from_mapping(tmp_path, **keys)
    assert "\n" not in str(info.value)


def test_an_explicit_nlist_below_the_default_nprobe_is_accepted(tmp_path):
    config = uniqueness_from_mapping(tmp_path, nlist=8)
    assert (config.nlist, config.nprobe) == (8, 16)
    assert ivf_parameters(config, 100_000) == (8, 8)
    assert uniqueness_from_mapping(tmp_path, nlist="auto", nprobe=64).nprobe == 64


def test_k_is_clamped_with_a_warning_when_there_are_few_patches(caplog):
    vectors = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        result = compute_uniqueness(vectors, UniquenessConfig(k_neighbors=5), seed=0)
    assert result.summary["k"] == 2 and result.summary["k_requested"] == 5
    assert "only 3 active patches; using k = 2" in caplog.text
    np.testing.assert_allclose(result.scores, brute_force_scores(vectors, 2), atol=1e-6)


def test_fewer_than_two_patches_is_an_input_error():
    with pytest.raises(InputError, match="at least 2 active patches, got 1"):
        compute_uniqueness(np.ones((1, 4), np.float32), UniquenessConfig(), seed=0)


def test_nan_or_inf_embeddings_are_an_error_naming_the_count_and_a_patch():
    vectors = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    vectors[4, 1] = np.nan
    vectors[8, 0] = np.inf
    labels = [f"tile.tif@{i},0" for i in range(10)]
    with pytest.raises(InputError, match=r"^2 embedding\(s\) contain NaN .*first: tile.tif@4,0"):
        compute_uniqueness(vectors, UniquenessConfig(), seed=0, row_labels=labels)


def test_auto_uses_exact_up_to_200000_patches_and_hnsw_above():
    assert choose_backend("auto", 200_000) == "exact"
    assert choose_backend("auto", 200_001) == "hnsw"
    assert choose_backend("faiss", 10) == "faiss"
    assert choose_backend("faiss_ivf", 10) == "faiss_ivf"
    result = compute_uniqueness(np.eye(5, dtype=np.float32), UniquenessConfig(), seed=0)
    assert result.summary["backend"] == "exact"
    np.testing.assert_allclose(result.scores, 1.0)  # orthogonal rows: cosine distance 1


@pytest.mark.parametrize(
    ("backend", "module", "command"),
    [
        ("faiss", "faiss", "pip install faiss-cpu"),
        ("faiss_ivf", "faiss", "pip install faiss-cpu"),
        ("hnsw", "hnswlib", "pip install hnswlib"),
    ],
)
def test_a_missing_backend_fails_with_the_pip_command(monkeypatch, backend, module, command):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingDependencyError) as info:
        compute_uniqueness(np.eye(4, dtype=np.float32), UniquenessConfig(backend=backend), 0)
    assert 'pip install "patchbalance[knn]"' in str(info.value)
    assert command in str(info.value)


def test_summary_reports_the_score_distribution(random_vectors):
    result = compute_uniqueness(random_vectors, UniquenessConfig(backend="exact"), seed=0)
    dist = result.summary["distribution"]
    assert dist["min"] == pytest.approx(result.scores.min())
    assert dist["median"] == pytest.approx(np.median(result.scores))
    assert dist["max"] == pytest.approx(result.scores.max())
    assert result.summary["seconds"] >= 0
