"""The raster stage of a build: probe the files, check the windows, count the masks.

`read_rasters` opens every raster once for its header, flags windows that fall outside their
raster or whose file cannot be read, and computes the mask statistics of the rest on the run's
scheduler (or takes them from the source when it has class counts). It returns a
`RasterReading`: arrays aligned with the records, plus the notes the summary shows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from patchbalance.balancing.stats import (
    BorderCheck,
    MaskStatistics,
    compute_mask_statistics,
    statistics_from_counts,
)
from patchbalance.compute import Compute
from patchbalance.config import ExclusionConfig
from patchbalance.errors import InputError
from patchbalance.progress import StageClock, progress_bar
from patchbalance.sources import SourceRecords
from patchbalance.table import lookup_by_path
from patchbalance.windows import (
    RasterInfo,
    check_band,
    pair_difference,
    probe_rasters,
    windows_in_bounds,
)

log = logging.getLogger(__name__)


@dataclass
class RasterReading:
    """What the raster stage found about every patch (arrays follow the records).

    Args:
        infos: the header of every raster that could be opened.
        stats: the mask statistics.
        out_of_bounds: the window lies (partly) outside its raster.
        read_error: the raster or the window could not be read.
        notes: read-error figures for the summary.
    """

    infos: dict[str, RasterInfo]
    stats: MaskStatistics
    out_of_bounds: np.ndarray
    read_error: np.ndarray
    notes: dict[str, Any]

    @property
    def computed(self) -> np.ndarray:
        """Return which patches have statistics: read, in bounds and without a read error."""
        return self.stats.read & ~self.read_error & ~self.out_of_bounds


def read_rasters(
    source: SourceRecords,
    exclusion: ExclusionConfig,
    classes: list[int] | None,
    compute: Compute,
    clock: StageClock,
    progress: bool = False,
    strict: bool = False,
    image_band: tuple[str, int] | None = None,
) -> RasterReading:
    """Return the raster stage's findings for every record of `source`.

    Args:
        source: the records, and the class counts when the source has them.
        exclusion: the `exclusion:` block (nodata, band, border checks).
        classes: `clustering.classes`, or None for every value seen.
        compute: where the mask statistics run.
        clock: times the `rasters` and `mask_statistics` stages.
        progress: show a progress bar.
        strict: raise `InputError` on the first unreadable or out-of-bounds window.
        image_band: (key, band): the highest image band a later stage reads, checked against
            every image before the statistics (`embeddings.bands`).

    Returns:
        The `RasterReading`.
    """
    records = source.records
    # Statistics from the source and no border check: the masks are never opened, not even
    # probed, so sizes and bounds come from the images alone.
    skip_masks = source.class_counts is not None and not (
        exclusion.exclude_border_nodata or exclusion.exclude_black_border
    )
    mask_paths = records["image_path"] if skip_masks else records["mask_path"]
    with clock.stage("rasters"):
        probed = [records["image_path"]] + ([] if skip_masks else [records["mask_path"]])
        files = {str(path) for column in probed for path in column.unique()}
        # Headers the source read already are not read again.
        infos, open_errors = probe_rasters(files - set(source.infos), compute.workers)
        infos.update({path: info for path, info in source.infos.items() if path in files})
    if image_band is not None:
        images = {str(path) for path in records["image_path"].unique()}
        counts = {path: infos[path].count for path in images if path in infos}
        check_band(counts, image_band[1], image_band[0], "image")
    differences: dict[tuple[str, str], str] = {}
    if not skip_masks:
        masks = {str(path) for path in records["mask_path"].unique()}
        counts = {path: infos[path].count for path in masks if path in infos}
        check_band(counts, exclusion.mask_band, "exclusion.mask_band")
        differences = _pair_differences(records, infos)
    read_error = (
        records["image_path"].isin(list(open_errors)).to_numpy()
        | mask_paths.isin(list(open_errors)).to_numpy()
    )
    in_bounds = _in_bounds(records, mask_paths, infos)
    out_of_bounds = ~read_error & ~in_bounds
    to_read = ~read_error & in_bounds
    with clock.stage("mask_statistics"):
        stats, notes = _statistics(source, exclusion, classes, infos, to_read, compute, progress)
    if stats.errors:
        read_error[list(stats.errors)] = True
    notes.update(_error_notes(records, stats, open_errors, read_error, out_of_bounds))
    if out_of_bounds.any():
        notes["first_out_of_bounds"] = _out_of_bounds_label(records, out_of_bounds, differences)
    if strict:
        _raise_if_strict(records, stats, open_errors, read_error, out_of_bounds, notes)
    _log_problems(stats, open_errors, out_of_bounds, notes)
    if source.class_counts is None:
        _warn_unnamed_nodata(records, stats, infos, exclusion, classes)
    return RasterReading(infos, stats, out_of_bounds, read_error, notes)


def _in_bounds(
    records: pd.DataFrame, mask_paths: pd.Series, infos: dict[str, RasterInfo]
) -> np.ndarray:
    """Return whether each window lies inside both its image and its mask."""
    heights = {path: info.height for path, info in infos.items()}
    widths = {path: info.width for path, info in infos.items()}
    image_paths = records["image_path"]
    height = np.minimum(
        lookup_by_path(image_paths, heights, 0), lookup_by_path(mask_paths, heights, 0)
    )
    width = np.minimum(
        lookup_by_path(image_paths, widths, 0), lookup_by_path(mask_paths, widths, 0)
    )
    return windows_in_bounds(
        records["row_off"].to_numpy(),
        records["col_off"].to_numpy(),
        records["patch_size"].to_numpy(),
        height.astype(np.int64),
        width.astype(np.int64),
    )


def _statistics(
    source: SourceRecords,
    exclusion: ExclusionConfig,
    classes: list[int] | None,
    infos: dict[str, RasterInfo],
    to_read: np.ndarray,
    compute: Compute,
    progress: bool,
) -> tuple[MaskStatistics, dict[str, Any]]:
    """Return the mask statistics: read from the windows, taken from the source, or both."""
    records = source.records
    notes: dict[str, Any] = {}
    border_check = (
        BorderCheck(exclusion.black_tolerance, exclusion.black_border_min_fraction)
        if exclusion.exclude_black_border
        else None
    )
    from_source = source.class_counts is not None
    if not from_source or exclusion.exclude_border_nodata or border_check:
        nodata_by_mask = {
            path: (exclusion.nodata_class if exclusion.nodata_class is not None else info.nodata)
            for path, info in infos.items()
        }
        with progress_bar(int(to_read.sum()), "mask statistics", progress) as bar:
            read = compute_mask_statistics(
                records,
                np.flatnonzero(to_read),
                nodata_by_mask,
                classes=classes,
                mask_band=exclusion.mask_band,
                border_check=border_check,
                image_has_mask={p: i.has_mask for p, i in infos.items()},
                block_shapes={p: i.block_shape for p, i in infos.items()},
                progress=bar.update,
                compute=compute,
            )
        if not from_source:
            return read, notes
    stats = statistics_from_counts(
        source.class_values,
        source.class_counts,
        records["patch_size"].to_numpy(dtype=np.int64) ** 2,
    )
    if exclusion.exclude_border_nodata or border_check:
        stats.border_nodata = read.border_nodata
        stats.black_border = read.black_border
        stats.read = read.read | ~to_read
        stats.errors = read.errors
    notes["statistics_from_source"] = True
    return stats, notes


def _pair_differences(
    records: pd.DataFrame, infos: dict[str, RasterInfo]
) -> dict[tuple[str, str], str]:
    """Return how each image/mask pair of the records differs (pairs that agree are left out).

    Logs one warning counting the pairs that differ and describing the first.
    """
    pairs = records[["image_path", "mask_path"]].drop_duplicates()
    differences = {}
    for image, mask in zip(pairs["image_path"], pairs["mask_path"], strict=True):
        if str(image) in infos and str(mask) in infos:
            difference = pair_difference(infos[str(image)], infos[str(mask)])
            if difference:
                differences[(str(image), str(mask))] = difference
    if differences:
        first = differences[min(differences)]
        log.warning(
            "%d image/mask pair(s) do not match, first: %s; windows are read at the same pixel "
            "offsets in both, so a window outside the smaller raster is excluded "
            "(window_out_of_bounds), and a mask in another CRS or geotransform may not line "
            "up with its image",
            len(differences),
            first,
        )
    return differences


def _out_of_bounds_label(
    records: pd.DataFrame,
    out_of_bounds: np.ndarray,
    differences: dict[tuple[str, str], str],
) -> str:
    """Return the first out-of-bounds window, and why when its image and mask differ."""
    row = int(np.flatnonzero(out_of_bounds)[0])
    label = _window_label(records, row)
    pair = (str(records.at[row, "image_path"]), str(records.at[row, "mask_path"]))
    return f"{label} ({differences[pair]})" if pair in differences else label


def _warn_unnamed_nodata(
    records: pd.DataFrame,
    stats: MaskStatistics,
    infos: dict[str, RasterInfo],
    exclusion: ExclusionConfig,
    classes: list[int] | None,
) -> None:
    """Warn once when a mask's own nodata value is counted as a class (SPEC §3.2).

    That happens when `exclusion.nodata_class` names another value and `clustering.classes`
    does not fix the class set: the mask's nodata pixels then become a class of their own.
    """
    if exclusion.nodata_class is None or classes is not None:
        return
    own = {
        path: float(info.nodata)
        for path, info in infos.items()
        if info.nodata is not None and info.nodata != exclusion.nodata_class
    }
    row_nodata = lookup_by_path(records["mask_path"], own).astype(np.float64)
    for c, value in enumerate(stats.class_values.tolist()):
        rows = (row_nodata == value) & (stats.counts[:, c] > 0)
        if not rows.any():
            continue
        share = stats.counts[:, c].sum() / max(int(stats.counts.sum()), 1)
        log.warning(
            "exclusion.nodata_class is %s, but mask %s has its own nodata value %g, present in "
            "%d window(s): it is counted as class %g (%.1f %% of the valid pixels); set "
            "exclusion.nodata_class: %g, or list the classes under clustering.classes",
            exclusion.nodata_class,
            records.at[int(np.flatnonzero(rows)[0]), "mask_path"],
            value,
            int(rows.sum()),
            value,
            100 * share,
            value,
        )
        return


def _window_label(records: pd.DataFrame, row: int) -> str:
    return (
        f"row {row + 1}: window ({records.at[row, 'row_off']}, {records.at[row, 'col_off']}) "
        f"of {records.at[row, 'image_path']}"
    )


def _error_notes(
    records: pd.DataFrame,
    stats: MaskStatistics,
    open_errors: dict[str, str],
    read_error: np.ndarray,
    out_of_bounds: np.ndarray,
) -> dict[str, Any]:
    """Return the summary's read-error figures."""
    unreadable = dict(open_errors)
    for path, reason in stats.errors.values():  # files whose windows failed: the first reason
        unreadable.setdefault(path, reason)
    notes: dict[str, Any] = {
        "read_errors": int(read_error.sum()),
        "out_of_bounds": int(out_of_bounds.sum()),
        "unreadable_files": dict(sorted(unreadable.items())[:20]),
    }
    if stats.errors:
        path, reason = stats.errors[min(stats.errors)]
        notes["first_window_error"] = f"{path}: {reason}"
    return notes


