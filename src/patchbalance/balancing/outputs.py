"""Writing the balanced table, the patch footprints and the summary, each atomically."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.warp import transform as transform_coordinates

from patchbalance.atomic import atomic_write_with, atomic_writer
from patchbalance.errors import MissingDependencyError, OutputError
from patchbalance.paths import (
    footprint_format,
)
from patchbalance.table import EXCLUDED, SAMPLER_WEIGHT
from patchbalance.windows import RasterInfo, window_corners

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    pass


FOOTPRINT_PROPERTIES = (
    SAMPLER_WEIGHT,
    "freq_cluster_id",
    "uniqueness_score",
    EXCLUDED,
    "exclusion_reason",
    "image_path",
    "row_off",
    "col_off",
    "patch_size",
)

# The GeoPackage's gpkg_contents.last_change: fixed, so that reruns give the same bytes.
GEOPACKAGE_DATE = "2000-01-01T00:00:00.000Z"


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


def _parse_crs(text: str, path: Path) -> CRS:
    try:
        return CRS.from_user_input(text)
    except CRSError as exc:
        raise OutputError(f"{path}: cannot read the CRS {text!r}: {exc}") from exc


def footprint_rings(
    table: pd.DataFrame, infos: dict[str, RasterInfo], target_crs: str | None, path: Path | str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str | None]:
    """Return the rows with a CRS, their corners' x and y (n, 4) in one CRS, and that CRS.

    `target_crs` None means the CRS of most patches (the first raster's on a tie); rows in
    other CRSs are reprojected to it. Rings are counter-clockwise in the target CRS.
    """
    xs, ys = window_corners(table, infos)
    crs_lookup = {p: info.crs for p, info in infos.items() if info.crs}
    crs_per_row = table["image_path"].map(crs_lookup)
    has_crs = crs_per_row.notna().to_numpy() & np.isfinite(xs).all(axis=1)
    rows = np.flatnonzero(has_crs)
    row_crs = crs_per_row.to_numpy(dtype=object)[rows]
    codes, crs_texts = pd.factorize(row_crs)
    if target_crs is None and len(crs_texts):
        target_crs = str(crs_texts[int(np.argmax(np.bincount(codes)))])
        if len(crs_texts) > 1:
            log.warning(
                "%s: the rasters have %d CRSs; every footprint is written in %s, the CRS of "
                "most patches (GeoJSON keeps them all in WGS 84)",
                path,
                len(crs_texts),
                target_crs,
            )
    x, y = xs[rows], ys[rows]
    if target_crs is not None:
        target = _parse_crs(target_crs, path)
        for code, crs_text in enumerate(crs_texts):
            if crs_text == target_crs:
                continue  # coordinates in the target CRS stay exactly as computed
            source = _parse_crs(crs_text, path)
            if source == target:
                continue
            chosen = codes == code
            out_x, out_y = transform_coordinates(
                source, target, x[chosen].ravel(), y[chosen].ravel()
            )
            x[chosen] = np.asarray(out_x).reshape(-1, 4)
            y[chosen] = np.asarray(out_y).reshape(-1, 4)
    # Exterior rings counter-clockwise (RFC 7946, GeoParquet's `orientation`): reverse the rings
    # the shoelace says are not.
    signed_area = 0.5 * (x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y).sum(axis=1)
    clockwise = signed_area < 0
    x[clockwise] = x[clockwise][:, ::-1]
    y[clockwise] = y[clockwise][:, ::-1]
    missing = len(table) - rows.size
    if missing:
        log.warning(
            "%d patch(es) come from rasters without a CRS and are left out of %s", missing, path
        )
    return rows, x, y, target_crs


def write_footprints(table: pd.DataFrame, infos: dict[str, RasterInfo], path: Path) -> int:
    """Write one Polygon per patch with a CRS in the format of `path`'s extension; return the count.

    `.geojson`: WGS 84 longitude/latitude (RFC 7946). `.gpkg` (GeoPackage, with its R-tree
    spatial index) and `.parquet` (GeoParquet 1.1, with a bbox covering column): the rasters'
    CRS. Every format carries the `FOOTPRINT_PROPERTIES` columns that `table` has, and is
    written atomically. Patches of rasters without a CRS are left out (a warning says how many).
    """
    path = Path(path)
    kind = footprint_format(path)
    if kind == "geojson":
        return write_geojson(table, infos, path)
    rows, x, y, crs_text = footprint_rings(table, infos, None, path)
    names = [name for name in FOOTPRINT_PROPERTIES if name in table.columns]
    properties = table.loc[table.index[rows], names].reset_index(drop=True)
    geometry = polygon_wkb(x, y)
    if kind == "geopackage":
        _write_geopackage(path, geometry, properties, crs_text)
    else:
        _write_geoparquet(path, geometry, x, y, properties, crs_text)
    return int(rows.size)


def polygon_wkb(x: np.ndarray, y: np.ndarray, srid: int | None = None) -> np.ndarray:
    """Return little-endian WKB Polygons (one closed ring each) for corners x, y of shape (n, 4).

    With `srid`, the geometries are PostGIS EWKB carrying that SRID.
    """
    n = x.shape[0]
    fields: list[tuple[Any, ...]] = [("order", "u1"), ("type", "<u4")]
    if srid is not None:
        fields.append(("srid", "<u4"))
    fields += [("rings", "<u4"), ("points", "<u4"), ("xy", "<f8", (10,))]
    record = np.dtype(fields)
    buffer = np.empty(n, dtype=record)
    buffer["order"] = 1
    buffer["type"] = 3 if srid is None else 3 | 0x20000000  # EWKB's "has SRID" flag
    if srid is not None:
        buffer["srid"] = srid
    buffer["rings"] = 1
    buffer["points"] = 5
    ring = np.empty((n, 5, 2))
    ring[:, :4, 0], ring[:, :4, 1] = x, y
    ring[:, 4] = ring[:, 0]
    buffer["xy"] = ring.reshape(n, 10)
    import pyarrow as pa

    fixed = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(record.itemsize), n, [None, pa.py_buffer(buffer.tobytes())]
    )
    return fixed.to_numpy(zero_copy_only=False)


_HEX_DIGITS = np.array([f"{value:02X}" for value in range(256)], dtype="<U2")


def wkb_hex(geometry: np.ndarray) -> np.ndarray:
    """Return each WKB geometry of equal length as upper-case hex text (PostGIS's input form)."""
    if len(geometry) == 0:
        return np.array([], dtype=object)
    width = len(geometry[0])
    octets = np.frombuffer(b"".join(geometry), dtype=np.uint8).reshape(-1, width)
    return np.ascontiguousarray(_HEX_DIGITS[octets]).view(f"<U{2 * width}").ravel()


def check_footprint_writer(kind: str) -> None:
    """Raise `MissingDependencyError` when the footprint format `kind` cannot be written here."""
    if kind == "geopackage":
        try:
            import pyogrio  # noqa: F401
        except ImportError as exc:
            raise MissingDependencyError(
                "pyogrio (GeoPackage footprints)", "footprints", "pyogrio"
            ) from exc


def _write_geopackage(
    path: Path, geometry: np.ndarray, properties: pd.DataFrame, crs_text: str | None
) -> None:
    check_footprint_writer("geopackage")
    from pyogrio import get_gdal_config_option, set_gdal_config_options
    from pyogrio.raw import write as ogr_write

    fields = [_ogr_column(properties[name]) for name in properties.columns]

    def write(temporary: Path) -> None:
        # gpkg_contents.last_change would hold the time of writing: a fixed date keeps reruns
        # byte-identical, as the other outputs are (SPEC §4).
        before = get_gdal_config_option("OGR_CURRENT_DATE")
        set_gdal_config_options({"OGR_CURRENT_DATE": GEOPACKAGE_DATE})
        try:
            ogr_write(
                temporary,
                geometry,
                fields,
                list(properties.columns),
                layer=path.stem,
                driver="GPKG",
                geometry_type="Polygon",
                crs=crs_text,
                encoding="UTF-8",
                layer_options={"SPATIAL_INDEX": "YES"},
            )
        finally:
            set_gdal_config_options({"OGR_CURRENT_DATE": before})

    atomic_write_with(path, write)


def _ogr_column(column: pd.Series) -> np.ndarray:
    """Return a column as the numpy array pyogrio writes: bool, int64, float64 (NaN = null) or str."""
    if pd.api.types.is_bool_dtype(column):
        return column.to_numpy(dtype=bool)
    if pd.api.types.is_integer_dtype(column) and not column.isna().any():
        return column.to_numpy(dtype=np.int64)
    if pd.api.types.is_numeric_dtype(column):
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    return column.astype(object).where(column.notna(), None).to_numpy(dtype=object)


def _write_geoparquet(
    path: Path,
    geometry: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    properties: pd.DataFrame,
    crs_text: str | None,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    bbox = pa.StructArray.from_arrays(
        [pa.array(v) for v in (x.min(axis=1), y.min(axis=1), x.max(axis=1), y.max(axis=1))],
        names=["xmin", "ymin", "xmax", "ymax"],
    )
    table = pa.Table.from_pandas(properties, preserve_index=False)
    table = table.append_column("geometry", pa.array(geometry, type=pa.binary()))
    table = table.append_column("bbox", bbox)
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": ["Polygon"],
        "orientation": "counterclockwise",
        "covering": {"bbox": {key: ["bbox", key] for key in ("xmin", "ymin", "xmax", "ymax")}},
    }
    if len(geometry):
        column["bbox"] = [float(x.min()), float(y.min()), float(x.max()), float(y.max())]
    if crs_text is not None:
        column["crs"] = _parse_crs(crs_text, path).to_dict(projjson=True)
    geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}
    metadata = dict(table.schema.metadata or {})
    metadata[b"geo"] = json.dumps(geo).encode("utf-8")
    table = table.replace_schema_metadata(metadata)
    atomic_write_with(path, lambda temporary: pq.write_table(table, temporary))


def write_geojson(table: pd.DataFrame, infos: dict[str, RasterInfo], path: Path) -> int:
    """Write one WGS 84 lon/lat Polygon per patch with a CRS (RFC 7946); return the count.

    Patches of rasters without a CRS are left out (a warning says how many).
    """
    rows, lon, lat, _ = footprint_rings(table, infos, "EPSG:4326", Path(path))
    names = [name for name in FOOTPRINT_PROPERTIES if name in table.columns]
    property_columns = {name: table[name].to_numpy(dtype=object)[rows] for name in names}
    lon_rounded = np.round(lon, 9)
    lat_rounded = np.round(lat, 9)

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
