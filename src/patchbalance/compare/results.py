"""The results of a comparison as JSON, Markdown tables and the verdict's few lines."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from patchbalance.atomic import atomic_writer, output_set
from patchbalance.compare.statistics import GROUPS, INTEREST, MIOU, RESOLVE_CAP, REST

# The rows after the classes in every table: mIoU, then what the classes of interest gained
# (their mean IoU) and what the other classes paid.
SUMMARY_ROWS = (MIOU, *GROUPS)
INTERVAL = "95 % Student-t interval over the seeds' differences"


def percent(value: float | None, signed: bool = False) -> str:
    """Return a share as percentage points with one decimal ("–" when not a number)."""
    if value is None or not np.isfinite(value):
        return "–"
    value = round(value * 100, 1) + 0.0
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def gain_cell(gain: dict[str, Any]) -> str:
    """Return 'mean [low, high] (wins/n)' in IoU points; one seed has no interval."""
    if not gain["n"]:
        return "–"
    if gain["n"] < 2:
        interval = "no interval from 1 seed"
    else:
        interval = f"{percent(gain['low'], True)}, {percent(gain['high'], True)}"
    return f"{percent(gain['mean'], True)} [{interval}] ({gain['wins']}/{gain['n']})"


def class_label(results: dict[str, Any], c: int | str) -> str:
    """Return the name of class `c`, or of a summary row ("mIoU", "interest", "rest")."""
    if str(c) == MIOU:
        return "mIoU"
    if str(c) in GROUPS:
        return str(c)
    return results["class_names"].get(str(c), f"class {c}")


def markdown_text(text: str) -> str:
    """Return `text` safe inside a Markdown table cell: HTML escaped, `|` and `$` (a table
    separator, and math on GitHub) escaped with a backslash."""
    return re.sub(r"([|$])", r"\\\1", html.escape(str(text), quote=False))


def _label(results: dict[str, Any], c: int | str) -> str:
    return markdown_text(class_label(results, c))


def _sampling_table(results: dict[str, Any], classes: list[str]) -> list[str]:
    lines = [
        "#### What the weights do before training (class pixel share per epoch, %)",
        "",
        "| arm | "
        + " | ".join(_label(results, c) for c in classes)
        + " | ESS share | max repeats | rows drawn | starved |",
        "|---|" + "---:|" * (len(classes) + 4),
    ]
    for arm, row in results["sampling"].items():
        shares = row["class_pixel_share"]
        starved = ", ".join(_label(results, c) for c in row["starved_classes"]) or "–"
        lines.append(
            f"| {markdown_text(arm)} | "
            + " | ".join(f"{shares[c]['weighted'] * 100:.2f}" for c in classes)
            + f" | {row['effective_sample_size_share']:.1%}"
            + f" | {row['max_expected_repeats_per_epoch']:.1f} | {row['n_drawable']} | {starved} |"
        )
    return lines


def _groups_note(results: dict[str, Any]) -> list[str]:
    groups = results.get("groups", {})
    named = {g: ", ".join(_label(results, c) for c in groups.get(g, [])) or "none" for g in GROUPS}
    return [
        "",
        f"`{INTEREST}` is the mean IoU of the classes of interest ({named[INTEREST]}), `{REST}` "
        f"that of the other classes ({named[REST]}), each averaged per seed before the seeds "
        "are paired.",
    ]


def _iou_tables(results: dict[str, Any], classes: list[str]) -> list[str]:
    summary, arms, baseline = results["summary"], results["arms"], results["baseline"]
    interest = [str(c) for c in results["classes_of_interest"]]
    lines: list[str] = []
    for key, title in (
        ("long_tau0", "long budget"),
        ("short_tau0", "short budget"),
        ("long_tau1", "long budget, prior correction τ = 1"),
    ):
        block = summary[key]
        rows = [*classes, *SUMMARY_ROWS]
        lines += [
            "",
            f"#### Validation IoU (%), mean over seeds: {title} (step {block['step']})",
            "",
            "| arm | " + " | ".join(_label(results, c) for c in rows) + " |",
            "|---|" + "---:|" * len(rows),
        ]
        for arm in arms:
            entry = block["arms"][arm]
            lines.append(
                f"| {markdown_text(arm)} | "
                + " | ".join(percent(entry[c]["iou"]) for c in rows)
                + " |"
            )
        gains = [*interest, *SUMMARY_ROWS]
        lines += [
            "",
            f"Gain over {markdown_text(baseline)} (IoU points), {title}: mean [{INTERVAL}] "
            "(seeds better / seeds)",
            "",
            "| arm | " + " | ".join(_label(results, c) for c in gains) + " |",
            "|---|" + "---:|" * len(gains),
        ]
        for arm in arms:
            if arm != baseline:
                entry = block["arms"][arm]
                cells = [gain_cell(entry[c]["gain_iou"]) for c in gains]
                lines.append(f"| {markdown_text(arm)} | " + " | ".join(cells) + " |")
    return lines + _groups_note(results)


def _every_class_gains(results: dict[str, Any], classes: list[str]) -> list[str]:
    summary, baseline = results["summary"], results["baseline"]
    others = [arm for arm in results["arms"] if arm != baseline]
    lines: list[str] = []
    for key, title in (("long_tau0", "long budget"), ("long_tau1", "long budget, τ = 1")):
        block = summary[key]
        lines += [
            "",
            f"#### Gain over {markdown_text(baseline)} for every class (IoU points), {title} "
            f"(step {block['step']}): mean [{INTERVAL}] (seeds better / seeds)",
            "",
            "| class | " + " | ".join(markdown_text(arm) for arm in others) + " |",
            "|---|" + "---:|" * len(others),
        ]
        for c in [*classes, *SUMMARY_ROWS]:
            cells = [gain_cell(block["arms"][arm][c]["gain_iou"]) for arm in others]
            lines.append(f"| {_label(results, c)} | " + " | ".join(cells) + " |")
    return lines


def _precision_recall(results: dict[str, Any]) -> list[str]:
    block, corrected = results["summary"]["long_tau0"], results["summary"]["long_tau1"]["arms"]
    interest = [str(c) for c in results["classes_of_interest"]]
    lines = [
        "",
        f"#### Precision / recall (%) of the classes of interest, long budget (step "
        f"{block['step']}), τ = 0 → τ = 1",
        "",
        "| arm | "
        + " | ".join(f"{_label(results, c)} P | {_label(results, c)} R" for c in interest)
        + " |",
        "|---|" + "---:|" * (2 * len(interest)),
    ]
    for arm in results["arms"]:
        cells = []
        for c in interest:
            plain, adjusted = block["arms"][arm][c], corrected[arm][c]
            cells += [
                f"{percent(plain['precision'])} → {percent(adjusted['precision'])}",
                f"{percent(plain['recall'])} → {percent(adjusted['recall'])}",
            ]
        lines.append(f"| {markdown_text(arm)} | " + " | ".join(cells) + " |")
    return lines


def _curves(results: dict[str, Any]) -> list[str]:
    lines = ["", "#### Learning curves: mIoU (%) by step, mean ± std over seeds (τ = 0)", ""]
    for arm, points in results["learning_curves"].items():
        lines.append(
            f"- {markdown_text(arm)}: "
            + ", ".join(f"{p['step']}: {percent(p['mean'])} ± {percent(p['std'])}" for p in points)
            + f". {results['plateau'][arm]['note']}"
        )
    return lines


def _code_block(text: str) -> list[str]:
    """Return `text` as a fenced Markdown block that no run of backticks in it can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, text, fence]


