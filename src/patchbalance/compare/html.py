"""The HTML page of `patchbalance compare`: the verdict, gains with intervals, curves, sampling.

One self-contained file like the report's (inline CSS, matplotlib figures embedded as base64
PNG, drawn through `matplotlib.figure.Figure` so the caller's pyplot state is never touched).
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from patchbalance.compare.results import (
    INTERVAL,
    SUMMARY_ROWS,
    class_label,
    gain_cell,
    percent,
    verdict_text,
)
from patchbalance.reporting.html import (
    PAGE_STYLE,
    _class_colours,
    _html_table,
    _png_data_uri,
    _require_matplotlib,
)


def _image(figure: Any, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{_png_data_uri(figure)}">'


def _arm_colours(arms: list[str]) -> dict[str, Any]:
    return dict(zip(arms, _class_colours(len(arms)), strict=True))


def _gains_section(results: dict[str, Any]) -> str:
    from matplotlib.figure import Figure

    block = results["summary"]["long_tau0"]
    baseline = results["baseline"]
    others = [arm for arm in results["arms"] if arm != baseline]
    columns = [*[str(c) for c in results["classes"]], *SUMMARY_ROWS]
    labels = [class_label(results, c) for c in columns]
    colours = _arm_colours(results["arms"])
    figure = Figure(figsize=(max(6.5, 1.1 * len(columns) + 3), 4.0))
    axes = figure.add_subplot()
    width = 0.8 / max(len(others), 1)
    for j, arm in enumerate(others):
        gains = [block["arms"][arm][c]["gain_iou"] for c in columns]
        x = np.arange(len(columns)) - 0.4 + width * (j + 0.5)
        mean = np.array([g["mean"] for g in gains]) * 100
        low = np.array([g["low"] for g in gains]) * 100
        high = np.array([g["high"] for g in gains]) * 100
        axes.errorbar(
            x, mean, yerr=[mean - low, high - mean], fmt="o", capsize=4,
            color=colours[arm], label=arm,
        )  # fmt: skip
    axes.axhline(0, color="#444", linewidth=0.8)
    axes.set_xticks(np.arange(len(columns)), labels, rotation=20, ha="right")
    axes.set_ylabel(f"IoU gain over {baseline} (points)")
    axes.set_title(f"Gain per class at step {block['step']}: mean and 95 % Student-t interval")
    axes.legend(frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    rows = [
        [html.escape(arm)] + [gain_cell(block["arms"][arm][c]["gain_iou"]) for c in columns]
        for arm in others
    ]
    return (
        "<h2>Gain over the baseline, per class</h2>"
        + _image(figure, "per-class gains with 95 % intervals")
        + _html_table(["arm", *labels], rows, text_columns=[0])
        + f'<p class="note">IoU points, mean over paired seeds [{INTERVAL}] (seeds better / '
        "seeds), validation without prior correction; interest and rest are the mean IoU of "
        "the classes of interest and of the other classes, averaged per seed before pairing."
        "</p>"
    )


def _curves_section(results: dict[str, Any]) -> str:
    from matplotlib.figure import Figure

    colours = _arm_colours(results["arms"])
    figure = Figure(figsize=(7.5, 4.0))
    axes = figure.add_subplot()
    for arm, points in results["learning_curves"].items():
        steps = np.array([p["step"] for p in points])
        mean = np.array([p["mean"] for p in points]) * 100
        std = np.nan_to_num(np.array([p["std"] for p in points], dtype=float)) * 100
        axes.plot(steps, mean, marker="o", color=colours[arm], label=arm)
        axes.fill_between(steps, mean - std, mean + std, color=colours[arm], alpha=0.15)
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("validation mIoU (%)")
    axes.set_title("Learning curves: mean ± std over seeds")
    axes.legend(frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    notes = "".join(
        f"<li>{html.escape(arm)}: {html.escape(check['note'])}</li>"
        for arm, check in results["plateau"].items()
    )
    return (
        "<h2>Learning curves</h2>" + _image(figure, "learning curves per arm") + f"<ul>{notes}</ul>"
    )


def _sampling_section(results: dict[str, Any]) -> str:
    from matplotlib.figure import Figure

    arms, classes = results["arms"], [str(c) for c in results["classes"]]
    labels = [class_label(results, c) for c in classes]
    colours = _arm_colours(arms)
    figure = Figure(figsize=(max(6.5, 1.2 * len(classes) + 3), 3.8))
    axes = figure.add_subplot()
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        shares = results["sampling"][arm]["class_pixel_share"]
        x = np.arange(len(classes)) - 0.4 + width * (j + 0.5)
        values = [shares[c]["weighted"] * 100 for c in classes]
        axes.bar(x, values, width, color=colours[arm], label=arm)
    axes.set_xticks(np.arange(len(classes)), labels, rotation=20, ha="right")
    axes.set_ylabel("share of labelled pixels per epoch (%)")
    axes.set_title("What each arm's weights draw, before training")
    axes.legend(frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    rows = []
    for arm in arms:
        row = results["sampling"][arm]
        rows.append(
            [
                html.escape(arm),
                f"{row['n_drawable']:,}",
                f"{row['effective_sample_size']:,.1f} ({row['effective_sample_size_share']:.1%})",
                f"{row['expected_distinct_per_epoch']:,.1f}",
                f"{row['max_expected_repeats_per_epoch']:.2f}",
            ]
        )
    header = ["arm", "rows drawn", "ESS", "distinct per epoch", "largest repeats"]
    return (
        "<h2>Sampling figures before training</h2>"
        + _image(figure, "class pixel share per epoch for each arm")
        + _html_table(header, rows, text_columns=[0])
    )


def _iou_section(results: dict[str, Any]) -> str:
    parts = []
    columns = [*[str(c) for c in results["classes"]], *SUMMARY_ROWS]
    labels = [class_label(results, c) for c in columns]
    for key, title in (("long_tau0", "long budget"), ("short_tau0", "short budget"),
                       ("long_tau1", "long budget, prior correction τ = 1")):  # fmt: skip
        block = results["summary"][key]
        rows = [
            [html.escape(arm)] + [percent(block["arms"][arm][c]["iou"]) for c in columns]
            for arm in results["arms"]
        ]
        parts.append(
            f"<h2>Validation IoU (%), {html.escape(title)} (step {block['step']})</h2>"
            + _html_table(["arm", *labels], rows, text_columns=[0])
        )
    return "".join(parts)


def render_compare_html(results: dict[str, Any]) -> str:
    """Return the comparison page as one self-contained HTML string.

    Class and arm names are drawn as plain text: a `$` in a name is not mathtext.
    """
    _require_matplotlib()
    from matplotlib import rc_context

    from patchbalance.version import __version__

    with rc_context({"text.parse_math": False}):
        sections = [
            f"<h2>Verdict</h2><pre>{html.escape(verdict_text(results))}</pre>",
            _gains_section(results),
            _curves_section(results),
            _sampling_section(results),
            _iou_section(results),
        ]
    title = (
        f"{len(results['arms'])} arms, {len(results['seeds'])} paired seeds, "
        f"{results['budgets']['long']} steps"
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>patchbalance compare: {html.escape(title)}</title>"
        f"<style>{PAGE_STYLE} pre {{ white-space: pre-wrap; }}</style></head><body>"
        f"<h1>Does it help? {html.escape(title)}</h1>"
        f'<p class="note">patchbalance {html.escape(__version__)}; baseline '
        f"{html.escape(results['baseline'])}.</p>" + "".join(sections) + "</body></html>\n"
    )
