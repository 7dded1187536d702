"""The HTML page of `patchbalance report`: what the weights will do, with plots (SPEC §5).

This module only renders: the figures are computed in `report` (and the map drawn in
`reporting.map`). The page is one self-contained file: inline CSS, and every plot a matplotlib figure embedded as
a base64 PNG, so it opens offline and can be mailed or attached to a ticket. Figures are drawn
through `matplotlib.figure.Figure` (the Agg canvas) rather than pyplot, so writing a report
never touches the caller's global matplotlib backend or state.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from patchbalance.atomic import atomic_writer, check_writable
from patchbalance.errors import MissingDependencyError
from patchbalance.reporting.map import WIDE_WEIGHT_RANGE, footprint_map
from patchbalance.sampling.figures import (
    ClusterFigures,
    SamplingFigures,
    active_and_drawn_weights,
    cluster_figures,
)
from patchbalance.table import SAMPLER_WEIGHT

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# More clusters than this are unreadable as bars; the page shows the largest and says so.
MAX_CLUSTERS_SHOWN = 30
UNIFORM_COLOUR = "#9aa5b1"
WEIGHTED_COLOUR = "#d1495b"

PAGE_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.note { color: #555; font-size: 0.92em; }
p.warning { color: #8a1c1c; font-weight: 600; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.95em; }
th, td { padding: 0.3em 0.9em; border-bottom: 1px solid #e4e4e4; text-align: right; }
th:first-child, td:first-child, th.text, td.text { text-align: left; }
thead th { background: #f4f4f4; }
img { max-width: 100%; height: auto; display: block; margin: 0.6em 0; }
.up { color: #1a7f37; } .down { color: #b42318; }
"""


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("matplotlib (for the HTML report)", "report") from exc


