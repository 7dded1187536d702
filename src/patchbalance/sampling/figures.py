"""What the weights will do in training, computed from the table alone (SPEC §5).

The figures live here (`SamplingFigures`, `ClusterFigures`); `reporting.html` only renders them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from patchbalance.balanced_table import BalancedTable, read_balanced_table
from patchbalance.errors import InputError
from patchbalance.measures import class_proportions, class_share, effective_sample_size
from patchbalance.sampling.registry import SAMPLING_METHODS

# A below-median class whose weighted share falls under this fraction of its uniform share is
# starved (SPEC §5).
STARVATION_RATIO = 0.9
# What the starvation warning of any other weighting points to: the setting that raised the rare
# classes in the evidence of SPEC §11 (docs/benchmarks.md).
EVIDENCE_HINT = (
    "in our evidence (docs/benchmarks.md), class_target with target_share: sqrt and "
    "class-centred windows (input.placement: class_centred) raised the rare classes"
)
# Weights whose effective sample size is below this share of the active patches are very
# concentrated: the build and the report warn (SPEC §3.7).
CONCENTRATED_ESS_SHARE = 0.05
# Patches whose expected repeats are within this relative tolerance of the largest tie with it.
REPEATS_TIE_TOLERANCE = 1e-9


@dataclass
class SamplingFigures:
    """The figures of SPEC §5 for one table."""

    class_values: list[int]
    uniform_share: np.ndarray  # (C,) class pixel share per epoch under uniform sampling
    weighted_share: np.ndarray  # (C,) the same under the weights
    n_rows: int
    n_active: int
    draws: int  # draws per epoch: the table's row count, the DataLoader's default num_samples
    ess: float
    expected_distinct: float
    expected_distinct_uniform: float
    max_expected_repeats: float
    max_repeats_patches: int = 1  # how many patches tie at the largest expected repeats

    @property
    def log_prior_ratio(self) -> np.ndarray:
        """Return ln(uniform share / weighted share) per class (SPEC §5); 0 where either is 0.

        Added to a trained model's class logits, it undoes the shift that the weights put into
        the model's class prior (logit adjustment, Menon et al. 2021).
        """
        both = (self.uniform_share > 0) & (self.weighted_share > 0)
        ratio = np.zeros_like(self.uniform_share)
        ratio[both] = np.log(self.uniform_share[both] / self.weighted_share[both])
        return ratio

    def starved_classes(self) -> list[int]:
        """Return the column indices of the classes the weights starve (SPEC §5).

        A class is starved when its uniform share is below the median class share and its
        weighted share is more than 10 % (relative) below its uniform share.
        """
        occurring = self.uniform_share > 0
        if not occurring.any():
            return []
        median = float(np.median(self.uniform_share[occurring]))
        starved = (
            occurring
            & (self.uniform_share < median)
            & (self.weighted_share < STARVATION_RATIO * self.uniform_share)
        )
        return [int(j) for j in np.flatnonzero(starved)]

    def starvation_warnings(self, method: str = "the weights") -> list[str]:
        """Return one warning line per starved class.

        Args:
            method: how to name the weighting in the line (a sampling_method, or a table).

        Returns:
            Lines such as "rank_max lowers class 3 from 9.6 % to 7.7 % of the pixels seen per
            epoch"; empty when no class is starved. Unless the method solves for class
            shares itself (`class_target`), each line ends with the setting that raised the
            rare classes in our evidence.
        """
        registered = SAMPLING_METHODS.get(method)
        hint = "" if registered and registered.sets_class_shares else f"; {EVIDENCE_HINT}"
        return [
            f"{method} lowers class {self.class_values[j]} from {self.uniform_share[j]:.2%} to "
            f"{self.weighted_share[j]:.2%} of the pixels seen per epoch (a below-median class; "
            f"a weighting meant to help rare classes should not starve one{hint})"
            for j in self.starved_classes()
        ]

    def concentration_warning(self) -> str | None:
        """Return a warning when the weights are very concentrated (ESS under 5 % of the
        active patches), naming the ESS and the largest expected repeats; else None."""
        share = self.ess / max(self.n_active, 1)
        if share >= CONCENTRATED_ESS_SHARE:
            return None
        return (
            f"the weights are very concentrated: an effective sample size of {self.ess:,.1f} of "
            f"{self.n_active:,} active patches ({share:.2%}), and {self.repeats_text()} per "
            "epoch; a floor on the effective sample size (weights.min_ess), a smaller "
            "weights.power, weights.uniform_mix or weights.max_weight spreads them"
        )

    def repeats_text(self) -> str:
        """Return the largest expected repeats and how many patches tie at it, as words."""
        count = self.max_repeats_patches
        who = "one patch" if count == 1 else f"each of {count:,} tied patches"
        return f"{self.max_expected_repeats:,.2f} expected draws of {who}"

    def to_dict(self) -> dict[str, object]:
        """Return the figures as plain JSON-ready values."""
        ratio = self.log_prior_ratio
        return {
            "n_rows": self.n_rows,
            "n_active": self.n_active,
            "draws_per_epoch": self.draws,
            "class_pixel_share": {
                str(value): {
                    "uniform": round(float(self.uniform_share[j]), 6),
                    "weighted": round(float(self.weighted_share[j]), 6),
                }
                for j, value in enumerate(self.class_values)
            },
            "effective_sample_size": round(self.ess, 3),
            "effective_sample_size_share": round(self.ess / max(self.n_active, 1), 6),
            "expected_distinct_per_epoch": round(self.expected_distinct, 3),
            "expected_distinct_per_epoch_uniform": round(self.expected_distinct_uniform, 3),
            "max_expected_repeats_per_epoch": round(self.max_expected_repeats, 4),
            "max_expected_repeats_patches": self.max_repeats_patches,
            "log_prior_ratio": {
                str(value): round(float(ratio[j]), 6) for j, value in enumerate(self.class_values)
            },
            "starved_classes": [self.class_values[j] for j in self.starved_classes()],
        }


def expected_distinct(probabilities: np.ndarray, draws: int) -> float:
    """Return the expected number of distinct items seen in `draws` draws with replacement."""
    probabilities = probabilities[probabilities > 0]
    # 1 - (1 - p)^N computed as -expm1(N * log1p(-p)) stays accurate for tiny p; a patch
    # that takes every draw (p = 1, one weight dominating) gives log1p(-1) = -inf, exactly 1.
    with np.errstate(divide="ignore"):
        return float(-np.expm1(draws * np.log1p(-np.minimum(probabilities, 1.0))).sum())


def sampling_figures(
    counts: np.ndarray, weights: np.ndarray, active: np.ndarray, class_values: list[int]
) -> SamplingFigures:
    """Return the SPEC §5 figures for class counts (N, C), weights (N,) and the active mask."""
    counts = np.nan_to_num(np.asarray(counts, dtype=np.float64))
    weights = np.asarray(weights, dtype=np.float64)
    active = np.asarray(active, dtype=bool)
    n_rows, n_active = len(weights), int(active.sum())
    active_counts = counts[active]
    active_weights = weights[active]
    # Every figure depends on the weights' ratios only: scaled to a largest of 1, no sum of
    # weights times pixel counts can overflow.
    largest = float(active_weights.max(initial=0.0))
    if largest > 0:
        active_weights = active_weights / largest
    uniform_share = class_share(active_counts)
    weighted_share = class_share(active_counts, active_weights)
    total_weight = active_weights.sum()
    if not total_weight > 0:
        raise InputError("every sampler_weight is 0; there is nothing the sampler could draw")
    ess = effective_sample_size(active_weights)
    probabilities = active_weights / total_weight
    draws = n_rows
    return SamplingFigures(
        class_values=list(class_values),
        uniform_share=uniform_share,
        weighted_share=weighted_share,
        n_rows=n_rows,
        n_active=n_active,
        draws=draws,
        ess=ess,
        expected_distinct=expected_distinct(probabilities, draws),
        expected_distinct_uniform=expected_distinct(np.full(n_active, 1.0 / n_active), draws),
        max_expected_repeats=float(draws * probabilities.max()),
        max_repeats_patches=int(
            np.count_nonzero(probabilities >= probabilities.max() * (1 - REPEATS_TIE_TOLERANCE))
        ),
    )


def figures_from_table(table: pd.DataFrame, where: str | None = None) -> SamplingFigures:
    """Return the SPEC §5 figures of a balanced table (needs `px_*` and `sampler_weight`).

    `where` names the table (its file) in error messages and warnings. Active rows are those
    not `excluded` (all rows of weight > 0 without the column); an excluded row with a weight
    above 0 is never drawn, and one warning counts such rows.
    """
    return balanced_figures(read_balanced_table(table, where))


def balanced_figures(balanced: BalancedTable) -> SamplingFigures:
    """Return the SPEC §5 figures of a `BalancedTable` (its rows as they are numbered)."""
    where = balanced.where
    weights = balanced.drawn_weights()
    active = balanced.active(weights)
    check_weight_total(weights[active], where)
    counts, values = balanced.class_counts()
    return sampling_figures(counts, weights, active, values)


def check_weight_total(weights: np.ndarray, where: str | None = None) -> None:
    """Raise `InputError` when the weights' sum overflows a float (the shares would be NaN)."""
    with np.errstate(over="ignore"):
        total = weights.sum()
    if not np.isfinite(total):
        prefix = f"{where}: " if where else ""
        raise InputError(
            f"{prefix}the sampler_weight values are too large to add up (largest "
            f"{weights.max():.3g}; their sum overflows); scale them down, e.g. divide every "
            "weight by their mean"
        )


