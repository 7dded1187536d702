"""`patchbalance report TABLE`: read the table, compute the figures, write the page, say it."""

from __future__ import annotations

from pathlib import Path

from patchbalance.atomic import check_writable
from patchbalance.balancing.outputs import summary_disagreement
from patchbalance.reporting.figures import figures_from_table, figures_text, read_report_table


def run_report_command(table_path: Path, out: Path | None = None) -> str:
    """Return the report's text for the terminal; with `out`, also write the HTML page there."""
    if out is not None:
        check_writable(Path(out), "the HTML report (--out)")
    table = read_report_table(table_path)
    figures = figures_from_table(table, where=str(table_path))
    text = figures_text(figures)
    concentrated = figures.concentration_warning()
    for line in [*figures.starvation_warnings(Path(table_path).name), concentrated]:
        if line:
            text += f"\nwarning: {line}"
    disagreement = summary_disagreement(table_path)
    if disagreement:
        text += f"\nwarning: {disagreement}"
    if out is not None:
        from patchbalance.reporting.html import write_html_report

        write_html_report(table, figures, Path(out), title=Path(table_path).name)
        text += f"\nreport written to {out}"
    return text
