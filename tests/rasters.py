"""Helpers that write small real GeoTIFFs for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rasterio.transform import from_origin

from patchbalance import geotiff

UTM_40N = "EPSG:32640"


def write_geotiff(
    path: Path,
    data: np.ndarray,
    crs: str | None = UTM_40N,
    transform=None,
    nodata: float | None = None,
    tiled: bool = True,
    block: int = 64,
) -> Path:
    """Write `data` ((bands,) h, w) as a tiled, deflate-compressed GeoTIFF and return its path.

    The tests' defaults over `patchbalance.geotiff.write_geotiff`: UTM zone 40N with 1 m pixels,
    and tiles of `block` px when the raster's sides are multiples of 16.
    """
    if crs is not None and not transform:
        transform = from_origin(300_000, 2_780_000, 1.0, 1.0)
    height, width = data.shape[-2:]
    aligned = tiled and height % 16 == 0 and width % 16 == 0
    return geotiff.write_geotiff(
        path, data, crs=crs, transform=transform, nodata=nodata, block=block if aligned else None
    )


def write_pair(
    folder: Path,
    name: str,
    mask: np.ndarray,
    image: np.ndarray | None = None,
    mask_nodata: float | None = 255,
    crs: str | None = UTM_40N,
    transform=None,
) -> tuple[Path, Path]:
    """Write an image/mask pair; the image defaults to mid-grey RGB of the mask's size."""
    if image is None:
        image = np.full((3, *mask.shape), 120, dtype=np.uint8)
    image_path = write_geotiff(
        folder / "images" / f"{name}.tif", image, crs=crs, transform=transform
    )
    mask_path = write_geotiff(
        folder / "masks" / f"{name}.tif", mask, crs=crs, transform=transform, nodata=mask_nodata
    )
    return image_path, mask_path


def record(image_path: Path, mask_path: Path, row_off: int, col_off: int, size: int) -> dict:
    """Return one patch record."""
    return {
        "image_path": str(image_path),
        "mask_path": str(mask_path),
        "row_off": row_off,
        "col_off": col_off,
        "patch_size": size,
    }


def write_two_pairs_and_records(
    folder: Path, seed: int, n_classes: int, size: int, zero_top: bool = True
) -> Path:
    """Write pairs `a` and `b` (64 px, random classes) and `records.csv` of their `size` windows.

    With `zero_top`, the top 32 (a) and 16 (b) rows are class 0, so the two masks differ in mix.
    """
    rng = np.random.default_rng(seed)
    records = []
    for name in ("a", "b"):
        mask = rng.integers(0, n_classes, size=(64, 64)).astype(np.uint8)
        if zero_top:
            mask[: 32 if name == "a" else 16] = 0
        pair = write_pair(folder, name, mask)
        records += [
            record(*pair, r, c, size) for r in range(0, 64, size) for c in range(0, 64, size)
        ]
    path = folder / "records.csv"
    pd.DataFrame(records).to_csv(path, index=False)
    return path


def write_records_build(folder: Path, csv_path: str) -> Path:
    """Write two pairs, `records.csv` and `build.yaml` (k 2..3, table at `csv_path`); return it."""
    import yaml

    write_two_pairs_and_records(folder, seed=0, n_classes=3, size=32, zero_top=False)
    block = {
        "input": {"records_path": "records.csv"},
        "clustering": {"k_min": 2, "k_max": 3},
        "output": {"csv_path": csv_path},
    }
    path = folder / "build.yaml"
    path.write_text(yaml.safe_dump({"balanced_dataset": block}))
    return path
