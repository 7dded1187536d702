"""The measurements of the GPU check, each beside its baseline from the same run.

Every step goes through the product's own entry points (`run_build`, `nearest_neighbors`,
`run_selection`, `run_train_command`) and returns a JSON-ready dict with its figures and a
`device_checks` block: where the product says its tensors were, against where they should be.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from sizes import SPARE_CORES, ModelSize, Sizes

# Two neighbours whose similarities differ by less than this are ties (float32 sums differ in
# their last bits between BLAS libraries and devices).
TIE_TOLERANCE = 1e-5
EMBEDDINGS_BAR = 0.90


@dataclass
class Context:
    """What every step needs: where to write, how big, on which device."""

    work: Path
    sizes: Sizes
    device: str  # "cuda" or "cpu": where the CUDA paths must run
    cores: int
    records: pd.DataFrame | None = None
    records_path: Path | None = None

    @property
    def loader_workers(self) -> int:
        """Return the DataLoader workers that read windows."""
        if self.sizes.loader_workers is not None:
            return self.sizes.loader_workers
        return max(1, self.cores - SPARE_CORES)


def device_check(expected: str, seen: str | None) -> dict[str, Any]:
    """Return whether the device `seen` by the product is of the kind `expected`."""
    ok = seen is not None and str(seen).split(":")[0] == expected
    return {"expected": expected, "seen": seen, "ok": bool(ok)}


# --------------------------------------------------------------------------------------------
# Embeddings


def save_random_dinov2(folder: Path, model: ModelSize) -> Path:
    """Save a DINOv2 of `model`'s size with seeded random weights (the real architecture)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        intermediate_size=model.intermediate_size,
        patch_size=14,
    )
    Dinov2Model(config).eval().save_pretrained(folder)
    return folder


def _embeddings_settings(ctx: Context, folder: Path) -> dict[str, Any]:
    return {
        "dino_model": str(folder),
        "use_gpu": ctx.device == "cuda",
        "precision": "bf16",
        "batch_size": ctx.sizes.batch_size,
        "num_workers": ctx.loader_workers,
        "image_size": ctx.sizes.image_size,
    }


def embeddings_step(ctx: Context, model: ModelSize) -> dict[str, Any]:
    """Return the build's embeddings throughput against the same model's forward-only rate."""
    from embeddings import forward_only  # bench/embeddings.py
    from patchbalance.balancing.pipeline import run_build
    from patchbalance.config import EmbeddingsConfig

    sizes = ctx.sizes
    folder = save_random_dinov2(ctx.work / f"dinov2_{model.key}", model)
    settings = _embeddings_settings(ctx, folder)
    config = {
        "mode": "embeddings",
        "num_workers": ctx.cores,
        "input": {"records_path": str(ctx.records_path)},
        "embeddings": settings,
        "uniqueness": {"backend": "exact"},
        "compute": {"scheduler": "threads"},
        "output": {"csv_path": str(ctx.work / f"balanced_{model.key}.csv")},
    }
    batches = min(sizes.forward_batches, math.ceil(sizes.patches / sizes.batch_size))
    baseline_config = EmbeddingsConfig(**settings)
    # The forward-only rate before and after the build: the better of the two is the baseline.
    forward = [forward_only(baseline_config, batches, "bf16")]
    result = run_build(config, progress=False)
    forward.append(forward_only(baseline_config, batches, "bf16"))
    summary = result.summary["embeddings"]
    end_to_end = summary["patches_per_second"]
    baseline = max(forward)
    ratio = end_to_end / baseline if end_to_end and baseline else None
    # A diagnostic beside the product's figure: the same loop without the model's load time.
    load = summary.get("model_load_seconds") or 0.0
    loop_seconds = summary["computed"] / end_to_end - load if end_to_end else None
    without_load = summary["computed"] / loop_seconds if loop_seconds else None
    return {
        "model": model.name,
        "architecture": {
            "hidden_size": model.hidden_size,
            "layers": model.num_hidden_layers,
            "heads": model.num_attention_heads,
            "patch_size": 14,
            "weights": "random (seeded), saved with save_pretrained",
        },
        "patches": summary["computed"],
        "image_size": sizes.image_size,
        "batch_size": sizes.batch_size,
        "loader_workers": summary.get("num_workers"),
        "end_to_end_patches_per_second": end_to_end,
        "forward_only_patches_per_second": round(baseline, 2),
        "forward_only_runs": [round(rate, 2) for rate in forward],
        "forward_only_batches": batches,
        "ratio": round(ratio, 3) if ratio else None,
        "end_to_end_without_model_load": round(without_load, 2) if without_load else None,
        "bar": EMBEDDINGS_BAR,
        "meets_bar": bool(ratio and ratio >= EMBEDDINGS_BAR),
        "model_load_seconds": summary.get("model_load_seconds"),
        "embeddings_stage_seconds": result.summary["timings_s"].get("embeddings"),
        "build_seconds": round(sum(result.summary["timings_s"].values()), 2),
        "precision": summary["precision"],
        "autocast_dtype": summary.get("autocast_dtype"),
        "uniqueness_device": result.summary["uniqueness"].get("device"),
        "device_checks": {
            "embeddings": device_check(ctx.device, summary.get("computed_on")),
            "uniqueness_exact": device_check(
                ctx.device, result.summary["uniqueness"].get("device")
            ),
        },
        "note": "end to end = the build's extraction loop (model load, DataLoader start, reading, "
        "preprocessing, forward, copy back); forward-only = the same model on ready-made "
        "tensors, same batch size and precision",
    }


