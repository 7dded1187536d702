"""Embeddings: offline model loading, preprocessing, DataLoader extraction, keyed resumable cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as functional

from embedding_fixtures import (
    TINY_HIDDEN,
    grid_records,
    save_tiny_dinov2,
    textured_image,
    write_textured,
)
from patchbalance import __version__
from patchbalance.config import EmbeddingsConfig
from patchbalance.embeddings import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_model_available,
    extract_embeddings,
    load_backbone,
    preprocess_window,
    raster_scaling,
    resolve_model,
)
from patchbalance.errors import ConfigError, InputError
from patchbalance.windows import probe_raster
from rasters import write_geotiff

MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
STD = np.array(IMAGENET_STD, dtype=np.float32)[:, None, None]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("models") / "tiny-dinov2")


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A 128 px textured RGB GeoTIFF and its 16 windows of 32 px."""
    image = write_textured(tmp_path_factory.mktemp("scene") / "scene.tif", seed=1)
    return image, grid_records(image, 128, 32)


def make_config(model: Path, tmp_path: Path | None = None, **changes) -> EmbeddingsConfig:
    values = {
        "dino_model": str(model),
        "image_size": 28,
        "batch_size": 4,
        "num_workers": 0,
        "precision": "fp32",
    }
    if tmp_path is not None:
        values["parquet_path"] = str(tmp_path / "cache" / "embeddings.parquet")
    values.update(changes)
    return EmbeddingsConfig(**values)


