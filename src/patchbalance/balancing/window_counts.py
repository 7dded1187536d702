"""Counting the windows of one partition: the work a scheduler's worker does (SPEC §3.2, §10).

`count_windows` takes a `CountTask` (the windows of one mask in block order, plus what is
needed to judge nodata) and returns a `WindowCounts` of flat numeric arrays: each window's
distinct values and their pixel counts, and its border flags. Overlapping windows are counted
from one read of their bounding box with running sums; other windows are read one by one and
counted with `numpy` comparisons or `numpy.bincount`. The client merges the results
(`stats.CountMerge`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from rasterio.errors import RasterioError
from rasterio.windows import Window

from patchbalance.errors import InputError
from patchbalance.windows import (
    MISSING_VALUE,
    gdal_message,
    nodata_pixels,
    open_raster,
    read_window,
    read_window_mask,
)

# Windows counted from one box: their box stays small enough for the CPU caches.
BOX_WINDOWS = 512
# The largest bounding box (pixels) a partition's windows are counted from in one read.
BOX_PIXELS_MAX = 64 * 2**20


@dataclass(frozen=True)
class BorderCheck:
    """Settings of the image black-border check."""

    tolerance: float
    min_fraction: float


# Up to this many known values, counting by comparison beats np.bincount on a window.
COMPARE_UP_TO = 16


class FractionalMaskValue(ValueError):
    """A float mask holds a value that is not a whole number, so it names no class."""

    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


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
        fractional = finite & (flat != np.round(flat))
        if fractional.any():
            raise FractionalMaskValue(float(flat[fractional][0]))
        missing = flat.size - int(np.count_nonzero(finite))
        if missing:
            # NaN marks missing labels in float masks: counted under a value no class takes.
            values, counts, _ = (
                _value_counts(flat[finite].astype(np.int64))
                if missing < flat.size
                else (np.zeros(0, np.int64), np.zeros(0, np.int64), False)
            )
            return np.append(values, MISSING_VALUE), np.append(counts, missing), False
        flat = flat.astype(np.int64)
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
    # Window position -> (the file that failed: mask or image, GDAL's reason).
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)


def count_windows(task: CountTask) -> WindowCounts:
    """Return the value counts and border flags of the task's windows; each file opens once.

    A `RasterioError` or `OSError` on a window (or on opening a file) is recorded in `errors`
    by the window's position in the task, with the file that failed (the mask, or the image
    read for the black-border check), so one bad file never aborts the run.
    """
    n = len(task.row_off)
    paths = [task.mask_path]
    if task.border_check is not None and task.image_path is not None:
        paths.append(task.image_path)
    datasets = []
    try:
        for path in paths:
            datasets.append(open_raster(path))
    except (RasterioError, OSError) as exc:
        for dataset in datasets:  # the mask, when only the image failed
            dataset.close()
        message = (path, gdal_message(exc))
        nothing = np.zeros(n, dtype=bool)
        return WindowCounts(
            np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(n, dtype=np.int32),
            nothing, nothing.copy(), nothing.copy(), {i: message for i in range(n)},
        )  # fmt: skip
    try:
        return _concatenate(
            [
                _count_from_box(run, datasets[0]) or _count_each_window(run, datasets)
                for run in _runs(task, BOX_WINDOWS)
            ]
        )
    finally:
        for dataset in datasets:
            dataset.close()


def _runs(task: CountTask, length: int) -> list[CountTask]:
    """Return the task cut into consecutive tasks of at most `length` windows."""
    if len(task.row_off) <= length:
        return [task]
    return [
        replace(
            task,
            row_off=task.row_off[start : start + length],
            col_off=task.col_off[start : start + length],
            size=task.size[start : start + length],
        )
        for start in range(0, len(task.row_off), length)
    ]


def _concatenate(parts: list[WindowCounts]) -> WindowCounts:
    """Return the counts of consecutive runs of windows as the counts of all of them."""
    if len(parts) == 1:
        return parts[0]
    errors: dict[int, tuple[str, str]] = {}
    offset = 0
    for part in parts:
        errors.update({offset + i: message for i, message in part.errors.items()})
        offset += len(part.lengths)
    return WindowCounts(
        values=np.concatenate([p.values for p in parts]),
        counts=np.concatenate([p.counts for p in parts]),
        lengths=np.concatenate([p.lengths for p in parts]),
        border_nodata=np.concatenate([p.border_nodata for p in parts]),
        black_border=np.concatenate([p.black_border for p in parts]),
        read=np.concatenate([p.read for p in parts]),
        errors=errors,
    )


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
    # int32 holds any count of a box of at most BOX_PIXELS_MAX pixels, at half the memory
    # traffic of int64.
    along = np.zeros((height, width + 1), dtype=np.int32)
    np.cumsum(indicator, axis=1, dtype=np.int32, out=along[:, 1:])
    spans, span_of = spans
    across = np.ascontiguousarray((along[:, spans[:, 1]] - along[:, spans[:, 0]]).T)
    down = np.zeros((len(spans), height + 1), dtype=np.int32)
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
    nodata = nodata_pixels(strip, task.nodata, task.classes)
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
    errors: dict[int, tuple[str, str]] = {}
    known = np.zeros(0, dtype=np.int64)
    for i in range(n):
        row, col, size = task.row_off[i], task.col_off[i], task.size[i]
        reading = task.mask_path
        try:
            mask = read_window(datasets[0], row, col, size, task.mask_band)
            values, counts, covered = _value_counts(mask, known)
            ring = nodata_pixels(_outer_ring(mask), task.nodata, task.classes)
            if task.border_check is not None:
                reading = str(task.image_path)
                image = read_window(datasets[1], row, col, size)
                image_mask = None
                if task.image_has_mask:
                    image_mask = read_window_mask(datasets[1], row, col, size)
                black_border[i] = black_border_sides(image, image_mask, task.border_check)
        except (RasterioError, OSError) as exc:
            errors[i] = (reading, gdal_message(exc))
            continue
        except FractionalMaskValue as exc:
            raise InputError(
                f"{task.mask_path}: the mask holds the value {exc.value:g}, which is no class "
                f"(window row_off {row}, col_off {col}); class values are whole numbers: "
                "resample masks with nearest neighbour, or round them"
            ) from None
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
