"""Benchmark `uniqueness.backend: faiss_ivf` against the exact search (SPEC §3.6, §10).

Bar: faiss_ivf recall@5 >= 0.95 against `exact` on 200,000 x 128 float32 clustered vectors
(a seeded Gaussian mixture of 1,000 centres), k = 5. hnsw runs alongside for context.

Prints the build+search time of each backend and their ratio, the recall@k of faiss_ivf
measured on every row against the exact neighbours (ties within 1e-6 count as found) next to
the summary's estimate on 1,000 sampled queries, and the figures a scaling estimate needs:
the IVFFlat index's size in bytes per vector (`faiss.serialize_index`) and its search
throughput in queries per second per thread. `--scale-n`/`--scale-dim` repeat the index
measurement on a larger set (e.g. 1,000,000 x 384) without the exact all-pairs search, with
recall on sampled queries.

    OMP_NUM_THREADS=1 python bench/knn_ivf.py
    OMP_NUM_THREADS=1 python bench/knn_ivf.py --skip-hnsw --scale-n 1000000 --scale-dim 384
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from scipy.stats import spearmanr

from patchbalance.balancing.uniqueness import (
    IVF_TRAIN_POINTS_PER_LIST,
    RECALL_TOLERANCE,
    drop_self,
    estimate_recall,
    exact_search,
    ivf_parameters,
    nearest_neighbors,
    normalise_rows,
)
from patchbalance.config import UniquenessConfig


def mixture(n: int, dim: int, centres: int, noise: float, seed: int) -> np.ndarray:
    """Return n float32 vectors drawn from a seeded Gaussian mixture of `centres` components."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(centres, dim)).astype(np.float32)
    labels = rng.integers(0, centres, size=n)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # bounded temporaries at 1,000,000 x 384
        stop = min(start + 100_000, n)
        out[start:stop] = centre[labels[start:stop]]
        out[start:stop] += rng.normal(scale=noise, size=(stop - start, dim)).astype(np.float32)
    return out


def recall_against(
    found_distance: np.ndarray, exact_distance: np.ndarray, k: int
) -> tuple[float, float]:
    """Return `(recall@k, share of rows with all k found)`; ties with the k-th count as found."""
    hits = (found_distance <= exact_distance[:, [k - 1]] + RECALL_TOLERANCE).sum(axis=1)
    hits = np.minimum(hits, k)
    return float(hits.sum() / (k * len(hits))), float((hits == k).mean())


def index_figures(
    unit: np.ndarray, config: UniquenessConfig, k: int, seed: int, queries: int
) -> dict[str, float]:
    """Return train/add/search seconds, bytes per vector and queries/s of an IVFFlat index.

    Built the way the faiss_ivf backend builds it (same nlist, nprobe, training sample).
    Searches `queries` seeded rows (all rows when 0) for k + 1 neighbours.
    """
    import faiss

    n, dim = unit.shape
    nlist, nprobe = ivf_parameters(config, n)
    rng = np.random.default_rng(seed)
    train_size = min(n, IVF_TRAIN_POINTS_PER_LIST * nlist)
    train = unit if train_size == n else unit[np.sort(rng.choice(n, train_size, replace=False))]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed % (2**31)
    start = time.perf_counter()
    index.train(train)
    t_train = time.perf_counter() - start
    start = time.perf_counter()
    index.add(unit)
    t_add = time.perf_counter() - start
    index.nprobe = nprobe
    size = int(faiss.serialize_index(index).size)
    query_ids = np.arange(n) if not queries else np.sort(rng.choice(n, queries, replace=False))
    start = time.perf_counter()
    similarities, indices = index.search(unit[query_ids], k + 1)
    t_search = time.perf_counter() - start
    return {
        "n": n,
        "dim": dim,
        "nlist": nlist,
        "nprobe": nprobe,
        "train_points": train_size,
        "train_s": t_train,
        "add_s": t_add,
        "search_s": t_search,
        "queries": len(query_ids),
        "qps_per_thread": len(query_ids) / t_search / faiss.omp_get_max_threads(),
        "bytes": size,
        "bytes_per_vector": size / n,
        "raw_bytes_per_vector": 4 * dim + 8,
        "query_ids": query_ids,
        "indices": indices.astype(np.int64),
        "similarities": similarities,
    }


