"""Per-patch mask statistics (SPEC §3.2) and the pixel-level border checks of SPEC §3.3.

One pass over the windows reads each mask window (and, when the black-border check is on, the
image window), counts its values with `numpy.bincount` and looks at its outer ring. Results go
into arrays preallocated for all patches; the class set is fixed at the end from the values seen
(or from `clustering.classes`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from rasterio.errors import RasterioError
from rasterio.windows import Window

from patchbalance.compute import Compute
from patchbalance.table import class_proportions
from patchbalance.windows import (
    CHUNK_WINDOWS,
    gdal_message,
    open_raster,
    read_window,
    read_window_mask,
    window_partitions,
)

# The largest bounding box (pixels) a partition's windows are counted from in one read.
BOX_PIXELS_MAX = 64 * 2**20
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
    errors: dict[int, str] = field(default_factory=dict)
    outside_class_pixels: int = 0

    @property
    def valid_pixels(self) -> np.ndarray:
        """Return the number of valid (labelled, in-class) pixels per patch."""
        return self.counts.sum(axis=1)


@dataclass(frozen=True)
class BorderCheck:
    """Settings of the image black-border check."""

    tolerance: float
    min_fraction: float


# Up to this many known values, counting by comparison beats np.bincount on a window.
COMPARE_UP_TO = 16


def _value_counts(
    window: np.ndarray, known: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Return the distinct values of `window`, their pixel counts, and whether `known` had them.

    Masks hold a handful of values, so when `known` (the values seen so far) is short, one
    vectorised comparison per value counts the window several times faster than
    `np.bincount`, which must first widen every pixel to intp. If the known values do not
    cover the window, it falls back to `np.bincount`.
    """
    flat = window.ravel()
    if known is not None and 0 < len(known) <= COMPARE_UP_TO and flat.dtype.kind in "ui":
        limits = np.iinfo(flat.dtype)
        known = known[(known >= limits.min) & (known <= limits.max)]
        # Compare in the window's own dtype: an int64 scalar would widen every pixel first.
        typed = known.astype(flat.dtype)
        counts = np.fromiter(
            (np.count_nonzero(flat == value) for value in typed), dtype=np.int64, count=len(known)
        )
        if counts.sum() == flat.size:
            present = counts > 0
            return known[present], counts[present], True
    if flat.dtype.kind == "f":
        finite = np.isfinite(flat)
        # NaN marks missing labels in float masks; give it a value no integer class can take.
        flat = np.where(finite, flat, np.iinfo(np.int64).min + 1).astype(np.int64)
    if flat.dtype.kind == "u" and flat.dtype.itemsize <= 2:
        counts = np.bincount(flat)
        values = np.flatnonzero(counts)
        return values.astype(np.int64), counts[values], False
    flat = flat.astype(np.int64, copy=False)
    low = int(flat.min())
    counts = np.bincount(flat - low)
    values = np.flatnonzero(counts)
    return values.astype(np.int64) + low, counts[values], False


def _outer_ring(window: np.ndarray) -> np.ndarray:
    """Return the pixels of the outermost 1-pixel ring of a 2-D window."""
    if window.shape[0] <= 2 or window.shape[1] <= 2:
        return window.ravel()
    return np.concatenate((window[0], window[-1], window[1:-1, 0], window[1:-1, -1]))


def black_border_sides(
    image: np.ndarray, dataset_mask: np.ndarray | None, check: BorderCheck
) -> bool:
    """Return True when one side of the (bands, h, w) window is at least min_fraction black.

    A pixel is black when every band is <= the tolerance, or when the image's own mask marks it
    nodata (`dataset_mask == 0`).
    """
    dark = (image <= check.tolerance).all(axis=0)
    if dataset_mask is not None:
        dark |= dataset_mask == 0
    sides = (dark[0], dark[-1], dark[:, 0], dark[:, -1])
    return any(side.mean() >= check.min_fraction for side in sides)


@dataclass(frozen=True)
class CountTask:
    """One partition's windows and what a worker needs to count them (no per-patch objects).

    Args:
        mask_path: the mask file every window reads.
        image_path: the image file, read only for the black-border check (else None).
        row_off, col_off, size: the windows, in the order to read them.
        nodata: the mask's nodata value (None: none).
        classes: the class values when `clustering.classes` fixes them, else None.
        mask_band: the mask band to count.
        border_check: the black-border settings, or None when the check is off.
        image_has_mask: whether the image has its own dataset mask.
    """

    mask_path: str
    image_path: str | None
    row_off: np.ndarray
    col_off: np.ndarray
    size: np.ndarray
    nodata: float | None
    classes: np.ndarray | None
    mask_band: int = 1
    border_check: BorderCheck | None = None
    image_has_mask: bool = False


@dataclass
class WindowCounts:
    """The counts of one partition, as flat arrays in the partition's window order.

    `values[j]`/`counts[j]` are the distinct values and pixel counts of the windows, `lengths`
    says how many belong to each window (0 for a window that was not read).
    """

    values: np.ndarray
    counts: np.ndarray
    lengths: np.ndarray
    border_nodata: np.ndarray
    black_border: np.ndarray
    read: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)


