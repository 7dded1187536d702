"""Embedding input (SPEC §3.5): band selection, scaling to [0, 1], one window to model input.

Bands are 1-based (default the first three; one band is repeated to three) and scaled to [0, 1]:
uint8 / 255; else by `value_range`; else by the 2nd-98th percentile of a seeded pixel sample
taken once per raster. Nodata pixels become 0, the window is resized with antialiasing to
`image_size` and normalised with the model's mean and standard deviation.
"""

from __future__ import annotations

import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from rasterio.errors import RasterioError

from patchbalance.config import EmbeddingsConfig
from patchbalance.errors import ConfigError, InputError
from patchbalance.table import key_label
from patchbalance.windows import (
    RasterHandleCache,
    RasterInfo,
    gdal_message,
    open_raster,
    probe_rasters,
    read_window,
    read_window_mask,
    window_partitions,
    windows_in_bounds,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The percentile stretch of non-uint8 rasters samples this many square windows per raster.
PERCENTILE_SAMPLE_WINDOWS = 16
PERCENTILE_SAMPLE_SIZE = 256


def check_bands_setting(config: EmbeddingsConfig) -> None:
    """Raise `ConfigError` unless `bands` is unset or lists one or three bands."""
    if config.bands is not None and len(config.bands) not in (1, 3):
        raise ConfigError(
            f"embeddings.bands must list 1 band (repeated to RGB) or 3 bands, got {config.bands}"
        )


@dataclass(frozen=True)
class RasterScaling:
    """How one raster's pixels become model input in [0, 1]."""

    bands: tuple[int, ...]  # 1-based, one or three
    low: np.ndarray  # per selected band: the value that maps to 0
    high: np.ndarray  # ... and to 1
    has_mask: bool  # whether the raster has nodata/mask pixels to zero
    method: str  # "uint8", "value_range" or "percentile"


def select_bands(config: EmbeddingsConfig, info: RasterInfo) -> tuple[int, ...]:
    """Return the 1-based bands to read from a raster (raises `InputError` if it lacks them)."""
    if config.bands is not None:
        bands = tuple(config.bands)
        if max(bands) > info.count:
            raise InputError(
                f"{info.path}: has {info.count} band(s) but embeddings.bands asks for "
                f"{list(bands)}; choose bands between 1 and {info.count}"
            )
        return bands
    if info.count >= 3:
        return (1, 2, 3)
    if info.count == 1:
        return (1,)
    raise InputError(
        f"{info.path}: has {info.count} bands; set embeddings.bands to the 1 or 3 bands to use"
    )


def percentile_range(
    path: str, info: RasterInfo, bands: tuple[int, ...], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return per-band 2nd and 98th percentiles of a seeded sample of the raster's valid pixels.

    The sample is up to 16 random square windows of up to 256 pixels, drawn from a generator
    seeded by `seed` and the path, so a raster always gets the same stretch.
    """
    size = min(PERCENTILE_SAMPLE_SIZE, info.width, info.height)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(path.encode())])
    cells = (info.height // size) * (info.width // size)
    count = min(PERCENTILE_SAMPLE_WINDOWS, max(1, cells))
    rows = rng.integers(0, info.height - size + 1, size=count)
    cols = rng.integers(0, info.width - size + 1, size=count)
    samples = []
    with open_raster(path) as dataset:
        for row, col in zip(rows.tolist(), cols.tolist(), strict=True):
            pixels = read_window(dataset, row, col, size, list(bands)).astype(np.float64)
            valid = np.isfinite(pixels).all(axis=0)
            if info.has_mask:
                valid &= read_window_mask(dataset, row, col, size) > 0
            samples.append(pixels[:, valid])
    values = np.concatenate(samples, axis=1)
    if values.shape[1] == 0:
        log.warning("%s: no valid pixel in the sample; scaling its values from 0 to 1", path)
        return np.zeros(len(bands), np.float32), np.ones(len(bands), np.float32)
    low, high = np.percentile(values, [2, 98], axis=1)
    # A flat band would divide by zero; give it a unit range.
    high = np.where(high > low, high, low + 1.0)
    return low.astype(np.float32), high.astype(np.float32)


def raster_scaling(
    config: EmbeddingsConfig, info: RasterInfo, seed: int, path: str | None = None
) -> RasterScaling:
    """Return how the raster's pixels are scaled to [0, 1] (computed once per raster)."""
    bands = select_bands(config, info)
    n = len(bands)
    if info.dtype == "uint8":
        low, high, method = np.zeros(n), np.full(n, 255.0), "uint8"
    elif config.value_range is not None:
        low = np.full(n, config.value_range[0])
        high = np.full(n, config.value_range[1])
        method = "value_range"
    else:
        low, high = percentile_range(path or info.path, info, bands, seed)
        method = "percentile"
    return RasterScaling(
        bands, low.astype(np.float32), high.astype(np.float32), info.has_mask, method
    )


def preprocess_window(
    pixels: np.ndarray,
    valid: np.ndarray | None,
    scaling: RasterScaling,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> torch.Tensor:
    """Return the model input (3, image_size, image_size) float32 for one window's pixels.

    `pixels` is (bands, h, w) as read; `valid` (h, w) is False on nodata pixels (or None).
    Scales to [0, 1], zeroes nodata and non-finite pixels, repeats one band to three, resizes
    with antialiasing and normalises with `mean`/`std`.
    """
    import torch
    import torch.nn.functional as functional

    x = pixels.astype(np.float32)
    x -= scaling.low[:, None, None]
    x /= (scaling.high - scaling.low)[:, None, None]
    np.clip(x, 0.0, 1.0, out=x)
    x[~np.isfinite(x)] = 0.0
    if valid is not None:
        x[:, ~valid] = 0.0
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    tensor = torch.from_numpy(x)
    if tensor.shape[-2:] != (image_size, image_size):
        tensor = functional.interpolate(
            tensor[None],
            size=(image_size, image_size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (tensor - mean_t) / std_t


class WindowDataset:
    """A map-style dataset of preprocessed image windows for a torch DataLoader.

    Item i is `(i, tensor, error)`: the model input for window i, or zeros and the GDAL
    message when the read failed (so the main process can name the patch in one line instead
    of a worker traceback). Each worker process opens each raster once (`RasterHandleCache`).
    """

    def __init__(
        self,
        paths: list[str],
        path_codes: np.ndarray,
        row_off: np.ndarray,
        col_off: np.ndarray,
        size: np.ndarray,
        scalings: dict[str, RasterScaling],
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.paths = paths
        self.path_codes = path_codes
        self.row_off = row_off
        self.col_off = col_off
        self.size = size
        self.scalings = scalings
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.handles = RasterHandleCache()

    def __len__(self) -> int:
        return len(self.path_codes)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        import torch

        path = self.paths[self.path_codes[i]]
        scaling = self.scalings[path]
        row, col, size = int(self.row_off[i]), int(self.col_off[i]), int(self.size[i])
        try:
            dataset = self.handles.get(path)
            pixels = read_window(dataset, row, col, size, list(scaling.bands))
            valid = read_window_mask(dataset, row, col, size) > 0 if scaling.has_mask else None
        except (RasterioError, OSError) as exc:
            empty = torch.zeros(3, self.image_size, self.image_size)
            return i, empty, gdal_message(exc)
        tensor = preprocess_window(pixels, valid, scaling, self.image_size, self.mean, self.std)
        return i, tensor, ""


def unreadable_window_error(keys: pd.DataFrame, row: int, message: str) -> InputError:
    """Return the error naming a window whose image could not be read, and GDAL's message."""
    return InputError(
        f"cannot read the image window {key_label(keys, row)} for embeddings: {message}"
    )


@dataclass
class RasterPlan:
    """The rasters of the windows to compute: paths, each window's path code, infos, scalings."""

    paths: list[str]
    codes: np.ndarray
    infos: dict[str, RasterInfo]
    scalings: dict[str, RasterScaling]

    def read_order(self, keys: pd.DataFrame, max_windows: int) -> list[np.ndarray]:
        """Return the rows of `keys` in chunks of one raster each (paths sorted), in block order."""
        partitions = window_partitions(
            [keys["image_path"].to_numpy()],
            np.argsort(self.codes, kind="stable"),
            keys["row_off"].to_numpy(),
            keys["col_off"].to_numpy(),
            block_shapes={path: info.block_shape for path, info in self.infos.items()},
            max_windows=max(1, max_windows),
        )
        return [partition.rows for partition in partitions]


def raster_plan(
    keys: pd.DataFrame,
    config: EmbeddingsConfig,
    seed: int,
    infos: dict[str, RasterInfo] | None,
) -> RasterPlan:
    """Return the plan of the rasters of `keys`; those missing from `infos` are probed here.

    Windows of a probed raster are checked to lie inside it; those of a raster in `infos` were
    checked by whoever probed it.
    """
    codes, uniques = pd.factorize(keys["image_path"], sort=True)
    paths = [str(path) for path in uniques]
    workers = max(1, min(config.num_workers, len(paths), os.cpu_count() or 1))
    known = {path: infos[path] for path in paths if infos is not None and path in infos}
    unknown = [path for path in paths if path not in known]
    if unknown:
        probed, errors = probe_rasters(unknown, workers)
        if errors:
            path, message = next(iter(sorted(errors.items())))
            raise InputError(f"{path}: cannot open the image for embeddings: {message}")
        known.update(probed)
        checked = np.array([path in probed for path in paths])[codes]
        inside = windows_in_bounds(
            keys["row_off"].to_numpy(),
            keys["col_off"].to_numpy(),
            keys["patch_size"].to_numpy(),
            np.array([known[p].height for p in paths])[codes],
            np.array([known[p].width for p in paths])[codes],
        )
        outside = checked & ~inside
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            raise InputError(
                f"{int(outside.sum())} window(s) lie outside their image, e.g. "
                f"{key_label(keys, first)}; exclude them before computing embeddings"
            )
    with ThreadPoolExecutor(max_workers=workers) as pool:
        scalings = dict(
            zip(
                paths,
                pool.map(lambda p: raster_scaling(config, known[p], seed, p), paths),
                strict=True,
            )
        )
    return RasterPlan(paths, codes.astype(np.int64), {p: known[p] for p in paths}, scalings)
