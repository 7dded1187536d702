"""Benchmark: composition clustering on 155,000 patches x 6 classes, SPEC §9 (bar: < 30 s).

Generates class pixel counts for 256 px windows from a mixture of composition types (a
Dirichlet per type, with absent classes), then times the whole stage: pseudo-count CLR, the
elbow sweep over k = 4..16 on the seeded 20,000-patch subsample, and the final fit on all
patches (MiniBatchKMeans above 100,000). For comparison it also times the sweep fitted on all
patches, which is what the subsample saves.

    python bench/composition.py
    python bench/composition.py --n 50000 --no-full-sweep
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from sklearn.cluster import KMeans

from patchbalance.balancing.composition import clr, fit_composition_clusters
from patchbalance.config import ClusteringConfig
from patchbalance.kmeans import elbow_k


def synthetic_counts(n: int, classes: int, seed: int) -> np.ndarray:
    """Return (n, classes) pixel counts of 256 x 256 windows from 8 composition types."""
    rng = np.random.default_rng(seed)
    types = rng.dirichlet(np.full(classes, 0.4), size=8)
    shares = rng.dirichlet(np.full(8, 2.0))
    kind = rng.choice(8, size=n, p=shares)
    proportions = np.vstack([rng.dirichlet(types[t] * 50 + 1e-3) for t in kind])
    proportions[proportions < 0.01] = 0  # absent classes, as in real masks
    proportions /= proportions.sum(axis=1, keepdims=True)
    return np.round(proportions * 65536).astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=155_000)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--no-full-sweep", action="store_true", help="skip the all-patch sweep")
    args = parser.parse_args()

    counts = synthetic_counts(args.n, args.classes, seed=0)
    config = ClusteringConfig(k_min=4, k_max=16)
    print(f"patches: {args.n:,} x {args.classes} classes; cores: {os.cpu_count()}")
    start = time.perf_counter()
    result = fit_composition_clusters(counts, config, seed=42)
    stage = time.perf_counter() - start
    print(
        f"composition stage (sweep k=4..16 on {result.sweep_sample:,}, final fit on all): "
        f"{stage:.1f} s -> k = {result.k} (bar < 30 s)"
    )

    if not args.no_full_sweep:
        features = clr(counts)
        start = time.perf_counter()
        inertias = [
            KMeans(n_clusters=k, random_state=42, n_init=config.n_init).fit(features).inertia_
            for k in range(config.k_min, config.k_max + 1)
        ]
        full = time.perf_counter() - start
        k_full = elbow_k(np.arange(config.k_min, config.k_max + 1), np.array(inertias))
        print(
            f"baseline: the same sweep fitted on all {args.n:,} patches: {full:.1f} s -> k = {k_full}"
        )
        print(f"ratio full-sweep / stage: {full / stage:.1f}x")


if __name__ == "__main__":
    main()
