"""Exclusion flags and reasons (SPEC §3.3): which patches take no part and get weight 0."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from patchbalance.config import ExclusionConfig
from patchbalance.table import EXCLUDED

# The order in which reasons are listed in `exclusion_reason`.
REASONS = (
    "mask_border_nodata",
    "image_black_border",
    "high_nodata",
    "low_entropy",
    "window_out_of_bounds",
    "read_error",
    "empty_mask",
)


@dataclass
class ExclusionFlags:
    """The exclusion flags of every patch, kept numeric until the table is written.

    Args:
        flags: the `has_*` flag columns, each a bool array over the patches.
        reason_bits: bit j is set when the patch carries `REASONS[j]`.
    """

    flags: dict[str, np.ndarray]
    reason_bits: np.ndarray

    @property
    def excluded(self) -> np.ndarray:
        """Return whether each patch is excluded (it carries at least one reason)."""
        return self.reason_bits != 0

    def counts(self) -> dict[str, int]:
        """Return how many patches carry each exclusion reason (a patch may carry several)."""
        return {
            name: int(np.count_nonzero(self.reason_bits & (1 << j)))
            for j, name in enumerate(REASONS)
        }

    def columns(self, rows: np.ndarray | slice) -> pd.DataFrame:
        """Return the flag columns, `excluded` and `exclusion_reason` of the patches `rows`."""
        bits = self.reason_bits[rows]
        distinct, inverse = np.unique(bits, return_inverse=True)
        text = np.array(
            [
                ";".join(name for j, name in enumerate(REASONS) if int(code) & (1 << j))
                for code in distinct
            ],
            dtype=object,
        )
        columns = pd.DataFrame({name: flag[rows] for name, flag in self.flags.items()})
        columns[EXCLUDED] = bits != 0
        columns["exclusion_reason"] = text[inverse.ravel()]
        return columns


def exclusion_flags(
    config: ExclusionConfig,
    nodata_defined: np.ndarray,
    border_nodata: np.ndarray,
    black_border: np.ndarray,
    nodata_ratio: np.ndarray,
    entropy: np.ndarray,
    valid_pixels: np.ndarray,
    out_of_bounds: np.ndarray,
    read_error: np.ndarray,
) -> ExclusionFlags:
    """Return the flags and exclusion reasons of every patch.

    `nodata_defined` says per patch whether its mask has a nodata value (the border check is
    only meaningful then). Statistics of patches that were not read are NaN and raise no flag
    of their own: those patches carry `window_out_of_bounds` or `read_error` instead.
    """
    measured = ~(out_of_bounds | read_error)
    flags = {
        "has_mask_border_nodata": measured
        & config.exclude_border_nodata
        & nodata_defined
        & border_nodata,
        "has_image_black_border": measured & config.exclude_black_border & black_border,
        "has_high_nodata": measured
        & (np.nan_to_num(nodata_ratio, nan=0.0) > config.max_nodata_ratio),
        "has_low_entropy": measured
        & (config.min_entropy > 0)
        & (np.nan_to_num(entropy, nan=np.inf) < config.min_entropy),
    }
    empty = measured & (valid_pixels == 0)
    reason_flags = (
        flags["has_mask_border_nodata"],
        flags["has_image_black_border"],
        flags["has_high_nodata"],
        flags["has_low_entropy"],
        out_of_bounds,
        read_error,
        empty,
    )
    bits = np.zeros(len(out_of_bounds), dtype=np.uint8)
    for j, flag in enumerate(reason_flags):
        bits |= np.asarray(flag, dtype=np.uint8) << j
    return ExclusionFlags({k: np.asarray(v, dtype=bool) for k, v in flags.items()}, bits)
