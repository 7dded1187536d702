"""Embeddings mode end to end: a tiny local DINOv2, real GeoTIFFs, the uniqueness column."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.stats import rankdata

from embedding_fixtures import save_tiny_dinov2, textured_image
from patchbalance import build_balanced_dataset
from patchbalance.balancing.pipeline import run_build
from patchbalance.config import config_from_mapping
from patchbalance.errors import ConfigError
from rasters import record, write_pair

KEY = ["image_path", "row_off", "col_off", "patch_size"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("models") / "tiny-dinov2")


@pytest.fixture()
def scene(tmp_path):
    """One 128 px scene of repeated texture with one odd window, plus an excluded window."""
    tile = textured_image(seed=3, size=32)
    image = np.tile(tile, (1, 4, 4))
    odd = np.random.default_rng(7).integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
    image[:, 64:96, 32:64] = odd  # the only window unlike the others
    mask = np.zeros((128, 128), np.uint8)
    mask[:, 64:] = 1
    mask[:, 80:84] = 2
    mask[0, 100] = 255  # nodata on the outer ring of window (0, 96): excluded
    image_path, mask_path = write_pair(tmp_path, "scene", mask, image=image)
    records = [
        record(image_path, mask_path, r, c, 32)
        for r in range(0, 128, 32)
        for c in range(0, 128, 32)
    ]
    return tmp_path, records


def _config(folder, records, model, **embeddings):
    block = _block(folder, records, model, **embeddings)
    return config_from_mapping({"balanced_dataset": block}, base_dir=folder)


def _block(folder, records, model, **embeddings):
    return {
        "mode": "embeddings",
        "sampling_method": "uniqueness_only",
        "input": {"patch_records": records},
        "clustering": {"k_selection": "fixed", "k": 2},
        "uniqueness": {"k_neighbors": 3, "backend": "exact"},
        "embeddings": {
            "dino_model": str(model),
            "image_size": 28,
            "batch_size": 4,
            "num_workers": 0,
            "precision": "fp32",
            "parquet_path": "cache/embeddings.parquet",
            **embeddings,
        },
        "output": {"csv_path": str(folder / "out" / "table.csv")},
        "num_workers": 1,
    }


def test_embeddings_mode_scores_uniqueness_from_the_cached_embeddings(scene, tiny_model):
    folder, records = scene
    table = build_balanced_dataset(_config(folder, records, tiny_model))
    active = table[~table["excluded"]].reset_index(drop=True)
    assert len(active) == 15 and table["excluded"].sum() == 1
    assert table.loc[table["excluded"], "uniqueness_score"].isna().all()
    assert (table.loc[table["excluded"], "sampler_weight"] == 0).all()

    # Recompute the scores independently from the cache file, joined by the patch key.
    cache = pq.read_table(folder / "cache" / "embeddings.parquet").to_pandas()
    joined = active[KEY].merge(cache, on=KEY, how="left", validate="one_to_one")
    vectors = np.stack(joined["embedding"]).astype(np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    distance = 1.0 - unit @ unit.T
    np.fill_diagonal(distance, np.inf)
    expected = np.sort(distance, axis=1)[:, :3].mean(axis=1)
    np.testing.assert_allclose(active["uniqueness_score"], expected, atol=1e-5)

    # The odd window is the most unique and, with uniqueness_only, gets the largest weight.
    odd = (active["row_off"] == 64) & (active["col_off"] == 32)
    assert active.loc[odd, "uniqueness_score"].iloc[0] == active["uniqueness_score"].max()
    assert active.loc[odd, "sampler_weight"].iloc[0] == active["sampler_weight"].max()
    ranks = rankdata(active["uniqueness_score"]) / len(active)
    np.testing.assert_allclose(active["sampler_weight"], ranks / ranks.mean(), rtol=1e-9)


def test_a_rerun_reuses_every_cached_embedding_and_reports_it(scene, tiny_model, caplog):
    folder, records = scene
    config = _config(folder, records, tiny_model)
    first = run_build(config)
    caplog.clear()
    with caplog.at_level("INFO", logger="patchbalance.embeddings"):
        second = run_build(config)
    assert "all 15 reused, nothing computed" in caplog.text and "None" not in caplog.text
    summary = json.loads((folder / "out" / "table.summary.json").read_text())
    embeddings = summary["embeddings"]
    assert first.summary["embeddings"]["computed"] == 15
    assert embeddings["computed"] == 0 and embeddings["cache_hits"] == 15
    assert "all 15 reused, nothing computed" in second.summary_text
    assert "None" not in second.summary_text
    assert summary["uniqueness"]["backend"] == "exact"
    pd.testing.assert_series_equal(
        second.table["uniqueness_score"], first.table["uniqueness_score"]
    )


def test_a_model_that_is_not_available_offline_fails_before_any_raster_is_read(
    tmp_path, monkeypatch
):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # The rasters do not exist: if they were read first, the error would be about them.
    records = [
        record(tmp_path / "nowhere.tif", tmp_path / "nowhere_mask.tif", 0, 0, 32),
        record(tmp_path / "nowhere.tif", tmp_path / "nowhere_mask.tif", 0, 32, 32),
    ]
    config = _config(tmp_path, records, "dinov2-giant")
    with pytest.raises(ConfigError, match="'dinov2-giant' is neither a local folder nor in"):
        run_build(config)


def test_a_relative_model_folder_is_found_next_to_the_config_and_the_summary_says_so(
    scene, tiny_model
):
    folder, records = scene
    import shutil

    shutil.copytree(tiny_model, folder / "models" / "tiny")
    result = run_build(_config(folder, records, "models/tiny"))
    assert result.summary["embeddings"]["computed"] == 15
    assert "15 computed" in result.summary_text
    assert "0 reused from the cache" in result.summary_text
    assert "(exact, k=3)" in result.summary_text


def test_corrupt_model_weights_exit_2_with_one_line_before_any_raster_is_read(tmp_path, tiny_model):
    import shutil

    import yaml
    from typer.testing import CliRunner

    from patchbalance.cli import app

    model = tmp_path / "corrupt-dinov2"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    weights.write_bytes(np.random.default_rng(0).bytes(weights.stat().st_size))
    # The rasters do not exist: read first, every patch would be excluded (read_error).
    records = [
        record(tmp_path / "nowhere.tif", tmp_path / "nowhere_mask.tif", 0, c, 32) for c in (0, 32)
    ]
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({"balanced_dataset": _block(tmp_path, records, model)}))
    result = CliRunner().invoke(app, ["build-balanced-dataset", str(config_path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert str(weights) in lines[0] and "corrupt or incomplete" in lines[0]
    assert "replace the file with an intact copy" in lines[0]
    assert not (tmp_path / "out" / "table.csv").exists()


def test_a_dry_run_reports_a_garbage_embeddings_cache_as_such(scene, tiny_model):
    import yaml
    from typer.testing import CliRunner

    from patchbalance.cli import app

    folder, records = scene
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump({"balanced_dataset": _block(folder, records, tiny_model)}))
    runner = CliRunner()
    plan = runner.invoke(app, ["build-balanced-dataset", str(config), "--dry-run"])
    assert plan.exit_code == 0, plan.output
    assert "embeddings.parquet (new)" in plan.stdout
    run_build(_config(folder, records, tiny_model))
    plan = runner.invoke(app, ["build-balanced-dataset", str(config), "--dry-run"])
    assert plan.exit_code == 0, plan.output
    assert "embeddings.parquet (exists: 15 rows;" in plan.stdout
    cache = folder / "cache" / "embeddings.parquet"
    cache.write_bytes(b"garbage")
    plan = runner.invoke(app, ["build-balanced-dataset", str(config), "--dry-run"])
    assert plan.exit_code == 2, plan.output
    assert "embeddings.parquet: not a readable Parquet embeddings cache" in plan.stderr
    assert "reused" not in plan.output
    # The run says the same.
    run = runner.invoke(app, ["build-balanced-dataset", str(config), "-q"])
    assert run.exit_code == 2 and "not a readable Parquet embeddings cache" in run.stderr
