"""Window placement over rasters: the regular grid, plus windows centred on rare classes (SPEC §2.1).

`placement: class_centred` adds, beside the grid, windows centred on pixels of the rare classes:
the crops that rare-class and foreground oversampling take at training time, precomputed so that
a weighted sampler can draw them.

For each mask, one pass in block order (strips of whole block rows, so memory is bounded by a
strip) counts the class pixels under the grid and labels each class's connected regions inside
the strip. Every region keeps a few seeded random pixels of its own; the largest regions of each
class are kept as candidates. After the pass over every mask the rare classes are known (share of
the grid's pixels below `rare_below`, or listed in `rare_classes`), and for each rare class and
raster the centres are taken one per region, largest first, then further pixels of the large
regions. A window is shifted to lie inside the raster, must hold at least `class_min_pixels` of
its class (read back from the mask), and is dropped when it equals a grid window or overlaps an
already chosen class window by more than `max_overlap` (intersection over union).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from rasterio.windows import Window
from scipy import ndimage

from patchbalance.compute import Compute
from patchbalance.errors import ConfigError
from patchbalance.measures import class_presence_threshold
from patchbalance.windows import RasterInfo, nodata_pixels, open_raster

# Random pixels kept per region: the first centres a region offers, in order.
PIXELS_PER_REGION = 4
# Regions kept per class and raster, as a multiple of the windows wanted: spare candidates for
# the ones that the overlap and min-pixels rules drop.
REGIONS_PER_WINDOW = 8


@dataclass(frozen=True)
class PlacementSettings:
    """The `input:` keys that place class-centred windows, validated by the configuration."""

    patch_size: int
    stride: int
    rare_below: float = 0.05
    rare_classes: tuple[int, ...] = ()
    windows_per_raster: int = 16
    min_pixels: float | None = None
    max_overlap: float = 0.5
    classes: tuple[int, ...] | None = None
    nodata: float | None = None
    mask_band: int = 1
    seed: int = 42

    @property
    def min_class_pixels(self) -> float:
        """Return the pixel count a class-centred window must hold of its class."""
        area = np.array([float(self.patch_size * self.patch_size)])
        return float(class_presence_threshold(self.min_pixels, area)[0])


@dataclass
class _Candidates:
    """The pass over one mask: grid class counts and, per class, its largest regions."""

    counts: dict[int, int] = field(default_factory=dict)
    # class value -> (sizes (R,), pixels (R, PIXELS_PER_REGION, 2) as row, col; -1 = none)
    regions: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def class_centred_records(
    pairs: list[tuple[str, str]],
    infos: list[RasterInfo],
    settings: PlacementSettings,
    compute: Compute | None = None,
) -> tuple[pd.DataFrame, dict[str, object]]:
    """Return the class-centred windows of every pair and the figures behind them.

    Args:
        pairs: (image path, mask path) per raster pair, in the order of the grid records.
        infos: the probed mask raster of each pair.
        settings: the placement keys.
        compute: where the per-mask passes run (a raster per task); this thread when None.

    Returns:
        Records (image_path, mask_path, row_off, col_off, patch_size, placement) of the added
        windows, and a summary: the class shares over the grid, the rare classes, and the
        windows added per class.
    """
    compute = compute or Compute("synchronous", 1)
    keep = settings.windows_per_raster * REGIONS_PER_WINDOW
    scans = [(info, settings, keep, settings.seed + number) for number, info in enumerate(infos)]
    passes: list[_Candidates] = [_Candidates()] * len(infos)
    for position, scanned in compute.as_completed(_scan_task, scans):
        passes[position] = scanned
    totals: dict[int, int] = {}
    for scanned in passes:
        for value, count in scanned.counts.items():
            totals[value] = totals.get(value, 0) + count
    _check_rare_classes(settings.rare_classes, sorted(totals))
    grand = sum(totals.values())
    shares = {value: count / grand for value, count in sorted(totals.items())} if grand else {}
    rare = sorted(
        value
        for value, share in shares.items()
        if share > 0 and (share < settings.rare_below or value in settings.rare_classes)
    )
    frames = []
    added = {value: 0 for value in rare}
    choices = [(info, scanned, rare, settings) for info, scanned in zip(infos, passes, strict=True)]
    chosen: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros((0, 2)), np.zeros(0))] * len(infos)
    for position, windows in compute.as_completed(_choose_task, choices):
        chosen[position] = windows
    for (image_path, mask_path), (offsets, values) in zip(pairs, chosen, strict=True):
        for value in values:
            added[int(value)] += 1
        frames.append(
            pd.DataFrame(
                {
                    "image_path": image_path,
                    "mask_path": mask_path,
                    "row_off": offsets[:, 0],
                    "col_off": offsets[:, 1],
                    "patch_size": np.int64(settings.patch_size),
                    "placement": [f"class:{v}" for v in values],
                }
            )
        )
    records = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    summary = {
        "class_share_over_grid": {str(v): round(s, 6) for v, s in shares.items()},
        "rare_classes": rare,
        "class_windows": {str(v): n for v, n in added.items()},
    }
    return records, summary


def _check_rare_classes(rare_classes: tuple[int, ...], found: list[int]) -> None:
    """Raise `ConfigError` when `input.rare_classes` names a class no mask holds."""
    unknown = [value for value in rare_classes if value not in found]
    if unknown:
        raise ConfigError(
            f"input.rare_classes names class {unknown[0]}, which is not among the classes "
            f"{found} that the masks hold; list class values that occur"
        )


def _scan_task(task: tuple[RasterInfo, PlacementSettings, int, int]) -> _Candidates:
    """Return `_scan_mask` of one raster (the unit of work on a cluster)."""
    return _scan_mask(*task)


def _choose_task(
    task: tuple[RasterInfo, _Candidates, list[int], PlacementSettings],
) -> tuple[np.ndarray, np.ndarray]:
    """Return `_choose_windows` of one raster (the unit of work on a cluster)."""
    return _choose_windows(*task)


def _grid_extent(length: int, settings: PlacementSettings) -> int:
    """Return how many pixels from the origin the grid windows cover along one axis."""
    if length < settings.patch_size:
        return 0
    last = (length - settings.patch_size) // settings.stride * settings.stride
    return last + settings.patch_size


def _strip_height(info: RasterInfo, patch_size: int) -> int:
    block = max(1, info.block_shape[0])
    return max(block, -(-patch_size // block) * block)


def _scan_mask(info: RasterInfo, settings: PlacementSettings, keep: int, seed: int) -> _Candidates:
    """Return the grid class counts and the largest regions per class of one mask, read once."""
    rng = np.random.default_rng(seed)
    nodata = settings.nodata if settings.nodata is not None else info.nodata
    covered_rows = _grid_extent(info.height, settings)
    covered_cols = _grid_extent(info.width, settings)
    scanned = _Candidates()
    height = _strip_height(info, settings.patch_size)
    with open_raster(info.path) as dataset:
        for top in range(0, info.height, height):
            rows = min(height, info.height - top)
            strip = dataset.read(settings.mask_band, window=Window(0, top, info.width, rows))
            valid = ~nodata_pixels(strip, nodata, settings.classes)
            values = _values_present(strip[valid])
            grid_rows = max(0, min(rows, covered_rows - top))
            under_grid = strip[:grid_rows, :covered_cols]
            for value in values:
                value = int(value)
                count = int(np.count_nonzero(under_grid == value))
                scanned.counts[value] = scanned.counts.get(value, 0) + count
                sizes, pixels = _regions(strip == value, rng)
                pixels[..., 0] += top * (pixels[..., 0] >= 0)
                _keep_largest(scanned.regions, value, sizes, pixels, keep)
    return scanned


def _values_present(pixels: np.ndarray) -> np.ndarray:
    """Return the sorted distinct values of `pixels` (a bincount for small unsigned integers)."""
    if pixels.dtype.kind == "u" and pixels.dtype.itemsize <= 2:
        return np.flatnonzero(np.bincount(pixels.ravel()))
    if pixels.dtype.kind == "f":  # NaN marks missing labels in a float mask
        pixels = pixels[np.isfinite(pixels)]
    return np.unique(pixels)


def _regions(
    pixels_of_class: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return each connected region's size and up to PIXELS_PER_REGION random pixels of it."""
    labels, count = ndimage.label(pixels_of_class)
    flat = np.flatnonzero(labels)
    region = labels.ravel()[flat] - 1
    # A random key per pixel; per region, the pixels with the largest keys are a random sample.
    keys = rng.random(flat.size)
    sizes = np.bincount(region, minlength=count)
    flat, region, keys = _top_key_candidates(flat, region, keys, sizes)
    order = np.lexsort((-keys, region))
    sorted_region = region[order]
    starts = np.searchsorted(sorted_region, np.arange(count))
    pixels = np.full((count, PIXELS_PER_REGION, 2), -1, dtype=np.int64)
    for k in range(PIXELS_PER_REGION):
        has = sizes > k
        chosen = flat[order[starts[has] + k]]
        pixels[has, k, 0], pixels[has, k, 1] = np.divmod(chosen, pixels_of_class.shape[1])
    return sizes, pixels


