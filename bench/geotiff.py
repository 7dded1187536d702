"""What the benchmark scripts share: a tiled GeoTIFF writer and the Dubai mask colours."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.transform import from_origin

from patchbalance import geotiff

REPO = Path(__file__).resolve().parents[1]
DUBAI_DATA = Path(
    os.environ.get("DUBAI_AERIAL_DIR", REPO.parent / "shared" / "data" / "dubai-aerial")
)
CRS = "EPSG:32640"  # UTM zone 40N, where Dubai lies; placements in the benchmarks are made up
MASK_NODATA = 255
# The colours the Dubai masks really use (see the data's README), in class-index order.
CLASS_COLOURS = {
    0: ("Unlabeled", 0x9B9B9B),
    1: ("Water", 0xE2A929),
    2: ("Land (unpaved area)", 0x8429F6),
    3: ("Road", 0x6EC1E4),
    4: ("Building", 0x3C1098),
    5: ("Vegetation", 0xFEDD3A),
}
NODATA_COLOUR = 0x000000


def write_geotiff(
    path: Path, bands: np.ndarray, transform: Any = None, nodata: float | None = None
) -> Path:
    """Write (bands, h, w) or (h, w) data as a tiled (256 px), deflate-compressed GeoTIFF."""
    if transform is None:
        transform = from_origin(300_000, 2_780_000, 0.5, 0.5)
    return geotiff.write_geotiff(
        path, bands, crs=CRS, transform=transform, nodata=nodata, block=256
    )


def mask_to_classes(rgb: np.ndarray, where: str) -> np.ndarray:
    """Return the (H, W) uint8 class-index mask of an RGB mask; black becomes MASK_NODATA."""
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    palette = np.array(
        [NODATA_COLOUR, *(colour for _, colour in CLASS_COLOURS.values())], dtype=np.int32
    )
    values = np.array([MASK_NODATA, *CLASS_COLOURS], dtype=np.uint8)
    order = np.argsort(palette)
    position = np.clip(np.searchsorted(palette[order], codes), 0, len(palette) - 1)
    found = palette[order][position] == codes
    if not found.all():
        unknown = np.unique(codes[~found])[:5]
        raise ValueError(
            f"{where}: {int((~found).sum())} pixel(s) of unknown mask colour(s) "
            + ", ".join(f"#{c:06X}" for c in unknown)
        )
    return values[order][position]
