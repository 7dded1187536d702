"""`patchbalance train CONFIG`: read the file, apply `--set`, plan, then train or describe."""

from __future__ import annotations

import os
from pathlib import Path

from patchbalance.config.loading import read_yaml_mapping
from patchbalance.train.plan import plan_training
from patchbalance.train.run import run_plan


def run_train_command(
    config_path: Path,
    overrides: list[str],
    dry_run: bool,
    progress: bool,
    resume: Path | None = None,
) -> str:
    """Run `patchbalance train CONFIG`; return the text to print (the plan, or the final table).

    Under DDP only rank 0 returns the table; the other ranks return an empty text.
    """
    config_path = Path(config_path)
    raw = read_yaml_mapping(config_path)
    # The plan resolves the configuration (overrides, then `${...}`) once.
    plan = plan_training(raw, config_path.resolve().parent, str(config_path), overrides)
    if dry_run:
        return "dry run: nothing trained\n" + plan.describe()
    result = run_plan(plan, progress, None if resume is None else os.fspath(resume))
    return result.summary_text if result.rank == 0 else ""
