"""Per-patch mask statistics (SPEC §3.2) and the pixel-level border checks of SPEC §3.3.

The windows are cut into partitions (one mask file, block order) that run on the run's
scheduler (`window_counts.count_windows`); `CountMerge` takes each partition's counts in as it
arrives. The class set is fixed at the end from the values seen (or from `clustering.classes`),
and the table's statistics columns are made from the counts a chunk of rows at a time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from patchbalance.balancing.window_counts import BorderCheck, CountTask, WindowCounts, count_windows
from patchbalance.compute import Compute, LazySequence
from patchbalance.errors import InputError
from patchbalance.measures import class_entropy, class_proportions
from patchbalance.table import class_column, lookup_by_path
from patchbalance.windows import CHUNK_WINDOWS, MISSING_VALUE, window_partitions

log = logging.getLogger(__name__)

__all__ = [
    "BorderCheck",
    "CountMerge",
    "MaskStatistics",
    "class_dist_json",
    "compute_mask_statistics",
    "nodata_ratios",
    "statistics_columns",
    "statistics_from_counts",
]

# Rows a per-row computation over the counts handles at once.
ROWS_AT_ONCE = 262_144
# Windows per partition on a cluster: a task of ~1 s, so scheduling costs stay small.
CLUSTER_PARTITION_WINDOWS = 4096


@dataclass
class MaskStatistics:
    """Class pixel counts and pixel-level flags for every patch (rows follow the records)."""

    class_values: np.ndarray  # (C,) the class values, sorted
    counts: np.ndarray  # (N, C) valid pixels per class
    nodata_pixels: np.ndarray  # (N,) pixels that are nodata (incl. values outside `classes`)
    window_pixels: np.ndarray  # (N,) patch_size ** 2
    border_nodata: np.ndarray  # (N,) a nodata pixel on the mask window's outer ring
    black_border: np.ndarray  # (N,) the image window has a black border
    read: np.ndarray  # (N,) the windows were read (False: not attempted or failed)
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (file, reason)
    outside_class_pixels: int = 0

    @property
    def valid_pixels(self) -> np.ndarray:
        """Return the number of valid (labelled, in-class) pixels per patch."""
        return self.counts.sum(axis=1)

    def check_listed_classes(self, classes: Sequence[int] | None) -> None:
        """Raise `InputError` naming `clustering.classes` when no patch holds any listed class;
        warn naming the listed classes that no patch holds."""
        if not classes:
            return
        totals = self.counts[self.read].sum(axis=0) if self.read.any() else self.counts.sum(axis=0)
        absent = [int(v) for v, total in zip(self.class_values, totals, strict=True) if total == 0]
        if len(absent) == len(self.class_values):
            raise InputError(
                f"clustering.classes lists {', '.join(map(str, absent))}, but no patch holds a "
                f"pixel of any of them ({self.outside_class_pixels:,} pixels hold other values, "
                "which count as nodata); list the class values of the masks"
            )
        if absent:
            log.warning(
                "clustering.classes lists %s, which no patch holds; its share is 0 everywhere",
                ", ".join(map(str, absent)),
            )

    @cached_property
    def entropy(self) -> np.ndarray:
        """Return each patch's class entropy in nats (NaN without valid pixels), computed once.

        Exclusion (`min_entropy`) and the table's `class_entropy` column read the same array.
        """
        return class_entropy(self.counts)

    @cached_property
    def nodata_ratio(self) -> np.ndarray:
        """Return each patch's nodata share of its window, computed once."""
        return self.nodata_pixels / np.maximum(self.window_pixels, 1)


