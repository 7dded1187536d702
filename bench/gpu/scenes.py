"""The check's own data: demo-style GeoTIFF mosaics and a records table of grid windows.

Each raster is a mosaic of the demo's synthetic scenes (`patchbalance.demo.demo_scene`, 512 px,
four classes with a rare one), drawn from a small set of distinct scenes turned and flipped, so
that making 20,000 windows costs seconds, not minutes.
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from rasterio.transform import from_origin
from sizes import Sizes

from patchbalance.demo import CRS, MASK_NODATA, demo_scene
from patchbalance.geotiff import write_geotiff
from patchbalance.table import write_table

SCENE = 512
BLOCK = 256


def _scene(task: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, index = task
    rng = np.random.default_rng([seed, index])
    return demo_scene(rng, SCENE, water_bias=0.4 if index % 3 == 1 else 0.0)


# The distinct scenes, made before the raster writers start: forked writers inherit them.
_SCENES: list[tuple[np.ndarray, np.ndarray]] = []


def _mosaic(
    scenes: list[tuple[np.ndarray, np.ndarray]], per_side: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return `(mask, image)` of per_side x per_side scenes, each turned and flipped at random."""
    side = SCENE * per_side
    mask = np.empty((side, side), np.uint8)
    image = np.empty((3, side, side), np.uint8)
    for row in range(per_side):
        for col in range(per_side):
            scene_mask, scene_image = scenes[int(rng.integers(len(scenes)))]
            turns, flip = int(rng.integers(4)), bool(rng.integers(2))
            scene_mask = np.rot90(scene_mask, turns)
            scene_image = np.rot90(scene_image, turns, axes=(1, 2))
            if flip:
                scene_mask, scene_image = scene_mask[:, ::-1], scene_image[:, :, ::-1]
            rows = slice(row * SCENE, (row + 1) * SCENE)
            cols = slice(col * SCENE, (col + 1) * SCENE)
            mask[rows, cols] = scene_mask
            image[:, rows, cols] = scene_image
    return mask, image


def _write_raster(task: tuple[Path, int, int, int]) -> tuple[str, str]:
    folder, index, per_side, seed = task
    mask, image = _mosaic(_SCENES, per_side, np.random.default_rng([seed, 1000 + index]))
    if index == 0:
        mask[:, -40:] = MASK_NODATA  # an unlabelled margin, as in the demo
    transform = from_origin(300_000 + 5_000 * index, 2_780_000, 0.5, 0.5)
    image_path = folder / "images" / f"mosaic_{index:03d}.tif"
    mask_path = folder / "masks" / f"mosaic_{index:03d}.tif"
    write_geotiff(image_path, image, crs=CRS, transform=transform, block=BLOCK)
    write_geotiff(mask_path, mask, crs=CRS, transform=transform, nodata=MASK_NODATA, block=BLOCK)
    return str(image_path), str(mask_path)


def write_check_data(folder: Path, sizes: Sizes, workers: int, seed: int = 7) -> pd.DataFrame:
    """Write the mosaics and `records.csv` under `folder`; return the records (absolute paths).

    Args:
        folder: where the rasters and the table go.
        sizes: how many windows, of what size, at what stride.
        workers: processes that write rasters side by side.
        seed: every scene and mosaic derives from it.

    Returns:
        The first `sizes.patches` grid windows, raster by raster.
    """
    rasters = math.ceil(sizes.patches / sizes.windows_per_raster)
    distinct = min(sizes.distinct_scenes, sizes.scenes_per_side**2 * rasters)
    scene_tasks = [(seed, i) for i in range(distinct)]
    raster_tasks = [(folder, i, sizes.scenes_per_side, seed) for i in range(rasters)]
    if workers > 1:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(min(workers, distinct), mp_context=context) as pool:
            _SCENES[:] = pool.map(_scene, scene_tasks)
        with ProcessPoolExecutor(min(workers, rasters), mp_context=context) as pool:
            paths = list(pool.map(_write_raster, raster_tasks))
    else:
        _SCENES[:] = map(_scene, scene_tasks)
        paths = [_write_raster(task) for task in raster_tasks]
    _SCENES.clear()
    offsets = np.arange(0, sizes.raster_side - sizes.patch + 1, sizes.stride)
    rows, cols = (a.ravel() for a in np.meshgrid(offsets, offsets, indexing="ij"))
    records = pd.concat(
        [
            pd.DataFrame(
                {
                    "image_path": image_path,
                    "mask_path": mask_path,
                    "row_off": rows,
                    "col_off": cols,
                    "patch_size": sizes.patch,
                }
            )
            for image_path, mask_path in paths
        ],
        ignore_index=True,
    ).iloc[: sizes.patches]
    write_table(records, folder / "records.csv")
    return records
