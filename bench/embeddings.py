"""Benchmark embedding extraction (SPEC §9): end-to-end patches/s vs forward-only patches/s.

Bar: end-to-end throughput (reading GeoTIFF windows in DataLoader workers, preprocessing,
forward, pooling) >= 90 % of the model's forward-only throughput on ready-made tensors at the
same batch size, i.e. reading is never the bottleneck.

Generates tiled, deflate-compressed RGB GeoTIFFs in a temporary folder. The model is
EfficientNet-Lite0 with its shipped ImageNet weights (default), or a DINOv2: a local folder
(`--dino-model DIR`) or, with `--dino-model tiny`, a small randomly initialised DINOv2
(hidden 192, 6 layers) built on the spot. `--compare-precision` also times fp32 against bf16
autocast, forward-only.

    python bench/embeddings.py
    python bench/embeddings.py --dino-model tiny --image-size 112 --compare-precision
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from geotiff import write_geotiff
from patchbalance.config import EmbeddingsConfig
from patchbalance.embeddings import autocast, choose_device, extract_embeddings, load_backbone


def write_rasters(folder: Path, count: int, size: int, seed: int) -> list[Path]:
    """Write `count` textured RGB uint8 GeoTIFFs (tiled 256, deflate) and return their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, size=(3, size // 32, size // 32)).astype(np.float32)
        image = np.kron(coarse, np.ones((32, 32), np.float32))
        image += rng.normal(0, 25, size=image.shape).astype(np.float32)
        path = folder / f"scene_{i}.tif"
        write_geotiff(path, np.clip(image, 0, 255).astype(np.uint8))
        paths.append(path)
    return paths


def grid(paths: list[Path], size: int, patch: int, stride: int) -> pd.DataFrame:
    offsets = range(0, size - patch + 1, stride)
    return pd.DataFrame(
        [
            {"image_path": str(p), "row_off": r, "col_off": c, "patch_size": patch}
            for p in paths
            for r in offsets
            for c in offsets
        ]
    )


def save_tiny_dinov2(folder: Path) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768
    )
    Dinov2Model(config).eval().save_pretrained(folder)
    return folder


def forward_only(config: EmbeddingsConfig, batches: int, precision: str) -> float:
    """Return patches/s of the model alone on ready-made normalised batches."""
    import torch

    backbone = load_backbone(config)
    device, _ = choose_device(config)
    backbone.module.to(device)
    generator = torch.Generator().manual_seed(0)
    shape = (config.batch_size, 3, config.image_size, config.image_size)
    inputs = [torch.randn(shape, generator=generator) for _ in range(min(batches, 4))]
    with torch.inference_mode(), autocast(device, precision):
        backbone.embed(inputs[0].to(device))  # warm-up
        start = time.perf_counter()
        for b in range(batches):
            backbone.embed(inputs[b % len(inputs)].to(device)).float().cpu().numpy()
        seconds = time.perf_counter() - start
    return batches * config.batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dino-model", default=None, help="a DINOv2 folder, or 'tiny'")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--rasters", type=int, default=4)
    parser.add_argument("--raster-size", type=int, default=1024)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compare-precision", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.dino_model is None:
            model = {"backbone": "efficientnet_lite0"}
            name = "efficientnet_lite0 (shipped ImageNet weights)"
        elif args.dino_model == "tiny":
            model = {"dino_model": str(save_tiny_dinov2(folder / "tiny"))}
            name = "tiny random DINOv2 (hidden 192, 6 layers, patch 14)"
        else:
            model = {"dino_model": args.dino_model}
            name = args.dino_model
        config = EmbeddingsConfig(
            **model,
            image_size=args.image_size,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            precision=args.precision,
        )
        device, precision = choose_device(config)
        records = grid(
            write_rasters(folder, args.rasters, args.raster_size, 0),
            args.raster_size,
            args.patch,
            args.stride,
        )
        batches = -(-len(records) // args.batch_size)
        print(
            f"model {name}; image_size {args.image_size}; batch {args.batch_size}; "
            f"{len(records)} windows of {args.patch} px from {args.rasters} GeoTIFFs; "
            f"device {device}, precision {precision}; torch threads {torch.get_num_threads()}, "
            f"DataLoader workers {args.num_workers}, cores {os.cpu_count()}"
        )
        if args.compare_precision:
            for option in ("fp32", "bf16"):
                rates = [forward_only(config, batches, option) for _ in range(args.repeats)]
                print(f"forward-only {option}: best {max(rates):8.1f} patches/s  {_fmt(rates)}")

        # Alternate the two measurements so that load from other processes hits both alike;
        # report the best of each.
        model_rates, loop_rates, call_rates = [], [], []
        for _ in range(args.repeats):
            model_rates.append(forward_only(config, batches, precision))
            start = time.perf_counter()
            result = extract_embeddings(records, config, seed=0, progress=False)
            call_rates.append(len(records) / (time.perf_counter() - start))
            loop_rates.append(result.summary["patches_per_second"])
        print(f"forward-only : best {max(model_rates):8.1f} patches/s  {_fmt(model_rates)}")
        print(
            f"end-to-end   : best {max(loop_rates):8.1f} patches/s  {_fmt(loop_rates)} "
            f"(extraction loop, DataLoader start included)"
        )
        print(
            f"whole call   : best {max(call_rates):8.1f} patches/s  {_fmt(call_rates)} "
            "(also model load and raster planning)"
        )
        ratio = max(loop_rates) / max(model_rates)
        print(f"ratio end-to-end / forward-only = {ratio:.2f} (bar: >= 0.90), best of each")
        median = float(np.median(loop_rates) / np.median(model_rates))
        print(f"ratio of the medians             = {median:.2f}")


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in values) + "]"


if __name__ == "__main__":
    main()
