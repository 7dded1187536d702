"""Footprint files (GeoPackage, GeoParquet, GeoJSON): geometry, CRS, properties, atomicity."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyogrio
import pyogrio.raw
import pytest
import rasterio
import shapely
from pyproj import CRS as ProjCRS
from pyproj import Transformer
from rasterio.transform import from_origin
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds

from patchbalance.balancing.pipeline import run_build
from patchbalance.config import config_from_mapping
from patchbalance.errors import ConfigError
from rasters import record, write_pair

PROPERTIES = [
    "sampler_weight",
    "freq_cluster_id",
    "excluded",
    "exclusion_reason",
    "image_path",
    "row_off",
    "col_off",
    "patch_size",
]


def _mask(rng: np.random.Generator, size: int) -> np.ndarray:
    mask = rng.integers(0, 3, (size, size)).astype(np.uint8)
    mask[: size // 2, : size // 3] = 1
    return mask


@pytest.fixture()
def mixed_crs_scene(tmp_path):
    """Two UTM zones (most patches in 40N), 2 m pixels, and one raster without a CRS."""
    rng = np.random.default_rng(7)
    east = write_pair(
        tmp_path, "east", _mask(rng, 128), transform=from_origin(300_000, 2_780_000, 2.0, 2.0)
    )
    west = write_pair(
        tmp_path,
        "west",
        _mask(rng, 64),
        crs="EPSG:32639",
        transform=from_origin(800_000, 2_790_000, 2.0, 2.0),
    )
    plain = write_pair(tmp_path, "plain", _mask(rng, 64), crs=None)
    records = [record(*east, r, c, 32) for r in range(0, 128, 32) for c in range(0, 128, 32)]
    records += [record(*west, r, c, 32) for r in (0, 32) for c in (0, 32)]
    records += [record(*plain, 0, 0, 32)]
    records += [record(*east, 112, 112, 32)]  # runs off the raster: excluded, still a footprint
    return tmp_path, records


def _build(folder, records, **output):
    config = config_from_mapping(
        {
            "input": {"patch_records": records},
            "clustering": {"k_min": 2, "k_max": 3},
            "output": {"csv_path": str(folder / "out" / "table.parquet"), **output},
            "num_workers": 1,
        },
        base_dir=folder,
    )
    return run_build(config)


def _expected_polygons(table: pd.DataFrame, target: str) -> list[shapely.Polygon]:
    """Each georeferenced window's corners from rasterio, reprojected with pyproj to `target`."""
    polygons = []
    for path, row_off, col_off, size in table[
        ["image_path", "row_off", "col_off", "patch_size"]
    ].itertuples(index=False):
        with rasterio.open(path) as dataset:
            west, south, east, north = window_bounds(
                Window(col_off, row_off, size, size), dataset.transform
            )
            source = dataset.crs.to_string()
        corners = np.array([(west, north), (west, south), (east, south), (east, north)])
        if source != target:
            transformer = Transformer.from_crs(source, target, always_xy=True)
            corners = np.column_stack(transformer.transform(corners[:, 0], corners[:, 1]))
        polygons.append(shapely.Polygon(corners))
    return polygons


def _read_back(path, kind):
    """Return (CRS, WKB geometries, {field: values}) read with pyogrio (geopandas for GeoParquet
    when this GDAL has no Parquet driver)."""
    if kind != "geoparquet" or "Parquet" in pyogrio.list_drivers():
        meta, _, geometry, values = pyogrio.raw.read(path)
        return meta["crs"], geometry, dict(zip(meta["fields"], values, strict=True))
    import geopandas

    frame = geopandas.read_parquet(path)
    crs = frame.crs.to_string()
    return (
        crs,
        shapely.to_wkb(frame.geometry.to_numpy()),
        {name: frame[name].to_numpy() for name in frame.columns if name != "geometry"},
    )


@pytest.mark.parametrize(
    ("name", "kind", "crs"),
    [
        ("footprints.gpkg", "geopackage", "EPSG:32640"),
        ("footprints.parquet", "geoparquet", "EPSG:32640"),
        ("footprints.geojson", "geojson", "EPSG:4326"),
    ],
)
def test_footprints_read_back_equal_the_reprojected_window_bounds(mixed_crs_scene, name, kind, crs):
    folder, records = mixed_crs_scene
    path = folder / "out" / name
    result = _build(folder, records, footprints_path=str(path))
    assert result.outputs[kind] == str(path)
    table = result.table
    placed = table[table["crs"] != ""].reset_index(drop=True)
    assert len(placed) == len(table) - 1  # the raster without a CRS has no footprint
    assert result.summary[f"{kind}_features"] == len(placed)

    read_crs, geometry, fields = _read_back(path, kind)
    assert ProjCRS.from_user_input(read_crs) == ProjCRS.from_user_input(crs)
    polygons = shapely.from_wkb(geometry)
    assert len(polygons) == len(placed)
    expected = _expected_polygons(placed, crs)
    tolerance = 1e-7 if kind == "geojson" else 1e-6  # degrees; metres
    for got, want in zip(polygons, expected, strict=True):
        assert got.geom_type == "Polygon" and got.exterior.is_ccw
        assert shapely.equals_exact(shapely.normalize(got), shapely.normalize(want), tolerance)
    in_target = placed["crs"].to_numpy() == "EPSG:32640"
    if kind != "geojson":
        # Windows of the majority CRS keep the table's exact bounds, unreprojected.
        bounds = shapely.bounds(polygons)[in_target]
        columns = ["tile_minx", "tile_miny", "tile_maxx", "tile_maxy"]
        np.testing.assert_array_equal(bounds, placed.loc[in_target, columns].to_numpy())

    for column in PROPERTIES:
        got = np.asarray(fields[column])
        want = placed[column].to_numpy()
        if column == "sampler_weight":
            np.testing.assert_allclose(got.astype(float), want)
        else:
            assert [str(v) if v is not None else "" for v in got] == [str(v) for v in want]
    assert not list((folder / "out").glob(".*"))  # no temporary files left behind


