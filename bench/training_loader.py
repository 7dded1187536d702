"""Benchmark: DataLoader throughput (patches/s) of the windowed dataset on the demo rasters.

Writes the demo data (4 tiled, deflate-compressed 512 x 512 GeoTIFF scenes, 64 px patches) and
builds its balanced table, then times full passes of the loaders. The baseline is a naive reader
that opens both rasters for every patch (what a Dataset without cached handles does), measured
in the same run without workers and without augmentation; the windowed dataset is timed the same
way, then as the example config trains: weighted sampler plus its augmentations (flips,
rotate90, Normalize, ToTensorV2), with 0 and 2 workers.

    python bench/training_loader.py
    python bench/training_loader.py --epochs 5 --out /tmp/demo
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from patchbalance.balancing.pipeline import run_build
from patchbalance.config import load_config
from patchbalance.data import CSVWindowedSegmentationDataset, build_dataloader
from patchbalance.demo import write_demo_dataset

AUGMENTATIONS = [
    {"_target_": "albumentations.HorizontalFlip", "p": 0.5},
    {"_target_": "albumentations.VerticalFlip", "p": 0.5},
    {"_target_": "albumentations.RandomRotate90", "p": 0.5},
    {
        "_target_": "albumentations.Normalize",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    },
    {"_target_": "albumentations.pytorch.ToTensorV2"},
]


class NaiveWindowDataset(torch.utils.data.Dataset):
    """Opens the image and mask files for every patch; no augmentation."""

    def __init__(self, dataset: CSVWindowedSegmentationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        d = self.dataset
        size = int(d.patch_size[index])
        window = Window(int(d.col_off[index]), int(d.row_off[index]), size, size)
        with rasterio.open(d.image_files[d._image_codes[index]]) as image:
            pixels = image.read(window=window)
        with rasterio.open(d.mask_files[d._mask_codes[index]]) as mask:
            labels = mask.read(1, window=window)
        return {
            "image": torch.from_numpy(pixels).float() / 255,
            "mask": torch.from_numpy(labels.astype(np.int64)),
        }


def patches_per_second(loader, epochs: int) -> float:
    """Return patches per second over `epochs` full passes of `loader` (after one warm-up)."""
    for _ in loader:
        break
    started = time.perf_counter()
    count = 0
    for epoch in range(epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            count += batch["image"].shape[0]
    return count / (time.perf_counter() - started)


def build_demo(out: Path | None) -> dict[str, Path]:
    """Write the demo data under `out` (default: a new temporary folder), build its table.

    Returns:
        The demo's paths (`write_demo_dataset`): `table` the balanced table, `val` the held-out
        scene's table, `config` the build configuration.
    """
    out = out or Path(tempfile.mkdtemp(prefix="patchbalance-bench-"))
    paths = write_demo_dataset(out)
    run_build(load_config(paths["config"]), progress=False)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    paths = build_demo(args.out)
    dataset = CSVWindowedSegmentationDataset(
        paths["table"], n_classes=4, augmentation_list=AUGMENTATIONS
    )
    print(f"demo table: {len(dataset)} patches of 64 px, batch size {args.batch_size}")
    naive = NaiveWindowDataset(dataset)
    naive_loader = build_dataloader(
        naive, {"shuffle": True}, batch_size=args.batch_size, seed=0, training=True
    )
    baseline = patches_per_second(naive_loader, args.epochs)
    print(f"  naive reader (open per patch), 0 workers   {baseline:8.0f} patches/s")
    plain = CSVWindowedSegmentationDataset(paths["table"], n_classes=4)
    plain_loader = build_dataloader(
        plain, {"shuffle": True}, batch_size=args.batch_size, seed=0, training=True
    )
    rate = patches_per_second(plain_loader, args.epochs)
    print(
        f"  windowed dataset, no augmentation, 0 workers  {rate:8.0f} patches/s"
        f"   ({rate / baseline:.2f}x the naive reader)"
    )
    for workers in (0, 2):
        loader = build_dataloader(
            dataset,
            {"weighted_sampler": True, "num_workers": workers, "persistent_workers": True},
            batch_size=args.batch_size,
            seed=0,
        )
        rate = patches_per_second(loader, args.epochs)
        print(
            f"  + augmentations, weighted, {workers} workers       {rate:8.0f} patches/s"
            f"   ({rate / baseline:.2f}x the naive reader)"
        )


if __name__ == "__main__":
    main()
