"""Windowed raster reading with rasterio, shared by statistics, embeddings and training.

Windows are square: `patch_size x patch_size` pixels with the top-left corner at
(`row_off`, `col_off`). The readers here never load a whole raster: `window_partitions` groups the
windows by file and orders each file's windows in row-major block order (so each compressed
block is decoded once while it sits in GDAL's cache); a stage opens each file once per
partition, not once per window.

A window on the ground (its corners and bounds in the raster's CRS) lives here too, as in
rasterio's `windows` module: `window_corners` and `tile_bound_columns`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from patchbalance.table import CRS_COLUMN, FOOTPRINT_BOUNDS

log = logging.getLogger(__name__)

# Windows handed to one worker task: large enough that opening the file is negligible, small
# enough that several workers share one big raster.
CHUNK_WINDOWS = 512


@dataclass(frozen=True)
class RasterInfo:
    """What the pipeline needs to know about one raster file."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    crs: str | None
    transform: Affine
    block_shape: tuple[int, int]
    has_mask: bool

    @property
    def has_crs(self) -> bool:
        """Return True when the raster is georeferenced."""
        return self.crs is not None


# The value under which the NaN (or infinite) pixels of a float mask are counted: always nodata.
MISSING_VALUE = np.iinfo(np.int64).min + 1


def nodata_pixels(
    values: np.ndarray, nodata: float | None, classes: np.ndarray | None = None
) -> np.ndarray:
    """Return which mask pixels are not valid: the nodata value, or a value outside `classes`.

    The one rule of SPEC §3.2 for a valid pixel, shared by the statistics, the border check
    and the class-centred window search. NaN and infinite pixels of a float mask (and
    `MISSING_VALUE`, which stands for them in integer counts) are never valid.
    """
    flags = np.zeros(values.shape, dtype=bool) if nodata is None else values == nodata
    flags |= ~np.isfinite(values) if values.dtype.kind == "f" else values == MISSING_VALUE
    if classes is not None:
        flags |= ~np.isin(values, classes)
    return flags


def gdal_message(exc: BaseException) -> str:
    """Return GDAL's error text on one line.

    A failed read raises rasterio's "Read failed. See previous exception for details." with
    GDAL's own errors chained as causes (outermost first, e.g. "IReadBlock failed ...", down
    to "TIFFFillTile:Read error at row ..."). The text is the first real message of that
    chain, with its root cause in brackets when that adds something.
    """
    texts: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(texts) < 16:
        text = " ".join(str(current).split())
        if text and "See previous exception" not in text:
            texts.append(text)
        current = current.__cause__
    if not texts:
        return type(exc).__name__
    first, root = texts[0], texts[-1]
    return first if root in first else f"{first} ({root})"


