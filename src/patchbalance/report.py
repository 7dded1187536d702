"""What the weights will do in training, computed from the table alone (SPEC §5)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from patchbalance.atomic import check_writable
from patchbalance.errors import InputError
from patchbalance.table import (
    class_columns,
    class_share,
    drawn_weights,
    effective_sample_size,
    excluded_column,
    read_table,
    rows_text,
)

# A below-median class whose weighted share falls under this fraction of its uniform share is
# starved (SPEC §5).
STARVATION_RATIO = 0.9


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
            epoch"; empty when no class is starved.
        """
        return [
            f"{method} lowers class {self.class_values[j]} from {self.uniform_share[j]:.2%} to "
            f"{self.weighted_share[j]:.2%} of the pixels seen per epoch (a below-median class; "
            "a weighting meant to help rare classes should not starve one)"
            for j in self.starved_classes()
        ]

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
            "log_prior_ratio": {
                str(value): round(float(ratio[j]), 6) for j, value in enumerate(self.class_values)
            },
            "starved_classes": [self.class_values[j] for j in self.starved_classes()],
        }


def expected_distinct(probabilities: np.ndarray, draws: int) -> float:
    """Return the expected number of distinct items seen in `draws` draws with replacement."""
    probabilities = probabilities[probabilities > 0]
    # 1 - (1 - p)^N computed as -expm1(N * log1p(-p)) stays accurate for tiny p.
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
    )


def figures_from_table(table: pd.DataFrame, where: str | None = None) -> SamplingFigures:
    """Return the SPEC §5 figures of a balanced table (needs `px_*` and `sampler_weight`).

    `where` names the table (its file) in error messages and warnings. Active rows are those
    not `excluded` (all rows of weight > 0 without the column); an excluded row with a weight
    above 0 is never drawn, and one warning counts such rows.
    """
    prefix = f"{where}: " if where else ""
    if "sampler_weight" not in table.columns:
        raise InputError(
            f"{prefix}the table has no sampler_weight column; build it with build-balanced-dataset"
        )
    columns, values = class_columns(table)
    if not columns:
        raise InputError(f"{prefix}the table has no px_<class> columns of class pixel counts")
    weights = pd.to_numeric(table["sampler_weight"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(weights) | (weights < 0)
    if bad.any():
        raise InputError(
            f"{prefix}sampler_weight is negative, empty or not a number in "
            f"{int(bad.sum())} row(s) ({rows_text(np.flatnonzero(bad))}); weights must be finite "
            "and >= 0: rebuild the table with build-balanced-dataset or fix those rows"
        )
    excluded = excluded_column(table, where)
    weights = drawn_weights(weights, excluded, where)
    active = ~excluded if excluded is not None else weights > 0
    counts = table[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    return sampling_figures(counts, weights, active, values)


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
        f"largest expected repeats/epoch   {figures.max_expected_repeats:.2f} (one patch)",
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


def run_report_command(table_path: Path, out: Path | None = None) -> str:
    """Return the report's text for the CLI; with `out`, also write the HTML page there."""
    if out is not None:
        check_writable(Path(out), "the HTML report (--out)")
    table = read_table(table_path)
    figures = figures_from_table(table, where=str(table_path))
    text = figures_text(figures)
    for line in figures.starvation_warnings(Path(table_path).name):
        text += f"\nwarning: {line}"
    if out is not None:
        from patchbalance.report_html import write_html_report

        write_html_report(table, figures, Path(out), title=Path(table_path).name)
        text += f"\nreport written to {out}"
    return text