def markdown(results: dict[str, Any]) -> str:
    """Return every table of the results in Markdown, then the learning curves and verdict."""
    classes = [str(c) for c in results["classes"]]
    lines = [
        f"### Comparison: {len(results['arms'])} arms, {len(results['seeds'])} paired seeds, "
        f"{results['budgets']['long']} steps (baseline {markdown_text(results['baseline'])})",
        "",
    ]
    lines += _sampling_table(results, classes)
    lines += _iou_tables(results, classes)
    lines += _every_class_gains(results, classes)
    lines += _precision_recall(results)
    lines += _curves(results)
    lines += ["", "#### Verdict", "", *_code_block(verdict_text(results))]
    return "\n".join(lines) + "\n"


def too_few_seeds(judged: dict[str, Any]) -> str:
    """Return the verdict's line when there are too few paired seeds to judge."""
    return f"too few seeds to judge ({judged['n_seeds']}; at least {judged['min_seeds']})"


def resolve_note(results: dict[str, Any], unresolved: dict[str, int | None]) -> str:
    """Return how many seeds would resolve each interval that spans 0 ("" when none does)."""
    parts = []
    for row, n in unresolved.items():
        label = class_label(results, row)
        if n is None:
            parts.append(f"{label} cannot be resolved (mean gain 0)")
        elif n > RESOLVE_CAP:
            parts.append(f"{label} more than {RESOLVE_CAP}")
        else:
            parts.append(f"{label} about {n}")
    if not parts:
        return ""
    return "seeds that would resolve the intervals spanning 0, at the observed spread: " + (
        ", ".join(parts)
    )


def verdict_text(results: dict[str, Any]) -> str:
    """Return the verdict: which arms raise the classes of interest without lowering mIoU."""
    summary, judged = results["summary"]["long_tau0"], results["verdict"]
    interest = [str(c) for c in results["classes_of_interest"]]
    names = ", ".join(class_label(results, c) for c in interest)
    lines = [
        f"verdict at step {summary['step']} (τ = 0), classes of interest {names}, against "
        f"{results['baseline']}; an arm helps when each class's 95 % interval is above 0 and "
        f"mIoU's is not wholly below 0, over at least {judged['min_seeds']} paired seeds:"
    ]
    for arm, verdict in judged["arms"].items():
        entry = summary["arms"][arm]
        cells = ", ".join(
            f"{class_label(results, c)} {gain_cell(entry[c]['gain_iou'])}"
            for c in [*interest, *GROUPS, MIOU]
        )
        if verdict["helps"] is None:
            why = "not judged"
        elif verdict["helps"]:
            why = "helps"
        elif verdict["lowers_miou"]:
            why = "does not help (lowers mIoU)"
        else:
            why = "does not help (not every class of interest has an interval above 0)"
        note = resolve_note(results, verdict["unresolved"])
        lines.append(f"  {arm}: {why}: {cells}" + (f"; {note}" if note else ""))
    if not judged["judged"]:
        lines.append(too_few_seeds(judged))
    else:
        helps = judged["helps"]
        lines.append("arms that help: " + (", ".join(helps) if helps else "none"))
    return "\n".join(lines)


def write_results(
    results: dict[str, Any], out_dir: Path, page: str | None = None
) -> dict[str, Path]:
    """Write results.json, results.md and (given its text) results.html as one set.

    Everything is rendered before anything is written, and the files are moved into place
    together (`atomic.output_set`): a failure leaves the previous set as it was. Returns the
    paths written.
    """
    texts = {
        "json": ("results.json", json.dumps(results, indent=2, default=float)),
        "markdown": ("results.md", markdown(results)),
    }
    if page is not None:
        texts["html"] = ("results.html", page)
    paths = {kind: out_dir / name for kind, (name, _) in texts.items()}
    with output_set():
        for kind, (_, text) in texts.items():
            with atomic_writer(paths[kind], "w") as stream:
                stream.write(text)
    return paths
