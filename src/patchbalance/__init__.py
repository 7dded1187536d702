"""patchbalance: sampler weights, CoreSets and weighted training for segmentation patches."""

from __future__ import annotations

from typing import Any

# `patchbalance.report(table)` is the API of the spec (SPEC §5); the figures live in
# `patchbalance.sampling.figures`.
from patchbalance.sampling.figures import prior_correction, report  # noqa: E402
from patchbalance.version import __version__

__all__ = [
    "__version__",
    "build_balanced_dataset",
    "load_config",
    "prior_correction",
    "report",
    "select_coreset",
]


def __getattr__(name: str) -> Any:
    # Imported on first use so that `import patchbalance` stays light (no sklearn, no torch).
    if name == "build_balanced_dataset":
        from patchbalance.balancing.pipeline import build_balanced_dataset

        return build_balanced_dataset
    if name == "load_config":
        from patchbalance.config import load_config

        return load_config
    if name == "select_coreset":
        from patchbalance.coreset import select_coreset

        return select_coreset
    raise AttributeError(f"module 'patchbalance' has no attribute {name!r}")