def print_index_figures(figures: dict) -> None:
    print(
        f"  IVFFlat n={figures['n']:,} dim={figures['dim']} nlist={figures['nlist']} "
        f"nprobe={figures['nprobe']} (trained on {figures['train_points']:,} points)\n"
        f"  train {figures['train_s']:.2f} s, add {figures['add_s']:.2f} s, search "
        f"{figures['queries']:,} queries {figures['search_s']:.2f} s = "
        f"{figures['qps_per_thread']:,.0f} queries/s/thread\n"
        f"  serialized index {figures['bytes']:,} bytes = {figures['bytes_per_vector']:.1f} "
        f"bytes/vector (4*dim + 8 = {figures['raw_bytes_per_vector']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--centres", type=int, default=1_000)
    parser.add_argument("--noise", type=float, default=0.6, help="std of each component")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--nlist", default="auto", help="'auto' or an int")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--skip-hnsw", action="store_true")
    parser.add_argument("--scale-n", type=int, default=0, help="0 skips the larger set")
    parser.add_argument("--scale-dim", type=int, default=384)
    parser.add_argument("--scale-queries", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import faiss
    import torch

    nlist = args.nlist if args.nlist == "auto" else int(args.nlist)
    config = UniquenessConfig(
        backend="faiss_ivf", k_neighbors=args.k, nlist=nlist, nprobe=args.nprobe
    )
    k = args.k
    print(
        f"n={args.n:,} dim={args.dim} centres={args.centres} noise={args.noise} k={k} "
        f"cores={os.cpu_count()} torch threads={torch.get_num_threads()} "
        f"faiss threads={faiss.omp_get_max_threads()} faiss {faiss.__version__}"
    )
    unit = normalise_rows(mixture(args.n, args.dim, args.centres, args.noise, args.seed))

    start = time.perf_counter()
    exact_idx, exact_dist, device = nearest_neighbors(unit, k, "exact", config, args.seed)
    t_exact = time.perf_counter() - start
    print(f"exact      {t_exact:8.2f} s  (device {device})")

    start = time.perf_counter()
    ivf_idx, ivf_dist, device = nearest_neighbors(unit, k, "faiss_ivf", config, args.seed)
    t_ivf = time.perf_counter() - start
    recall, complete = recall_against(ivf_dist, exact_dist, k)
    start = time.perf_counter()
    estimate, sampled = estimate_recall(unit, ivf_idx, k, config.block_size, args.seed)
    t_estimate = time.perf_counter() - start
    ivf_scores, exact_scores = ivf_dist.mean(axis=1), exact_dist.mean(axis=1)
    nl, npr = ivf_parameters(config, args.n)
    print(
        f"faiss_ivf  {t_ivf:8.2f} s  (device {device}, nlist {nl}, nprobe {npr}); "
        f"recall@{k} {recall:.4f} on all rows, {complete:.4f} of rows with all {k} found; "
        f"summary estimate {estimate:.4f} on {sampled} queries ({t_estimate:.2f} s); "
        f"max |score diff| {np.abs(ivf_scores - exact_scores).max():.2e}, Spearman "
        f"{spearmanr(ivf_scores, exact_scores).statistic:.4f}"
    )

    if not args.skip_hnsw:
        start = time.perf_counter()
        hnsw_idx, hnsw_dist, _ = nearest_neighbors(unit, k, "hnsw", config, args.seed)
        t_hnsw = time.perf_counter() - start
        hnsw_recall, _ = recall_against(hnsw_dist, exact_dist, k)
        print(
            f"hnsw       {t_hnsw:8.2f} s  (M {config.M}, ef_construction "
            f"{config.ef_construction}, ef_search {config.ef_search}); recall@{k} "
            f"{hnsw_recall:.4f} on all rows"
        )

    print("index figures at this size:")
    print_index_figures(index_figures(unit, config, k, args.seed, queries=0))

    print("\nratios")
    print(f"  exact / faiss_ivf = {t_exact / t_ivf:.2f}")
    if not args.skip_hnsw:
        print(f"  exact / hnsw      = {t_exact / t_hnsw:.2f}")
    print(f"  faiss_ivf recall@{k} = {recall:.4f} (bar: >= 0.95)")

    if args.scale_n:
        del unit, exact_idx, exact_dist, ivf_idx, ivf_dist
        print(f"\nlarger set: n={args.scale_n:,} dim={args.scale_dim}")
        big = normalise_rows(
            mixture(args.scale_n, args.scale_dim, args.centres, args.noise, args.seed + 1)
        )
        figures = index_figures(big, config, k, args.seed, queries=args.scale_queries)
        print_index_figures(figures)
        ids = figures["query_ids"]
        ivf_idx, ivf_sim = drop_self(ids, figures["indices"], figures["similarities"])
        sample = ids[:1_000]
        true_idx, true_sim, _ = exact_search(big, sample, k + 1, config.block_size)
        _, true_sim = drop_self(sample, true_idx, true_sim)
        big_recall, _ = recall_against(1.0 - ivf_sim[:1_000], 1.0 - true_sim, k)
        print(f"  recall@{k} {big_recall:.4f} on the first 1,000 of those queries vs exact")


if __name__ == "__main__":
    main()
