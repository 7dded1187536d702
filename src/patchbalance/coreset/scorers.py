"""The six CoreSet scorers of SPEC §6 (Nogueira et al. 2026), on arrays aligned with the pool.

Every function takes arrays over the pool only, in patch-key order, and returns scores or an
order over that pool. Ties are broken by position, which is the patch-key order, so every
result is deterministic. Reading tables and embeddings is the job of `coreset.pool` and
`coreset.pool_embeddings`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from patchbalance.errors import ConfigError, InputError, MissingDependencyError
from patchbalance.kmeans import (
    distinct_rows,
    elbow_k,
    fit_kmeans,
    renumber_by_size,
    sweep_k,
    sweep_sample,
)

log = logging.getLogger(__name__)

# log(sigma + eps) keeps the feature-activation score finite for a constant embedding.
FA_EPSILON = 1e-8
# The k sweep of fd fits on a seeded subsample of this many patches, as the composition sweep.
FD_SWEEP_SAMPLE = 20_000
# Above this many patches the final fd fit uses MiniBatchKMeans.
FD_MINIBATCH_ABOVE = 100_000
# One k-means++ start per k in the sweep (sklearn's "auto"), several for the final fit: the
# sweep only needs the inertia curve's shape, the final fit decides the clusters.
FD_SWEEP_N_INIT = 1
FD_FINAL_N_INIT = 3
# Per-cluster Vendi scores are computed on at most this many members (seeded subsample):
# the eigen-decomposition is cubic in min(members, dimension).
VENDI_MAX_MEMBERS = 500
# The Vendi rule stops after this many consecutive k whose score moved by less than delta.
VENDI_CALM_STEPS = 3


# --------------------------------------------------------------------------------------------
# Shared helpers


def order_scores(order: np.ndarray, n: int) -> np.ndarray:
    """Return 1 - position / (n - 1) for the patches of `order` (first = 1, last = 0), 0 elsewhere."""
    scores = np.zeros(n, dtype=np.float64)
    if n == 1:
        scores[order] = 1.0
        return scores
    scores[order] = 1.0 - np.arange(len(order), dtype=np.float64) / (n - 1)
    return scores


def top_by_score(scores: np.ndarray, count: int) -> np.ndarray:
    """Return the positions of the `count` highest scores; equal scores go by position (patch key)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return order[:count]


def minmax(values: np.ndarray) -> np.ndarray:
    """Return `values` scaled to [0, 1]; a constant array becomes all zeros."""
    values = np.asarray(values, dtype=np.float64)
    low, high = values.min(), values.max()
    if not high > low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


# --------------------------------------------------------------------------------------------
# lc: label complexity


def label_complexity_scores(entropy: np.ndarray) -> np.ndarray:
    """Return class_entropy / its maximum over the pool; all zeros when every entropy is 0."""
    entropy = np.nan_to_num(np.asarray(entropy, dtype=np.float64), nan=0.0)
    top = entropy.max() if entropy.size else 0.0
    if not top > 0:
        return np.zeros_like(entropy)
    return entropy / top


# --------------------------------------------------------------------------------------------
# cb: class balance, greedy


def has_uniform_totals(features: np.ndarray) -> bool:
    """Return True when every row of `features` has the same sum (class proportions do)."""
    totals = np.asarray(features, dtype=np.float64).sum(axis=1)
    return bool(totals.size == 0 or np.ptp(totals) <= 1e-9 * max(abs(totals[0]), 1.0))


def resolve_cb_device(device: str | None) -> tuple[str, str | None]:
    """Return ("numpy", None) or ("torch", device) for the cb greedy loop from the `device` key.

    null: CUDA through torch when it is available, else numpy; "cpu": numpy; "cuda" or
    "cuda:N": torch on that device, an error if torch or CUDA is missing.
    """
    if device is None:
        try:
            import torch
        except ImportError:
            return "numpy", None
        return ("torch", "cuda") if torch.cuda.is_available() else ("numpy", None)
    name = device.strip().lower()
    if name == "cpu":
        return "numpy", None
    if name == "cuda" or name.startswith("cuda:"):
        try:
            import torch
        except ImportError as exc:
            raise MissingDependencyError(f"torch (for device: {device})", "embeddings") from exc
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: {device} was asked for but CUDA is not available here; "
                "set device: cpu (or null to use CUDA only when present)"
            )
        return "torch", name
    raise ConfigError(f"device: {device!r} is not supported; use null, cpu, cuda or cuda:N")