def _is_nodata(values: np.ndarray, nodata: float | None, classes: np.ndarray | None) -> np.ndarray:
    flags = np.zeros(values.shape, dtype=bool) if nodata is None else values == nodata
    if classes is not None:
        flags |= ~np.isin(values, classes)
    return flags


def count_windows(task: CountTask) -> WindowCounts:
    """Return the value counts and border flags of the task's windows; each file opens once.

    A `RasterioError` or `OSError` on a window (or on opening a file) is recorded in `errors`
    by the window's position in the task, so one bad file never aborts the run.
    """
    n = len(task.row_off)
    try:
        datasets = [open_raster(task.mask_path)]
        if task.border_check is not None and task.image_path is not None:
            datasets.append(open_raster(task.image_path))
    except (RasterioError, OSError) as exc:
        message = gdal_message(exc)
        nothing = np.zeros(n, dtype=bool)
        return WindowCounts(
            np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(n, dtype=np.int32),
            nothing, nothing.copy(), nothing.copy(), {i: message for i in range(n)},
        )  # fmt: skip
    try:
        counted = _count_from_box(task, datasets[0])
        return counted if counted is not None else _count_each_window(task, datasets)
    finally:
        for dataset in datasets:
            dataset.close()


def _column_spans(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the distinct (left, right) column spans of windows and each window's span."""
    spans, span_of = np.unique(np.stack([left, right], axis=1), axis=0, return_inverse=True)
    return spans, span_of.ravel()


def _window_sums(
    indicator: np.ndarray,
    top: np.ndarray,
    bottom: np.ndarray,
    spans: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Return the number of True pixels of `indicator` in each window [top:bottom, span].

    Running sums along the rows give each row's count over every distinct column span
    (`_column_spans`); running sums of those down the rows give the windows. Both run along
    contiguous memory.
    """
    height, width = indicator.shape
    along = np.zeros((height, width + 1), dtype=np.int64)
    np.cumsum(indicator, axis=1, dtype=np.int64, out=along[:, 1:])
    spans, span_of = spans
    across = np.ascontiguousarray((along[:, spans[:, 1]] - along[:, spans[:, 0]]).T)
    down = np.zeros((len(spans), height + 1), dtype=np.int64)
    np.cumsum(across, axis=1, out=down[:, 1:])
    return down[span_of, bottom] - down[span_of, top]


def _count_from_box(task: CountTask, dataset: Any) -> WindowCounts | None:
    """Return the counts of all windows from one read of their bounding box, or None.

    Overlapping windows (a stride below the window size) share most pixels; counting them
    from summed-area tables of the box costs a few passes over the box instead of one pass
    per window. None when that does not pay or does not apply: the box holds more pixels than
    the windows, or more than `BOX_PIXELS_MAX`; a float mask; the black-border check (which
    reads the image window by window); a read error (the caller then reads window by window
    and records the error on the windows it hits).
    """
    if (
        task.border_check is not None
        or np.dtype(dataset.dtypes[task.mask_band - 1]).kind not in "ui"
    ):
        return None
    size = task.size.astype(np.int64)
    top, left = int(task.row_off.min()), int(task.col_off.min())
    bottom, right = int((task.row_off + size).max()), int((task.col_off + size).max())
    box = (bottom - top) * (right - left)
    if box > BOX_PIXELS_MAX or box > int((size * size).sum()):
        return None
    try:
        strip = dataset.read(task.mask_band, window=Window(left, top, right - left, bottom - top))
    except (RasterioError, OSError):
        return None
    r0, c0 = task.row_off - top, task.col_off - left
    r1, c1 = r0 + size, c0 + size
    flat = strip.ravel()
    if flat.dtype.kind == "u" and flat.dtype.itemsize <= 2:
        values = np.flatnonzero(np.bincount(flat)).astype(np.int64)
    else:
        values = np.unique(flat).astype(np.int64)
    spans = _column_spans(c0, c1)
    counts = np.zeros((len(size), len(values)), dtype=np.int64)
    for j, value in enumerate(values.tolist()):
        counts[:, j] = _window_sums(strip == value, r0, r1, spans)
    nodata = _is_nodata(strip, task.nodata, task.classes)
    invalid = _window_sums(nodata, r0, r1, spans)
    inner = size > 2  # windows of 1 or 2 pixels are all ring
    interior = np.zeros(len(size), dtype=np.int64)
    if inner.any():
        inner_spans = _column_spans(c0[inner] + 1, c1[inner] - 1)
        interior[inner] = _window_sums(nodata, r0[inner] + 1, r1[inner] - 1, inner_spans)
    present = counts > 0
    return WindowCounts(
        values=np.broadcast_to(values, counts.shape)[present],
        counts=counts[present],
        lengths=present.sum(axis=1).astype(np.int32),
        border_nodata=invalid - interior > 0,
        black_border=np.zeros(len(size), dtype=bool),
        read=np.ones(len(size), dtype=bool),
    )


def _count_each_window(task: CountTask, datasets: list[Any]) -> WindowCounts:
    """Return the counts of the task's windows, reading them one by one."""
    n = len(task.row_off)
    border_nodata = np.zeros(n, dtype=bool)
    black_border = np.zeros(n, dtype=bool)
    read = np.zeros(n, dtype=bool)
    lengths = np.zeros(n, dtype=np.int32)
    values_seen: list[np.ndarray] = []
    counts_seen: list[np.ndarray] = []
    errors: dict[int, str] = {}
    known = np.zeros(0, dtype=np.int64)
    for i in range(n):
        row, col, size = task.row_off[i], task.col_off[i], task.size[i]
        try:
            mask = read_window(datasets[0], row, col, size, task.mask_band)
            values, counts, covered = _value_counts(mask, known)
            ring = _is_nodata(_outer_ring(mask), task.nodata, task.classes)
            if task.border_check is not None:
                image = read_window(datasets[1], row, col, size)
                image_mask = None
                if task.image_has_mask:
                    image_mask = read_window_mask(datasets[1], row, col, size)
                black_border[i] = black_border_sides(image, image_mask, task.border_check)
        except (RasterioError, OSError) as exc:
            errors[i] = gdal_message(exc)
            black_border[i] = False
            continue
        if not covered and len(values) <= COMPARE_UP_TO:
            known = np.union1d(known, values)
        values_seen.append(values)
        counts_seen.append(counts)
        lengths[i] = len(values)
        border_nodata[i] = bool(ring.any())
        read[i] = True
    return WindowCounts(
        np.concatenate(values_seen) if values_seen else np.zeros(0, np.int64),
        np.concatenate(counts_seen) if counts_seen else np.zeros(0, np.int64),
        lengths,
        border_nodata,
        black_border,
        read,
        errors,
    )


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
        self.errors: dict[int, str] = {}

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
            is_nodata = row_nodata == value
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
        counts = np.zeros((self.n, len(class_values)), dtype=np.int64)
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
    mask_paths = records["mask_path"].to_numpy()
    image_paths = records["image_path"].to_numpy()
    row_off = records["row_off"].to_numpy(dtype=np.int64)
    col_off = records["col_off"].to_numpy(dtype=np.int64)
    size = records["patch_size"].to_numpy(dtype=np.int64)
    class_list = np.asarray(sorted(classes), dtype=np.int64) if classes is not None else None
    path_columns = [mask_paths, image_paths] if border_check is not None else [mask_paths]
    partitions = window_partitions(
        path_columns,
        indices,
        row_off,
        col_off,
        block_shapes=block_shapes,
        max_windows=CLUSTER_PARTITION_WINDOWS if compute.distributed else CHUNK_WINDOWS,
    )
    has_mask = image_has_mask or {}
    tasks = [
        CountTask(
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
        for part in partitions
    ]
    merge = CountMerge(len(records), size * size)
    for position, counted in compute.as_completed(count_windows, tasks):
        merge.add(partitions[position].rows, counted)
        tasks[position] = None  # the task's arrays are no longer needed
        if progress:
            progress(len(partitions[position].rows))
    nodata_lookup = {
        path: np.nan if value is None else float(value) for path, value in nodata_by_mask.items()
    }
    row_nodata = records["mask_path"].map(nodata_lookup).to_numpy(dtype=np.float64)
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


def class_entropy(counts: np.ndarray) -> np.ndarray:
    """Return the Shannon entropy (nats) of each row's class distribution; NaN without pixels."""
    proportions = class_proportions(counts)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(proportions > 0, proportions * np.log(proportions), 0.0)
    entropy = -terms.sum(axis=1)
    entropy[np.asarray(counts).sum(axis=1) == 0] = np.nan
    return entropy + 0.0  # turns -0.0 into 0.0


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
    ratio = stats.nodata_pixels / np.maximum(stats.window_pixels, 1)
    return np.where(computed, ratio, np.nan)


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
        columns[f"px_{int(value)}"] = column
    nodata_ratio = stats.nodata_pixels[rows] / np.maximum(stats.window_pixels[rows], 1)
    columns["nodata_ratio"] = np.where(computed, nodata_ratio, np.nan)
    dist = class_dist_json(stats.class_values, counts)
    dist[~computed] = ""
    columns["class_dist_json"] = dist
    columns["class_entropy"] = np.where(computed, class_entropy(counts), np.nan)
    dominant = pd.array(np.zeros(n, dtype=np.int64), dtype="Int64")
    has_pixels = computed & (counts.sum(axis=1) > 0)
    if len(stats.class_values):
        dominant_values = stats.class_values[np.argmax(counts, axis=1)]
        dominant = pd.array(dominant_values, dtype="Int64")
    dominant[~has_pixels] = pd.NA
    columns["dominant_class"] = dominant
    return pd.DataFrame(columns)
