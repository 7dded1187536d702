"""Writing small GeoTIFFs: the sample data of the demo, the tests' and the benchmarks' rasters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rasterio.io import MemoryFile

from patchbalance.atomic import atomic_writer


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
    # Encoded in memory, then written by Python: a full disk is then an OSError with its errno
    # (GDAL would print libtiff's own lines and keep none), and no half a file is ever left.
    with MemoryFile() as memory:
        with memory.open(**profile) as dataset:
            dataset.write(bands)
        encoded = memory.read()
    with atomic_writer(path, "wb") as stream:
        stream.write(encoded)
    return path
