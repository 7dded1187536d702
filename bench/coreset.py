"""CoreSet selection time per method (SPEC §6), and the cb greedy's numpy vs torch paths.

Synthetic pool: N patches (default 155,000) with 6 land-cover-like classes (most patches miss
some classes, one class dominates) and, for fa / fd / lc_fd / fa_cb, N x 768 float32 embeddings
drawn around 16 centres. Budget 0.3 of the pool. Every method runs through
`patchbalance.coreset.select_coreset`, so the times include pool building, scoring, selection
and the training weights.

Baselines measured side by side in the same run:
- cb: the straightforward greedy (the upstream way: each step copies the unselected rows, adds
  the running totals and recomputes every entropy), timed over its first `--baseline-steps`
  steps and extrapolated to the budget (its steps get cheaper as the pool shrinks; the
  extrapolation accounts for that linearly).
- cb torch path vs numpy path on the same first `--torch-steps` steps (torch on CPU here, and on
  CUDA too when it is available), checking that both pick the same patches.

    python bench/coreset.py                      # the full figures (several minutes)
    python bench/coreset.py --n 20000 --dim 128  # a quick run
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pandas as pd

from patchbalance.coreset import select_coreset
from patchbalance.coreset.scorers import class_balance_order
from patchbalance.measures import class_entropy, class_proportions

CLASSES = 6
LABEL_METHODS = ("lc", "cb", "cb_spatial")
EMBEDDING_METHODS = ("fa", "fd", "fd_vendi", "lc_fd", "fa_cb")


def synthetic_table(n: int, seed: int) -> pd.DataFrame:
    """Return a balanced table of `n` fully labelled 256 x 256 patches with six classes."""
    rng = np.random.default_rng(seed)
    # Scene types with different class mixes: background-heavy, water, urban, rare-class rich.
    alphas = np.array(
        [
            [6.0, 0.6, 0.4, 0.3, 0.05, 0.02],
            [1.0, 4.0, 0.3, 0.2, 0.05, 0.02],
            [1.5, 0.3, 3.0, 1.5, 0.1, 0.05],
            [1.0, 0.5, 0.5, 0.5, 1.0, 0.5],
        ]
    )
    kinds = rng.choice(len(alphas), size=n, p=[0.55, 0.2, 0.2, 0.05])
    proportions = np.empty((n, CLASSES))
    for kind, alpha in enumerate(alphas):
        rows = kinds == kind
        proportions[rows] = rng.dirichlet(alpha, size=int(rows.sum()))
    proportions[proportions < 0.01] = 0.0
    proportions /= proportions.sum(axis=1, keepdims=True)
    pixels = 256 * 256
    counts = np.floor(proportions * pixels).astype(np.int64)
    counts[np.arange(n), counts.argmax(axis=1)] += pixels - counts.sum(axis=1)
    side = int(math.ceil(math.sqrt(n)))
    row, col = np.divmod(np.arange(n), side)
    table = pd.DataFrame(
        {
            "image_path": [f"/data/scene_{i % 40:02d}.tif" for i in range(n)],
            "mask_path": [f"/data/mask_{i % 40:02d}.tif" for i in range(n)],
            "row_off": row * 256,
            "col_off": col * 256,
            "patch_size": 256,
            "tile_minx": col * 128.0,
            "tile_maxx": col * 128.0 + 128.0,
            "tile_miny": -row * 128.0 - 128.0,
            "tile_maxy": -row * 128.0,
        }
    )
    for j in range(CLASSES):
        table[f"px_{j}"] = counts[:, j]
    table["class_entropy"] = class_entropy(counts)
    table["has_low_entropy"] = False
    table["excluded"] = False
    table["freq_cluster_id"] = kinds
    table["sampler_weight"] = 1.0
    return table


def synthetic_embeddings(n: int, dim: int, seed: int) -> np.ndarray:
    """Return (n, dim) float32 vectors around 16 centres, like clustered image features."""
    rng = np.random.default_rng(seed + 1)
    centres = rng.standard_normal((16, dim), dtype=np.float32) * 2.0
    labels = rng.integers(0, 16, size=n)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors += centres[labels]
    return vectors


def naive_cb_steps(features: np.ndarray, steps: int) -> tuple[float, list[int]]:
    """Time `steps` steps of the straightforward greedy; return seconds and its picks."""
    n = len(features)
    selected = np.zeros(n, dtype=bool)
    cumulative = np.zeros(features.shape[1])
    picks = []
    start = time.perf_counter()
    for _ in range(steps):
        unselected = np.flatnonzero(~selected)
        candidates = cumulative + features[unselected]
        proportions = candidates / candidates.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(proportions > 0, proportions * np.log(proportions), 0.0)
        best = unselected[int(np.argmax(-terms.sum(axis=1)))]
        selected[best] = True
        cumulative += features[best]
        picks.append(int(best))
    return time.perf_counter() - start, picks


def timed(label: str, function, results: dict[str, float]) -> object:
    start = time.perf_counter()
    value = function()
    results[label] = time.perf_counter() - start
    print(f"  {label:<34} {results[label]:9.2f} s", flush=True)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=155_000, help="patches in the pool")
    parser.add_argument("--dim", type=int, default=768, help="embedding dimension")
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-steps", type=int, default=300)
    parser.add_argument("--torch-steps", type=int, default=2000)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="limit BLAS/OpenMP (KMeans) and torch to this many threads (default: no limit)",
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        default=[*LABEL_METHODS, *EMBEDDING_METHODS],
        help=f"any of {', '.join([*LABEL_METHODS, *EMBEDDING_METHODS])}",
    )
    args = parser.parse_args()
    import torch
    from threadpoolctl import threadpool_limits

    if args.threads is not None:
        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)

    n, budget = args.n, args.budget
    count = int(math.floor(budget * n + 0.5))
    print(f"pool {n:,} patches x {CLASSES} classes, budget {budget} = {count:,} patches")
    print(
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, thread limit "
        f"{args.threads or 'none'}, CUDA {torch.cuda.is_available()}"
    )
    table = synthetic_table(n, args.seed)
    needs_embeddings = any(m in EMBEDDING_METHODS for m in args.methods)
    embeddings = synthetic_embeddings(n, args.dim, args.seed) if needs_embeddings else None

    times: dict[str, float] = {}
    print("\nselect_coreset, end to end (device: cpu for cb):")
    base = {"budget": budget, "device": "cpu"}
    settings = {
        "lc": {"method": "lc"},
        "cb": {"method": "cb"},
        "cb_spatial": {"method": "cb", "cb_use_spatial": True},
        "fa": {"method": "fa"},
        "fd": {"method": "fd"},
        "fd_vendi": {"method": "fd", "fd_use_vendi": True},
        "lc_fd": {"method": "lc_fd"},
        "fa_cb": {"method": "fa_cb"},
    }
    for method in args.methods:
        uses = embeddings if method in EMBEDDING_METHODS else None
        label = f"{method} ({args.dim}-d embeddings)" if uses is not None else method
        out = timed(
            label, lambda m=method, e=uses: select_coreset(table, {**base, **settings[m]}, e), times
        )
        assert int(out["coreset_selected"].sum()) == count

    # cb: the greedy alone, our numpy path vs the straightforward loop and the torch path.
    features = class_proportions(table[[f"px_{j}" for j in range(CLASSES)]].to_numpy())
    print("\ncb greedy alone:")
    if "cb" not in times:
        timed("cb numpy, full budget", lambda: class_balance_order(features, count), times)
    steps = min(args.baseline_steps, count)
    naive_seconds, naive_picks = naive_cb_steps(features, steps)
    first = class_balance_order(features, steps)
    assert naive_picks == first.tolist(), "the straightforward loop picks other patches"
    # Per-step cost of the straightforward loop is proportional to the unselected rows.
    per_row_step = naive_seconds / sum(n - t for t in range(steps))
    naive_estimate = per_row_step * sum(n - t for t in range(count))
    print(
        f"  straightforward loop: {steps} steps in {naive_seconds:.2f} s -> "
        f"{naive_estimate:,.0f} s estimated for {count:,} steps (same picks as ours)"
    )
    ours = times.get("cb", times.get("cb numpy, full budget"))
    print(
        f"  ours (numpy, incremental columns) vs straightforward: {naive_estimate / ours:.1f}x faster"
    )

    torch_steps = min(args.torch_steps, count)
    numpy_start = time.perf_counter()
    numpy_picks = class_balance_order(features, torch_steps)
    numpy_seconds = time.perf_counter() - numpy_start
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"  first {torch_steps:,} steps: numpy {numpy_seconds:.2f} s ({numpy_seconds / torch_steps * 1e3:.2f} ms/step)"
    )
    for device in devices:
        if device == "cuda":
            class_balance_order(features[:1000], 10, backend="torch", device=device)  # warm-up
        start = time.perf_counter()
        picks = class_balance_order(features, torch_steps, backend="torch", device=device)
        seconds = time.perf_counter() - start
        same = np.array_equal(picks, numpy_picks)
        print(
            f"  first {torch_steps:,} steps: torch {device} {seconds:.2f} s "
            f"({seconds / torch_steps * 1e3:.2f} ms/step) = "
            f"{seconds / numpy_seconds:.2f}x the numpy time; same picks: {same}"
        )

    print("\nsummary (seconds):")
    for label, seconds in times.items():
        print(f"  {label:<34} {seconds:9.2f}")
    label_times = {m: times[m] for m in LABEL_METHODS if m in times}
    if label_times:
        slowest = max(label_times.values())
        verdict = "yes" if slowest < 10 else "no"
        print(
            f"label methods 'in seconds' (< 10 s) on {n:,} patches: {verdict} "
            f"(slowest {slowest:.1f} s)"
        )


if __name__ == "__main__":
    main()