def figures_text(figures: SamplingFigures, class_names: dict[int, str] | None = None) -> str:
    """Return the figures as a small text table for the terminal."""
    names = class_names or {}
    lines = ["class pixel share per epoch      uniform   weighted    ratio  log prior ratio"]
    prior = figures.log_prior_ratio
    for j, value in enumerate(figures.class_values):
        label = names.get(value, f"class {value}")
        uniform, weighted = figures.uniform_share[j], figures.weighted_share[j]
        ratio = weighted / uniform if uniform > 0 else float("nan")
        lines.append(
            f"  {label:<30} {uniform:8.2%}  {weighted:9.2%}  {ratio:6.2f}x  {prior[j]:+15.3f}"
        )
    share = figures.ess / max(figures.n_active, 1)
    lines += [
        f"effective sample size            {figures.ess:,.1f} of {figures.n_active:,} active "
        f"({share:.1%})",
        f"expected distinct patches/epoch  {figures.expected_distinct:,.1f} of {figures.draws:,} "
        f"draws (uniform: {figures.expected_distinct_uniform:,.1f})",
        f"largest expected repeats/epoch   {figures.max_expected_repeats:.2f} "
        + (
            "(one patch)"
            if figures.max_repeats_patches == 1
            else f"({figures.max_repeats_patches:,} patches tie)"
        ),
    ]
    return "\n".join(lines)