def open_raster(path: str) -> rasterio.DatasetReader:
    """Return the raster at `path` opened for reading (plain images without a CRS are fine)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def probe_raster(path: str) -> RasterInfo:
    """Return the size, CRS, transform, nodata and block shape of the raster at `path`."""
    with open_raster(path) as dataset:
        crs = dataset.crs.to_string() if dataset.crs else None
        flags = dataset.mask_flag_enums
        has_mask = any(MaskFlags.all_valid not in band_flags for band_flags in flags)
        block_h, block_w = dataset.block_shapes[0] if dataset.block_shapes else (1, dataset.width)
        return RasterInfo(
            path=path,
            width=dataset.width,
            height=dataset.height,
            count=dataset.count,
            dtype=dataset.dtypes[0],
            nodata=dataset.nodata,
            crs=crs,
            transform=dataset.transform,
            block_shape=(int(block_h), int(block_w)),
            has_mask=has_mask,
        )


def probe_rasters(
    paths: Iterable[str], num_workers: int = 1
) -> tuple[dict[str, RasterInfo], dict[str, str]]:
    """Return `(infos, errors)`: a `RasterInfo` per readable path, a GDAL message per failure."""
    unique = sorted(set(paths))
    infos: dict[str, RasterInfo] = {}
    errors: dict[str, str] = {}

    def probe(path: str) -> tuple[str, RasterInfo | None, str | None]:
        if not os.path.exists(path):
            return path, None, "file not found"
        try:
            return path, probe_raster(path), None
        except (RasterioError, OSError, ValueError) as exc:
            return path, None, gdal_message(exc)

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for path, info, error in pool.map(probe, unique):
            if info is not None:
                infos[path] = info
            else:
                errors[path] = error or "unreadable"
    return infos, errors


def check_band(band_counts: Mapping[str, int], band: int, key: str, kind: str = "mask") -> None:
    """Raise `InputError` naming `key` and the first raster (by path) with fewer than `band` bands.

    Args:
        band_counts: the band count of each raster, by path.
        band: the highest 1-based band that will be read.
        key: the configuration key that asks for it (`exclusion.mask_band`, `embeddings.bands`).
        kind: what the rasters are, for the message (`mask`, `image`).
    """
    from patchbalance.errors import InputError

    short = sorted(path for path, count in band_counts.items() if count < band)
    if short:
        more = f" (and {len(short) - 1} more {kind}(s))" if len(short) > 1 else ""
        raise InputError(
            f"{key} is {band}, but the {kind} {short[0]} has {band_counts[short[0]]} "
            f"band(s){more}; set {key} to bands that the {kind}s have (numbered from 1)"
        )


def pair_difference(image: RasterInfo, mask: RasterInfo) -> str:
    """Return how an image and its mask differ in size, transform or CRS ("" when they agree).

    Differing CRS count only when both rasters have one (a mask saved without a CRS is common).
    """
    if (image.width, image.height) != (mask.width, mask.height):
        smaller = (
            "the mask is the smaller one"
            if mask.width * mask.height < image.width * image.height
            else "the image is the smaller one"
        )
        return (
            f"image {image.path} is {image.width}x{image.height} but mask {mask.path} is "
            f"{mask.width}x{mask.height} ({smaller})"
        )
    if not image.transform.almost_equals(mask.transform):
        return f"image {image.path} and mask {mask.path} have different geotransforms"
    if image.crs is not None and mask.crs is not None and not _same_crs(image.crs, mask.crs):
        return f"image {image.path} is in {image.crs} but mask {mask.path} is in {mask.crs}"
    return ""


def _same_crs(first: str, second: str) -> bool:
    """Return whether two CRS strings name the same CRS (spelled alike, or equal to GDAL)."""
    if first == second:
        return True
    try:
        return rasterio.crs.CRS.from_string(first) == rasterio.crs.CRS.from_string(second)
    except RasterioError:
        return False


def windows_in_bounds(
    row_off: np.ndarray,
    col_off: np.ndarray,
    size: np.ndarray,
    height: np.ndarray,
    width: np.ndarray,
) -> np.ndarray:
    """Return a boolean array: True where the whole window lies inside its raster."""
    return (row_off >= 0) & (col_off >= 0) & (row_off + size <= height) & (col_off + size <= width)


def block_order(
    row_off: np.ndarray, col_off: np.ndarray, block_shape: tuple[int, int]
) -> np.ndarray:
    """Return the permutation that visits windows in row-major order of the blocks they start in."""
    block_h, block_w = max(1, block_shape[0]), max(1, block_shape[1])
    return np.lexsort((col_off, row_off, col_off // block_w, row_off // block_h))


def read_window(
    dataset: rasterio.DatasetReader,
    row_off: int,
    col_off: int,
    size: int,
    bands: Sequence[int] | int | None = None,
) -> np.ndarray:
    """Return the pixels of one window: `(bands, size, size)`, or `(size, size)` for an int band."""
    window = Window(int(col_off), int(row_off), int(size), int(size))
    return dataset.read(bands, window=window)


def read_window_mask(
    dataset: rasterio.DatasetReader, row_off: int, col_off: int, size: int
) -> np.ndarray:
    """Return the dataset mask of one window (0 = nodata, 255 = valid), shape `(size, size)`."""
    window = Window(int(col_off), int(row_off), int(size), int(size))
    return dataset.dataset_mask(window=window)


@dataclass(frozen=True)
class WindowPartition:
    """Windows that share their files, in block order: the unit of work of a stage.

    Args:
        paths: the files every window of the partition reads, e.g. `(mask_path,)` or
            `(mask_path, image_path)`.
        rows: the positions of the windows in the records, in the order to read them.
    """

    paths: tuple[str, ...]
    rows: np.ndarray


def window_partitions(
    path_columns: Sequence[np.ndarray],
    indices: np.ndarray,
    row_off: np.ndarray,
    col_off: np.ndarray,
    block_shapes: dict[str, tuple[int, int]] | None = None,
    max_windows: int = CHUNK_WINDOWS,
) -> list[WindowPartition]:
    """Return the windows `indices` grouped by the files they read, each group in block order.

    Args:
        path_columns: arrays (or Series, categorical ones as they are) over all windows naming
            the files each window needs; the first column's file gives the block shape.
        indices: the windows to include.
        row_off: row offsets of all windows.
        col_off: column offsets of all windows.
        block_shapes: the block shape of each file (256 x 256 when unknown).
        max_windows: the most windows per partition; a larger group is cut in block order.

    Returns:
        The partitions, files in their order of first appearance.
    """
    indices = np.asarray(indices, dtype=np.int64)
    selected = pd.DataFrame(
        {
            j: (
                column.iloc[indices].reset_index(drop=True)
                if isinstance(column, pd.Series)
                else np.asarray(column)[indices]
            )
            for j, column in enumerate(path_columns)
        }
    )
    partitions = []
    groups = selected.groupby(list(selected.columns), sort=False, observed=True).indices
    for paths, positions in groups.items():
        paths = tuple(str(p) for p in paths) if isinstance(paths, tuple) else (str(paths),)
        members = indices[positions]
        shape = (block_shapes or {}).get(paths[0], (256, 256))
        ordered = members[block_order(row_off[members], col_off[members], shape)]
        for start in range(0, len(ordered), max_windows):
            partitions.append(WindowPartition(paths, ordered[start : start + max_windows]))
    return partitions


class RasterHandleCache:
    """Open rasterio datasets kept per process, opened lazily on first use.

    Meant for `torch.utils.data.Dataset` objects: each DataLoader worker (a forked process)
    gets its own handles, because handles opened before a fork must not be shared.
    """

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._handles: dict[str, rasterio.DatasetReader] = {}

    def get(self, path: str) -> rasterio.DatasetReader:
        """Return an open dataset for `path`, opening it in this process if needed."""
        if os.getpid() != self._pid:
            self._handles = {}
            self._pid = os.getpid()
        handle = self._handles.get(path)
        if handle is None or handle.closed:
            handle = open_raster(path)
            self._handles[path] = handle
        return handle

    def close(self) -> None:
        """Close every handle this process opened."""
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, object]:
        return {"_pid": -1, "_handles": {}}

    def __setstate__(self, state: dict[str, object]) -> None:
        self._pid = os.getpid()
        self._handles = {}


# --------------------------------------------------------------------------------------------
# Windows on the ground


def _affine_columns(paths: pd.Series, infos: dict[str, RasterInfo]) -> np.ndarray:
    """Return (N, 6) affine coefficients a, b, c, d, e, f per row; NaN for unknown rasters."""
    table = {
        path: (
            info.transform.a,
            info.transform.b,
            info.transform.c,
            info.transform.d,
            info.transform.e,
            info.transform.f,
        )
        for path, info in infos.items()
    }
    codes, uniques = pd.factorize(paths)
    lookup = np.array([table.get(path, (np.nan,) * 6) for path in uniques], dtype=np.float64)
    if len(lookup) == 0:
        return np.full((len(paths), 6), np.nan)
    return lookup[codes]


def window_corners(
    records: pd.DataFrame, infos: dict[str, RasterInfo], path_column: str = "image_path"
) -> tuple[np.ndarray, np.ndarray]:
    """Return the x and y of each window's four corners (N, 4) in its raster's CRS.

    Corners run top-left, bottom-left, bottom-right, top-right in pixel space.
    """
    coeff = _affine_columns(records[path_column], infos)
    row = records["row_off"].to_numpy(dtype=np.float64)
    col = records["col_off"].to_numpy(dtype=np.float64)
    size = records["patch_size"].to_numpy(dtype=np.float64)
    pixel_cols = np.stack([col, col, col + size, col + size], axis=1)
    pixel_rows = np.stack([row, row + size, row + size, row], axis=1)
    a, b, c, d, e, f = (coeff[:, [j]] for j in range(6))
    xs = a * pixel_cols + b * pixel_rows + c
    ys = d * pixel_cols + e * pixel_rows + f
    return xs, ys


def tile_bound_columns(records: pd.DataFrame, infos: dict[str, RasterInfo]) -> pd.DataFrame:
    """Return tile_minx, tile_miny, tile_maxx, tile_maxy and crs per patch.

    Bounds are empty for rasters without a CRS (pixel coordinates are not map bounds) or that
    could not be opened.
    """
    xs, ys = window_corners(records, infos)
    crs_lookup = {path: info.crs or "" for path, info in infos.items()}
    crs = records["image_path"].map(crs_lookup).fillna("").to_numpy(dtype=object)
    georeferenced = crs != ""
    bounds = (xs.min(axis=1), ys.min(axis=1), xs.max(axis=1), ys.max(axis=1))
    columns = {
        name: np.where(georeferenced, bound, np.nan)
        for name, bound in zip(FOOTPRINT_BOUNDS, bounds, strict=True)
    }
    columns[CRS_COLUMN] = crs
    return pd.DataFrame(columns)