def _top_key_candidates(
    flat: np.ndarray, region: np.ndarray, keys: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the pixels that can hold one of their region's PIXELS_PER_REGION largest keys.

    Sorting every pixel of a class costs most of the scan; only the few with the largest keys
    per region are needed. A region of `size` pixels keeps the keys above 1 - 64 / size (about
    64 of them); a region left with fewer than PIXELS_PER_REGION keeps all its pixels, so the
    chosen pixels are those of a sort over every pixel.
    """
    threshold = np.where(sizes > 64, 1.0 - 64.0 / np.maximum(sizes, 1), -1.0)
    keep = keys > threshold[region]
    kept = np.bincount(region[keep], minlength=sizes.size)
    short = kept < np.minimum(sizes, PIXELS_PER_REGION)
    if short.any():
        keep |= short[region]
    return flat[keep], region[keep], keys[keep]


def _keep_largest(
    regions: dict[int, tuple[np.ndarray, np.ndarray]],
    value: int,
    sizes: np.ndarray,
    pixels: np.ndarray,
    keep: int,
) -> None:
    if value in regions:
        sizes = np.concatenate([regions[value][0], sizes])
        pixels = np.concatenate([regions[value][1], pixels])
    # Stable: equal sizes keep the order in which the pass met them.
    order = np.argsort(-sizes, kind="stable")[:keep]
    regions[value] = (sizes[order], pixels[order])


def _choose_windows(
    info: RasterInfo, scanned: _Candidates, rare: list[int], settings: PlacementSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Return the chosen (row_off, col_off) pairs and their class values for one raster."""
    size = settings.patch_size
    if info.height < size or info.width < size:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)
    chosen: list[tuple[int, int]] = []
    classes: list[int] = []
    with open_raster(info.path) as dataset:
        for value in rare:
            if value not in scanned.regions:
                continue
            _, pixels = scanned.regions[value]
            # One centre per region, largest regions first; then the regions' further pixels.
            centres = pixels.transpose(1, 0, 2).reshape(-1, 2)
            centres = centres[centres[:, 0] >= 0]
            tops = np.clip(centres - size // 2, 0, [info.height - size, info.width - size])
            taken = 0
            for row, col in tops:
                if taken == settings.windows_per_raster:
                    break
                if _on_grid(row, col, settings) or _overlaps(row, col, chosen, settings):
                    continue
                window = dataset.read(settings.mask_band, window=Window(col, row, size, size))
                if np.count_nonzero(window == value) < settings.min_class_pixels:
                    continue
                chosen.append((int(row), int(col)))
                classes.append(value)
                taken += 1
    return np.array(chosen, dtype=np.int64).reshape(-1, 2), np.array(classes, dtype=np.int64)


def _on_grid(row: int, col: int, settings: PlacementSettings) -> bool:
    return row % settings.stride == 0 and col % settings.stride == 0


def _overlaps(
    row: int, col: int, chosen: list[tuple[int, int]], settings: PlacementSettings
) -> bool:
    """Return whether the window at (row, col) overlaps a chosen one by more than max_overlap."""
    if not chosen:
        return False
    size = settings.patch_size
    offsets = np.abs(np.asarray(chosen) - (row, col))
    overlap = np.clip(size - offsets, 0, None).prod(axis=1).astype(np.float64)
    iou = overlap / (2.0 * size * size - overlap)
    return bool(np.any(iou > settings.max_overlap))
