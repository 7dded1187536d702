"""End-to-end builds on real GeoTIFFs: exclusion reasons, outputs, determinism."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
from rasterio.warp import transform_bounds

from patchbalance.balancing.pipeline import run_build
from patchbalance.config import config_from_mapping
from patchbalance.errors import InputError
from rasters import record, write_geotiff, write_pair


def _mixed_mask(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[: size // 2, : size // 2] = 1
    mask[size // 2 :, size // 4 : size // 2] = 2
    mask[rng.integers(0, size, 40), rng.integers(0, size, 40)] = 3
    return mask


@pytest.fixture()
def scene(tmp_path):
    """Four 128 px scenes with known defects, 32 px patches: returns (folder, records)."""
    rng = np.random.default_rng(0)
    records = []
    clean = write_pair(tmp_path, "clean", _mixed_mask(rng))
    records += [record(*clean, r, c, 32) for r in range(0, 128, 32) for c in range(0, 128, 32)]

    ring = _mixed_mask(rng)
    ring[0, 40] = 255  # nodata on the outer ring of window (0, 32)
    ring[50, 50] = 255  # nodata inside window (32, 32) only, not on its ring
    ring_pair = write_pair(tmp_path, "ring", ring)
    records += [record(*ring_pair, 0, 32, 32), record(*ring_pair, 32, 32, 32)]

    image = np.full((3, 128, 128), 120, dtype=np.uint8)
    image[:, 64:96, 96:98] = 0  # window (64, 96): its west side is black
    image[:, 0, 5] = 0  # a single dark pixel on the north edge of window (0, 0)
    bordered = write_pair(tmp_path, "bordered", _mixed_mask(rng), image=image)
    records += [record(*bordered, 64, 96, 32), record(*bordered, 0, 0, 32)]

    records.append(record(*clean, 112, 112, 32))  # runs off the raster
    missing = (tmp_path / "images" / "missing.tif", tmp_path / "masks" / "missing.tif")
    records.append(record(*missing, 0, 0, 32))
    corrupt = tmp_path / "masks" / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00 this is not a tiff")
    corrupt_image = write_geotiff(
        tmp_path / "images" / "corrupt.tif", np.full((3, 32, 32), 9, np.uint8)
    )
    records.append(record(corrupt_image, corrupt, 0, 0, 32))
    empty = write_pair(tmp_path, "empty", np.full((32, 32), 255, dtype=np.uint8))
    records.append(record(*empty, 0, 0, 32))
    return tmp_path, records


def _config(folder, records, **overrides):
    block = {
        "input": {"patch_records": records},
        "clustering": {"k_min": 2, "k_max": 4},
        "output": {"csv_path": str(folder / "out" / "table.csv")},
        "num_workers": 2,
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            block.setdefault(section, {})[name] = value
        else:
            block[section] = value
    return config_from_mapping({"balanced_dataset": block}, base_dir=folder)


def _reason(table: pd.DataFrame, name: str, row: int, col: int) -> str:
    match = table[
        table["image_path"].str.endswith(f"{name}.tif")
        & (table["row_off"] == row)
        & (table["col_off"] == col)
    ]
    return match["exclusion_reason"].fillna("").iloc[0]


def test_each_defect_is_excluded_with_its_reason(scene):
    folder, records = scene
    table = run_build(_config(folder, records)).table
    clean = table[table["image_path"].str.endswith("clean.tif")]
    assert clean["excluded"].sum() == 1  # only the window that runs off the raster
    assert _reason(table, "clean", 112, 112) == "window_out_of_bounds"
    assert _reason(table, "ring", 0, 32) == "mask_border_nodata"
    assert _reason(table, "ring", 32, 32) == ""
    assert _reason(table, "bordered", 64, 96) == "image_black_border"
    assert _reason(table, "bordered", 0, 0) == ""  # one dark edge pixel is not a border
    assert _reason(table, "missing", 0, 0) == "read_error"
    assert (
        table.loc[table["mask_path"].str.endswith("corrupt.tif"), "exclusion_reason"].iloc[0]
        == "read_error"
    )
    assert _reason(table, "empty", 0, 0) == "mask_border_nodata;empty_mask"
    assert (table.loc[table["excluded"], "sampler_weight"] == 0).all()
    assert table.loc[table["excluded"], "freq_cluster_id"].eq(-1).all()
    active = table[~table["excluded"]]
    assert active["sampler_weight"].mean() == pytest.approx(1.0)
    assert (active["sampler_weight"] > 0).all()


def test_summary_counts_exclusions_and_records_alpha_and_timings(scene):
    folder, records = scene
    result = run_build(_config(folder, records))
    summary = json.loads((folder / "out" / "table.summary.json").read_text())
    assert summary["n_patches"] == len(records) == 24
    assert summary["excluded_by_reason"]["read_error"] == 2
    assert summary["excluded_by_reason"]["window_out_of_bounds"] == 1
    assert summary["excluded_by_reason"]["image_black_border"] == 1
    assert summary["pseudo_count"] == 0.5
    assert set(summary["timings_s"]) >= {"records", "mask_statistics", "composition", "weights"}
    assert summary["n_active"] == int((~result.table["excluded"]).sum())
    sizes = [c["size"] for c in summary["clustering"]["clusters"]]
    assert sum(sizes) == summary["n_active"]


def test_strict_turns_read_errors_into_an_error(scene):
    folder, records = scene
    with pytest.raises(InputError, match="--strict: 2 patch"):
        run_build(_config(folder, records), strict=True)


def test_strict_reports_out_of_bounds_windows(scene):
    folder, records = scene
    inside = [
        r for r in records if "missing" not in r["image_path"] and "corrupt" not in r["mask_path"]
    ]
    with pytest.raises(InputError, match="outside their raster"):
        run_build(_config(folder, inside), strict=True)


def test_max_nodata_ratio_and_min_entropy_flags(scene):
    folder, records = scene
    table = run_build(
        _config(folder, records, exclusion__max_nodata_ratio=0.0005, exclusion__min_entropy=0.001)
    ).table
    assert _reason(table, "ring", 32, 32) == "high_nodata"  # 1 of 1024 px is nodata
    homogeneous = table[(table["class_entropy"] == 0) & table["has_low_entropy"]]
    assert len(homogeneous) > 0
    assert homogeneous["exclusion_reason"].str.contains("low_entropy").all()


def test_entropy_is_computed_once_for_exclusion_and_the_table(scene, monkeypatch):
    import patchbalance.balancing.stats as stats

    calls = []
    real = stats.class_entropy

    def counting(counts):
        calls.append(len(counts))
        return real(counts)

    monkeypatch.setattr(stats, "class_entropy", counting)
    folder, records = scene
    table = run_build(_config(folder, records, exclusion__min_entropy=0.001)).table
    assert table["has_low_entropy"].any()  # exclusion read the entropy ...
    assert table["class_entropy"].notna().any()  # ... and so did the table
    assert calls == [len(records)]


def test_two_runs_with_the_same_seed_give_identical_tables(scene):
    folder, records = scene
    first = run_build(_config(folder, records), write=False).table
    second = run_build(_config(folder, records), write=False).table
    pd.testing.assert_frame_equal(first, second)


def test_tile_bounds_and_crs_come_from_the_raster_transform(scene):
    folder, records = scene
    table = run_build(_config(folder, records), write=False).table
    row = table[
        table["image_path"].str.endswith("clean.tif")
        & (table["row_off"] == 32)
        & (table["col_off"] == 64)
    ].iloc[0]
    with rasterio.open(row["image_path"]) as dataset:
        left, bottom, right, top = rasterio.windows.bounds(
            rasterio.windows.Window(64, 32, 32, 32), dataset.transform
        )
    assert (row["tile_minx"], row["tile_miny"], row["tile_maxx"], row["tile_maxy"]) == (
        left,
        bottom,
        right,
        top,
    )
    assert row["crs"] == "EPSG:32640"


def test_geojson_is_lon_lat_inside_the_reprojected_footprint_with_table_properties(scene):
    folder, records = scene
    geojson = folder / "out" / "patches.geojson"
    config = _config(
        folder,
        records,
        output={"csv_path": str(folder / "out" / "t.parquet"), "geojson_path": str(geojson)},
    )
    table = run_build(config).table
    info = pyogrio.read_info(geojson)
    assert info["crs"] == "EPSG:4326"
    meta, _, geometries, fields = pyogrio.raw.read(geojson)
    names = list(meta["fields"])
    with rasterio.open(records[0]["image_path"]) as dataset:
        west, south, east, north = transform_bounds(dataset.crs, "EPSG:4326", *dataset.bounds)
    raw = json.loads(geojson.read_text())
    readable = table[table["crs"] != ""].reset_index(drop=True)
    assert len(raw["features"]) == len(readable) == info["features"]
    for feature, (_, row) in zip(raw["features"], readable.iterrows(), strict=True):
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
        if (
            row["image_path"] == records[0]["image_path"]
            and row["exclusion_reason"] != "window_out_of_bounds"
        ):
            assert (ring[:, 0] >= west - 1e-9).all() and (ring[:, 0] <= east + 1e-9).all()
            assert (ring[:, 1] >= south - 1e-9).all() and (ring[:, 1] <= north + 1e-9).all()
        # RFC 7946: counter-clockwise exterior ring (positive shoelace area).
        area = 0.5 * np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1])
        assert area > 0
        props = feature["properties"]
        assert props["sampler_weight"] == pytest.approx(row["sampler_weight"])
        assert props["freq_cluster_id"] == row["freq_cluster_id"]
        assert props["excluded"] == bool(row["excluded"])
    weights = fields[names.index("sampler_weight")]
    np.testing.assert_allclose(np.sort(weights), np.sort(readable["sampler_weight"].to_numpy()))
    assert pd.read_parquet(folder / "out" / "t.parquet").shape == table.shape


def test_rasters_without_crs_get_no_geojson_and_empty_bounds(tmp_path):
    rng = np.random.default_rng(3)
    pair = write_pair(tmp_path, "plain", _mixed_mask(rng), crs=None)
    records = [record(*pair, r, c, 32) for r in range(0, 128, 32) for c in range(0, 128, 32)]
    geojson = tmp_path / "out" / "p.geojson"
    config = _config(
        tmp_path,
        records,
        output={"csv_path": str(tmp_path / "out" / "t.csv"), "geojson_path": str(geojson)},
    )
    result = run_build(config)
    assert not geojson.exists()
    assert result.summary["geojson_skipped"] == "rasters have no CRS"
    assert result.table["tile_minx"].isna().all()
    assert (result.table["crs"] == "").all()


def test_include_excluded_false_keeps_only_active_rows(scene):
    folder, records = scene
    config = _config(
        folder, records, output={"csv_path": str(folder / "o.csv"), "include_excluded": False}
    )
    run_build(config)
    written = pd.read_csv(folder / "o.csv")
    assert not written["excluded"].any()
    assert written["sampler_weight"].mean() == pytest.approx(1.0)


def test_a_failed_run_leaves_the_previous_table_untouched(scene):
    folder, records = scene
    run_build(_config(folder, records))
    table_path = folder / "out" / "table.csv"
    before = table_path.read_bytes()
    broken = [record(folder / "nope.tif", folder / "nope_mask.tif", 0, 0, 32)]
    with pytest.raises(InputError, match="every one of the 1 patches is excluded"):
        run_build(_config(folder, broken))
    assert table_path.read_bytes() == before
    assert not list((folder / "out").glob(".*.tmp"))


def test_input_columns_pass_through_to_the_output(scene):
    folder, records = scene
    tagged = [dict(r, region=f"r{i % 3}") for i, r in enumerate(records)]
    table = run_build(_config(folder, tagged), write=False).table
    assert table["region"].tolist() == [f"r{i % 3}" for i in range(len(records))]
    assert list(table.columns[:6]) == [
        "image_path",
        "mask_path",
        "row_off",
        "col_off",
        "patch_size",
        "region",
    ]


def test_every_sampling_method_of_masks_only_gives_valid_weights(scene):
    folder, records = scene
    for method in (
        "rank_max",
        "rank_add",
        "rank_multiply",
        "multiplicative",
        "composition_only",
        "cluster_balanced",
        "repeat_factor",
        "inverse_frequency",
    ):
        table = run_build(_config(folder, records, sampling_method=method), write=False).table
        active = ~table["excluded"]
        assert table.loc[active, "sampler_weight"].mean() == pytest.approx(1.0), method
        assert np.isfinite(table["sampler_weight"]).all(), method
        if method == "cluster_balanced":
            totals = table[active].groupby("freq_cluster_id")["sampler_weight"].sum()
            np.testing.assert_allclose(totals, totals.iloc[0])


def test_rasters_grid_source_generates_full_windows_only(tmp_path):
    rng = np.random.default_rng(4)
    mask = _mixed_mask(rng, 100)
    pair = write_pair(tmp_path, "grid", mask)
    config = config_from_mapping(
        {
            "input": {
                "rasters": [{"image_path": str(pair[0]), "mask_path": str(pair[1])}],
                "patch_size": 32,
                "stride": 24,
            },
            "clustering": {"k_min": 2, "k_max": 3},
            "output": {"csv_path": str(tmp_path / "g.csv")},
        }
    )
    table = run_build(config, write=False).table
    # Offsets 0, 24, 48 fit (48 + 32 = 80 <= 100); 72 + 32 = 104 does not.
    assert sorted(set(table["row_off"])) == [0, 24, 48]
    assert len(table) == 9


def test_glob_source_pairs_images_and_masks_by_stem(tmp_path):
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        write_pair(tmp_path, name, _mixed_mask(rng, 64))
    config = config_from_mapping(
        {
            "input": {
                "image_glob": "images/*.tif",
                "mask_glob": "masks/*.tif",
                "patch_size": 32,
                "placement": "grid",  # the grid alone (the default adds class-centred windows)
            },
            "clustering": {"k_min": 2, "k_max": 3},
            "output": {"csv_path": "g.csv"},
        },
        base_dir=tmp_path,
    )
    table = run_build(config, write=False).table
    assert len(table) == 8
    for image_path, mask_path in zip(table["image_path"], table["mask_path"], strict=True):
        assert (Path(image_path).parent.name, Path(mask_path).parent.name) == ("images", "masks")
        assert Path(image_path).name == Path(mask_path).name


def test_rasters_source_rejects_a_pair_of_different_sizes(tmp_path):
    image = write_geotiff(tmp_path / "i.tif", np.zeros((3, 64, 64), dtype=np.uint8))
    mask = write_geotiff(tmp_path / "m.tif", np.zeros((48, 64), dtype=np.uint8))
    config = config_from_mapping(
        {
            "input": {
                "rasters": [{"image_path": str(image), "mask_path": str(mask)}],
                "patch_size": 16,
            },
            "output": {"csv_path": str(tmp_path / "x.csv")},
        }
    )
    with pytest.raises(InputError, match=r"i\.tif is 64x64 but mask .*m\.tif is 64x48"):
        run_build(config, write=False)


def test_outputs_get_ordinary_file_permissions(scene):
    folder, records = scene
    geojson = folder / "out" / "p.geojson"
    run_build(
        _config(
            folder,
            records,
            output={"csv_path": str(folder / "out" / "t.csv"), "geojson_path": str(geojson)},
        )
    )
    umask = os.umask(0)
    os.umask(umask)
    for name in ("t.csv", "t.summary.json", "p.geojson"):
        assert stat.S_IMODE((folder / "out" / name).stat().st_mode) == 0o666 & ~umask, name


def test_paths_are_resolved_once_when_the_configuration_is_loaded(tmp_path):
    from patchbalance.config import config_from_mapping

    (tmp_path / "models" / "dino").mkdir(parents=True)
    config = config_from_mapping(
        {
            "mode": "embeddings",
            "input": {
                "rasters": [{"image_path": "i.tif", "mask_path": "~/m.tif"}],
                "patch_size": 8,
            },
            "embeddings": {"parquet_path": "cache/e.parquet", "dino_model": "models/dino"},
            "output": {"csv_path": "out/t.csv", "geojson_path": "../f.geojson"},
        },
        base_dir=tmp_path,
    )
    assert config.input.rasters[0].image_path == str(tmp_path / "i.tif")
    assert config.input.rasters[0].mask_path == str(Path("~/m.tif").expanduser())
    assert config.output.csv_path == str(tmp_path / "out" / "t.csv")
    assert config.output.footprints_path == str(tmp_path.parent / "f.geojson")
    assert config.embeddings.parquet_path == str(tmp_path / "cache" / "e.parquet")
    assert config.embeddings.dino_model == str(tmp_path / "models" / "dino")
    # A model id that names no folder stays an id.
    other = config_from_mapping(
        {"input": {"records_path": "r.csv"}, "output": {"csv_path": "t.csv"}}, base_dir=tmp_path
    )
    assert other.embeddings.dino_model == "facebook/dinov2-small"
    assert other.with_resolved_paths().input.records_path == str(tmp_path / "r.csv")


def test_a_command_resolves_and_checks_its_configuration_once(tmp_path, monkeypatch):
    """The build command loads (resolves and checks) its config once; the API resolves again
    only a config changed since it was loaded."""
    import patchbalance.config as config_module
    from patchbalance.balancing.command import run_build_command
    from patchbalance.demo import write_demo_dataset

    calls = []
    real = config_module.check_build_files
    monkeypatch.setattr(
        config_module, "check_build_files", lambda config: calls.append(1) or real(config)
    )
    config_path = write_demo_dataset(tmp_path)["config"]
    run_build_command(config_path, progress=False)
    assert len(calls) == 1
    loaded = config_module.load_config(config_path)
    run_build(loaded, write=False)
    assert len(calls) == 2  # the load; the run reuses it
    loaded.seed = 7  # changed in Python: resolved and checked again
    run_build(loaded, write=False)
    assert len(calls) == 3


def test_the_build_carries_the_figures_the_report_computes_from_its_table(scene):
    """demo and compare use the build's own figures: they are those of the table it wrote."""
    from patchbalance.sampling.figures import figures_from_table

    folder, records = scene
    result = run_build(_config(folder, records))
    assert result.summary["sampling"] == result.figures.to_dict()
    from_table = figures_from_table(pd.read_csv(folder / "out" / "table.csv")).to_dict()
    assert from_table.keys() == result.figures.to_dict().keys()
    assert json.dumps(from_table, sort_keys=True) == json.dumps(
        result.figures.to_dict(), sort_keys=True
    )
    written = json.loads((folder / "out" / "table.summary.json").read_text())
    assert written == json.loads(json.dumps(result.summary.to_dict()))
    assert list(written)[-4:] == ["warnings", "timings_s", "outputs", "output_sha256"]
