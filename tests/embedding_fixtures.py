"""Helpers for the embeddings tests: a tiny DINOv2 saved locally and textured GeoTIFFs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rasters import write_geotiff

TINY_PATCH = 14
TINY_HIDDEN = 32


def save_tiny_dinov2(folder: Path, seed: int = 0, corrupt: bool = False) -> Path:
    """Save a randomly initialised 2-layer DINOv2 (hidden 32, patch 14) to `folder`.

    With `corrupt`, the final layer norm's weights are NaN, so every embedding is NaN.
    """
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=TINY_PATCH,
        image_size=28,
    )
    model = Dinov2Model(config).eval()
    if corrupt:
        with torch.no_grad():
            model.layernorm.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    return Path(folder)


def textured_image(seed: int, size: int = 128, bands: int = 3) -> np.ndarray:
    """Return a uint8 image of smooth random blobs plus noise, (bands, size, size)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(bands, size // 16, size // 16)).astype(np.float64)
    smooth = np.kron(coarse, np.ones((16, 16)))
    noisy = smooth + rng.normal(0, 20, size=smooth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def grid_records(
    image_path: Path, size: int, patch: int, stride: int | None = None
) -> pd.DataFrame:
    """Return the records of a regular grid of windows over a `size` x `size` image."""
    stride = stride or patch
    offsets = range(0, size - patch + 1, stride)
    return pd.DataFrame(
        [
            {"image_path": str(image_path), "row_off": r, "col_off": c, "patch_size": patch}
            for r in offsets
            for c in offsets
        ]
    )


def write_textured(path: Path, seed: int, size: int = 128, bands: int = 3, **kwargs) -> Path:
    """Write a textured uint8 GeoTIFF and return its path."""
    return write_geotiff(path, textured_image(seed, size, bands), **kwargs)