def test_geopackage_has_an_rtree_spatial_index(mixed_crs_scene):
    folder, records = mixed_crs_scene
    path = folder / "out" / "patches.gpkg"
    _build(folder, records, footprints_path=str(path))
    assert pyogrio.list_layers(path)[:, 0].tolist() == ["patches"]
    with sqlite3.connect(path) as connection:
        extensions = connection.execute(
            "SELECT table_name, extension_name FROM gpkg_extensions"
        ).fetchall()
        indexed = connection.execute("SELECT count(*) FROM rtree_patches_geom").fetchone()[0]
    assert ("patches", "gpkg_rtree_index") in extensions
    assert indexed == pyogrio.read_info(path)["features"]


def test_geoparquet_metadata_declares_wkb_polygons_crs_and_bbox_covering(mixed_crs_scene):
    folder, records = mixed_crs_scene
    path = folder / "out" / "patches.parquet"
    table = _build(folder, records, footprints_path=str(path)).table
    geo = json.loads(pq.read_schema(path).metadata[b"geo"])
    column = geo["columns"][geo["primary_column"]]
    assert geo["version"] == "1.1.0"
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["Polygon"]
    assert ProjCRS.from_json_dict(column["crs"]) == ProjCRS.from_epsg(32640)
    written = pq.read_table(path).to_pandas()
    boxes = pd.DataFrame(list(written["bbox"]))
    np.testing.assert_allclose(
        column["bbox"],
        [boxes["xmin"].min(), boxes["ymin"].min(), boxes["xmax"].max(), boxes["ymax"].max()],
    )
    placed = table[table["crs"] != ""].reset_index(drop=True)
    in_target = (placed["crs"] == "EPSG:32640").to_numpy()
    np.testing.assert_array_equal(
        boxes.loc[in_target, ["xmin", "ymin", "xmax", "ymax"]].to_numpy(),
        placed.loc[in_target, ["tile_minx", "tile_miny", "tile_maxx", "tile_maxy"]].to_numpy(),
    )


@pytest.mark.skipif(shutil.which("ogrinfo") is None, reason="GDAL's ogrinfo is not installed")
@pytest.mark.parametrize("name", ["patches.gpkg", "patches.geojson", "patches.parquet"])
def test_ogrinfo_opens_the_footprints(mixed_crs_scene, name):
    folder, records = mixed_crs_scene
    path = folder / "out" / name
    n = _build(folder, records, footprints_path=str(path)).table["crs"].ne("").sum()
    drivers = subprocess.run(["ogrinfo", "--formats"], capture_output=True, text=True).stdout
    if name.endswith(".parquet") and "Parquet" not in drivers:
        pytest.skip("this GDAL has no Parquet driver (Debian builds GDAL without Arrow)")
    report = subprocess.run(
        ["ogrinfo", "-ro", "-so", "-al", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert f"Feature Count: {n}" in report
    assert "sampler_weight" in report


def test_a_failed_footprint_write_keeps_the_previous_file(mixed_crs_scene, monkeypatch):
    folder, records = mixed_crs_scene
    path = folder / "out" / "patches.gpkg"
    _build(folder, records, footprints_path=str(path))
    before = path.read_bytes()

    def broken_write(temporary, *args, **kwargs):
        temporary.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pyogrio.raw, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        _build(folder, records, footprints_path=str(path))
    assert path.read_bytes() == before
    assert not list((folder / "out").glob(".*"))


def test_geojson_path_is_a_synonym_of_footprints_path(tmp_path):
    def output(**keys):
        return config_from_mapping(
            {"input": {"records_path": "r.csv"}, "output": {"csv_path": "t.csv", **keys}},
            base_dir=tmp_path,
        ).output

    # Paths are absolute once loaded: relative ones are taken against the config's folder.
    assert output(geojson_path="p.geojson").footprints_path == str(tmp_path / "p.geojson")
    assert output(geojson_path="p.gpkg").footprints_path == str(tmp_path / "p.gpkg")
    with pytest.raises(ConfigError, match="either 'geojson_path' or its synonym"):
        output(geojson_path="p.geojson", footprints_path="q.gpkg")
    with pytest.raises(ConfigError, match=r"output.footprints_path.*\.gpkg, \.parquet, \.geojson"):
        output(footprints_path="p.shp")
