"""Per-patch mask statistics (SPEC §3.2) and the pixel-level border checks of SPEC §3.3.

One pass over the windows reads each mask window (and, when the black-border check is on, the
image window), counts its values with `numpy.bincount` and looks at its outer ring. Results go
into arrays preallocated for all patches; the class set is fixed at the end from the values seen
(or from `clustering.classes`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from patchbalance.table import class_proportions
from patchbalance.windows import for_each_window, read_window, read_window_mask

# Distinct values remembered per window in the dense buffer; windows with more spill to a dict.
VALUES_PER_WINDOW = 16


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
) -> MaskStatistics:
    """Return the statistics of the windows `indices` of `records` (other rows stay empty).

    `nodata_by_mask` gives the nodata value of each mask file (None = no nodata). When
    `classes` is given, values outside it count as nodata. With `border_check`, the image window
    is read too and tested for a black border.
    """
    n = len(records)
    mask_paths = records["mask_path"].to_numpy()
    image_paths = records["image_path"].to_numpy()
    row_off = records["row_off"].to_numpy(dtype=np.int64)
    col_off = records["col_off"].to_numpy(dtype=np.int64)
    size = records["patch_size"].to_numpy(dtype=np.int64)
    class_list = np.asarray(sorted(classes), dtype=np.int64) if classes is not None else None

    buffer_values = np.zeros((n, VALUES_PER_WINDOW), dtype=np.int64)
    buffer_counts = np.zeros((n, VALUES_PER_WINDOW), dtype=np.int64)
    buffer_used = np.zeros(n, dtype=np.int16)
    spilled: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    border_nodata = np.zeros(n, dtype=bool)
    black_border = np.zeros(n, dtype=bool)
    read = np.zeros(n, dtype=bool)
    lock = threading.Lock()
    image_has_mask = image_has_mask or {}

    def is_nodata(values: np.ndarray, nodata: float | None) -> np.ndarray:
        flags = np.zeros(values.shape, dtype=bool) if nodata is None else values == nodata
        if class_list is not None:
            flags |= ~np.isin(values, class_list)
        return flags

    known_values = np.zeros(0, dtype=np.int64)

    def handle(datasets: Sequence, i: int) -> None:
        nonlocal known_values
        mask = read_window(datasets[0], row_off[i], col_off[i], size[i], mask_band)
        values, counts, covered = _value_counts(mask, known_values)
        if not covered and len(values) <= COMPARE_UP_TO:
            with lock:
                known_values = np.union1d(known_values, values)
        used = len(values)
        if used <= VALUES_PER_WINDOW:
            buffer_values[i, :used] = values
            buffer_counts[i, :used] = counts
            buffer_used[i] = used
        else:
            with lock:
                spilled[i] = (values, counts)
        border_nodata[i] = bool(
            is_nodata(_outer_ring(mask), nodata_by_mask.get(mask_paths[i])).any()
        )
        if border_check is not None:
            image = read_window(datasets[1], row_off[i], col_off[i], size[i])
            image_mask = None
            if image_has_mask.get(image_paths[i], False):
                image_mask = read_window_mask(datasets[1], row_off[i], col_off[i], size[i])
            black_border[i] = black_border_sides(image, image_mask, border_check)
        read[i] = True

    path_columns = [mask_paths, image_paths] if border_check is not None else [mask_paths]
    errors = for_each_window(
        path_columns,
        np.asarray(indices, dtype=np.int64),
        row_off,
        col_off,
        handle,
        block_shapes=block_shapes,
        num_workers=num_workers,
        progress=progress,
    )
    read[list(errors)] = False

    # Flatten the (patch, value, count) triplets and turn them into a dense count matrix.
    slot = np.arange(VALUES_PER_WINDOW)[None, :] < buffer_used[:, None]
    rows = np.broadcast_to(np.arange(n)[:, None], slot.shape)[slot]
    values = buffer_values[slot]
    counts = buffer_counts[slot]
    if spilled:
        extra_rows = np.concatenate([np.full(len(v), i) for i, (v, _) in spilled.items()])
        rows = np.concatenate((rows, extra_rows))
        values = np.concatenate((values, *[v for v, _ in spilled.values()]))
        counts = np.concatenate((counts, *[c for _, c in spilled.values()]))
    keep = read[rows]
    rows, values, counts = rows[keep], values[keep], counts[keep]

    nodata_lookup = {
        path: np.nan if value is None else float(value) for path, value in nodata_by_mask.items()
    }
    row_nodata = pd.Series(mask_paths, dtype=object).map(nodata_lookup).to_numpy(dtype=np.float64)
    nodata_flag = values == row_nodata[rows]
    outside = np.zeros_like(nodata_flag)
    if class_list is not None:
        outside = ~np.isin(values, class_list) & ~nodata_flag
        class_values = class_list
    else:
        class_values = np.unique(values[~nodata_flag])
    invalid = nodata_flag | outside
    nodata_pixels = np.bincount(rows[invalid], weights=counts[invalid], minlength=n).astype(
        np.int64
    )
    valid_rows, valid_values, valid_counts = rows[~invalid], values[~invalid], counts[~invalid]
    column = np.searchsorted(class_values, valid_values)
    dense = np.zeros((n, len(class_values)), dtype=np.int64)
    np.add.at(dense, (valid_rows, column), valid_counts)
    return MaskStatistics(
        class_values=class_values,
        counts=dense,
        nodata_pixels=nodata_pixels,
        window_pixels=size * size,
        border_nodata=border_nodata & read,
        black_border=black_border & read,
        read=read,
        errors=errors,
        outside_class_pixels=int(counts[outside].sum()),
    )


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


def statistics_columns(stats: MaskStatistics, computed: np.ndarray) -> pd.DataFrame:
    """Return the SPEC §3.2 columns; rows where `computed` is False are left empty."""
    n = len(stats.counts)
    columns: dict[str, object] = {}
    for c, value in enumerate(stats.class_values):
        column = pd.array(stats.counts[:, c], dtype="Int64")
        column[~computed] = pd.NA
        columns[f"px_{int(value)}"] = column
    nodata_ratio = stats.nodata_pixels / np.maximum(stats.window_pixels, 1)
    columns["nodata_ratio"] = np.where(computed, nodata_ratio, np.nan)
    dist = class_dist_json(stats.class_values, stats.counts)
    dist[~computed] = ""
    columns["class_dist_json"] = dist
    columns["class_entropy"] = np.where(computed, class_entropy(stats.counts), np.nan)
    dominant = pd.array(np.zeros(n, dtype=np.int64), dtype="Int64")
    has_pixels = computed & (stats.counts.sum(axis=1) > 0)
    if len(stats.class_values):
        dominant_values = stats.class_values[np.argmax(stats.counts, axis=1)]
        dominant = pd.array(dominant_values, dtype="Int64")
    dominant[~has_pixels] = pd.NA
    columns["dominant_class"] = dominant
    return pd.DataFrame(columns)
