"""The dry-run plan of `build-balanced-dataset`: what a run would do, checked as a run checks.

`plan_text` makes the checks a run makes before its first stage (the output targets, the
records, that the rasters they name exist, the model, the embeddings cache) and returns the
plan.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from patchbalance.balancing.pipeline import _check_outputs, output_paths
from patchbalance.config import BalancedDatasetConfig
from patchbalance.errors import InputError
from patchbalance.sources import SourceRecords, load_records


def _missing_rasters(config: BalancedDatasetConfig, source: SourceRecords) -> list[str]:
    """Return the raster files the records name that do not exist (sorted).

    Raises `InputError`, as the run would after reading, when every patch lacks a file.
    """
    records = source.records
    exclusion = config.exclusion
    # As in the run: with statistics from the source and no border check, masks are not read.
    masks_read = source.class_counts is None or (
        exclusion.exclude_border_nodata or exclusion.exclude_black_border
    )
    columns = [records["image_path"]] + ([records["mask_path"]] if masks_read else [])
    files = {str(path) for column in columns for path in column.unique()}
    missing = sorted(path for path in files if not os.path.exists(path))
    if missing:
        lacking = np.zeros(len(records), dtype=bool)
        for column in columns:
            lacking |= column.isin(missing).to_numpy()
        if lacking.all():
            raise InputError(
                f"every one of the {len(records)} patches names a raster that does not exist "
                f"({len(missing)} file(s) missing, e.g. {missing[0]}); paths in the records "
                f"are taken relative to the configuration's folder {config.base_dir}"
            )
    return missing


def _cache_line(config: BalancedDatasetConfig) -> str:
    """Return the plan's line on the embeddings cache (raising for a file that is none)."""
    from patchbalance.embeddings.cache import cache_file_rows

    cache = Path(config.embeddings.parquet_path or "")
    if not cache.exists():
        return f"  embeddings cache: {cache} (new)"
    rows = cache_file_rows(cache)
    return (
        f"  embeddings cache: {cache} (exists: {rows:,} rows; those made with this run's "
        "settings are reused)"
    )


def plan_text(config: BalancedDatasetConfig) -> str:
    """Return the dry-run plan: patches, files, stages to run, caches to reuse, outputs.

    The checks a run makes before its first stage are made here too: the output targets,
    the records and that the rasters they name exist, the model, the embeddings cache.
    """
    _check_outputs(config, output_paths(config), dry_run=True)
    source = load_records(config)
    records = source.records
    paths = pd.concat([records["image_path"], records["mask_path"]]).unique()
    if config.mode == "embeddings" and source.uniqueness is None and source.embeddings is None:
        from patchbalance.embeddings import check_model_available

        check_model_available(config.embeddings)
    missing = _missing_rasters(config, source)
    stages = ["records", "mask statistics", "exclusion", "composition clusters"]
    if config.mode == "embeddings" and source.uniqueness is None:
        if source.embeddings is None:
            stages.append("embeddings")
        stages.append("uniqueness")
    stages += ["weights", "outputs"]
    lines = [
        f"plan for {config.source_path or 'the configuration'}:",
        f"  patches: {len(records):,} from {len(paths):,} raster files"
        + (f" ({len(missing)} missing, e.g. {missing[0]})" if missing else ""),
        f"  mode: {config.mode}; sampling_method: {config.sampling_method}"
        + (" (the default)" if config.sampling_method_is_default else ""),
        *(
            ["  placement: class_centred (the default over rasters; placement: grid leaves it out)"]
            if config.placement_is_default
            else []
        ),
        f"  stages: {' -> '.join(stages)}",
    ]
    if config.mode == "embeddings" and config.embeddings.parquet_path:
        lines.append(_cache_line(config))
    for name, path in output_paths(config).items():
        lines.append(f"  output {name}: {path}")
    if config.output.postgres_table is not None:
        from patchbalance.balancing.postgres_table import describe

        table = config.output.postgres_table
        lines.append(f"  output postgres_table: {describe(config)} (if_exists: {table.if_exists})")
    return "\n".join(lines)
