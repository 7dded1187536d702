"""Embeddings on Dask workers (SPEC §10): a real LocalCluster against the in-process build.

A tiny DINOv2 saved locally embeds the demo scenes on two worker processes; the vectors come
back to the client, which alone writes the keyed cache.
"""

from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

pytest.importorskip("distributed")

from embedding_fixtures import save_tiny_dinov2  # noqa: E402
from patchbalance.balancing.pipeline import run_build  # noqa: E402
from patchbalance.config import EmbeddingsConfig, load_config  # noqa: E402
from patchbalance.demo import write_demo_dataset  # noqa: E402
from patchbalance.embeddings import extract_embeddings, resolve_model, workers  # noqa: E402
from patchbalance.embeddings.preprocess import raster_plan  # noqa: E402
from patchbalance.embeddings.workers import EmbeddingTask, embed_partition  # noqa: E402
from patchbalance.table import normalised_keys  # noqa: E402
from patchbalance.windows import probe_rasters  # noqa: E402

KEY = ["image_path", "row_off", "col_off", "patch_size"]


def cache_contents(path) -> tuple:
    """Return a cache file's keys, its vectors and its settings metadata."""
    table = pq.read_table(path)
    metadata = json.loads(table.schema.metadata[b"patchbalance.embeddings"])
    keys = table.select(KEY).to_pandas()
    return keys, np.stack(table.column("embedding").to_pandas()), metadata


def table_text(result) -> str:
    return result.table.to_csv(index=False, lineterminator="\n")


def test_a_local_cluster_embeds_like_the_in_process_build_and_a_rerun_computes_nothing(
    tmp_path, monkeypatch
):
    paths = write_demo_dataset(tmp_path / "demo")
    model = save_tiny_dinov2(tmp_path / "model")

    def config(scheduler: str, cache: str):
        return load_config(
            paths["config"],
            [
                "mode=embeddings",
                f"embeddings.dino_model={model}",
                "embeddings.image_size=28",
                "embeddings.batch_size=8",
                "embeddings.num_workers=0",
                "embeddings.precision=fp32",
                "embeddings.checkpoint_every=2",
                f"embeddings.parquet_path={cache}",
                f"compute.scheduler={scheduler}",
                "compute.workers=2",
            ],
        )

    in_process = run_build(config("synchronous", "in_process.parquet"), write=False)
    # Partitions of 40 windows: several per scene, more tasks than workers, so a worker that
    # reuses its loaded model shows in the summary, and checkpoints are written as they arrive.
    monkeypatch.setattr(workers, "CLUSTER_PARTITION_WINDOWS", 40)
    on_cluster = run_build(config("local", "cluster.parquet"), write=False)
    cluster_cache = tmp_path / "demo" / "cluster.parquet"
    written = cluster_cache.read_bytes()

    summary = on_cluster.summary["embeddings"]
    patches = in_process.summary["embeddings"]["patches"]
    assert summary["computed"] == patches and summary["cache_hits"] == 0
    assert summary["scheduler"] == "local" and summary["workers"] == 2
    assert summary["partitions"] > 2 and 1 <= summary["model_loads"] <= 2
    assert set(summary["device_by_worker"]) <= {"0", "1"}
    assert set(summary["device_by_worker"].values()) == {"cpu"} and summary["device"] == "cpu"
    assert not (tmp_path / "demo" / "cluster.parquet.parts").exists()
    workers_used = len(summary["device_by_worker"])
    assert f"{patches:,} computed at " in on_cluster.summary_text
    assert f" on {workers_used} Dask worker" in on_cluster.summary_text

    # Same keys and settings; the vectors agree to float32 rounding (the batches differ: the
    # cluster batches each partition, the DataLoader batches across rasters).
    keys, vectors, metadata = cache_contents(tmp_path / "demo" / "in_process.parquet")
    cluster_keys, cluster_vectors, cluster_metadata = cache_contents(cluster_cache)
    assert cluster_keys.equals(keys) and cluster_metadata == metadata
    np.testing.assert_allclose(cluster_vectors, vectors, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        on_cluster.table["uniqueness_score"], in_process.table["uniqueness_score"], atol=1e-6
    )

    rerun = run_build(config("local", "cluster.parquet"), write=False)
    assert rerun.summary["embeddings"]["computed"] == 0
    assert rerun.summary["embeddings"]["cache_hits"] == patches
    assert f"all {patches:,} reused, nothing computed" in rerun.summary_text
    assert cluster_cache.read_bytes() == written
    assert table_text(rerun) == table_text(on_cluster)
    # In-process from the cluster's vectors: the same table, byte for byte.
    from_cluster_vectors = run_build(config("synchronous", "cluster.parquet"), write=False)
    assert from_cluster_vectors.summary["embeddings"]["computed"] == 0
    assert table_text(from_cluster_vectors) == table_text(on_cluster)


