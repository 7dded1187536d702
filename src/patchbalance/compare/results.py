"""The results of a comparison as JSON, Markdown tables and the verdict's few lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from patchbalance.atomic import atomic_writer


def percent(value: float | None, signed: bool = False) -> str:
    """Return a share as percentage points with one decimal ("–" when not a number)."""
    if value is None or not np.isfinite(value):
        return "–"
    value = round(value * 100, 1) + 0.0
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def gain_cell(gain: dict[str, Any]) -> str:
    """Return 'mean [low, high] (wins/n)' in IoU points."""
    if not gain["n"]:
        return "–"
    return (
        f"{percent(gain['mean'], True)} [{percent(gain['low'], True)}, {percent(gain['high'], True)}]"
        f" ({gain['wins']}/{gain['n']})"
    )


def class_label(results: dict[str, Any], c: int | str) -> str:
    """Return the name of class `c` (or "mIoU")."""
    if str(c) == "miou":
        return "mIoU"
    return results["class_names"].get(str(c), f"class {c}")


def _sampling_table(results: dict[str, Any], classes: list[str]) -> list[str]:
    lines = [
        "#### What the weights do before training (class pixel share per epoch, %)",
        "",
        "| arm | "
        + " | ".join(class_label(results, c) for c in classes)
        + " | ESS share | max repeats | rows drawn | starved |",
        "|---|" + "---:|" * (len(classes) + 4),
    ]
    for arm, row in results["sampling"].items():
        shares = row["class_pixel_share"]
        starved = ", ".join(class_label(results, c) for c in row["starved_classes"]) or "–"
        lines.append(
            f"| {arm} | "
            + " | ".join(f"{shares[c]['weighted'] * 100:.2f}" for c in classes)
            + f" | {row['effective_sample_size_share']:.1%}"
            + f" | {row['max_expected_repeats_per_epoch']:.1f} | {row['n_drawable']} | {starved} |"
        )
    return lines


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
        lines += [
            "",
            f"#### Validation IoU (%), mean over seeds: {title} (step {block['step']})",
            "",
            "| arm | " + " | ".join(class_label(results, c) for c in classes) + " | mIoU |",
            "|---|" + "---:|" * (len(classes) + 1),
        ]
        for arm in arms:
            entry = block["arms"][arm]
            lines.append(
                f"| {arm} | "
                + " | ".join(percent(entry[c]["iou"]) for c in [*classes, "miou"])
                + " |"
            )
        lines += [
            "",
            f"Gain over {baseline} (IoU points), {title}: mean [95 % bootstrap interval] "
            "(seeds better / seeds)",
            "",
            "| arm | " + " | ".join(class_label(results, c) for c in interest) + " | mIoU |",
            "|---|" + "---:|" * (len(interest) + 1),
        ]
        for arm in arms:
            if arm != baseline:
                entry = block["arms"][arm]
                cells = [gain_cell(entry[c]["gain_iou"]) for c in [*interest, "miou"]]
                lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _every_class_gains(results: dict[str, Any], classes: list[str]) -> list[str]:
    summary, baseline = results["summary"], results["baseline"]
    others = [arm for arm in results["arms"] if arm != baseline]
    lines: list[str] = []
    for key, title in (("long_tau0", "long budget"), ("long_tau1", "long budget, τ = 1")):
        block = summary[key]
        lines += [
            "",
            f"#### Gain over {baseline} for every class (IoU points), {title} "
            f"(step {block['step']}): mean [95 % bootstrap interval] (seeds better / seeds)",
            "",
            "| class | " + " | ".join(others) + " |",
            "|---|" + "---:|" * len(others),
        ]
        for c in [*classes, "miou"]:
            cells = [gain_cell(block["arms"][arm][c]["gain_iou"]) for arm in others]
            lines.append(f"| {class_label(results, c)} | " + " | ".join(cells) + " |")
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
        + " | ".join(f"{class_label(results, c)} P | {class_label(results, c)} R" for c in interest)
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
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _curves(results: dict[str, Any]) -> list[str]:
    lines = ["", "#### Learning curves: mIoU (%) by step, mean ± std over seeds (τ = 0)", ""]
    for arm, points in results["learning_curves"].items():
        lines.append(
            f"- {arm}: "
            + ", ".join(f"{p['step']}: {percent(p['mean'])} ± {percent(p['std'])}" for p in points)
            + f". {results['plateau'][arm]['note']}"
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    """Return every table of the results in Markdown, then the learning curves and verdict."""
    classes = [str(c) for c in results["classes"]]
    lines = [
        f"### Comparison: {len(results['arms'])} arms, {len(results['seeds'])} paired seeds, "
        f"{results['budgets']['long']} steps (baseline {results['baseline']})",
        "",
    ]
    lines += _sampling_table(results, classes)
    lines += _iou_tables(results, classes)
    lines += _every_class_gains(results, classes)
    lines += _precision_recall(results)
    lines += _curves(results)
    lines += ["", "#### Verdict", "", verdict_text(results)]
    return "\n".join(lines) + "\n"


def verdict_text(results: dict[str, Any]) -> str:
    """Return the verdict: which arms raise the classes of interest without lowering mIoU."""
    summary = results["summary"]["long_tau0"]
    interest = [str(c) for c in results["classes_of_interest"]]
    names = ", ".join(class_label(results, c) for c in interest)
    lines = [
        f"verdict at step {summary['step']} (τ = 0), classes of interest {names}, against "
        f"{results['baseline']}; an arm helps when each class's 95 % interval is above 0 and "
        "mIoU's is not wholly below 0:"
    ]
    for arm, judged in results["verdict"]["arms"].items():
        entry = summary["arms"][arm]
        cells = ", ".join(
            f"{class_label(results, c)} {gain_cell(entry[c]['gain_iou'])}"
            for c in [*interest, "miou"]
        )
        if judged["helps"]:
            why = "helps"
        elif judged["lowers_miou"]:
            why = "does not help (lowers mIoU)"
        else:
            why = "does not help (not every class of interest has an interval above 0)"
        lines.append(f"  {arm}: {why}: {cells}")
    helps = results["verdict"]["helps"]
    lines.append("arms that help: " + (", ".join(helps) if helps else "none"))
    return "\n".join(lines)


def write_results(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write results.json and results.md into `out_dir` atomically; return their paths."""
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    with atomic_writer(paths["json"], "w") as stream:
        json.dump(results, stream, indent=2, default=float)
    with atomic_writer(paths["markdown"], "w") as stream:
        stream.write(markdown(results))
    return paths
