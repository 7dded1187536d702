"""Exclusion flags and reasons (SPEC §3.3): which patches take no part and get weight 0."""

from __future__ import annotations

import numpy as np
import pandas as pd

from patchbalance.config import ExclusionConfig

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


def exclusion_columns(
    config: ExclusionConfig,
    nodata_defined: np.ndarray,
    border_nodata: np.ndarray,
    black_border: np.ndarray,
    nodata_ratio: np.ndarray,
    entropy: np.ndarray,
    valid_pixels: np.ndarray,
    out_of_bounds: np.ndarray,
    read_error: np.ndarray,
) -> pd.DataFrame:
    """Return the flag columns, `excluded` and `exclusion_reason` for every patch.

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
    reasons = np.full(len(out_of_bounds), "", dtype=object)
    for name, flag in zip(REASONS, reason_flags, strict=True):
        reasons[flag] = reasons[flag] + name + ";"
    reasons = pd.Series(reasons, dtype=object).str.rstrip(";")
    excluded = np.logical_or.reduce(reason_flags)
    columns = pd.DataFrame({name: np.asarray(flag, dtype=bool) for name, flag in flags.items()})
    columns["excluded"] = excluded
    columns["exclusion_reason"] = reasons.to_numpy()
    return columns


def count_reasons(reasons: pd.Series) -> dict[str, int]:
    """Return how many patches carry each exclusion reason (a patch may carry several)."""
    counts = {name: 0 for name in REASONS}
    exploded = reasons[reasons != ""].str.split(";").explode()
    for name, count in exploded.value_counts().items():
        counts[str(name)] = int(count)
    return counts
