"""gpu.md: the check's figures beside their baselines, as a short Markdown page."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _number(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _checks(result: dict[str, Any]) -> str:
    checks = result.get("device_checks", {})
    if not checks:
        return "–"
    return "; ".join(
        f"{name} {seen['seen']}" + ("" if seen["ok"] else f" (**expected {seen['expected']}**)")
        for name, seen in checks.items()
    )


def _embeddings_rows(name: str, r: dict[str, Any]) -> list[str]:
    return [
        f"| embeddings {r['model']} ({r['patches']:,} patches, batch {r['batch_size']}, "
        f"{r['precision']}) | {_number(r['end_to_end_patches_per_second'])} patches/s end to end "
        f"| {_number(r['forward_only_patches_per_second'])} patches/s forward-only "
        f"| {_number(r['ratio'], 2)} (bar ≥ {r['bar']}: {_number(r['meets_bar'])}) "
        f"| {_checks(r)} |"
    ]


def _knn_rows(r: dict[str, Any]) -> list[str]:
    return [
        f"| exact kNN {r['n']:,} × {r['dim']}, k = {r['k']} | {_number(r['exact_seconds'], 2)} s "
        f"| {_number(r['faiss_seconds'], 2)} s ({r['faiss']}) | faiss / exact "
        f"{_number(r['speedup'], 2)}×; neighbours identical: {_number(r['neighbours_identical'])} "
        f"({r['rows_differing']} rows differ, {r['rows_differing_beyond_ties']} beyond ties) "
        f"| {_checks(r)} |"
    ]


def _coreset_rows(r: dict[str, Any]) -> list[str]:
    rows = []
    for method in ("cb", "fd"):
        m = r[method]
        if method in r["device_checks"]:
            check = _checks({"device_checks": {method: r["device_checks"][method]}})
        else:
            check = "no CUDA path (scikit-learn k-means)"
        rows.append(
            f"| CoreSet {method}, {r['n']:,} patches, budget {m['budget']} ({m['picks']:,} picks) "
            f"| {_number(m['device_seconds'], 2)} s (device) | {_number(m['cpu_seconds'], 2)} s "
            f"(cpu) | cpu / device {_number(m['speedup'], 2)}×; same picks: {_number(m['same_picks'])} "
            f"| {check} |"
        )
    return rows


def _train_rows(r: dict[str, Any]) -> list[str]:
    return [
        f"| `patchbalance train` ({r['model']}, batch {r['batch_size']}, {r['patch']} px) "
        f"| {_number(r['bf16']['steps_per_second'], 2)} steps/s bf16 autocast "
        f"| {_number(r['fp32']['steps_per_second'], 2)} steps/s fp32 "
        f"| bf16 / fp32 {_number(r['speedup'], 2)}×; metrics written: {_number(r['metrics_written'])} "
        f"| {_checks(r)} |"
    ]


def report_text(report: dict[str, Any]) -> str:
    """Return the Markdown page for the check's `report` (the content of gpu.json)."""
    env = report["environment"]
    machine = env.get("device_name") or f"CPU only ({env.get('cpu')})"
    lines = [
        "# patchbalance GPU check",
        "",
        f"Device under test: **{report['device_under_test']}** on {machine}, {env['cores']} cores; "
        f"torch {env['torch']} (CUDA {env.get('cuda_runtime')}), Python {env['python']}, "
        f"patchbalance {env['patchbalance']} at commit {env.get('commit') or 'unknown'}"
        + ("; tiny sizes (--small)" if report.get("small") else "")
        + f". Took {_number(report.get('seconds'))} s.",
        "",
        "| figure | measured | baseline (same run) | ratio | where it ran (read from the product) |",
        "|---|---|---|---|---|",
    ]
    for name, result in report["steps"].items():
        if result.get("status") != "ok":
            lines.append(
                f"| {name} | **{result.get('status')}**: {result.get('error', '')} | | | |"
            )
        elif name.startswith("embeddings"):
            lines += _embeddings_rows(name, result)
        elif name == "knn":
            lines += _knn_rows(result)
        elif name == "coreset":
            lines += _coreset_rows(result)
        elif name == "train":
            lines += _train_rows(result)
    device = report["device_under_test"]
    if report["ok"]:
        lines += ["", f"Verdict: every step finished and every path ran on **{device}**."]
    else:
        lines += ["", "Verdict: **problems**:"] + [f"- {line}" for line in report["problems"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write `report_text(report)` to `path` (replacing it whole)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(report_text(report), encoding="utf-8")
    os.replace(temporary, path)