class BatchCounter:
    """An `on_batch` hook that counts computed batches and patches, optionally failing."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.batches = 0
        self.patches = 0
        self.fail_after = fail_after

    def __call__(self, batch_number: int, patches: int) -> None:
        self.batches += 1
        self.patches += patches
        if self.fail_after is not None and batch_number >= self.fail_after:
            raise KeyboardInterrupt


def reference_cls(model: Path, window: np.ndarray, image_size: int) -> np.ndarray:
    """The CLS embedding of one uint8 window, preprocessed and run here independently."""
    from transformers import Dinov2Model

    scaled = torch.from_numpy(window.astype(np.float32) / 255.0)[None]
    resized = functional.interpolate(
        scaled, size=(image_size, image_size), mode="bilinear", antialias=True
    )
    normalised = (resized - torch.from_numpy(MEAN)) / torch.from_numpy(STD)
    network = Dinov2Model.from_pretrained(model).eval()
    with torch.inference_mode():
        return network(pixel_values=normalised).last_hidden_state[0, 0].numpy()


# ------------------------------------------------------------------------------------------
# models


def test_unknown_model_id_fails_offline_with_one_line_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as info:
        check_model_available(EmbeddingsConfig(dino_model="dinov2-small"))
    assert str(info.value) == (
        "embeddings.dino_model 'dinov2-small' is neither a local folder nor in the local "
        f"Hugging Face cache ({tmp_path / 'hub'}), and models are never downloaded during a "
        "run; set embeddings.dino_model to a local folder with config.json and "
        "model.safetensors (e.g. made with `hf download facebook/dinov2-small --local-dir "
        "DIR` where there is network)"
    )
    assert "\n" not in str(info.value)


def test_a_model_in_the_hugging_face_cache_is_found_offline_with_its_revision(
    monkeypatch, tmp_path, tiny_model
):
    # Lay out a cache entry the way huggingface_hub does: refs/main -> snapshots/<commit>.
    hub = tmp_path / "hub"
    repo = hub / "models--facebook--dinov2-small"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((tiny_model / name).read_bytes())
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    source = resolve_model(EmbeddingsConfig(dino_model="dinov2-small", image_size=28))
    assert source.model_id == "facebook/dinov2-small"
    assert source.revision == commit
    assert source.folder == snapshot


def test_a_missing_local_folder_is_named_in_the_error(tmp_path):
    with pytest.raises(ConfigError, match=r"'\./no/such/model': no such folder"):
        check_model_available(EmbeddingsConfig(dino_model="./no/such/model"))


def test_image_size_must_be_a_multiple_of_the_patch_size(tiny_model):
    with pytest.raises(ConfigError) as info:
        check_model_available(make_config(tiny_model, image_size=100))
    assert str(info.value) == (
        "embeddings.image_size (100) must be a multiple of the model's patch size (14), "
        "e.g. 98 or 112"
    )


def test_bands_must_be_one_or_three(tiny_model):
    with pytest.raises(ConfigError, match=r"1 band \(repeated to RGB\) or 3 bands, got \[1, 2\]"):
        check_model_available(make_config(tiny_model, bands=[1, 2]))


def test_efficientnet_lite0_classifies_coffee_and_a_cat_with_its_shipped_weights():
    from skimage import data

    config = EmbeddingsConfig(backbone="efficientnet_lite0", image_size=224)
    backbone = load_backbone(config)
    assert backbone.dim == 1280
    scaling = raster_scaling(config, _uint8_info(3), seed=0)
    batch = []
    for photo in (data.coffee(), data.chelsea()):
        side = min(photo.shape[:2])
        square = photo[:side, :side].transpose(2, 0, 1)
        batch.append(preprocess_window(square, None, scaling, 224, backbone.mean, backbone.std))
    with torch.inference_mode():
        logits = backbone.module(torch.stack(batch))
        features = backbone.embed(torch.stack(batch))
        head = backbone.module._fc(features)
    top = logits.argmax(dim=1).tolist()
    assert top[0] == 967  # ImageNet class 967: espresso
    assert top[1] in (281, 282, 285)  # tabby cat, tiger cat, Egyptian cat
    assert features.shape == (2, 1280)
    # The pooled features are what the classifier head reads: the head reproduces the logits.
    np.testing.assert_allclose(head, logits, atol=1e-4)


def _uint8_info(count: int):
    from affine import Affine

    from patchbalance.windows import RasterInfo

    return RasterInfo(
        "mem.tif", 64, 64, count, "uint8", None, None, Affine.identity(), (64, 64), False
    )


# ------------------------------------------------------------------------------------------
# preprocessing


def test_uint8_windows_are_divided_by_255_and_normalised_with_imagenet_statistics():
    pixels = np.stack([np.full((4, 4), v, np.uint8) for v in (0, 51, 255)])
    scaling = raster_scaling(EmbeddingsConfig(), _uint8_info(3), seed=0)
    tensor = preprocess_window(pixels, None, scaling, 4, IMAGENET_MEAN, IMAGENET_STD).numpy()
    expected = (np.array([0.0, 0.2, 1.0], np.float32)[:, None, None] - MEAN) / STD
    np.testing.assert_allclose(tensor, np.broadcast_to(expected, (3, 4, 4)), atol=1e-6)


def test_value_range_scales_and_clips_and_nodata_becomes_zero_before_normalising(tmp_path):
    values = np.array([[[-50.0, 0.0], [500.0, 2000.0]]], dtype=np.float32)
    path = write_geotiff(tmp_path / "dem.tif", values, tiled=False)
    config = EmbeddingsConfig(value_range=(0.0, 1000.0))
    scaling = raster_scaling(config, probe_raster(str(path)), seed=0)
    valid = np.array([[True, True], [True, False]])
    tensor = preprocess_window(values, valid, scaling, 2, IMAGENET_MEAN, IMAGENET_STD).numpy()
    scaled = np.array([[0.0, 0.0], [0.5, 0.0]], np.float32)  # clipped; nodata -> 0
    # One band is repeated to three channels, each normalised with its own statistics.
    np.testing.assert_allclose(tensor, (scaled[None] - MEAN) / STD, atol=1e-6)


def test_percentile_stretch_is_computed_once_per_raster_from_its_pixels(tmp_path):
    rng = np.random.default_rng(5)
    values = rng.gamma(2.0, 300.0, size=(2, 96, 96)).astype(np.uint16)
    path = write_geotiff(tmp_path / "sentinel.tif", values)
    config = EmbeddingsConfig(bands=[2])
    scaling = raster_scaling(config, probe_raster(str(path)), seed=0)
    # A 96 px raster is sampled whole, so the stretch is band 2's own 2nd/98th percentiles.
    low, high = np.percentile(values[1].astype(np.float64), [2, 98])
    assert scaling.method == "percentile" and scaling.bands == (2,)
    np.testing.assert_allclose([scaling.low[0], scaling.high[0]], [low, high], rtol=1e-6)
    # Patches of one raster share the stretch: a pixel value maps to the same input anywhere.
    dark = preprocess_window(values[1:, :8, :8], None, scaling, 8, IMAGENET_MEAN, IMAGENET_STD)
    expected = (np.clip((values[1, :8, :8] - low) / (high - low), 0, 1) - MEAN) / STD
    np.testing.assert_allclose(dark.numpy(), expected.astype(np.float32), atol=1e-5)


def test_percentile_sample_of_a_large_raster_is_seeded(tmp_path):
    rng = np.random.default_rng(6)
    values = rng.normal(1000, 200, size=(1, 1024, 1024)).astype(np.float32)
    path = write_geotiff(tmp_path / "big.tif", values, block=256)
    info = probe_raster(str(path))
    first = raster_scaling(EmbeddingsConfig(), info, seed=3)
    again = raster_scaling(EmbeddingsConfig(), info, seed=3)
    other = raster_scaling(EmbeddingsConfig(), info, seed=4)
    assert first.low[0] == again.low[0] and first.high[0] == again.high[0]
    assert first.low[0] != other.low[0]
    low, high = np.percentile(values, [2, 98])
    assert abs(first.low[0] - low) < 10 and abs(first.high[0] - high) < 10


def test_band_selection_follows_the_given_order_and_checks_the_band_count(tmp_path):
    values = np.stack([np.full((8, 8), 10 * (b + 1), np.uint8) for b in range(5)])
    path = write_geotiff(tmp_path / "multi.tif", values, tiled=False)
    info = probe_raster(str(path))
    scaling = raster_scaling(EmbeddingsConfig(bands=[4, 2, 1]), info, seed=0)
    assert scaling.bands == (4, 2, 1)
    assert raster_scaling(EmbeddingsConfig(), info, seed=0).bands == (1, 2, 3)
    with pytest.raises(InputError, match=r"multi.tif: has 5 band\(s\) but embeddings.bands"):
        raster_scaling(EmbeddingsConfig(bands=[6]), info, seed=0)
    two = write_geotiff(tmp_path / "two.tif", values[:2], tiled=False)
    with pytest.raises(InputError, match="two.tif: has 2 bands; set embeddings.bands"):
        raster_scaling(EmbeddingsConfig(), probe_raster(str(two)), seed=0)


def test_resizing_uses_antialiasing():
    # A 1-pixel checkerboard averages to grey when shrunk with antialiasing; without it,
    # bilinear sampling would pick near-pure black or white pixels.
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)[None]
    scaling = raster_scaling(EmbeddingsConfig(), _uint8_info(1), seed=0)
    tensor = preprocess_window(board, None, scaling, 16, (0.0,) * 3, (1.0,) * 3).numpy()
    assert tensor.shape == (3, 16, 16)
    np.testing.assert_allclose(tensor, 0.5, atol=0.02)


# ------------------------------------------------------------------------------------------
# extraction


def test_identical_windows_get_identical_embeddings_and_match_a_direct_forward(
    tmp_path, tiny_model
):
    image = textured_image(seed=2, size=64)
    image[:, 32:, 32:] = image[:, :32, :32]  # window (32, 32) is a copy of window (0, 0)
    path = write_geotiff(tmp_path / "copy.tif", image)
    records = grid_records(path, 64, 32)
    result = extract_embeddings(records, make_config(tiny_model), seed=0, progress=False)
    assert result.vectors.shape == (4, TINY_HIDDEN) and result.vectors.dtype == np.float32
    np.testing.assert_array_equal(result.vectors[3], result.vectors[0])
    assert np.abs(result.vectors[1] - result.vectors[0]).max() > 1e-3
    np.testing.assert_allclose(
        result.vectors[1], reference_cls(tiny_model, image[:, :32, 32:], 28), atol=1e-5
    )
    summary = result.summary
    assert summary["computed"] == 4 and summary["cache_hits"] == 0
    assert summary["dim"] == TINY_HIDDEN and summary["pooling"] == "cls"
    assert summary["device"] == "cpu" and summary["precision"] == "fp32"
    # Read from the output tensor: where the vectors were really computed, and no autocast.
    assert summary["computed_on"] == "cpu" and summary["autocast_dtype"] is None
    assert summary["patches_per_second"] > 0


def test_pooling_options_give_cls_mean_and_both(tmp_path, scene, tiny_model):
    _, records = scene
    records = records.iloc[:3]
    cls = extract_embeddings(records, make_config(tiny_model), 0, progress=False).vectors
    mean = extract_embeddings(
        records, make_config(tiny_model, pooling="mean"), 0, progress=False
    ).vectors
    both = extract_embeddings(
        records, make_config(tiny_model, pooling="cls+mean"), 0, progress=False
    ).vectors
    assert mean.shape == (3, TINY_HIDDEN) and both.shape == (3, 2 * TINY_HIDDEN)
    np.testing.assert_allclose(both[:, :TINY_HIDDEN], cls, atol=1e-6)
    np.testing.assert_allclose(both[:, TINY_HIDDEN:], mean, atol=1e-6)
    assert np.abs(mean - cls).max() > 1e-3


def test_dataloader_workers_give_the_same_embeddings_in_record_order(scene, tiny_model):
    _, records = scene
    shuffled = records.sample(frac=1.0, random_state=0).reset_index(drop=True)
    serial = extract_embeddings(shuffled, make_config(tiny_model), 0, progress=False)
    parallel = extract_embeddings(
        shuffled, make_config(tiny_model, num_workers=2), 0, progress=False
    )
    assert parallel.summary["num_workers"] == 2
    np.testing.assert_allclose(parallel.vectors, serial.vectors, atol=1e-6)
    in_grid_order = extract_embeddings(records, make_config(tiny_model), 0, progress=False)
    position = {tuple(row): i for i, row in enumerate(records[["row_off", "col_off"]].values)}
    back = [position[tuple(row)] for row in shuffled[["row_off", "col_off"]].values]
    np.testing.assert_allclose(serial.vectors, in_grid_order.vectors[back], atol=1e-6)


def test_efficientnet_backbone_extracts_1280_features_from_geotiff_windows(tmp_path, scene):
    _, records = scene
    config = EmbeddingsConfig(
        backbone="efficientnet_lite0", image_size=64, batch_size=8, num_workers=0
    )
    result = extract_embeddings(records.iloc[:4], config, 0, progress=False)
    assert result.vectors.shape == (4, 1280)
    assert np.isfinite(result.vectors).all() and result.vectors.std() > 0
    assert result.summary["model_id"] == "efficientnet-lite0"
    assert result.summary["pooling"] == "avg"


def test_nan_embeddings_are_an_error_naming_the_count_and_a_patch(tmp_path, scene):
    _, records = scene
    broken = save_tiny_dinov2(tmp_path / "broken", corrupt=True)
    config = make_config(broken, tmp_path)
    with pytest.raises(InputError) as info:
        extract_embeddings(records.iloc[:5], config, 0, progress=False)
    message = str(info.value)
    assert message.startswith("5 embedding(s) came out NaN or infinite (first: ")
    assert "scene.tif (row_off " in message
    assert not Path(config.parquet_path).exists()  # nothing non-finite is cached


def test_the_summary_records_the_autocast_dtype_the_model_ran_under(scene, tiny_model):
    _, records = scene
    result = extract_embeddings(
        records.iloc[:2], make_config(tiny_model, precision="bf16"), 0, progress=False
    )
    summary = result.summary
    assert summary["precision"] == "bf16" and summary["autocast_dtype"] == "bfloat16"
    assert summary["computed_on"] == "cpu" and summary["model_load_seconds"] >= 0


def test_use_gpu_without_cuda_says_so(caplog, scene, tiny_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, records = scene
    with caplog.at_level(logging.WARNING):
        result = extract_embeddings(
            records.iloc[:2], make_config(tiny_model, use_gpu=True), 0, progress=False
        )
    assert "use_gpu is true but CUDA is not available; running on the CPU" in caplog.text
    assert result.summary["device"] == "cpu"


def test_a_window_outside_its_image_is_an_input_error(scene, tiny_model):
    image, records = scene
    bad = pd.concat(
        [records.iloc[:2], pd.DataFrame([dict(records.iloc[0], row_off=120)])], ignore_index=True
    )
    with pytest.raises(InputError, match=r"^1 window\(s\) lie outside their image, e\.g\. "):
        extract_embeddings(bad, make_config(tiny_model), 0, progress=False)


# ------------------------------------------------------------------------------------------
# cache


def test_rerun_with_the_same_config_computes_nothing(tmp_path, scene, tiny_model):
    _, records = scene
    config = make_config(tiny_model, tmp_path)
    first = extract_embeddings(records, config, 0, progress=False)
    counter = BatchCounter()
    again = extract_embeddings(records, config, 0, progress=False, on_batch=counter)
    assert counter.batches == 0
    assert again.summary["computed"] == 0 and again.summary["cache_hits"] == 16
    np.testing.assert_array_equal(again.vectors, first.vectors)


def test_cache_rows_follow_keys_not_positions(tmp_path, scene, tiny_model):
    _, records = scene
    config = make_config(tiny_model, tmp_path)
    first = extract_embeddings(records, config, 0, progress=False)
    reversed_records = records.iloc[::-1].reset_index(drop=True)
    counter = BatchCounter()
    again = extract_embeddings(reversed_records, config, 0, progress=False, on_batch=counter)
    assert counter.batches == 0
    np.testing.assert_array_equal(again.vectors, first.vectors[::-1])


def test_added_patches_are_the_only_ones_computed(tmp_path, scene, tiny_model):
    _, records = scene
    config = make_config(tiny_model, tmp_path)
    extract_embeddings(records.iloc[:10], config, 0, progress=False)
    counter = BatchCounter()
    result = extract_embeddings(records, config, 0, progress=False, on_batch=counter)
    assert counter.patches == 6
    assert result.summary["computed"] == 6 and result.summary["cache_hits"] == 10
    fresh = extract_embeddings(records, make_config(tiny_model), 0, progress=False)
    np.testing.assert_allclose(result.vectors, fresh.vectors, atol=1e-6)
    assert pq.read_metadata(config.parquet_path).num_rows == 16


def test_changing_image_size_recomputes_everything_and_says_why(
    tmp_path, scene, tiny_model, caplog
):
    _, records = scene
    extract_embeddings(records, make_config(tiny_model, tmp_path), 0, progress=False)
    counter = BatchCounter()
    with caplog.at_level(logging.WARNING):
        result = extract_embeddings(
            records, make_config(tiny_model, tmp_path, image_size=42), 0, False, counter
        )
    assert counter.patches == 16 and result.summary["cache_hits"] == 0
    assert "image_size 28 -> 42" in caplog.text
    assert result.summary["cache_invalidated"] == "image_size 28 -> 42"
    metadata = json.loads(
        pq.read_schema(result.summary["cache_path"]).metadata[b"patchbalance.embeddings"]
    )
    assert metadata["image_size"] == 42


def test_a_cache_from_another_model_is_recomputed(tmp_path, scene, tiny_model):
    _, records = scene
    extract_embeddings(records.iloc[:4], make_config(tiny_model, tmp_path), 0, progress=False)
    other = save_tiny_dinov2(tmp_path / "other", seed=1)
    counter = BatchCounter()
    result = extract_embeddings(
        records.iloc[:4], make_config(other, tmp_path), 0, progress=False, on_batch=counter
    )
    assert counter.patches == 4
    assert result.summary["cache_invalidated"].startswith("weights_sha256 ")


def test_cache_file_records_keys_float32_lists_and_the_settings(tmp_path, scene, tiny_model):
    _, records = scene
    config = make_config(tiny_model, tmp_path, bands=[3, 2, 1])
    extract_embeddings(records.iloc[:5], config, 0, progress=False)
    table = pq.read_table(config.parquet_path)
    assert table.column_names == ["image_path", "row_off", "col_off", "patch_size", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), TINY_HIDDEN)
    assert table.schema.field("row_off").type == pa.int64()
    metadata = json.loads(table.schema.metadata[b"patchbalance.embeddings"])
    weights = (tiny_model / "model.safetensors").read_bytes()
    assert metadata["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert metadata["model_id"] == str(tiny_model.resolve())
    assert metadata["backbone"] == "dinov2" and metadata["pooling"] == "cls"
    assert metadata["bands"] == [3, 2, 1] and metadata["value_range"] is None
    assert metadata["image_size"] == 28 and metadata["patchbalance_version"] == __version__
    keys = table.select(["row_off", "col_off"]).to_pandas()
    expected = records.iloc[:5][["row_off", "col_off"]].sort_values(["row_off", "col_off"])
    pd.testing.assert_frame_equal(keys, expected.reset_index(drop=True).astype("int64"))


def test_a_file_that_is_not_an_embeddings_cache_is_refused_and_left_alone(
    tmp_path, scene, tiny_model
):
    _, records = scene
    config = make_config(tiny_model, tmp_path)
    path = Path(config.parquet_path)
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"a": [1, 2]}), path)
    before = path.read_bytes()
    with pytest.raises(InputError, match="not a patchbalance embeddings cache"):
        extract_embeddings(records.iloc[:2], config, 0, progress=False)
    assert path.read_bytes() == before


def test_an_interrupted_run_resumes_and_ends_with_the_uninterrupted_cache(
    tmp_path, scene, tiny_model
):
    _, records = scene
    config = make_config(tiny_model, tmp_path, checkpoint_every=50)
    with pytest.raises(KeyboardInterrupt):
        extract_embeddings(records, config, 0, progress=False, on_batch=BatchCounter(2))
    # The interrupted run kept its 2 finished batches (8 patches) as a checkpoint.
    parts = Path(config.parquet_path + ".parts")
    assert len(list(parts.glob("part-*.parquet"))) == 1
    counter = BatchCounter()
    resumed = extract_embeddings(records, config, 0, progress=False, on_batch=counter)
    assert counter.patches == 8
    assert resumed.summary["cache_hits"] == 8 and resumed.summary["computed"] == 8
    assert not parts.exists()

    reference = make_config(tiny_model, tmp_path / "reference")
    uninterrupted = extract_embeddings(records, reference, 0, progress=False)
    np.testing.assert_allclose(resumed.vectors, uninterrupted.vectors, atol=1e-6)
    resumed_table = pq.read_table(config.parquet_path).to_pandas()
    reference_table = pq.read_table(reference.parquet_path).to_pandas()
    key = ["image_path", "row_off", "col_off", "patch_size"]
    resumed_table = resumed_table.sort_values(key).reset_index(drop=True)
    reference_table = reference_table.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(resumed_table[key], reference_table[key])
    np.testing.assert_allclose(
        np.stack(resumed_table["embedding"]), np.stack(reference_table["embedding"]), atol=1e-6
    )


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path, scene, tiny_model):
    image, records = scene
    config = make_config(tiny_model, tmp_path, checkpoint_every=2)
    records_path = tmp_path / "records.csv"
    records.to_csv(records_path, index=False)
    # A separate process extracts and is SIGKILLed during batch 3: batches 1-2 were
    # checkpointed, batch 3 was not.
    script = textwrap.dedent(
        f"""
        import os, signal
        import pandas as pd
        from patchbalance.config import EmbeddingsConfig
        from patchbalance.embeddings import extract_embeddings

        def hook(batch, patches):
            if batch == 3:
                os.kill(os.getpid(), signal.SIGKILL)

        config = EmbeddingsConfig.model_validate_json({config.model_dump_json()!r})
        extract_embeddings(pd.read_csv({str(records_path)!r}), config, 0, False, hook)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    process = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert process.returncode == -9, process.stderr.decode()[-2000:]
    assert not Path(config.parquet_path).exists()
    counter = BatchCounter()
    resumed = extract_embeddings(records, config, 0, progress=False, on_batch=counter)
    assert resumed.summary["cache_hits"] == 8
    assert counter.patches == 8
    assert np.isfinite(resumed.vectors).all()
