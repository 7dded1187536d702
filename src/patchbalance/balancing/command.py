"""`patchbalance build-balanced-dataset CONFIG`: load the config, run the build, say what it did."""

from __future__ import annotations

import os
from collections.abc import Sequence

from patchbalance.balancing.pipeline import run_build
from patchbalance.balancing.plan import plan_text
from patchbalance.config import load_config


def run_build_command(
    config_path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    strict: bool = False,
    progress: bool = True,
) -> str:
    """Return the build's summary text (the plan with `dry_run`), writing its outputs."""
    config = load_config(config_path, list(overrides))
    if dry_run:
        return plan_text(config)
    return run_build(config, strict=strict, progress=progress).summary_text
