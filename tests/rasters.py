"""Helpers that write small real GeoTIFFs for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

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
    """Write `data` ((bands,) h, w) as a tiled, deflate-compressed GeoTIFF and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bands = data if data.ndim == 3 else data[None]
    profile = {
        "driver": "GTiff",
        "width": bands.shape[2],
        "height": bands.shape[1],
        "count": bands.shape[0],
        "dtype": bands.dtype.name,
        "compress": "deflate",
    }
    if crs is not None:
        profile["crs"] = crs
        profile["transform"] = transform or from_origin(300_000, 2_780_000, 1.0, 1.0)
    elif transform is not None:
        profile["transform"] = transform
    if tiled and bands.shape[1] % 16 == 0 and bands.shape[2] % 16 == 0:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(bands)
    return path


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