def test_a_partition_embedded_by_the_worker_function_matches_the_dataloader(tmp_path):
    write_demo_dataset(tmp_path)
    model = save_tiny_dinov2(tmp_path / "model")
    config = EmbeddingsConfig(
        dino_model=str(model), image_size=28, batch_size=5, num_workers=0, precision="fp32"
    )
    image = str(tmp_path / "images" / "scene_2.tif")
    records = normalised_keys(
        pd.DataFrame(
            {
                "image_path": [image] * 12,
                "row_off": np.repeat([0, 64, 128], 4),
                "col_off": np.tile([0, 64, 128, 192], 3),
                "patch_size": [64] * 12,
            }
        )
    )
    expected = extract_embeddings(records, config, seed=0, progress=False).vectors
    infos, _ = probe_rasters([image])
    plan = raster_plan(records, config, 0, infos)
    (rows,) = plan.read_order(records, 64)
    task = EmbeddingTask(
        config=config,
        source=resolve_model(config),
        model_key="tiny",
        path=image,
        scaling=plan.scalings[image],
        row_off=records["row_off"].to_numpy()[rows],
        col_off=records["col_off"].to_numpy()[rows],
        size=records["patch_size"].to_numpy()[rows],
    )
    first, again = embed_partition(task), embed_partition(task)
    assert first.loaded_model and not again.loaded_model
    assert first.worker == "client" and first.device == "cpu" and not first.errors
    np.testing.assert_allclose(first.vectors, expected[rows], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(again.vectors, first.vectors)

    # A raster the worker cannot open: every window gets GDAL's message, none a vector.
    missing = embed_partition(dataclasses.replace(task, path=str(tmp_path / "gone.tif")))
    assert sorted(missing.errors) == list(range(len(rows)))
    assert "gone.tif" in missing.errors[0] and not missing.vectors.any()


def test_given_raster_infos_the_extraction_probes_nothing(tmp_path, monkeypatch):
    write_demo_dataset(tmp_path)
    model = save_tiny_dinov2(tmp_path / "model")
    config = EmbeddingsConfig(
        dino_model=str(model), image_size=28, batch_size=4, num_workers=0, precision="fp32"
    )
    image = str(tmp_path / "images" / "scene_1.tif")
    records = pd.DataFrame(
        {"image_path": [image] * 2, "row_off": [0, 64], "col_off": [0, 0], "patch_size": [64] * 2}
    )
    infos, _ = probe_rasters([image])
    expected = extract_embeddings(records, config, seed=0, progress=False).vectors

    def refuse(*args, **kwargs):
        raise AssertionError("the rasters were probed again")

    monkeypatch.setattr("patchbalance.embeddings.preprocess.probe_rasters", refuse)
    given = extract_embeddings(records, config, seed=0, progress=False, infos=infos)
    np.testing.assert_array_equal(given.vectors, expected)
    with pytest.raises(AssertionError, match="probed again"):
        extract_embeddings(records, config, seed=0, progress=False)


def test_each_worker_takes_one_gpu_chosen_by_its_name(monkeypatch):
    import torch

    # The rule only: which GPU a worker named so takes on a machine that has two.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    config = EmbeddingsConfig(use_gpu=True)
    devices = [workers.worker_device(config, str(number)) for number in range(4)]
    assert devices == [("cuda:0", "bf16"), ("cuda:1", "bf16")] * 2
    name = "tcp://10.0.0.5:40000"
    assert workers.worker_device(config, name)[0] == f"cuda:{zlib.crc32(name.encode()) % 2}"
    assert workers.worker_device(EmbeddingsConfig(), "1")[0] == "cpu"  # use_gpu is off
