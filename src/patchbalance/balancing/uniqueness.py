"""Visual uniqueness (SPEC §3.6): mean cosine distance of each patch to its k nearest others.

All backends answer the same question on L2-normalised embeddings: the `k` nearest *other*
patches by cosine similarity. Each queries `k + 1` neighbours and drops the query itself by
index, not by position, so exact duplicates work: two identical vectors find each other at
distance 0 whichever of the two a backend happens to list first.

- `exact`: blocked matrix products (torch when installed, on the GPU when there is one; else
  numpy) with a partial top-k per tile; memory is bounded by `block_size`², never N x N.
- `faiss`: faiss `IndexFlatIP` (exact).
- `sklearn`: `NearestNeighbors(algorithm="brute", metric="cosine")` (exact).
- `hnsw`: hnswlib graph (approximate).
- `faiss_ivf`: faiss `IndexIVFFlat` with the inner-product metric (approximate; SPEC §10):
  k-means on a seeded sample picks `nlist` lists and a query visits the `nprobe` nearest ones;
  on the GPU(s) when faiss sees any.
- The approximate backends put their recall@k against `exact` on a seeded sample of up to 1,000
  queries into the summary.
- `auto`: `exact` up to 200,000 patches, `hnsw` above.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from patchbalance.config import UniquenessConfig
from patchbalance.errors import InputError, MissingDependencyError

log = logging.getLogger(__name__)

# `auto` switches from the exact search to hnsw above this many patches.
AUTO_EXACT_LIMIT = 200_000
# Queries sampled to estimate the recall of an approximate backend.
RECALL_SAMPLE = 1_000
# Two neighbours whose distances differ by less than this are ties when measuring recall.
RECALL_TOLERANCE = 1e-6
# Backends whose neighbours are approximate, so the summary carries a recall estimate.
APPROXIMATE_BACKENDS = ("hnsw", "faiss_ivf")
# faiss_ivf: `nlist: auto` is about this many lists per sqrt(N), faiss's usual rule of thumb.
IVF_LISTS_PER_SQRT_N = 4
# faiss warns when k-means has fewer than 39 training points per centroid; nlist is lowered so
# that every list has at least this many.
IVF_MIN_POINTS_PER_LIST = 39
# Training sample per list: faiss recommends 30 to 256; more costs k-means time, not recall.
IVF_TRAIN_POINTS_PER_LIST = 64


@dataclass
class UniquenessResult:
    """Uniqueness scores of the patches, aligned with the input vectors, and run figures."""

    scores: np.ndarray  # float64 (n,): mean cosine distance to the k nearest other patches
    summary: dict[str, Any] = field(default_factory=dict)


def compute_uniqueness(
    vectors: np.ndarray,
    config: UniquenessConfig,
    seed: int,
    row_labels: Sequence[str] | None = None,
) -> UniquenessResult:
    """Return each row's mean cosine distance to its `k_neighbors` nearest other rows.

    `vectors` is (n, D), one embedding per active patch. `row_labels`, when given, names the
    rows in error messages (e.g. the patch key). Raises `InputError` for NaN/inf values or
    fewer than 2 rows; `MissingDependencyError` when the chosen backend is not installed.
    """
    start = time.perf_counter()
    unit = normalise_rows(check_vectors(vectors, row_labels))
    n = len(unit)
    k = clamp_k(config.k_neighbors, n)
    backend = choose_backend(config.backend, n)
    indices, distances, device = nearest_neighbors(unit, k, backend, config, seed)
    scores = distances.mean(axis=1, dtype=np.float64)
    summary: dict[str, Any] = {
        "backend": backend,
        "backend_requested": config.backend,
        "k": k,
        "n": n,
        "dim": int(unit.shape[1]),
    }
    if device:
        summary["device"] = device
    if k != config.k_neighbors:
        summary["k_requested"] = config.k_neighbors
    if backend == "hnsw":
        summary.update(
            M=config.M, ef_construction=config.ef_construction, ef_search=config.ef_search
        )
    if backend == "faiss_ivf":
        summary.update(ivf_summary(config, n))
    if backend in APPROXIMATE_BACKENDS:
        summary["recall_at_k"], summary["recall_queries"] = estimate_recall(
            unit, indices, k, config.block_size, seed
        )
        log.info(
            "uniqueness: %s recall@%d ~ %.4f on %d sampled queries",
            backend,
            k,
            summary["recall_at_k"],
            summary["recall_queries"],
        )
    summary["seconds"] = round(time.perf_counter() - start, 3)
    summary["distribution"] = {
        "min": float(scores.min()),
        "median": float(np.median(scores)),
        "mean": float(scores.mean()),
        "max": float(scores.max()),
    }
    return UniquenessResult(scores=scores, summary=summary)


def check_vectors(vectors: np.ndarray, row_labels: Sequence[str] | None = None) -> np.ndarray:
    """Return `vectors` as a float32 (n, D) array; raise `InputError` for NaN/inf or n < 2."""
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise InputError(
            f"embeddings must be a 2-d array (patches x dimensions), got {array.shape}"
        )
    array = array.astype(np.float32, copy=False)
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        name = row_labels[first] if row_labels is not None else f"active patch #{first}"
        raise InputError(
            f"{int(bad.sum())} embedding(s) contain NaN or infinite values (first: {name}); "
            "recompute them (delete the embeddings cache) or fix the source column"
        )
    if len(array) < 2:
        raise InputError(
            f"visual uniqueness needs at least 2 active patches, got {len(array)}; "
            "add patches or relax the exclusion rules"
        )
    return array


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """Return float32 rows scaled to unit L2 norm (all-zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # A zero row would divide by zero; left at zero it is at distance 1 from everything.
    return vectors / np.where(norms > 0, norms, 1.0).astype(np.float32)


def clamp_k(k: int, n: int) -> int:
    """Return `k` limited to n - 1 (with a warning when that changes it)."""
    if n < 2:
        raise InputError(f"visual uniqueness needs at least 2 active patches, got {n}")
    if k > n - 1:
        log.warning(
            "uniqueness.k_neighbors is %d but there are only %d active patches; using k = %d",
            k,
            n,
            n - 1,
        )
        return n - 1
    return k


def choose_backend(requested: str, n: int) -> str:
    """Return the backend to run: `requested`, or for `auto` exact up to 200,000 rows, else hnsw."""
    if requested != "auto":
        return requested
    if n <= AUTO_EXACT_LIMIT:
        return "exact"
    if importlib.util.find_spec("hnswlib") is None:
        log.warning(
            "uniqueness: %d patches and hnswlib is not installed; using the exact search "
            '(pip install "patchbalance[knn]" for the faster approximate one)',
            n,
        )
        return "exact"
    return "hnsw"


def nearest_neighbors(
    unit: np.ndarray, k: int, backend: str, config: UniquenessConfig, seed: int
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Return `(indices, distances, device)`: each row's k nearest other rows, nearest first.

    `unit` holds L2-normalised rows; distances are 1 - cosine similarity, clipped to [0, 2].
    `device` names where the exact or faiss_ivf search ran (None for the other backends).
    """
    ids = np.arange(len(unit))
    device = None
    if backend == "exact":
        indices, similarities, device = exact_search(unit, ids, k + 1, config.block_size)
    elif backend == "faiss":
        indices, similarities = _faiss_search(unit, k + 1)
    elif backend == "faiss_ivf":
        nlist, nprobe = ivf_parameters(config, len(unit))
        indices, similarities, device = _faiss_ivf_search(unit, k + 1, nlist, nprobe, seed)
    elif backend == "sklearn":
        indices, similarities = _sklearn_search(unit, k + 1)
    elif backend == "hnsw":
        indices, similarities = _hnsw_search(unit, k + 1, config, seed)
    else:
        raise ValueError(f"unknown uniqueness backend {backend!r}")
    indices, similarities = drop_self(ids, indices, similarities)
    return indices, np.clip(1.0 - similarities, 0.0, 2.0), device


def drop_self(
    query_ids: np.ndarray, indices: np.ndarray, similarities: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return the (q, m - 1) neighbours left after removing each query from its own m results.

    The rows of `indices`/`similarities` are sorted nearest first. A query is removed where its
    own index appears; where it does not (more exact duplicates than m, or an approximate
    search that missed it) the farthest result goes instead, so every row keeps m - 1.
    """
    drop = indices == query_ids[:, None]
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    rows, width = indices.shape
    return (
        indices[keep].reshape(rows, width - 1),
        similarities[keep].reshape(rows, width - 1),
    )


# --------------------------------------------------------------------------------------------
# exact


def exact_search(
    unit: np.ndarray, query_ids: np.ndarray, m: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """Return `(indices, similarities, device)` of the m most similar rows for each query row.

    Works through (block_size x block_size) tiles of the similarity matrix, keeping a running
    top-m per query, so memory stays O(block_size² + n·m) whatever n is (two tiles at a time
    at most). Uses torch (CUDA when available) if installed, else numpy.
    """
    if importlib.util.find_spec("torch") is not None:
        return _exact_torch(unit, query_ids, m, block_size)
    indices, similarities = _exact_numpy(unit, query_ids, m, block_size)
    return indices, similarities, "cpu (numpy)"


def _exact_numpy(
    unit: np.ndarray, query_ids: np.ndarray, m: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    n = len(unit)
    out_idx = np.empty((len(query_ids), m), dtype=np.int64)
    out_sim = np.empty((len(query_ids), m), dtype=np.float32)
    for q_start in range(0, len(query_ids), block_size):
        queries = unit[query_ids[q_start : q_start + block_size]]
        best_sim = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        best_idx = np.empty((len(queries), 0), dtype=np.int64)
        for d_start in range(0, n, block_size):
            similarity = queries @ unit[d_start : d_start + block_size].T
            take = min(m, similarity.shape[1])
            if take < similarity.shape[1]:
                part = np.argpartition(-similarity, take - 1, axis=1)[:, :take]
            else:
                part = np.broadcast_to(np.arange(take), similarity.shape).copy()
            candidate_sim = np.concatenate(
                [best_sim, np.take_along_axis(similarity, part, axis=1)], axis=1
            )
            candidate_idx = np.concatenate([best_idx, part + d_start], axis=1)
            take = min(m, candidate_sim.shape[1])
            if take < candidate_sim.shape[1]:
                keep = np.argpartition(-candidate_sim, take - 1, axis=1)[:, :take]
                candidate_sim = np.take_along_axis(candidate_sim, keep, axis=1)
                candidate_idx = np.take_along_axis(candidate_idx, keep, axis=1)
            best_sim, best_idx = candidate_sim, candidate_idx
        # Nearest first; ties broken by index so the order never depends on the tiling.
        order = np.lexsort((best_idx, -best_sim), axis=1)
        out_sim[q_start : q_start + len(queries)] = np.take_along_axis(best_sim, order, axis=1)
        out_idx[q_start : q_start + len(queries)] = np.take_along_axis(best_idx, order, axis=1)
    return out_idx, out_sim


def _exact_torch(
    unit: np.ndarray, query_ids: np.ndarray, m: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, str]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = torch.from_numpy(np.ascontiguousarray(unit)).to(device)
    n = base.shape[0]
    best_sim = torch.full((len(query_ids), m), -torch.inf, device=device)
    best_idx = torch.full((len(query_ids), m), -1, dtype=torch.int64, device=device)

    def merge(start: int, stop: int, sim: torch.Tensor, idx: torch.Tensor) -> None:
        """Fold candidate neighbours into the running top-m of query rows start:stop."""
        sim = torch.cat([best_sim[start:stop], sim], dim=1)
        idx = torch.cat([best_idx[start:stop], idx], dim=1)
        sim, position = torch.topk(sim, m, dim=1)
        best_sim[start:stop] = sim
        best_idx[start:stop] = torch.gather(idx, 1, position)

    with torch.inference_mode():
        if len(query_ids) == n and np.array_equal(query_ids, np.arange(n)):
            # All rows against all rows: the similarity matrix is symmetric, so each
            # off-diagonal tile (i, j) also serves block j's queries through its transpose.
            # That halves the matrix products, which dominate the time.
            for i in range(0, n, block_size):
                rows = base[i : i + block_size]
                for j in range(i, n, block_size):
                    tile = rows @ base[j : j + block_size].T
                    sim, idx = torch.topk(tile, min(m, tile.shape[1]), dim=1)
                    merge(i, i + len(rows), sim, idx + j)
                    if j != i:
                        # A contiguous copy makes the column-wise top-k several times faster.
                        flipped = tile.T.contiguous()
                        sim, idx = torch.topk(flipped, min(m, flipped.shape[1]), dim=1)
                        merge(j, j + len(flipped), sim, idx + i)
        else:
            query_index = torch.from_numpy(np.asarray(query_ids, dtype=np.int64)).to(device)
            for q in range(0, len(query_ids), block_size):
                queries = base[query_index[q : q + block_size]]
                for j in range(0, n, block_size):
                    tile = queries @ base[j : j + block_size].T
                    sim, idx = torch.topk(tile, min(m, tile.shape[1]), dim=1)
                    merge(q, q + len(queries), sim, idx + j)
        # Where the search really ran: the device of the tensors that hold its results.
        searched_on = str(best_sim.device)
        sim_np = best_sim.float().cpu().numpy()
        idx_np = best_idx.cpu().numpy()
    # Nearest first; ties broken by index so the order never depends on the tiling.
    order = np.lexsort((idx_np, -sim_np), axis=1)
    return (
        np.take_along_axis(idx_np, order, axis=1),
        np.take_along_axis(sim_np, order, axis=1),
        searched_on,
    )


# --------------------------------------------------------------------------------------------
# faiss, sklearn, hnsw


def _faiss_search(unit: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError(
            "faiss (uniqueness.backend: faiss)", "knn", "faiss-cpu"
        ) from exc
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(np.ascontiguousarray(unit))
    similarities, indices = index.search(np.ascontiguousarray(unit), m)
    return indices.astype(np.int64), similarities.astype(np.float32)


def ivf_parameters(config: UniquenessConfig, n: int) -> tuple[int, int]:
    """Return the `(nlist, nprobe)` that faiss_ivf uses on n rows.

    `nlist: auto` is round(4·sqrt(n)); any nlist is lowered to n // 39 (at least 1) so that
    k-means has 39 training points per list, and nprobe to nlist.
    """
    auto = round(IVF_LISTS_PER_SQRT_N * math.sqrt(n))
    nlist = auto if config.nlist == "auto" else config.nlist
    nlist = max(1, min(nlist, n // IVF_MIN_POINTS_PER_LIST))
    return nlist, min(config.nprobe, nlist)


def ivf_summary(config: UniquenessConfig, n: int) -> dict[str, Any]:
    """Return the faiss_ivf figures for the summary, warning where nlist or nprobe was lowered."""
    nlist, nprobe = ivf_parameters(config, n)
    figures: dict[str, Any] = {"nlist": nlist, "nprobe": nprobe}
    if config.nlist == "auto":
        figures["nlist_requested"] = "auto"
    elif nlist != config.nlist:
        figures["nlist_requested"] = config.nlist
        log.warning(
            "uniqueness.nlist is %d but %d patches train at most %d lists (%d points each); "
            "using nlist = %d",
            config.nlist,
            n,
            nlist,
            IVF_MIN_POINTS_PER_LIST,
            nlist,
        )
    if nprobe != config.nprobe:
        figures["nprobe_requested"] = config.nprobe
        log.warning(
            "uniqueness.nprobe is %d but there are only %d lists; using nprobe = %d",
            config.nprobe,
            nlist,
            nprobe,
        )
    return figures


def _faiss_ivf_search(
    unit: np.ndarray, m: int, nlist: int, nprobe: int, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError(
            "faiss (uniqueness.backend: faiss_ivf)", "knn", "faiss-cpu"
        ) from exc
    data = np.ascontiguousarray(unit)
    n, dim = data.shape
    train_size = min(n, IVF_TRAIN_POINTS_PER_LIST * nlist)
    train = data
    if train_size < n:
        rng = np.random.default_rng(seed)
        train = data[np.sort(rng.choice(n, size=train_size, replace=False))]
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed % (2**31)  # k-means initialisation, so the same seed gives the same lists
    index.train(train)
    index.nprobe = nprobe
    device = "cpu"
    gpus = faiss.get_num_gpus()
    if gpus > 0:
        # The trained (still empty) index is cloned with its nprobe; adding and searching,
        # which dominate the time, run on the GPU(s).
        index = faiss.index_cpu_to_all_gpus(index)
        device = "cuda" if gpus == 1 else f"cuda ({gpus} GPUs)"
    index.add(data)
    similarities, indices = index.search(data, m)
    return indices.astype(np.int64), similarities.astype(np.float32), device


def _sklearn_search(unit: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.neighbors import NearestNeighbors

    model = NearestNeighbors(n_neighbors=m, algorithm="brute", metric="cosine").fit(unit)
    distances, indices = model.kneighbors(unit)
    return indices.astype(np.int64), (1.0 - distances).astype(np.float32)


def _hnsw_search(
    unit: np.ndarray, m: int, config: UniquenessConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    try:
        import hnswlib
    except ImportError as exc:
        raise MissingDependencyError(
            "hnswlib (uniqueness.backend: hnsw)", "knn", "hnswlib"
        ) from exc
    n, dim = unit.shape
    threads = os.cpu_count() or 1
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(
        max_elements=n,
        ef_construction=config.ef_construction,
        M=config.M,
        random_seed=seed % (2**31),
    )
    index.add_items(unit, np.arange(n), num_threads=threads)
    # hnswlib needs ef >= the number of results asked for.
    index.set_ef(max(config.ef_search, m))
    labels, distances = index.knn_query(unit, k=m, num_threads=threads)
    # For space "ip", hnswlib's distance is 1 - inner product.
    return labels.astype(np.int64), (1.0 - distances).astype(np.float32)


def estimate_recall(
    unit: np.ndarray, indices: np.ndarray, k: int, block_size: int, seed: int
) -> tuple[float, int]:
    """Return `(recall@k, queries)` of approximate neighbours against the exact search.

    Uses a seeded sample of up to 1,000 queries. An approximate neighbour counts as found when
    its true distance is within the exact k nearest (ties included), so duplicates listed in a
    different order are not misses.
    """
    n = len(unit)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(RECALL_SAMPLE, n), replace=False))
    exact_idx, exact_sim, _ = exact_search(unit, sample, k + 1, block_size)
    _, exact_sim = drop_self(sample, exact_idx, exact_sim)
    kth_distance = 1.0 - exact_sim[:, -1]
    found = indices[sample]
    true_distance = 1.0 - np.einsum("qd,qkd->qk", unit[sample], unit[found])
    hits = (true_distance <= kth_distance[:, None] + RECALL_TOLERANCE).sum(axis=1)
    return float(np.minimum(hits, k).sum() / (k * len(sample))), int(len(sample))