# --------------------------------------------------------------------------------------------
# kNN


def _tie_explained(unit: np.ndarray, row: int, ours: np.ndarray, theirs: np.ndarray) -> bool:
    """Return True when two neighbour lists of `row` differ only among equally similar rows."""
    query = unit[row].astype(np.float64)
    a = np.sort(unit[ours].astype(np.float64) @ query)
    b = np.sort(unit[theirs].astype(np.float64) @ query)
    return bool(np.abs(a - b).max() <= TIE_TOLERANCE)


def knn_step(ctx: Context) -> dict[str, Any]:
    """Return the exact search's time against faiss IndexFlatIP's, and whether they agree."""
    import faiss

    from patchbalance.balancing.uniqueness import nearest_neighbors, normalise_rows
    from patchbalance.config import UniquenessConfig
    from uniqueness import clustered_embeddings  # bench/uniqueness.py

    sizes, k = ctx.sizes, 5
    unit = normalise_rows(clustered_embeddings(sizes.knn_n, sizes.knn_dim, sizes.knn_centres, 0))
    config = UniquenessConfig(backend="exact", k_neighbors=k)
    # Warm-up on a slice: the first CUDA matrix product loads its kernels.
    nearest_neighbors(unit[: min(4096, len(unit))], k, "exact", config, 0)
    started = time.perf_counter()
    exact_idx, exact_dist, device = nearest_neighbors(unit, k, "exact", config, 0)
    exact_seconds = time.perf_counter() - started
    started = time.perf_counter()
    faiss_idx, faiss_dist, _ = nearest_neighbors(unit, k, "faiss", config, 0)
    faiss_seconds = time.perf_counter() - started
    differing = np.flatnonzero((exact_idx != faiss_idx).any(axis=1))
    beyond_ties = [
        int(row)
        for row in differing
        if not _tie_explained(unit, int(row), exact_idx[row], faiss_idx[row])
    ]
    return {
        "n": sizes.knn_n,
        "dim": sizes.knn_dim,
        "k": k,
        "exact_seconds": round(exact_seconds, 3),
        "exact_device": device,
        "faiss_seconds": round(faiss_seconds, 3),
        "faiss": f"faiss-cpu {faiss.__version__} IndexFlatIP, {faiss.omp_get_max_threads()} threads",
        "speedup": round(faiss_seconds / exact_seconds, 2),
        "rows_differing": len(differing),
        "rows_differing_beyond_ties": len(beyond_ties),
        "neighbours_identical": not beyond_ties,
        "max_distance_difference": float(np.abs(exact_dist - faiss_dist).max()),
        "device_checks": {"uniqueness_exact": device_check(ctx.device, device)},
        "note": f"neighbour lists that differ only among neighbours within {TIE_TOLERANCE} "
        "cosine similarity of each other count as identical (ties)",
    }


