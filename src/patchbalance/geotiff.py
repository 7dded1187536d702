"""Writing small GeoTIFFs: the sample data of the demo, the tests' and the benchmarks' rasters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from patchbalance.atomic import atomic_write_with


def write_geotiff(
    path: str | Path,
    data: np.ndarray,
    crs: str | None = None,
    transform: Any = None,
    nodata: float | None = None,
    block: int | None = None,
) -> Path:
    """Return `path` after writing `data` there as a deflate-compressed GeoTIFF, atomically.

    Args:
        path: the file to write; its folder is created when missing.
        data: (bands, height, width) or (height, width) pixels; their dtype is the file's.
        crs: the coordinate reference system (e.g. "EPSG:32640"); None writes none.
        transform: the affine pixel-to-ground transform; None writes none.
        nodata: the nodata value of every band, if any.
        block: tile size in pixels (a multiple of 16); None writes strips, not tiles.

    Returns:
        `path`, as a `Path`.
    """
    path = Path(path)
    bands = data if data.ndim == 3 else data[None]
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": bands.shape[2],
        "height": bands.shape[1],
        "count": bands.shape[0],
        "dtype": bands.dtype.name,
        "compress": "deflate",
    }
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    if block is not None:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    if nodata is not None:
        profile["nodata"] = nodata

    def write(temporary: Path) -> None:
        with rasterio.open(temporary, "w", **profile) as dataset:
            dataset.write(bands)

    atomic_write_with(path, write)
    return path
