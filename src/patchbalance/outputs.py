"""Writing the balanced table, the GeoJSON footprints and the summary, each atomically."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.warp import transform as transform_coordinates

from patchbalance.errors import OutputError
from patchbalance.windows import RasterInfo

log = logging.getLogger(__name__)


def check_writable(path: Path, what: str) -> None:
    """Raise `OutputError` unless a file can be written at `path`.

    `path` must not be a folder; its folder must exist (or be made here) and take a test
    file, created and deleted at once. The test file is the only check that holds as root
    (where permission bits stop nothing) and on /proc or read-only mounts.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(
            f"{path}: {what} names a folder, not a file; give a file name in that folder"
        )
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{path}: cannot create the output folder for {what}: {exc.strerror}"
        ) from exc
    _write_test_file(folder, path, what)


def check_writable_folder(folder: Path, what: str) -> None:
    """Raise `OutputError` unless files can be written in `folder` (made later when missing).

    An existing `folder` must be a folder that takes a test file; a missing one needs its
    nearest existing parent to. Nothing is left behind.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: {what} is a file, not a folder; give a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{folder}: cannot create {what}: {existing} is a file, not a folder")
    _write_test_file(existing, folder, what)


def _write_test_file(folder: Path, target: Path, what: str) -> None:
    try:
        handle, probe = tempfile.mkstemp(prefix=".patchbalance-write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(
            f"{target}: cannot write {what} in {folder} ({reason}); choose a writable folder"
        ) from None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def publish(temporary: str | os.PathLike[str], path: Path) -> None:
    """Move a finished temporary file onto `path` with ordinary file permissions.

    `tempfile.mkstemp` creates files readable by their owner only; an output should get the
    permissions any new file gets (0666 less the umask), so others can read the tables.
    """
    os.chmod(temporary, 0o666 & ~_umask())
    os.replace(temporary, path)


@contextmanager
def atomic_writer(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Yield a temporary file next to `path` that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(handle, mode, encoding=encoding) as stream:
            yield stream
        publish(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temporary_path)` and move the result onto `path` only if it succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent
    )
    os.close(handle)
    try:
        write(Path(temporary))
        publish(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Write `table` as Parquet when `path` ends in .parquet, else as CSV, atomically."""
    path = Path(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        atomic_write_with(path, lambda tmp: table.to_parquet(tmp, index=False))
    else:
        with atomic_writer(path, "w") as stream:
            table.to_csv(stream, index=False, lineterminator="\n")


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_writer(Path(path), "w") as stream:
        json.dump(data, stream, indent=2, default=_json_default)
        stream.write("\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


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
    columns = pd.DataFrame(
        {
            "tile_minx": np.where(georeferenced, xs.min(axis=1), np.nan),
            "tile_miny": np.where(georeferenced, ys.min(axis=1), np.nan),
            "tile_maxx": np.where(georeferenced, xs.max(axis=1), np.nan),
            "tile_maxy": np.where(georeferenced, ys.max(axis=1), np.nan),
            "crs": crs,
        }
    )
    return columns


GEOJSON_PROPERTIES = (
    "sampler_weight",
    "freq_cluster_id",
    "uniqueness_score",
    "excluded",
    "exclusion_reason",
    "image_path",
    "row_off",
    "col_off",
    "patch_size",
)


def _property_value(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating | float):
        return None if not math.isfinite(float(value)) else float(value)
    return value


def write_geojson(table: pd.DataFrame, infos: dict[str, RasterInfo], path: Path) -> int:
    """Write one WGS 84 lon/lat Polygon per patch with a CRS (RFC 7946); return the count.

    Patches of rasters without a CRS are left out (a warning says how many).
    """
    xs, ys = window_corners(table, infos)
    crs_lookup = {p: info.crs for p, info in infos.items() if info.crs}
    crs_per_row = table["image_path"].map(crs_lookup)
    has_crs = crs_per_row.notna().to_numpy() & np.isfinite(xs).all(axis=1)
    lon = np.full_like(xs, np.nan)
    lat = np.full_like(ys, np.nan)
    for crs_text in pd.unique(crs_per_row[has_crs]):
        rows = np.flatnonzero(has_crs & (crs_per_row == crs_text).to_numpy())
        try:
            source = CRS.from_user_input(crs_text)
        except CRSError as exc:
            raise OutputError(f"{path}: cannot reproject from CRS {crs_text!r}: {exc}") from exc
        out_x, out_y = transform_coordinates(
            source, "EPSG:4326", xs[rows].ravel(), ys[rows].ravel()
        )
        lon[rows] = np.asarray(out_x).reshape(-1, 4)
        lat[rows] = np.asarray(out_y).reshape(-1, 4)
    # RFC 7946: exterior rings are counter-clockwise. Reverse rings the shoelace says are not.
    signed_area = 0.5 * (lon * np.roll(lat, -1, axis=1) - np.roll(lon, -1, axis=1) * lat).sum(
        axis=1
    )
    clockwise = signed_area < 0
    lon[clockwise] = lon[clockwise][:, ::-1]
    lat[clockwise] = lat[clockwise][:, ::-1]

    names = [name for name in GEOJSON_PROPERTIES if name in table.columns]
    rows = np.flatnonzero(has_crs)
    property_columns = {name: table[name].to_numpy(dtype=object)[rows] for name in names}
    lon_rounded = np.round(lon[rows], 9)
    lat_rounded = np.round(lat[rows], 9)
    missing = int((~has_crs).sum())
    if missing:
        log.warning(
            "%d patch(es) come from rasters without a CRS and are left out of %s", missing, path
        )

    with atomic_writer(Path(path), "w") as stream:
        stream.write('{"type": "FeatureCollection", "features": [\n')
        for j in range(len(rows)):  # one feature per patch: the file is text by definition
            ring = [[lon_rounded[j, c], lat_rounded[j, c]] for c in range(4)]
            ring.append(ring[0])
            feature = {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {name: _property_value(property_columns[name][j]) for name in names},
            }
            if j:
                stream.write(",\n")
            stream.write(json.dumps(feature))
        stream.write("\n]}\n")
    return len(rows)
