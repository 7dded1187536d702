"""`patchbalance compare` (SPEC §11): does a sampling make the model better on the rare classes?

Modules: `config` (the `compare:` keys and each arm's merged configs), `tables` (each arm's
training table, built once), `engine` (the paired trainings, resumable), `statistics` (paired
gains with Student-t intervals, curves, plateaus, the verdict), `results` (JSON, Markdown),
`html` (the page) and `command` (the command line's entry point).
"""

from __future__ import annotations

from patchbalance.compare.command import run_compare, run_compare_command
from patchbalance.compare.config import (
    CompareConfig,
    ComparePlan,
    compare_plan_from_mapping,
    load_compare_config,
)
from patchbalance.compare.statistics import paired_t_interval

__all__ = [
    "CompareConfig",
    "ComparePlan",
    "compare_plan_from_mapping",
    "load_compare_config",
    "paired_t_interval",
    "run_compare",
    "run_compare_command",
]