class CountMerge:
    """Merges the `WindowCounts` of partitions, as they arrive, into arrays over all patches.

    Counts are kept as one column per value seen (int32 while a window has fewer than 2**31
    pixels), so the client holds a few bytes per patch and value, never the partitions.

    Args:
        n: the number of patches.
        window_pixels: `patch_size ** 2` per patch.
    """

    def __init__(self, n: int, window_pixels: np.ndarray) -> None:
        self.n = n
        self.window_pixels = np.asarray(window_pixels, dtype=np.int64)
        fits = n == 0 or int(self.window_pixels.max(initial=0)) < 2**31
        self._dtype = np.int32 if fits else np.int64
        self.columns: dict[int, np.ndarray] = {}
        self.border_nodata = np.zeros(n, dtype=bool)
        self.black_border = np.zeros(n, dtype=bool)
        self.read = np.zeros(n, dtype=bool)
        self.errors: dict[int, tuple[str, str]] = {}

    def add(self, rows: np.ndarray, part: WindowCounts) -> None:
        """Take in the counts of the partition whose windows are the patches `rows`."""
        owner = np.repeat(rows, part.lengths)
        for value in np.unique(part.values).tolist():
            column = self.columns.get(value)
            if column is None:
                column = self.columns[value] = np.zeros(self.n, dtype=self._dtype)
            chosen = part.values == value
            column[owner[chosen]] = part.counts[chosen]
        self.read[rows] = part.read
        self.border_nodata[rows] = part.border_nodata
        self.black_border[rows] = part.black_border
        for position, message in part.errors.items():
            self.errors[int(rows[position])] = message

    def statistics(self, row_nodata: np.ndarray, classes: np.ndarray | None) -> MaskStatistics:
        """Return the statistics of every patch.

        Args:
            row_nodata: the nodata value of each patch's mask (NaN: none).
            classes: the class values when `clustering.classes` fixes them, else None; values
                outside them count as nodata.

        Returns:
            The `MaskStatistics`; patches that were not read have zero counts.
        """
        nodata_pixels = np.zeros(self.n, dtype=np.int64)
        outside = 0
        valid: dict[int, np.ndarray] = {}
        for value in sorted(self.columns):
            column = self.columns.pop(value)
            is_nodata = (row_nodata == value) | (value == MISSING_VALUE)
            if classes is not None and value not in classes:
                nodata_pixels += column
                outside += int(column[~is_nodata].sum())
                continue
            nodata_pixels[is_nodata] += column[is_nodata]
            column[is_nodata] = 0
            if classes is not None or column.any():
                valid[value] = column
        class_values = (
            np.asarray(classes, dtype=np.int64)
            if classes is not None
            else np.asarray(sorted(valid), dtype=np.int64)
        )
        # int32 (4 bytes per patch and class) whenever a window has fewer than 2**31 pixels.
        counts = np.zeros((self.n, len(class_values)), dtype=self._dtype)
        for c, value in enumerate(class_values.tolist()):
            if value in valid:
                counts[:, c] = valid.pop(value)
        return MaskStatistics(
            class_values=class_values,
            counts=counts,
            nodata_pixels=nodata_pixels,
            window_pixels=self.window_pixels,
            border_nodata=self.border_nodata & self.read,
            black_border=self.black_border & self.read,
            read=self.read,
            errors=self.errors,
            outside_class_pixels=outside,
        )


def compute_mask_statistics(
    records: pd.DataFrame,
    indices: np.ndarray,
    nodata_by_mask: dict[str, float | None],
    classes: Sequence[int] | None = None,
    mask_band: int = 1,
    border_check: BorderCheck | None = None,
    image_has_mask: dict[str, bool] | None = None,
    block_shapes: dict[str, tuple[int, int]] | None = None,
    num_workers: int = 1,
    progress: Callable[[int], None] | None = None,
    compute: Compute | None = None,
) -> MaskStatistics:
    """Return the statistics of the windows `indices` of `records` (other rows stay empty).

    Args:
        records: the patch records (keys).
        indices: the rows whose windows are read.
        nodata_by_mask: the nodata value of each mask file (None = no nodata).
        classes: the class values; values outside them count as nodata. None: every value seen.
        mask_band: the mask band to count.
        border_check: with it, the image window is read too and tested for a black border.
        image_has_mask: per image file, whether it has its own dataset mask.
        block_shapes: per file, its block shape (windows are read in block order).
        num_workers: threads, when `compute` is not given.
        progress: called with the number of windows of each partition done.
        compute: where the partitions run (a cluster, threads or this thread).

    Returns:
        The statistics, rows following `records`.
    """
    compute = compute or Compute("threads", num_workers)
    row_off = records["row_off"].to_numpy(dtype=np.int64)
    col_off = records["col_off"].to_numpy(dtype=np.int64)
    size = records["patch_size"].to_numpy(dtype=np.int64)
    class_list = np.asarray(sorted(classes), dtype=np.int64) if classes is not None else None
    # The path columns stay as they are (categorical): no Python object per patch.
    path_columns = [records["mask_path"]] + ([records["image_path"]] if border_check else [])
    partitions = window_partitions(
        path_columns,
        indices,
        row_off,
        col_off,
        block_shapes=block_shapes,
        max_windows=CLUSTER_PARTITION_WINDOWS if compute.distributed else CHUNK_WINDOWS,
    )
    has_mask = image_has_mask or {}

    def task(position: int) -> CountTask:
        part = partitions[position]
        return CountTask(
            mask_path=part.paths[0],
            image_path=part.paths[1] if len(part.paths) > 1 else None,
            row_off=row_off[part.rows],
            col_off=col_off[part.rows],
            size=size[part.rows],
            nodata=nodata_by_mask.get(part.paths[0]),
            classes=class_list,
            mask_band=mask_band,
            border_check=border_check,
            image_has_mask=len(part.paths) > 1 and has_mask.get(part.paths[1], False),
        )

    # Tasks are made as they are handed out, so only those in flight hold their offsets.
    tasks = LazySequence(task, len(partitions))
    merge = CountMerge(len(records), size * size)
    for position, counted in compute.as_completed(count_windows, tasks):
        merge.add(partitions[position].rows, counted)
        if progress:
            progress(len(partitions[position].rows))
    nodata_lookup = {
        path: np.nan if value is None else float(value) for path, value in nodata_by_mask.items()
    }
    row_nodata = lookup_by_path(records["mask_path"], nodata_lookup).astype(np.float64)
    return merge.statistics(row_nodata, class_list)


