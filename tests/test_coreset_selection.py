"""CoreSet selection over a table: pool, budget, ties, embeddings, spatial spread, weights."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import entropy as scipy_entropy
from threadpoolctl import threadpool_limits

from patchbalance.coreset import budget_count, run_selection, select_coreset
from patchbalance.coreset.scorers import class_balance_order, feature_activation_scores
from patchbalance.errors import ConfigError, InputError


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # KMeans' OpenMP threads spin-wait; on a busy shared machine one thread is far faster.
    with threadpool_limits(1):
        yield


def pool_table(counts: np.ndarray, patch_size: int = 16, seed: int = 0) -> pd.DataFrame:
    """A balanced table as the build writes it, one row per row of class pixel `counts`."""
    counts = np.asarray(counts, dtype=np.int64)
    n = len(counts)
    rng = np.random.default_rng(seed)
    proportions = counts / counts.sum(axis=1, keepdims=True)
    table = pd.DataFrame(
        {
            "image_path": [f"/data/scene_{i % 3}.tif" for i in range(n)],
            "mask_path": [f"/data/mask_{i % 3}.tif" for i in range(n)],
            "row_off": (np.arange(n) // 3) * patch_size,
            "col_off": 0,
            "patch_size": patch_size,
        }
    )
    minx = rng.random(n) * 1000
    miny = rng.random(n) * 1000
    table["tile_minx"], table["tile_maxx"] = minx, minx + 8
    table["tile_miny"], table["tile_maxy"] = miny, miny + 8
    table["crs"] = "EPSG:32640"
    for j in range(counts.shape[1]):
        table[f"px_{j}"] = counts[:, j]
    table["class_dist_json"] = [
        json.dumps({str(j): round(float(p), 6) for j, p in enumerate(row) if p > 0})
        for row in proportions
    ]
    table["class_entropy"] = scipy_entropy(proportions.T)
    table["has_low_entropy"] = False
    table["excluded"] = False
    table["exclusion_reason"] = ""
    table["freq_cluster_id"] = np.arange(n) % 4
    table["sampler_weight"] = 1.0
    return table


def random_counts(n: int, seed: int, alpha=(3.0, 0.5, 0.8, 0.1), pixels: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    proportions = rng.dirichlet(alpha, size=n)
    proportions[proportions < 0.03] = 0
    proportions /= proportions.sum(axis=1, keepdims=True)
    counts = np.floor(proportions * pixels).astype(np.int64)
    counts[:, 0] += pixels - counts.sum(axis=1)  # every patch fully labelled
    return counts


def config(**values) -> dict:
    return {"method": "lc", "budget": 0.3, "device": "cpu", **values}


# --------------------------------------------------------------------------------------------
# Output shape and pool


def test_output_keeps_every_row_and_scores_only_the_pool():
    table = pool_table(random_counts(12, seed=1))
    table.loc[2, ["excluded", "exclusion_reason"]] = [True, "mask_border_nodata"]
    table.loc[5, "has_low_entropy"] = True
    table.loc[7, ["excluded", "exclusion_reason"]] = [True, "low_entropy"]
    out = select_coreset(table, config(budget=5, budget_mode="count"))
    assert len(out) == len(table)
    pd.testing.assert_frame_equal(
        out[table.columns.drop("sampler_weight")], table.drop(columns="sampler_weight")
    )
    outside = out.index.isin([2, 5, 7])
    assert out.loc[outside, "coreset_score"].isna().all()
    assert out.loc[~outside, "coreset_score"].notna().all()
    assert not out.loc[outside, "coreset_selected"].any()
    assert out["coreset_selected"].sum() == 5
    assert out["coreset_selected"].dtype == bool


def test_without_exclude_low_entropy_homogeneous_patches_join_the_pool():
    table = pool_table(random_counts(10, seed=2))
    table.loc[5, "has_low_entropy"] = True
    table.loc[7, ["excluded", "exclusion_reason", "has_low_entropy"]] = [True, "low_entropy", True]
    table.loc[8, ["excluded", "exclusion_reason"]] = [True, "image_black_border"]
    out = select_coreset(table, config(exclude_low_entropy=False, budget=1.0))
    assert out.loc[[5, 7], "coreset_selected"].all()
    assert not out.loc[8, "coreset_selected"]
    assert out["coreset_selected"].sum() == 9


def test_an_empty_pool_is_an_error_that_counts_why():
    table = pool_table(random_counts(4, seed=3))
    table["excluded"] = True
    with pytest.raises(InputError, match="pool is empty: all 4 rows are excluded"):
        select_coreset(table, config())


def test_duplicate_patch_keys_in_the_pool_are_an_error():
    table = pool_table(random_counts(6, seed=4))
    table.loc[4, ["image_path", "row_off"]] = table.loc[1, ["image_path", "row_off"]].to_list()
    with pytest.raises(InputError, match="2 rows share a patch key"):
        select_coreset(table, config())


# --------------------------------------------------------------------------------------------
# Budget


def test_budget_fraction_rounds_to_the_nearest_count_and_at_least_one():
    assert budget_count(0.3, "fraction", 10) == 3
    assert budget_count(0.25, "fraction", 10) == 3  # 2.5 rounds half up
    assert budget_count(0.01, "fraction", 10) == 1
    assert budget_count(1.0, "fraction", 10) == 10
    assert budget_count(10, "count", 10) == 10


@pytest.mark.parametrize(
    ("budget", "mode", "message"),
    [
        (1.5, "fraction", "budget 1.5 is larger than the pool: .* at most 1"),
        (11, "count", "budget 11 is larger than the pool of 10 patches"),
        (0, "fraction", "budget must be > 0"),
        (-2, "count", "budget must be > 0"),
    ],
)
def test_budget_out_of_range_is_an_error_that_says_why(budget, mode, message):
    with pytest.raises(ConfigError, match=message):
        budget_count(budget, mode, 10)


def test_budget_errors_reach_the_api_as_config_errors():
    table = pool_table(random_counts(10, seed=5))
    with pytest.raises(ConfigError, match="larger than the pool of 10 patches"):
        select_coreset(table, config(budget=11, budget_mode="count"))
    with pytest.raises(ConfigError, match="budget"):
        select_coreset(table, config(budget=0))


def test_a_fraction_that_rounds_to_zero_selects_one_patch():
    out = select_coreset(pool_table(random_counts(10, seed=6)), config(budget=0.01))
    assert out["coreset_selected"].sum() == 1


# --------------------------------------------------------------------------------------------
# Scorers on the table


def test_equal_scores_are_broken_by_the_patch_key_not_the_row_order():
    table = pool_table(np.tile([[200, 56]], (6, 1)))
    shuffled = table.sample(frac=1.0, random_state=3).reset_index(drop=True)
    out = select_coreset(shuffled, config(budget=2, budget_mode="count"))
    chosen = out[out["coreset_selected"]].sort_values(["image_path", "row_off"])
    # Smallest keys: scene_0 row 0 and scene_0 row 16.
    assert chosen["image_path"].tolist() == ["/data/scene_0.tif", "/data/scene_0.tif"]
    assert chosen["row_off"].tolist() == [0, 16]


def test_lc_selects_the_most_mixed_patches():
    counts = np.array([[256, 0], [128, 128], [192, 64], [240, 16]])
    out = select_coreset(pool_table(counts), config(budget=2, budget_mode="count"))
    assert out["coreset_selected"].tolist() == [False, True, True, False]
    np.testing.assert_allclose(
        out["coreset_score"], out["class_entropy"] / out["class_entropy"].max()
    )


def test_cb_on_the_table_uses_each_patch_class_proportions():
    counts = random_counts(40, seed=7)
    table = pool_table(counts)
    out = select_coreset(table, config(method="cb", budget=10, budget_mode="count"))
    # The pool runs in patch-key order, not row order: map the greedy's picks back to rows.
    order = table.sort_values(["image_path", "row_off", "col_off", "patch_size"]).index.to_numpy()
    proportions = counts[order] / counts[order].sum(axis=1, keepdims=True)
    picks = order[class_balance_order(proportions, 10)]
    assert set(np.flatnonzero(out["coreset_selected"])) == set(picks.tolist())
    assert out.loc[picks[0], "coreset_score"] == 1.0


def test_cb_with_spatial_spread_uses_min_max_normalised_window_centroids():
    counts = random_counts(30, seed=8)
    table = pool_table(counts, seed=8)
    out = select_coreset(
        table, config(method="cb", cb_use_spatial=True, budget=8, budget_mode="count")
    )
    order = table.sort_values(["image_path", "row_off", "col_off", "patch_size"]).index.to_numpy()
    x = (table["tile_minx"] + table["tile_maxx"]).to_numpy()[order] / 2
    y = (table["tile_miny"] + table["tile_maxy"]).to_numpy()[order] / 2
    features = np.column_stack(
        [
            counts[order] / counts[order].sum(axis=1, keepdims=True),
            (x - x.min()) / (x.max() - x.min()),
            (y - y.min()) / (y.max() - y.min()),
        ]
    )
    picks = order[class_balance_order(features, 8)]
    assert set(np.flatnonzero(out["coreset_selected"])) == set(picks.tolist())


def test_spatial_options_name_the_missing_bound_columns():
    table = pool_table(random_counts(8, seed=9)).drop(columns=["tile_miny", "tile_maxx"])
    with pytest.raises(
        InputError, match="cb_use_spatial: true needs the columns tile_miny, tile_maxx"
    ):
        select_coreset(table, config(method="cb", cb_use_spatial=True))
    embeddings = np.random.default_rng(0).normal(size=(8, 4))
    with pytest.raises(InputError, match="fd_use_spatial: true needs the columns"):
        select_coreset(table, config(method="fa", fd_use_spatial=True), embeddings)


def test_spatial_options_refuse_empty_bounds():
    table = pool_table(random_counts(8, seed=10))
    table.loc[3, "tile_minx"] = np.nan
    with pytest.raises(InputError, match="1 pool row"):
        select_coreset(table, config(method="cb", cb_use_spatial=True))


def test_fa_cb_with_lambda_one_is_fa_and_with_lambda_zero_is_cb():
    table = pool_table(random_counts(30, seed=11))
    embeddings = np.random.default_rng(1).normal(size=(30, 6)).astype(np.float32)
    for weight, method in [(0.0, "cb"), (1.0, "fa")]:
        hybrid = select_coreset(table, config(method="fa_cb", fa_cb_lambda=weight), embeddings)
        single = select_coreset(table, config(method=method), embeddings)
        pd.testing.assert_series_equal(hybrid["coreset_score"], single["coreset_score"])
        pd.testing.assert_series_equal(hybrid["coreset_selected"], single["coreset_selected"])


def test_fa_cb_mixes_the_two_scores_linearly():
    table = pool_table(random_counts(20, seed=12))
    embeddings = np.random.default_rng(2).normal(size=(20, 5)).astype(np.float32)
    fa = select_coreset(table, config(method="fa"), embeddings)["coreset_score"]
    cb = select_coreset(table, config(method="cb"), embeddings)["coreset_score"]
    mixed = select_coreset(table, config(method="fa_cb", fa_cb_lambda=0.25), embeddings)
    np.testing.assert_allclose(mixed["coreset_score"], 0.25 * fa + 0.75 * cb)


def test_lc_fd_with_m_zero_is_lc_and_with_m_the_pool_is_fd():
    table = pool_table(random_counts(24, seed=13))
    embeddings = np.random.default_rng(3).normal(size=(24, 4)).astype(np.float32)
    fd_settings = {"fd_k_min": 3, "fd_k_max": 3}
    lc = select_coreset(table, config(method="lc"))
    fd = select_coreset(table, config(method="fd", **fd_settings), embeddings)
    zero = select_coreset(
        table, config(method="lc_fd", lc_fd_cutoff_m=0, **fd_settings), embeddings
    )
    whole = select_coreset(
        table, config(method="lc_fd", lc_fd_cutoff_m=24, **fd_settings), embeddings
    )
    pd.testing.assert_series_equal(zero["coreset_selected"], lc["coreset_selected"])
    pd.testing.assert_series_equal(whole["coreset_score"], fd["coreset_score"])


# --------------------------------------------------------------------------------------------
# Embeddings


def write_cache(path, table: pd.DataFrame, vectors: np.ndarray, rows: np.ndarray) -> None:
    dim = vectors.shape[1]
    flat = pa.array(vectors[rows].astype(np.float32).reshape(-1))
    pq.write_table(
        pa.table(
            {
                "image_path": table["image_path"].to_numpy()[rows].tolist(),
                "row_off": table["row_off"].to_numpy()[rows],
                "col_off": table["col_off"].to_numpy()[rows],
                "patch_size": table["patch_size"].to_numpy()[rows],
                "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
            }
        ),
        path,
    )


@pytest.fixture()
def embedded():
    table = pool_table(random_counts(20, seed=14))
    table.loc[[3, 11], ["excluded", "exclusion_reason"]] = [True, "read_error"]
    vectors = np.random.default_rng(4).normal(size=(20, 6)).astype(np.float32)
    return table, vectors


def test_embeddings_cache_is_joined_by_patch_key_not_by_position(tmp_path, embedded):
    table, vectors = embedded
    # Shuffled rows, the excluded patches absent, like a cache written by the build.
    rows = np.random.default_rng(5).permutation([i for i in range(20) if i not in (3, 11)])
    write_cache(tmp_path / "cache.parquet", table, vectors, rows)
    from_array = select_coreset(table, config(method="fa"), vectors)
    from_cache = select_coreset(
        table, config(method="fa", parquet_path=str(tmp_path / "cache.parquet"))
    )
    pd.testing.assert_frame_equal(from_cache, from_array)


def test_missing_cache_rows_are_an_error_that_counts_them(tmp_path, embedded):
    table, vectors = embedded
    rows = np.array([i for i in range(20) if i not in (3, 11, 0, 5, 6)])
    write_cache(tmp_path / "cache.parquet", table, vectors, rows)
    with pytest.raises(InputError, match="3 of 18 pool patches have no row"):
        select_coreset(table, config(method="fa", parquet_path=str(tmp_path / "cache.parquet")))


def test_duplicate_cache_keys_are_an_error_that_counts_them(tmp_path, embedded):
    table, vectors = embedded
    rows = np.concatenate([np.arange(20), [4, 9]])
    write_cache(tmp_path / "cache.parquet", table, vectors, rows)
    with pytest.raises(InputError, match="4 rows share a patch key"):
        select_coreset(table, config(method="fd", parquet_path=str(tmp_path / "cache.parquet")))


def test_embedding_column_of_a_parquet_table_is_used(tmp_path, embedded):
    table, vectors = embedded
    with_column = table.assign(embedding=list(vectors))
    with_column.to_parquet(tmp_path / "table.parquet")
    read_back = pd.read_parquet(tmp_path / "table.parquet")
    out = select_coreset(read_back, config(method="fa", embedding_column="embedding"))
    expected = select_coreset(table, config(method="fa"), vectors)
    np.testing.assert_allclose(out["coreset_score"], expected["coreset_score"])
    # fa scores of the pool are computed from those vectors.
    pool = ~table["excluded"].to_numpy()
    np.testing.assert_allclose(
        out["coreset_score"].to_numpy()[pool],
        feature_activation_scores(vectors[pool]),
        rtol=1e-6,
    )


def test_embedding_methods_without_embeddings_say_what_to_set(embedded):
    table, _ = embedded
    with pytest.raises(InputError, match="set embedding_column .* or parquet_path"):
        select_coreset(table, config(method="fd"))


def test_nan_embeddings_are_an_error(embedded):
    table, vectors = embedded
    vectors = vectors.copy()
    vectors[[1, 2], 0] = np.nan
    with pytest.raises(InputError, match="2 pool patch embedding"):
        select_coreset(table, config(method="fa"), vectors)


# --------------------------------------------------------------------------------------------
# Training weights


def test_weights_are_zero_outside_the_coreset_and_mean_one_inside():
    table = pool_table(random_counts(50, seed=15))
    table.loc[[0, 1], "excluded"] = True
    out = select_coreset(table, config(method="cb", budget=0.4))
    chosen = out["coreset_selected"].to_numpy()
    weights = out["sampler_weight"].to_numpy()
    assert chosen.sum() == 19  # 0.4 * 48 = 19.2
    assert np.all(weights[~chosen] == 0.0)
    assert weights[chosen].mean() == pytest.approx(1.0)
    assert np.all(weights[chosen] > 0)
    # A real WeightedRandomSampler over the output draws only CoreSet rows.
    sampler = torch.utils.data.WeightedRandomSampler(
        torch.tensor(weights), num_samples=2000, generator=torch.Generator().manual_seed(0)
    )
    assert set(sampler) <= set(np.flatnonzero(chosen).tolist())


def test_inverse_frequency_weights_match_a_hand_computation():
    table = pool_table(np.array([[3, 1], [2, 2], [4, 0]]))
    out = select_coreset(table, config(budget=1.0, max_weight=None))
    # proportions (.75,.25) (.5,.5) (1,0); mean share g = (.75, .25);
    # scores .75/.75 + .25/.25 = 2, .5/.75 + .5/.25 = 8/3, 1/.75 = 4/3; mean 2.
    np.testing.assert_allclose(out["sampler_weight"], [1.0, 4 / 3, 2 / 3])


def test_repeat_factor_weights_match_a_hand_computation():
    table = pool_table(np.array([[4, 0], [3, 1], [4, 0], [4, 0]]), patch_size=2)
    out = select_coreset(table, config(budget=1.0, sampler_weights="repeat_factor"))
    # f = (1, 0.25); t = median = 0.625; factors: class 1 -> sqrt(0.625 / 0.25).
    factors = np.array([1.0, np.sqrt(0.625 / 0.25), 1.0, 1.0])
    np.testing.assert_allclose(out["sampler_weight"], factors / factors.mean())


def test_uniform_and_keep_weights():
    table = pool_table(random_counts(3, seed=16))
    table["sampler_weight"] = [2.0, 4.0, 6.0]
    uniform = select_coreset(table, config(budget=1.0, sampler_weights="uniform"))
    np.testing.assert_allclose(uniform["sampler_weight"], 1.0)
    keep = select_coreset(table, config(budget=1.0, sampler_weights="keep"))
    np.testing.assert_allclose(keep["sampler_weight"], [0.5, 1.0, 1.5])


def test_max_weight_caps_the_coreset_weights_and_keeps_mean_one():
    table = pool_table(random_counts(5, seed=17))
    table["sampler_weight"] = [1.0, 1.0, 1.0, 1.0, 100.0]
    out = select_coreset(table, config(budget=1.0, sampler_weights="keep", max_weight=2))
    np.testing.assert_allclose(out["sampler_weight"], [0.75, 0.75, 0.75, 0.75, 2.0])


def test_keep_without_input_weights_is_an_error():
    table = pool_table(random_counts(5, seed=18)).drop(columns="sampler_weight")
    with pytest.raises(InputError, match="needs a sampler_weight column"):
        select_coreset(table, config(sampler_weights="keep"))


# --------------------------------------------------------------------------------------------
# Summary figures


def test_summary_compares_class_share_of_pool_and_coreset_and_counts_clusters():
    counts = np.array([[10, 0], [5, 5], [8, 2], [9, 1]])
    table = pool_table(counts)
    table["freq_cluster_id"] = [0, 1, 1, 0]
    result = run_selection(table, config(budget=2, budget_mode="count"))
    share = result.summary["class_pixel_share"]
    assert share["1"]["pool"] == pytest.approx(8 / 40)
    # lc picks rows 1 and 2 (most mixed): class 1 is 7 of their 20 pixels.
    assert share["1"]["coreset"] == pytest.approx(7 / 20)
    assert result.summary["selected_per_cluster"] == {
        "0": {"pool": 2, "selected": 0},
        "1": {"pool": 2, "selected": 2},
    }


def test_class_dist_json_alone_is_enough_for_cb():
    counts = random_counts(20, seed=19)
    table = pool_table(counts)
    without_counts = table.drop(columns=[c for c in table.columns if c.startswith("px_")])
    a = select_coreset(table, config(method="cb", sampler_weights="uniform"))
    b = select_coreset(without_counts, config(method="cb", sampler_weights="uniform"))
    pd.testing.assert_series_equal(a["coreset_selected"], b["coreset_selected"])
