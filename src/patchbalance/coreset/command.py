"""`patchbalance select-coreset CONFIG`: read the table, select, write the CoreSet and summary.

The output table and its summary JSON are each written atomically; `--dry-run` checks the
configuration and inputs and prints the plan instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from patchbalance.coreset.config import CoresetConfig, load_coreset_config
from patchbalance.coreset.pool import budget_count, check_key_columns, pool_mask
from patchbalance.coreset.selection import EMBEDDING_METHODS, run_selection
from patchbalance.errors import ConfigError, InputError
from patchbalance.paths import default_summary_path
from patchbalance.progress import StageClock
from patchbalance.table import EXCLUDED, read_table, write_table


def summary_text(summary: dict[str, Any], output: Path | None, summary_path: Path | None) -> str:
    """Return the summary as a few lines for the terminal."""
    budget = summary["budget"]
    shown = f"{budget:g} of the pool" if summary["budget_mode"] == "fraction" else f"{int(budget)}"
    lines = [
        f"CoreSet method {summary['method']}, budget {shown}: selected "
        f"{summary['n_selected']:,} of {summary['n_pool']:,} pool patches "
        f"({summary['selected_share_of_pool']:.1%}); {summary['n_rows']:,} rows in the table "
        f"({summary['left_out_of_pool'][EXCLUDED]:,} excluded, "
        f"{summary['left_out_of_pool']['low_entropy']:,} low-entropy left out)",
    ]
    if "fd" in summary:
        fd = summary["fd"]
        lines.append(f"fd clusters: k = {fd['k']} by the {fd['k_rule']} rule")
    if "cb_backend" in summary:
        lines.append(f"cb greedy ran on {summary['cb_backend']}")
    lines.append("class pixel share          pool    CoreSet   CoreSet weighted")
    for value, share in summary["class_pixel_share"].items():
        lines.append(
            f"  class {value:<16} {share['pool']:8.2%}  {share['coreset']:8.2%}  "
            f"{share['coreset_weighted']:10.2%}"
        )
    if "selected_per_cluster" in summary:
        parts = [
            f"{cluster}: {counts['selected']}/{counts['pool']}"
            for cluster, counts in summary["selected_per_cluster"].items()
        ]
        lines.append("selected per freq_cluster_id (selected/pool): " + ", ".join(parts))
    cap = summary["max_weight"]
    lines.append(
        f"sampler_weight: {summary['sampler_weights']} over the CoreSet (mean 1"
        f"{f', max {cap:g}' if cap is not None else ''}; 0 elsewhere), effective sample size "
        f"{summary['effective_sample_size']:,.1f}"
    )
    for note in summary.get("notes", []):
        lines.append(f"note: {note}")
    if output is not None:
        lines.append(f"wrote {output}")
    if summary_path is not None:
        lines.append(f"wrote {summary_path}")
    return "\n".join(lines)


def _summary_path(config: CoresetConfig, output: Path) -> Path:
    return Path(config.summary_path or default_summary_path(output))


def _plan_text(
    config: CoresetConfig,
    table: pd.DataFrame,
    input_path: Path,
    output_path: Path,
    summary_path: Path,
) -> str:
    """Return what `--dry-run` prints, after checking the table, the pool and the embeddings."""
    check_key_columns(table, str(input_path))
    pool, left_out = pool_mask(table, config.exclude_low_entropy, str(input_path))
    count = budget_count(config.budget, config.budget_mode, int(pool.sum()))
    if config.method in EMBEDDING_METHODS:
        if config.embedding_column and config.embedding_column in table.columns:
            source = f"column {config.embedding_column}"
        elif config.parquet_path:
            cache = Path(config.parquet_path)
            if not cache.is_file():
                raise InputError(f"{cache}: embeddings file (parquet_path) not found")
            source = str(cache)
        else:
            raise InputError(
                f"method {config.method} needs embeddings: set embedding_column or parquet_path"
            )
    else:
        source = "not needed"
    return "\n".join(
        [
            f"plan: CoreSet method {config.method} on {input_path}",
            f"  rows {len(table):,}; pool {int(pool.sum()):,} (excluded "
            f"{left_out[EXCLUDED]:,}, low-entropy left out {left_out['low_entropy']:,})",
            f"  budget {config.budget:g} ({config.budget_mode}) -> {count:,} patches",
            f"  embeddings: {source}",
            f"  sampler_weight: {config.sampler_weights} over the CoreSet",
            f"  would write {output_path} and {summary_path}",
        ]
    )


def run_select_coreset_command(
    config_path: Path, overrides: list[str], dry_run: bool = False, progress: bool = True
) -> str:
    """Run `patchbalance select-coreset CONFIG`; return the summary text to print.

    Reads `input_csv_path`, selects, and writes `output_csv_path` (CSV or Parquet by its
    extension) and the summary JSON next to it, each atomically. With `dry_run`, checks the
    configuration and inputs and returns the plan without selecting or writing.
    """
    from patchbalance.atomic import check_writable, output_set, write_json
    from patchbalance.version import __version__

    start = time.perf_counter()
    config = load_coreset_config(config_path, overrides)
    if not config.input_csv_path:
        raise ConfigError(f"{config_path}: input_csv_path is empty; point it at the balanced table")
    if not config.output_csv_path:
        raise ConfigError(
            f"{config_path}: output_csv_path is empty; say where to write the CoreSet"
        )
    input_path = Path(config.input_csv_path)
    output_path = Path(config.output_csv_path)
    summary_path = _summary_path(config, output_path)
    table = read_table(input_path)

    if dry_run:
        return _plan_text(config, table, input_path, output_path, summary_path)

    # Fail on an unwritable output before the selection, not after it.
    check_writable(output_path, "the CoreSet table (output_csv_path)")
    check_writable(summary_path, "the CoreSet summary")
    result = run_selection(table, config, progress=progress, where=str(input_path))
    # One set, as the build's: the summary (with the table's SHA-256) is moved into place last.
    with StageClock(3, result.summary["timings_s"]).stage("write"), output_set() as written:
        write_table(result.table, output_path)
        result.summary.update(
            {
                "input": str(input_path),
                "output": str(output_path),
                "version": __version__,
                "total_s": round(time.perf_counter() - start, 3),
                "output_sha256": written.hashes({"table": str(output_path)}),
            }
        )
        write_json(result.summary, summary_path)
    return summary_text(result.summary, output_path, summary_path)