def statistics_from_counts(
    class_values: np.ndarray, counts: np.ndarray, window_pixels: np.ndarray
) -> MaskStatistics:
    """Return `MaskStatistics` built from counts a source already has (no window was read)."""
    n = len(counts)
    nodata = np.clip(window_pixels - counts.sum(axis=1), 0, None).astype(np.int64)
    return MaskStatistics(
        class_values=np.asarray(class_values, dtype=np.int64),
        counts=np.asarray(counts),
        nodata_pixels=nodata,
        window_pixels=np.asarray(window_pixels, dtype=np.int64),
        border_nodata=np.zeros(n, dtype=bool),
        black_border=np.zeros(n, dtype=bool),
        read=np.ones(n, dtype=bool),
    )


def class_dist_json(class_values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Return a JSON object per row: class value (string) -> proportion, zero classes omitted."""
    proportions = class_proportions(counts)
    keys = [str(int(value)) for value in class_values]
    out = np.empty(len(counts), dtype=object)
    present = proportions > 0
    for i in range(len(counts)):  # one small dict per row: the column is text by definition
        columns = np.flatnonzero(present[i])
        out[i] = json.dumps({keys[c]: round(float(proportions[i, c]), 6) for c in columns})
    return out


def nodata_ratios(stats: MaskStatistics, computed: np.ndarray) -> np.ndarray:
    """Return the nodata share of each patch's window; NaN where `computed` is False."""
    return np.where(computed, stats.nodata_ratio, np.nan)


def statistics_columns(
    stats: MaskStatistics, computed: np.ndarray, rows: np.ndarray | slice | None = None
) -> pd.DataFrame:
    """Return the SPEC §3.2 columns of the patches `rows` (all when None).

    Rows where `computed` is False are left empty. The text column `class_dist_json` is made
    here, for these rows only, so a caller writing a large table makes it a chunk at a time.
    """
    rows = slice(None) if rows is None else rows
    counts = stats.counts[rows]
    computed = computed[rows]
    n = len(counts)
    columns: dict[str, object] = {}
    for c, value in enumerate(stats.class_values):
        column = pd.array(counts[:, c], dtype="Int64")
        column[~computed] = pd.NA
        columns[class_column(value)] = column
    columns["nodata_ratio"] = np.where(computed, stats.nodata_ratio[rows], np.nan)
    dist = class_dist_json(stats.class_values, counts)
    dist[~computed] = ""
    columns["class_dist_json"] = dist
    columns["class_entropy"] = np.where(computed, stats.entropy[rows], np.nan)
    dominant = pd.array(np.zeros(n, dtype=np.int64), dtype="Int64")
    has_pixels = computed & (counts.sum(axis=1) > 0)
    if len(stats.class_values):
        dominant_values = stats.class_values[np.argmax(counts, axis=1)]
        dominant = pd.array(dominant_values, dtype="Int64")
    dominant[~has_pixels] = pd.NA
    columns["dominant_class"] = dominant
    return pd.DataFrame(columns)
