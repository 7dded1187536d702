"""The `patchbalance` command line: argument parsing and printing only; the work is in the library.

Exit status: 0 on success, 2 on a configuration or input error (one line on stderr, no traceback
unless `--debug`), 1 on an unexpected failure.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from patchbalance.errors import PatchbalanceError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Sampler weights, CoreSets and weighted training for imbalanced segmentation patches.",
)

ConfigArg = Annotated[Path, typer.Argument(help="The YAML configuration file.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a configuration value: key.path=value (repeatable)."),
]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Validate the configuration and inputs, print the plan.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
SchedulerOption = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help="Where the per-raster work runs: auto, local, threads, synchronous or a Dask "
        "scheduler address (tcp://host:8786); sets compute.scheduler.",
    ),
]


def _configure_logging(quiet: bool, verbose: bool) -> None:
    from patchbalance.config.secrets import SecretFilter

    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(
        level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(SecretFilter())
    # Third-party libraries stay quiet unless asked for.
    for name in (
        "rasterio", "fiona", "matplotlib", "PIL", "urllib3", "filelock", "distributed", "bokeh",
        "tornado", "lightning.pytorch", "lightning.fabric",
    ):  # fmt: skip
        logging.getLogger(name).setLevel(logging.WARNING if not verbose else logging.INFO)


def _run(task: Callable[[], str | None], quiet: bool, verbose: bool, debug: bool) -> None:
    """Run `task`, print what it returns, and turn errors into the exit statuses of the spec."""
    _configure_logging(quiet, verbose)
    try:
        text = task()
    except PatchbalanceError as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - the last line of defence prints and exits 1
        from patchbalance.config.secrets import mask_text

        if debug:
            traceback.print_exc()
        else:
            typer.echo(
                f"unexpected error: {type(exc).__name__}: {mask_text(str(exc))} "
                "(rerun with --debug for details)",
                err=True,
            )
        raise typer.Exit(1) from None
    if text:
        typer.echo(text)


@app.command("build-balanced-dataset")
def build_balanced_dataset_command(
    config: ConfigArg,
    set_: SetOption = None,
    dry_run: DryRunOption = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Treat unreadable or out-of-bounds windows as errors.")
    ] = False,
    scheduler: SchedulerOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """Compute a sampler_weight for every patch and write the balanced table."""

    def task() -> str:
        from patchbalance.balancing.command import run_build_command

        overrides = (set_ or []) + ([f"compute.scheduler={scheduler}"] if scheduler else [])
        return run_build_command(
            config, overrides, dry_run=dry_run, strict=strict, progress=not quiet
        )

    _run(task, quiet, verbose, debug)


@app.command("select-coreset")
def select_coreset_command(
    config: ConfigArg,
    set_: SetOption = None,
    dry_run: DryRunOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """Select a CoreSet from a balanced table and give it training weights."""

    def task() -> str:
        from patchbalance.coreset import run_select_coreset_command

        return run_select_coreset_command(
            config, overrides=set_ or [], dry_run=dry_run, progress=not quiet
        )

    _run(task, quiet, verbose, debug)


@app.command("report")
def report_command(
    table: Annotated[Path, typer.Argument(help="A balanced table (CSV or Parquet).")],
    out: Annotated[Path | None, typer.Option("--out", help="Write an HTML report here.")] = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """Show what the weights will do in training: class shares, ESS, repeats."""

    def task() -> str:
        from patchbalance.reporting.command import run_report_command

        return run_report_command(table, out)

    _run(task, quiet, verbose, debug)


@app.command("train")
def train_command(
    config: ConfigArg,
    set_: SetOption = None,
    dry_run: DryRunOption = False,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the run of this checkpoint (its last.pt)."),
    ] = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """Train a segmentation model with the weighted sampler."""

    def task() -> str:
        from patchbalance.train.command import run_train_command

        return run_train_command(
            config, overrides=set_ or [], dry_run=dry_run, progress=not quiet, resume=resume
        )

    _run(task, quiet, verbose, debug)


@app.command("compare")
def compare_command(
    config: ConfigArg,
    set_: SetOption = None,
    dry_run: DryRunOption = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """Train every arm with paired seeds and say which ones help the rare classes."""

    def task() -> str:
        from patchbalance.compare import run_compare_command

        return run_compare_command(
            config, overrides=set_ or [], progress=not quiet, dry_run=dry_run
        )

    _run(task, quiet, verbose, debug)


@app.command("demo")
def demo_command(
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the sample data and outputs.")
    ] = Path("patchbalance-demo"),
    scheduler: SchedulerOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    debug: DebugOption = False,
) -> None:
    """Write a small georeferenced sample dataset and run build and report on it."""

    def task() -> str:
        from patchbalance.demo import run_demo_command

        return run_demo_command(out, progress=not quiet, scheduler=scheduler)

    _run(task, quiet, verbose, debug)


def main() -> None:
    """Entry point of the `patchbalance` console script."""
    app()


if __name__ == "__main__":
    main()