# --------------------------------------------------------------------------------------------
# CoreSet


def _cuda_peak_mb(run: Any) -> tuple[Any, float | None]:
    """Return `run()`'s result and the CUDA memory it allocated at peak (MB; None: no CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return run(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    value = run()
    torch.cuda.synchronize()
    return value, round((torch.cuda.max_memory_allocated() - before) / 1e6, 3)


def coreset_step(ctx: Context) -> dict[str, Any]:
    """Return cb and fd on the device under test against the CPU, with their picks compared."""
    from coreset import synthetic_embeddings, synthetic_table  # bench/coreset.py
    from patchbalance.coreset.selection import SELECTED_COLUMN, run_selection

    sizes = ctx.sizes
    table = synthetic_table(sizes.coreset_n, 0)
    vectors = synthetic_embeddings(sizes.coreset_n, sizes.coreset_dim, 0)
    # On the CPU-only run `device: null` stands in for cuda (it resolves to the CPU there).
    devices = {"device": "cuda" if ctx.device == "cuda" else None, "cpu": "cpu"}
    out: dict[str, Any] = {"n": sizes.coreset_n, "dim": sizes.coreset_dim}
    checks: dict[str, Any] = {}
    for method in ("cb", "fd"):
        runs = {}
        for label, device in devices.items():
            config = {
                "method": method,
                "budget": sizes.coreset_budget,
                "device": device,
                "fd_k_max": sizes.fd_k_max,
            }
            started = time.perf_counter()
            result, peak = _cuda_peak_mb(lambda c=config: run_selection(table, c, vectors))
            runs[label] = (result, time.perf_counter() - started, peak)
        (on_device, device_seconds, peak), (on_cpu, cpu_seconds, _) = runs.values()
        score = "coreset_score"
        same = bool(
            np.array_equal(on_device.table[SELECTED_COLUMN], on_cpu.table[SELECTED_COLUMN])
            and np.array_equal(on_device.table[score], on_cpu.table[score], equal_nan=True)
        )
        block = {
            "budget": sizes.coreset_budget,
            "picks": on_device.summary["n_selected"],
            "device_seconds": round(device_seconds, 3),
            "cpu_seconds": round(cpu_seconds, 3),
            "speedup": round(cpu_seconds / device_seconds, 2),
            "same_picks": same,
            "cuda_peak_mb": peak,
        }
        if method == "cb":
            block["backend"] = on_device.summary.get("cb_backend")
            block["cpu_backend"] = on_cpu.summary.get("cb_backend")
            expected = "torch (cuda)" if ctx.device == "cuda" else "numpy"
            checks["cb"] = {
                "expected": expected,
                "seen": block["backend"],
                "ok": block["backend"] == expected and (ctx.device != "cuda" or bool(peak)),
            }
        else:
            block["fd_k"] = on_device.summary.get("fd", {}).get("k")
            block["note"] = (
                "fd has no CUDA path: its k-means runs on scikit-learn on the CPU whatever "
                "`device` says (the key drives the cb greedy only), so both runs do the same work"
            )
        out[method] = block
    out["device_checks"] = checks
    return out


# --------------------------------------------------------------------------------------------
# Training


def _train_tables(ctx: Context) -> tuple[Path, Path]:
    records = ctx.records
    rng = np.random.default_rng(0)
    train = records.assign(sampler_weight=rng.gamma(2.0, 0.5, len(records)))
    val = records.iloc[-ctx.sizes.val_patches :]
    paths = ctx.work / "train.csv", ctx.work / "val.csv"
    train.to_csv(paths[0], index=False)
    val.to_csv(paths[1], index=False)
    return paths


def _train_config(ctx: Context, tables: tuple[Path, Path], precision: str) -> Path:
    sizes = ctx.sizes
    workers = min(ctx.loader_workers, 8)
    config: dict[str, Any] = {
        "train_dataset": {
            "_target_": "patchbalance.data.CSVWindowedSegmentationDataset",
            "input_csv_path": str(tables[0]),
            "n_classes": 4,
            # No augmentations: the check measures the device, and albumentations stays out
            # of the wheels.
            "data_loader": {
                "weighted_sampler": True,
                "weighted_sampler_num_samples": sizes.train_steps_per_epoch * sizes.train_batch,
                "num_workers": workers,
                "drop_last": True,
            },
        },
        "val_dataset": {"input_csv_path": str(tables[1]), "data_loader": {"num_workers": workers}},
        "loss": {"_target_": "torch.nn.CrossEntropyLoss", "ignore_index": 255},
        "hyperparameters": {
            "batch_size": sizes.train_batch,
            "epochs": sizes.train_epochs,
            "lr": 1e-3,
        },
        "device": ctx.device,
        "precision": precision,
        "seed": 0,
        "output_dir": str(ctx.work / f"train_{precision}"),
    }
    if sizes.train_model:
        config["model"] = dict(sizes.train_model)
    path = ctx.work / f"train_{precision}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _train_run(ctx: Context, tables: tuple[Path, Path], precision: str) -> dict[str, Any]:
    import torch

    from patchbalance.train.command import run_train_command

    config_path = _train_config(ctx, tables, precision)
    started = time.perf_counter()
    run_train_command(config_path, [], dry_run=False, progress=False)
    seconds = time.perf_counter() - started
    output = ctx.work / f"train_{precision}"
    metrics = pd.read_csv(output / "metrics.csv")
    checkpoint = torch.load(output / "last.pt", map_location="cpu", weights_only=False)
    steps = metrics["step"].to_numpy()
    times = metrics["train_seconds"].to_numpy()
    # The last epoch's rate: the first one also pays for cuDNN's kernel choice and warm-up.
    last = (steps[-1] - (steps[-2] if len(steps) > 1 else 0)) / times[-1]
    where = checkpoint.get("trained_on", {})
    return {
        "steps_per_second": round(float(last), 3),
        "steps_per_second_all_epochs": round(float(steps[-1] / times.sum()), 3),
        "steps": int(steps[-1]),
        "metrics_rows": len(metrics),
        "metrics_columns_present": bool({"miou", "train_loss", "val_loss"} <= set(metrics)),
        "last_miou": float(metrics["miou"].iloc[-1]),
        "seconds": round(seconds, 2),
        "trained_on": where,
    }


def train_step(ctx: Context) -> dict[str, Any]:
    """Return `patchbalance train` steps/s with bf16 autocast against fp32, on the device."""
    sizes = ctx.sizes
    tables = _train_tables(ctx)
    runs = {precision: _train_run(ctx, tables, precision) for precision in ("fp32", "bf16")}
    bf16, fp32 = runs["bf16"], runs["fp32"]
    return {
        "batch_size": sizes.train_batch,
        "patch": sizes.patch,
        "model": sizes.train_model.get("_target_", "the default Unet (resnet18, no weights)")
        + (" (3 stages)" if sizes.train_model else ""),
        "bf16": bf16,
        "fp32": fp32,
        "speedup": round(bf16["steps_per_second"] / fp32["steps_per_second"], 2),
        "metrics_written": bool(
            bf16["metrics_rows"] == sizes.train_epochs == fp32["metrics_rows"]
            and bf16["metrics_columns_present"]
            and fp32["metrics_columns_present"]
        ),
        "device_checks": {
            "train_fp32": device_check(ctx.device, fp32["trained_on"].get("device")),
            "train_bf16": device_check(ctx.device, bf16["trained_on"].get("device")),
            "train_bf16_autocast": {
                "expected": "bfloat16",
                "seen": bf16["trained_on"].get("autocast_dtype"),
                "ok": bf16["trained_on"].get("autocast_dtype") == "bfloat16",
            },
        },
    }