def _png_data_uri(figure: Figure) -> str:
    """Return `figure` rendered as a PNG `data:` URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_tag(figure: Figure, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{_png_data_uri(figure)}">'


def _html_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], text_columns: Sequence[int] = ()
) -> str:
    """Return an HTML table; cells are trusted HTML, `text_columns` are left-aligned."""
    css = [' class="text"' if j in text_columns else "" for j in range(len(header))]
    head = "".join(f"<th{css[j]}>{html.escape(str(cell))}</th>" for j, cell in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{css[j]}>{cell}</td>" for j, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _class_labels(class_values: Sequence[int], class_names: dict[int, str] | None) -> list[str]:
    names = class_names or {}
    return [names.get(value, f"class {value}") for value in class_values]


def _class_colours(n_classes: int) -> list[Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if n_classes <= 10 else "tab20"]
    return [palette(j % palette.N) for j in range(n_classes)]


# ------------------------------------------------------------------------------------------
# Sections


def _summary_section(figures: SamplingFigures) -> str:
    uniform_repeats = figures.draws / max(figures.n_active, 1)
    ess_share = figures.ess / max(figures.n_active, 1)
    rows = [
        ["patches in the table", f"{figures.n_rows:,}", ""],
        ["active (not excluded)", f"{figures.n_active:,}", ""],
        ["draws per epoch", f"{figures.draws:,}", f"{figures.draws:,}"],
        [
            "effective sample size (ESS)",
            f"{figures.ess:,.1f} ({ess_share:.1%} of active)",
            f"{figures.n_active:,} (100%)",
        ],
        [
            "expected distinct patches per epoch",
            f"{figures.expected_distinct:,.1f}",
            f"{figures.expected_distinct_uniform:,.1f}",
        ],
        [
            "largest expected repeats of one patch per epoch",
            f"{figures.max_expected_repeats:.2f}"
            + (
                f" ({figures.max_repeats_patches:,} patches tie)"
                if figures.max_repeats_patches > 1
                else ""
            ),
            f"{uniform_repeats:.2f}",
        ],
    ]
    return (
        "<h2>Sampling at a glance</h2>"
        + _html_table(["figure", "with the weights", "uniform sampling"], rows)
        + '<p class="note">One epoch draws as many patches as the table has rows, with '
        "replacement, each with probability proportional to its <code>sampler_weight</code>. "
        "ESS = (&Sigma;w)&sup2; / &Sigma;w&sup2;: the number of equally weighted patches that "
        "would carry the same information. Expected distinct patches = "
        "&Sigma;<sub>i</sub> 1 &minus; (1 &minus; &pi;<sub>i</sub>)<sup>N</sup>.</p>"
    )


def _class_share_section(figures: SamplingFigures, labels: list[str]) -> str:
    from matplotlib.figure import Figure

    rows = []
    prior = figures.log_prior_ratio
    for j, label in enumerate(labels):
        uniform, weighted = figures.uniform_share[j], figures.weighted_share[j]
        ratio = weighted / uniform if uniform > 0 else float("nan")
        css = "up" if ratio > 1.0005 else "down" if ratio < 0.9995 else ""
        rows.append(
            [
                html.escape(label),
                f"{uniform:.2%}",
                f"{weighted:.2%}",
                f'<span class="{css}">{ratio:.2f}&times;</span>',
                f"{prior[j]:+.3f}",
            ]
        )
    concentrated = figures.concentration_warning()
    warnings = "".join(
        f'<p class="warning">{html.escape(line)}</p>'
        for line in [*figures.starvation_warnings("This weighting"), concentrated]
        if line
    )
    n_classes = len(labels)
    figure = Figure(figsize=(max(6.0, 0.9 * n_classes + 2.5), 3.8))
    axes = figure.add_subplot()
    positions = np.arange(n_classes)
    width = 0.38
    axes.bar(
        positions - width / 2,
        figures.uniform_share * 100,
        width,
        label="uniform",
        color=UNIFORM_COLOUR,
    )
    axes.bar(
        positions + width / 2,
        figures.weighted_share * 100,
        width,
        label="weighted",
        color=WEIGHTED_COLOUR,
    )
    for x, value in zip(positions + width / 2, figures.weighted_share, strict=True):
        axes.annotate(
            f"{value:.1%}",
            (x, value * 100),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    # Slant the class names once they would run into each other.
    crowded = n_classes > 6 or max(len(label) for label in labels) > 11
    axes.set_xticks(
        positions, labels, rotation=25 if crowded else 0, ha="right" if crowded else "center"
    )
    axes.set_ylabel("share of labelled pixels per epoch (%)")
    axes.set_title("Class pixel share per epoch: uniform vs weighted sampling")
    axes.legend(frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    return (
        "<h2>Class pixel share per epoch</h2>"
        + _image_tag(figure, "class pixel share per epoch, uniform vs weighted")
        + _html_table(["class", "uniform", "weighted", "ratio", "log prior ratio"], rows)
        + warnings
        + '<p class="note">log prior ratio = ln(uniform share / weighted share): add it to a '
        "trained model's class logits to undo the class prior these weights put into it "
        "(<code>prior_correction</code> in <code>patchbalance train</code>).</p>"
    )


def _weight_section(weights: np.ndarray, active: np.ndarray) -> str:
    from matplotlib.figure import Figure

    active_weights = weights[active]
    figure = Figure(figsize=(11, 3.8))
    histogram, lorenz = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
    low, high = float(active_weights.min()), float(active_weights.max())
    # Weights spanning orders of magnitude read better on log-spaced bins.
    if low > 0 and high / low > WIDE_WEIGHT_RANGE:
        bins = np.geomspace(low, high, 41)
        histogram.set_xscale("log")
    else:
        bins = 40
    histogram.hist(active_weights, bins=bins, color=WEIGHTED_COLOUR, alpha=0.85)
    histogram.axvline(1.0, color="#333", linestyle="--", linewidth=1)
    histogram.annotate(
        " uniform = 1", (1.0, 0.95), xycoords=("data", "axes fraction"), fontsize=8, va="top"
    )
    histogram.set_xlabel("sampler_weight (expected draws per epoch relative to uniform)")
    histogram.set_ylabel("active patches")
    histogram.set_title("Weight distribution")
    histogram.spines[["top", "right"]].set_visible(False)

    # The share of all draws taken by the most-weighted fraction of patches.
    ordered = np.sort(active_weights)[::-1]
    cumulative = np.concatenate([[0.0], np.cumsum(ordered) / ordered.sum()])
    patch_fraction = np.linspace(0.0, 1.0, len(cumulative))
    lorenz.plot(patch_fraction * 100, cumulative * 100, color=WEIGHTED_COLOUR, label="weighted")
    lorenz.plot([0, 100], [0, 100], color=UNIFORM_COLOUR, linestyle="--", label="uniform")
    lorenz.set_xlabel("most-weighted active patches (%)")
    lorenz.set_ylabel("share of draws (%)")
    lorenz.set_title("Concentration of draws")
    lorenz.legend(frameon=False, loc="lower right")
    lorenz.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()

    quantiles = np.quantile(active_weights, [0.0, 0.25, 0.5, 0.75, 1.0])
    rows = [
        [name, f"{value:.4g}"]
        for name, value in zip(["min", "25 %", "median", "75 %", "max"], quantiles, strict=True)
    ]
    top_decile = int(np.ceil(0.1 * len(ordered)))
    rows.append(
        ["share of draws, top 10 % of patches", f"{ordered[:top_decile].sum() / ordered.sum():.1%}"]
    )
    excluded = int((~active).sum())
    note = (
        f'<p class="note">{excluded:,} excluded patch(es) have weight 0 and are left out of '
        "these plots.</p>"
        if excluded
        else ""
    )
    return (
        "<h2>Weights</h2>"
        + _image_tag(figure, "histogram of sampler weights and concentration of draws")
        + _html_table(["active patches", SAMPLER_WEIGHT], rows)
        + note
    )


def _cluster_figure(clusters: ClusterFigures, shown: np.ndarray, labels: list[str]) -> Figure:
    """Return the two panels: cluster size vs share of draws, and mean composition."""
    from matplotlib.figure import Figure

    n_shown = len(shown)
    figure = Figure(figsize=(11, max(3.2, 0.34 * n_shown + 1.9)), layout="constrained")
    share_axes, composition_axes = figure.subplots(1, 2, sharey=True)
    positions = np.arange(n_shown)
    height = 0.4
    share_axes.barh(
        positions - height / 2,
        clusters.size_share[shown] * 100,
        height,
        color=UNIFORM_COLOUR,
        label="share of patches (uniform draws)",
    )
    share_axes.barh(
        positions + height / 2,
        clusters.draw_share[shown] * 100,
        height,
        color=WEIGHTED_COLOUR,
        label="share of weighted draws",
    )
    share_axes.set_yticks(
        positions, [f"cluster {clusters.ids[c]} (n={clusters.sizes[c]:,})" for c in shown]
    )
    share_axes.invert_yaxis()
    share_axes.set_xlabel("share (%)")
    share_axes.set_title("Cluster size vs share of draws")
    # Below the panels, where no bar can hide it.
    figure.legend(
        handles=share_axes.get_legend_handles_labels()[0],
        frameon=False,
        fontsize=8,
        ncol=2,
        loc="outside lower left",
    )
    share_axes.spines[["top", "right"]].set_visible(False)

    colours = _class_colours(len(labels))
    left = np.zeros(n_shown)
    for j, label in enumerate(labels):
        values = clusters.mean_composition[shown, j] * 100
        composition_axes.barh(positions, values, 0.7, left=left, color=colours[j], label=label)
        left += values
    composition_axes.set_xlim(0, 100)
    composition_axes.set_xlabel("mean class proportion of the cluster's patches (%)")
    composition_axes.set_title("Mean composition")
    composition_axes.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    composition_axes.spines[["top", "right"]].set_visible(False)
    return figure


def _cluster_rows(clusters: ClusterFigures, shown: np.ndarray, labels: list[str]) -> list[list]:
    """Return one table row per shown cluster: id, size, shares, mean weight, composition."""
    rows = []
    composition = clusters.mean_composition
    for c in shown:
        parts = ", ".join(
            f"{html.escape(labels[j])} {composition[c, j]:.0%}"
            for j in np.argsort(-composition[c])
            if composition[c, j] >= 0.005
        )
        rows.append(
            [
                str(clusters.ids[c]),
                f"{clusters.sizes[c]:,}",
                f"{clusters.size_share[c]:.1%}",
                f"{clusters.draw_share[c]:.1%}",
                f"{clusters.mean_weight[c]:.3g}",
                parts,
            ]
        )
    return rows


def _cluster_section(clusters: ClusterFigures | None, labels: list[str]) -> str:
    if clusters is None:
        return (
            "<h2>Composition clusters</h2><p class='note'>The table has no "
            "<code>freq_cluster_id</code> column.</p>"
        )
    if not len(clusters.ids):
        return "<h2>Composition clusters</h2><p class='note'>No active patch has a cluster.</p>"
    order = np.argsort(-clusters.sizes, kind="stable")
    hidden = max(0, len(order) - MAX_CLUSTERS_SHOWN)
    shown = order[:MAX_CLUSTERS_SHOWN]
    figure = _cluster_figure(clusters, shown, labels)
    note = f'<p class="note">{hidden} smaller cluster(s) are not shown.</p>' if hidden else ""
    header = [
        "cluster",
        "patches",
        "share of patches",
        "share of draws",
        "mean weight",
        "mean composition",
    ]
    return (
        f"<h2>Composition clusters ({len(clusters.ids)})</h2>"
        + _image_tag(figure, "cluster sizes, share of draws and mean composition")
        + _html_table(header, _cluster_rows(clusters, shown, labels), text_columns=[5])
        + note
    )


def _map_section(table: pd.DataFrame, weights: np.ndarray, active: np.ndarray) -> str:
    drawn = footprint_map(table, weights, active)
    if drawn is None:
        return (
            "<h2>Patch footprints</h2><p class='note'>No map: the table has no tile bounds "
            "with a CRS (the rasters are not georeferenced).</p>"
        )
    figure, hidden = drawn
    note = "Excluded patches are grey and hatched."
    if hidden:
        note += f" {hidden} more CRS(s) are not drawn."
    return (
        "<h2>Patch footprints</h2>"
        + _image_tag(figure, "map of patch footprints coloured by sampler weight")
        + f'<p class="note">Footprints in the raster CRS, coloured by weight. {note}</p>'
    )


# ------------------------------------------------------------------------------------------
# The page


def render_html_report(
    table: pd.DataFrame,
    figures: SamplingFigures,
    title: str = "balanced table",
    class_names: dict[int, str] | None = None,
) -> str:
    """Return the report page for `table` and its SPEC §5 `figures` as one HTML string."""
    _require_matplotlib()
    from patchbalance.version import __version__

    active, weights = active_and_drawn_weights(table)
    labels = _class_labels(figures.class_values, class_names)
    sections = [
        _summary_section(figures),
        _class_share_section(figures, labels),
        _weight_section(weights, active),
        _cluster_section(cluster_figures(table, weights, active), labels),
        _map_section(table, weights, active),
    ]
    safe_title = html.escape(title)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>patchbalance report: {safe_title}</title>"
        f"<style>{PAGE_STYLE}</style></head><body>"
        f"<h1>What the weights will do: {safe_title}</h1>"
        f'<p class="note">patchbalance {html.escape(__version__)}. Computed from the table '
        "alone, before any training.</p>" + "".join(sections) + "</body></html>\n"
    )


def write_html_report(
    table: pd.DataFrame,
    figures: SamplingFigures,
    out: Path,
    title: str = "balanced table",
    class_names: dict[int, str] | None = None,
) -> None:
    """Write the self-contained HTML report of `table` to `out` atomically; return nothing."""
    out = Path(out)
    check_writable(out, "the HTML report")
    page = render_html_report(table, figures, title=title, class_names=class_names)
    with atomic_writer(out, "w") as stream:
        stream.write(page)
