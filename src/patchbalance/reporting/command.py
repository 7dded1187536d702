"""`patchbalance report TABLE`: read the table, compute the figures, write the page, say it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from patchbalance.atomic import check_writable
from patchbalance.balanced_table import summary_disagreement
from patchbalance.config import table_files
from patchbalance.errors import InputError
from patchbalance.paths import check_distinct_files, resolve_path
from patchbalance.sampling.figures import figures_from_table, figures_text
from patchbalance.table import (
    KEY_COLUMNS,
    check_table_file,
    is_parquet,
    normalised_keys,
    read_table,
    shared_keys_text,
)

RASTER_COLUMNS = ("image_path", "mask_path")


def check_report_target(out: Path, table_path: Path, table: pd.DataFrame) -> None:
    """Raise `ConfigError` when `--out` names the table, its summary, or a file the build read
    or wrote (its configuration, records, footprints, a raster the table names)."""
    protected: dict[str, str | Path | None] = dict(table_files(table_path))
    for column in RASTER_COLUMNS:
        if column in table:
            # Only rasters of the same name can be the same file (hard links aside).
            named = [p for p in table[column].dropna().unique() if Path(str(p)).name == out.name]
            for number, path in enumerate(named, start=1):
                where = resolve_path(str(path), Path(table_path).parent)
                protected[f"a raster of the table ({column} {number})"] = where
    check_distinct_files({"--out": out}, protected)


def _shared_keys(table: pd.DataFrame) -> str | None:
    """Return the text on rows that repeat a patch key, or None (or without key columns)."""
    if not set(KEY_COLUMNS) <= set(table.columns):
        return None
    try:
        return shared_keys_text(normalised_keys(table))
    except InputError:
        return None  # offsets that are not whole numbers: the figures do not need them


def run_report_command(table_path: Path, out: Path | None = None) -> str:
    """Return the report's text for the terminal; with `out`, also write the HTML page there."""
    if out is not None:
        check_writable(Path(out), "the HTML report (--out)")
    table = read_report_table(table_path)
    if out is not None:
        check_report_target(Path(out), Path(table_path), table)
    figures = figures_from_table(table, where=str(table_path))
    text = figures_text(figures)
    concentrated = figures.concentration_warning()
    for line in [*figures.starvation_warnings(Path(table_path).name), concentrated]:
        if line:
            text += f"\nwarning: {line}"
    disagreement = summary_disagreement(table_path)
    if disagreement:
        text += f"\nwarning: {disagreement}"
    shared = _shared_keys(table)
    if shared:
        text += (
            f"\nwarning: {Path(table_path).name}: {shared}; each copy is drawn on its own, so "
            "these figures count that patch once per copy: drop the copies or rebuild the table"
        )
    if out is not None:
        from patchbalance.reporting.html import write_html_report

        write_html_report(table, figures, Path(out), title=Path(table_path).name)
        text += f"\nreport written to {out}"
    return text


def read_report_table(path: Path) -> pd.DataFrame:
    """Return the balanced table at `path` for `report`: a CSV (maybe compressed) or Parquet."""
    path = Path(path)
    check_table_file(path, "balanced table")
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if not is_parquet(path) and ".csv" not in suffixes[-2:]:
        raise InputError(
            f"{path}: report reads the balanced table that build-balanced-dataset writes "
            f"(output.csv_path, a .csv or .parquet file), not a '{path.suffix or 'suffix-less'}' "
            "file"
        )
    return read_table(path, what="balanced table")