def _raise_if_strict(
    records: pd.DataFrame,
    stats: MaskStatistics,
    open_errors: dict[str, str],
    read_error: np.ndarray,
    out_of_bounds: np.ndarray,
    notes: dict[str, Any],
) -> None:
    """Raise `InputError` (--strict) naming the first unreadable or out-of-bounds window."""
    if read_error.any():
        if stats.errors:
            problem = notes["first_window_error"]
        else:
            row = int(np.flatnonzero(read_error)[0])
            image, mask = records.at[row, "image_path"], records.at[row, "mask_path"]
            unreadable = [path for path in (mask, image) if path in open_errors]
            problem = (
                f"{unreadable[0]}: {open_errors[unreadable[0]]}"
                if unreadable
                else _window_label(records, row)
            )
        raise InputError(
            f"--strict: {int(read_error.sum())} patch(es) could not be read, first: {problem}"
        )
    if out_of_bounds.any():
        problem = notes["first_out_of_bounds"]
        raise InputError(
            f"--strict: {int(out_of_bounds.sum())} window(s) lie outside their raster, first: "
            f"{problem}"
        )


def _log_problems(
    stats: MaskStatistics,
    open_errors: dict[str, str],
    out_of_bounds: np.ndarray,
    notes: dict[str, Any],
) -> None:
    for path, message in sorted(open_errors.items())[:5]:
        log.warning("cannot read %s: %s (its patches are excluded: read_error)", path, message)
    if stats.errors:
        log.warning(
            "%d window(s) could not be read (excluded: read_error), first: %s",
            len(stats.errors),
            notes["first_window_error"],
        )
    if out_of_bounds.any():
        log.warning(
            "%d window(s) lie outside their raster (excluded: window_out_of_bounds), first: %s",
            out_of_bounds.sum(),
            notes["first_out_of_bounds"],
        )
