"""Benchmark the uniqueness backends (SPEC §9): exact vs faiss vs sklearn vs hnsw.

Bars: `exact` within 1.5x of faiss IndexFlatIP and >= 3x faster than sklearn brute cosine on
155,000 x 768 float32 with k = 5; hnsw recall@5 >= 0.95.

The embeddings are clustered (a few hundred centres plus noise), like real patch embeddings.
sklearn's brute search is quadratic and slow, so by default it runs on a subsample
(`--sklearn-n`) side by side with `exact` on the same subsample; the printed sklearn/exact ratio
is measured there, and the full-size sklearn time is extrapolated as t * (n / n_sub)^2 and
labelled as such. `--sklearn-n 0` runs sklearn on the full set.

    python bench/uniqueness.py                 # full size (minutes on a laptop)
    python bench/uniqueness.py --n 30000       # quicker
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from scipy.stats import spearmanr

from patchbalance.balancing.uniqueness import compute_uniqueness, normalise_rows
from patchbalance.config import UniquenessConfig


def clustered_embeddings(n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    """Return n clustered float32 vectors: random centres plus isotropic noise."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(centres, dim)).astype(np.float32)
    labels = rng.integers(0, centres, size=n)
    noise = rng.normal(scale=0.6, size=(n, dim)).astype(np.float32)
    return centre[labels] + noise


def timed(vectors: np.ndarray, backend: str, k: int, block: int, seed: int):
    config = UniquenessConfig(backend=backend, k_neighbors=k, block_size=block)
    start = time.perf_counter()
    result = compute_uniqueness(vectors, config, seed)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=155_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--centres", type=int, default=300)
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--sklearn-n", type=int, default=20_000, help="0 = the full set")
    parser.add_argument("--pca-dim", type=int, default=128, help="0 skips the PCA variant")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import faiss
    import torch

    print(
        f"n={args.n} dim={args.dim} k={args.k} centres={args.centres} cores={os.cpu_count()} "
        f"torch threads={torch.get_num_threads()} faiss threads={faiss.omp_get_max_threads()}"
    )
    vectors = clustered_embeddings(args.n, args.dim, args.centres, args.seed)
    k, block = args.k, args.block_size

    t_exact, exact = timed(vectors, "exact", k, block, args.seed)
    print(f"exact   {t_exact:9.2f} s  (device {exact.summary['device']})")
    t_faiss, faiss_result = timed(vectors, "faiss", k, block, args.seed)
    print(f"faiss   {t_faiss:9.2f} s  IndexFlatIP")
    agree = np.abs(faiss_result.scores - exact.scores).max()
    print(f"        max |score exact - score faiss| = {agree:.2e}")

    t_hnsw, hnsw = timed(vectors, "hnsw", k, block, args.seed)
    rho_hnsw = spearmanr(hnsw.scores, exact.scores).statistic
    print(
        f"hnsw    {t_hnsw:9.2f} s  recall@{k} {hnsw.summary['recall_at_k']:.4f} "
        f"(summary estimate, {hnsw.summary['recall_queries']} queries); Spearman vs exact "
        f"{rho_hnsw:.4f}"
    )

    sub_n = args.n if args.sklearn_n <= 0 else min(args.sklearn_n, args.n)
    subset = vectors[np.random.default_rng(args.seed).choice(args.n, sub_n, replace=False)]
    t_sk, sk = timed(subset, "sklearn", k, block, args.seed)
    t_ex_sub, ex_sub = timed(subset, "exact", k, block, args.seed)
    sk_agree = np.abs(sk.scores - ex_sub.scores).max()
    scale = (args.n / sub_n) ** 2
    label = "measured" if sub_n == args.n else f"EXTRAPOLATED from n={sub_n} as t*(n/n_sub)^2"
    print(
        f"sklearn {t_sk * scale:9.2f} s  ({label}); on n={sub_n}: sklearn {t_sk:.2f} s vs "
        f"exact {t_ex_sub:.2f} s, max |score diff| {sk_agree:.2e}"
    )

    if args.pca_dim:
        from sklearn.decomposition import PCA

        start = time.perf_counter()
        unit = normalise_rows(vectors)
        fit_rows = np.random.default_rng(args.seed).choice(args.n, min(20_000, args.n), False)
        pca = PCA(n_components=args.pca_dim, random_state=args.seed).fit(unit[fit_rows])
        reduced = pca.transform(unit).astype(np.float32)
        t_pca_fit = time.perf_counter() - start
        t_pca_exact, pca_result = timed(reduced, "exact", k, block, args.seed)
        t_pca = t_pca_fit + t_pca_exact
        rho_pca = spearmanr(pca_result.scores, exact.scores).statistic
        print(
            f"pca{args.pca_dim}+exact {t_pca:6.2f} s  (PCA {t_pca_fit:.2f} s); Spearman vs "
            f"full exact {rho_pca:.4f}; speed-up {t_exact / t_pca:.2f}x"
        )

    print("\nratios against the SPEC §9 bars")
    print(f"  exact / faiss      = {t_exact / t_faiss:.2f}   (bar: <= 1.5)")
    print(f"  sklearn / exact    = {t_sk / t_ex_sub:.2f}   (bar: >= 3; measured on n={sub_n})")
    print(f"  hnsw recall@{k}     = {hnsw.summary['recall_at_k']:.4f} (bar: >= 0.95)")
    if args.pca_dim:
        print(
            f"  pca{args.pca_dim}: Spearman {rho_pca:.4f} (wanted >= 0.98), speed-up "
            f"{t_exact / t_pca:.2f}x (wanted >= 4)"
        )


if __name__ == "__main__":
    main()