def class_balance_order(
    features: np.ndarray,
    budget: int,
    backend: str = "numpy",
    device: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Return the pool positions picked by the cb greedy, in pick order (length `budget`).

    Starting from S = 0, each step picks the unpicked row i that maximises the Shannon entropy
    of the normalised S + features[i], then adds features[i] to S. Equal entropies go to the
    lowest position. `backend` "numpy" updates only the columns of S that the last pick
    changed; "torch" recomputes the pool on `device` each step without leaving the device.
    """
    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    if not 1 <= budget <= n:
        raise ValueError(f"budget {budget} outside 1..{n}")
    # Columns that are 0 for every row never change the entropy: drop them.
    features = features[:, features.max(axis=0, initial=0.0) > 0]
    if features.shape[1] == 0:
        return np.arange(budget)
    if backend == "torch":
        return _class_balance_order_torch(features, budget, device or "cpu", progress)
    return _class_balance_order_numpy(features, budget, progress)


def _xlogx(values: np.ndarray) -> np.ndarray:
    positive = values > 0
    return np.where(positive, values * np.log(np.where(positive, values, 1.0)), 0.0)


def _class_balance_order_numpy(
    features: np.ndarray, budget: int, progress: Callable[[int], None] | None
) -> np.ndarray:
    # With v = S + F_i and T_i = sum(v), the entropy is H_i = ln T_i - sum_j phi(v_j) / T_i,
    # phi(x) = x ln x. Write sum_j phi(S_j + F_ij) = Phi(S) + D_i, where
    # D_i = sum_j d_ij and d_ij = phi(S_j + F_ij) - phi(S_j) is 0 wherever F_ij = 0. A pick
    # changes S_j only where its own F_kj > 0, so a step recomputes those columns of d (one
    # vectorised pass over the pool each) instead of all C; the other columns stay exact.
    n = len(features)
    columns = np.ascontiguousarray(features.T)  # (C, N): each class column is contiguous
    uniform = has_uniform_totals(features)
    d = _xlogx(columns)  # d_ij at S = 0
    totals_d = d.sum(axis=0)
    state = np.zeros(columns.shape[0])
    phi_state = np.zeros(columns.shape[0])
    buffer = np.empty(n)
    if not uniform:
        row_totals = columns.sum(axis=0)
        total = np.empty(n)
        entropy = np.empty(n)
        scratch = np.empty(n)
    order = np.empty(budget, dtype=np.int64)
    chunk = max(1, budget // 100)
    for step in range(budget):
        if uniform:
            # T_i is the same for every row, so the entropy is highest where D_i is lowest.
            pick = int(np.argmin(totals_d))
        else:
            np.add(row_totals, state.sum(), out=total)
            np.log(total, out=entropy)
            np.add(totals_d, phi_state.sum(), out=scratch)
            np.divide(scratch, total, out=scratch)
            np.subtract(entropy, scratch, out=entropy)
            pick = int(np.argmax(entropy))
        order[step] = pick
        # +inf stays +inf through the column updates, so a picked row is never picked again.
        totals_d[pick] = np.inf
        picked = columns[:, pick].copy()
        for j in np.flatnonzero(picked > 0):
            state[j] += picked[j]
            level = state[j]
            phi_state[j] = level * math.log(level)
            np.subtract(totals_d, d[j], out=totals_d)
            np.add(columns[j], level, out=buffer)
            np.log(buffer, out=d[j])
            np.multiply(d[j], buffer, out=d[j])
            d[j] -= phi_state[j]
            np.add(totals_d, d[j], out=totals_d)
        if progress is not None and ((step + 1) % chunk == 0 or step + 1 == budget):
            progress(chunk if (step + 1) % chunk == 0 else (step + 1) % chunk)
    return order


def _class_balance_order_torch(
    features: np.ndarray, budget: int, device: str, progress: Callable[[int], None] | None
) -> np.ndarray:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError("torch (for the cb torch path)", "embeddings") from exc
    uniform = has_uniform_totals(features)
    # float64 so that late steps, whose entropies differ in the 8th digit, still rank exactly.
    values = torch.as_tensor(features, dtype=torch.float64, device=device)
    n, c = values.shape
    row_totals = values.sum(dim=1)
    state = torch.zeros(c, dtype=torch.float64, device=device)
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    order = torch.empty(budget, dtype=torch.int64, device=device)
    mixed = torch.empty_like(values)
    plogp = torch.empty_like(values)
    key = torch.empty(n, dtype=torch.float64, device=device)
    total = torch.empty(n, dtype=torch.float64, device=device)
    chunk = max(1, budget // 100)
    with torch.inference_mode():
        for step in range(budget):
            torch.add(values, state, out=mixed)
            torch.special.xlogy(mixed, mixed, out=plogp)
            torch.sum(plogp, dim=1, out=key)
            if not uniform:
                # key = -H = sum phi / T - ln T; minimising it maximises the entropy.
                torch.add(row_totals, state.sum(), out=total)
                key.div_(total).sub_(torch.log(total))
            key.masked_fill_(taken, float("inf"))
            pick = torch.argmin(key).reshape(1)
            order[step : step + 1] = pick
            taken.index_fill_(0, pick, True)
            state.add_(values.index_select(0, pick).squeeze(0))
            if progress is not None and ((step + 1) % chunk == 0 or step + 1 == budget):
                progress(chunk if (step + 1) % chunk == 0 else (step + 1) % chunk)
    return order.cpu().numpy()


def class_balance_scores(order: np.ndarray, n: int) -> np.ndarray:
    """Return (n - step) / (n - 1) for the patch picked at greedy step 1, 2, ..., 0 elsewhere."""
    scores = np.zeros(n, dtype=np.float64)
    if n == 1:
        scores[order] = 1.0
        return scores
    steps = np.arange(1, len(order) + 1, dtype=np.float64)
    scores[order] = (n - steps) / (n - 1)
    return scores


# --------------------------------------------------------------------------------------------
# fa: feature activation


def feature_activation_scores(embeddings: np.ndarray) -> np.ndarray:
    """Return 1 - minmax(gamma), gamma_i = -(1 - mean_i) * ln(std_i + eps) of each embedding."""
    embeddings = np.asarray(embeddings)
    mean = embeddings.mean(axis=1, dtype=np.float64)
    std = embeddings.std(axis=1, dtype=np.float64)
    gamma = -(1.0 - mean) * np.log(std + FA_EPSILON)
    return 1.0 - minmax(gamma)


# --------------------------------------------------------------------------------------------
# fd: feature diversity


def vendi_score(vectors: np.ndarray) -> float:
    """Return the Vendi score: exp of the Shannon entropy of the eigenvalues of K / n.

    K is the cosine-similarity matrix of the n vectors. n identical vectors score 1, n
    orthogonal vectors score n. The non-zero eigenvalues of X X^T equal those of X^T X, so
    the smaller of the two (n x n or d x d) is decomposed.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    n = len(vectors)
    if n == 0:
        raise ValueError("the Vendi score of an empty set is undefined")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    gram = unit @ unit.T if n <= unit.shape[1] else unit.T @ unit
    eigenvalues = np.linalg.eigvalsh(gram / n)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(np.exp(-np.sum(eigenvalues * np.log(eigenvalues))))


def mean_cluster_vendi(embeddings: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """Return the mean over clusters of the Vendi score of each cluster's members."""
    rng = np.random.default_rng(seed)
    scores = []
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        if len(members) > VENDI_MAX_MEMBERS:
            members = np.sort(rng.choice(members, size=VENDI_MAX_MEMBERS, replace=False))
        scores.append(vendi_score(embeddings[members]))
    return float(np.mean(scores))


def choose_k_vendi(ks: list[int], vendi: dict[int, float], delta: float) -> tuple[int | None, bool]:
    """Return (k, settled) by the Vendi rule over the scores `vendi` seen so far for `ks`.

    The rule stops once the mean per-cluster Vendi score has moved by less than `delta` for
    three consecutive k, and takes the last k before that calm run (the smallest k after which
    more clusters stop changing the clusters' diversity). Returns (None, False) while the run
    has not happened yet.
    """
    calm = 0
    last_moving = ks[0]
    for previous, current in zip(ks, ks[1:], strict=False):
        if abs(vendi[current] - vendi[previous]) < delta:
            calm += 1
            if calm == VENDI_CALM_STEPS:
                return last_moving, True
        else:
            calm = 0
            last_moving = current
    return None, False


@dataclass
class FeatureDiversityResult:
    """The fd order over the pool and how its clusters were chosen."""

    order: np.ndarray  # pool positions, round-robin order
    labels: np.ndarray  # cluster per pool position, 0 = largest
    k: int
    rule: str  # "elbow", "vendi" or "single"
    sweep: dict[int, float] = field(default_factory=dict)  # k -> inertia (elbow) or mean Vendi
    sweep_sample: int = 0
    notes: list[str] = field(default_factory=list)


def round_robin_order(labels: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Return positions taken round-robin over clusters 0, 1, ..., nearest to the centroid first.

    Round r takes the r-th nearest member of every cluster that still has one, in cluster
    order; equal distances go by position.
    """
    labels = np.asarray(labels)
    n = len(labels)
    positions = np.arange(n)
    by_cluster = np.lexsort((positions, distances, labels))
    sorted_labels = labels[by_cluster]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(n, dtype=np.int64)
    rank[by_cluster] = np.arange(n) - starts
    return np.lexsort((labels, rank))


def feature_diversity_order(
    embeddings: np.ndarray,
    k_min: int,
    k_max: int,
    use_vendi: bool,
    vendi_delta: float,
    seed: int,
    progress: Callable[[int], None] | None = None,
) -> FeatureDiversityResult:
    """Return the fd round-robin order of the pool's embeddings and the clustering behind it.

    k is chosen over k_min..k_max (clamped to the distinct embeddings of the sweep sample) by
    the elbow of the KMeans inertia (SPEC §3.4's rule) or, with `use_vendi`, by the Vendi
    rule. The sweep fits on a seeded subsample of FD_SWEEP_SAMPLE patches when the pool is
    larger; the final fit uses every patch.
    """
    data = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = len(data)
    if n == 1:
        return FeatureDiversityResult(
            np.zeros(1, dtype=np.int64), np.zeros(1, np.int64), 1, "single"
        )
    notes: list[str] = []
    sample = sweep_sample(data, FD_SWEEP_SAMPLE, seed)
    distinct = distinct_rows(sample)
    top = min(k_max, distinct)
    bottom = min(k_min, top)
    if top < k_max:
        notes.append(f"fd_k_max={k_max} clamped to {top}: only {distinct} distinct embeddings")
    ks = list(range(bottom, top + 1))
    rule = "vendi" if use_vendi else "elbow"
    if use_vendi:
        sweep = sweep_k(
            sample,
            ks,
            seed,
            FD_SWEEP_N_INIT,
            score=lambda rows, model: mean_cluster_vendi(rows, model.labels_, seed),
            stop=lambda scores: choose_k_vendi(list(scores), scores, vendi_delta)[1],
            progress=progress,
            minibatch_above=FD_MINIBATCH_ABOVE,
        )
        chosen = choose_k_vendi(list(sweep), sweep, vendi_delta)[0]
        if chosen is None:
            chosen = ks[-1]
            notes.append(
                f"the mean per-cluster Vendi score never settled (|change| < {vendi_delta} for "
                f"{VENDI_CALM_STEPS} consecutive k) up to k={ks[-1]}; using k={ks[-1]}"
            )
    else:
        sweep = sweep_k(
            sample, ks, seed, FD_SWEEP_N_INIT, progress=progress, minibatch_above=FD_MINIBATCH_ABOVE
        )
        chosen = elbow_k(np.array(list(sweep)), np.array(list(sweep.values())))
    for note in notes:
        log.warning(note)
    model = fit_kmeans(data, chosen, seed, FD_FINAL_N_INIT, FD_MINIBATCH_ABOVE)
    raw_labels = model.labels_
    centres = model.cluster_centers_.astype(np.float64)
    # Distance to the own centroid, in blocks so that no (N, D) float64 copy is made.
    distances = np.empty(n, dtype=np.float64)
    for start in range(0, n, 16_384):
        block = data[start : start + 16_384].astype(np.float64)
        difference = block - centres[raw_labels[start : start + 16_384]]
        distances[start : start + len(block)] = np.sqrt(
            np.einsum("ij,ij->i", difference, difference)
        )
    labels, sizes = renumber_by_size(raw_labels, chosen)
    return FeatureDiversityResult(
        order=round_robin_order(labels, distances),
        labels=labels,
        k=len(sizes),
        rule=rule,
        sweep=sweep,
        sweep_sample=len(sample),
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# hybrids


def label_complexity_then_diversity_order(
    diversity_order: np.ndarray, complexity: np.ndarray, cutoff: int
) -> np.ndarray:
    """Return the lc_fd order: the first `cutoff` patches of the fd order, then the rest by lc.

    The rest go by decreasing lc score; equal scores by position (patch key).
    """
    n = len(complexity)
    cutoff = min(max(cutoff, 0), n)
    head = np.asarray(diversity_order[:cutoff], dtype=np.int64)
    rest = np.ones(n, dtype=bool)
    rest[head] = False
    remaining = np.flatnonzero(rest)
    tail = remaining[np.argsort(-np.asarray(complexity)[remaining], kind="stable")]
    return np.concatenate([head, tail])


def default_cutoff(n: int, cutoff: int | None) -> int:
    """Return lc_fd's m: the configured value, or 10 % of the pool (rounded), at most the pool."""
    m = int(math.floor(0.1 * n + 0.5)) if cutoff is None else int(cutoff)
    return min(max(m, 0), n)


def check_finite_embeddings(embeddings: np.ndarray, what: str) -> None:
    """Raise InputError when some embedding holds NaN or infinity, with the count of such rows."""
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        raise InputError(
            f"{what}: {int(bad.sum())} pool patch embedding(s) hold NaN or infinite values "
            f"(first at pool position {int(np.flatnonzero(bad)[0])}); recompute the embeddings"
        )