def prior_correction(table: pd.DataFrame) -> np.ndarray:
    """Return log_prior_ratio per class of a balanced table, in the order of its px_ columns.

    Args:
        table: a balanced table with `px_<class>` counts and `sampler_weight`.

    Returns:
        (C,) ln(uniform share / weighted share); add tau times it to a model's class logits to
        undo the class prior shift of training with these weights (0 where a share is 0).
    """
    return figures_from_table(table).log_prior_ratio


def report(table: pd.DataFrame) -> SamplingFigures:
    """Return what the weights of `table` will do in training (the Python API of `report`)."""
    return figures_from_table(table)


@dataclass
class ClusterFigures:
    """Per composition cluster (`freq_cluster_id`) of the active patches: size and draws."""

    ids: np.ndarray  # (K,) cluster ids, ascending
    sizes: np.ndarray  # (K,) active patches per cluster
    size_share: np.ndarray  # (K,) share of those patches: the share of uniform draws
    draw_share: np.ndarray  # (K,) share of the weighted draws
    mean_weight: np.ndarray  # (K,) mean sampler_weight of the cluster's patches
    mean_composition: np.ndarray  # (K, C) mean class proportions of the cluster's patches


def active_and_drawn_weights(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Return which rows are active and the weight each is drawn with (0 for excluded rows).

    Args:
        table: a balanced table with `sampler_weight`.

    Returns:
        `(active, weights)` by the rules of `figures_from_table` (the table's one reader), so
        that plots and figures agree.
    """
    balanced = read_balanced_table(table)
    weights = balanced.drawn_weights(warn=False)
    return balanced.active(weights), weights


def cluster_figures(
    table: pd.DataFrame, weights: np.ndarray, active: np.ndarray
) -> ClusterFigures | None:
    """Return the figures of each composition cluster, or None without `freq_cluster_id`.

    Args:
        table: a balanced table with `px_<class>` counts.
        weights: (N,) the weight each row is drawn with (`active_and_drawn_weights`).
        active: (N,) which rows are active.

    Returns:
        The `ClusterFigures` of the active patches that have a cluster (id >= 0); with no such
        patch, figures of zero clusters.
    """
    if "freq_cluster_id" not in table.columns:
        return None
    cluster_ids = pd.to_numeric(table["freq_cluster_id"], errors="coerce").to_numpy()
    in_cluster = active & np.isfinite(cluster_ids) & (cluster_ids >= 0)
    counts, _ = read_balanced_table(table).class_counts()
    proportions = class_proportions(counts[in_cluster])
    ids, inverse = np.unique(cluster_ids[in_cluster].astype(np.int64), return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(ids))
    cluster_weight = np.bincount(inverse, weights=weights[in_cluster], minlength=len(ids))
    mean_composition = np.zeros((len(ids), counts.shape[1]))
    np.add.at(mean_composition, inverse, proportions)
    if len(ids):
        mean_composition /= sizes[:, None]
    return ClusterFigures(
        ids=ids,
        sizes=sizes,
        size_share=sizes / max(sizes.sum(), 1),
        draw_share=cluster_weight / max(weights[active].sum(), 1e-300),
        mean_weight=np.divide(cluster_weight, sizes, out=np.zeros(len(ids)), where=sizes > 0),
        mean_composition=mean_composition,
    )
