"""Records from the local sources: inline `patch_records`, a `records_path` table, a raster grid."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from rasterio.errors import RasterioError

from patchbalance.compute import Compute
from patchbalance.config import BalancedDatasetConfig, InputConfig
from patchbalance.errors import InputError
from patchbalance.paths import resolve_path
from patchbalance.table import KEY_COLUMNS, check_table_file, read_table, separator_hint
from patchbalance.windows import (
    RasterInfo,
    check_band,
    gdal_message,
    pair_difference,
    probe_raster,
)

log = logging.getLogger(__name__)

RECORD_COLUMNS = ("image_path", "mask_path", "row_off", "col_off", "patch_size")
INTEGER_COLUMNS = ("row_off", "col_off", "patch_size")


def _row_label(source: str, position: int) -> str:
    if source == "input.patch_records":
        return f"{source}[{position}]"
    return f"{source} row {position + 1}"


def validate_records(records: pd.DataFrame, source: str, base_dir: Path) -> pd.DataFrame:
    """Return the records with checked integer offsets and absolute path strings.

    `source` names where the records came from in error messages (a file, or
    `input.patch_records`). Raises `InputError` for missing columns, non-integer or negative
    offsets, patch_size <= 0, empty paths and duplicate patch keys.
    """
    missing = [column for column in RECORD_COLUMNS if column not in records.columns]
    if missing:
        raise InputError(
            f"{source}: missing record column(s) {', '.join(missing)}; every record needs "
            f"{', '.join(RECORD_COLUMNS)}{separator_hint(list(records.columns))}"
        )
    if records.empty:
        raise InputError(f"{source}: no records; the source holds no patches")
    records = records.reset_index(drop=True).copy()
    for column in INTEGER_COLUMNS:
        if pd.api.types.is_integer_dtype(records[column].dtype):
            # Already whole numbers (a Parquet int column): no float copy of millions of rows.
            records[column] = records[column].astype(np.int64)
            continue
        numeric = pd.to_numeric(records[column], errors="coerce")
        as_float = numeric.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(as_float) | (as_float != np.round(as_float))
        if bad.any():
            position = int(np.flatnonzero(bad)[0])
            value = records[column].iloc[position]
            # A plain number in the message: 12.5, not np.float64(12.5).
            value = value.item() if isinstance(value, np.generic) else value
            if pd.isna(value) or not str(value).strip():
                raise InputError(
                    f"{_row_label(source, position)}: {column} is empty; every record needs a "
                    "whole number of pixels there"
                )
            raise InputError(
                f"{_row_label(source, position)}: {column} must be a whole number of pixels, "
                f"got {value!r}"
            )
        records[column] = as_float.astype(np.int64)
    negative = (records["row_off"].to_numpy() < 0) | (records["col_off"].to_numpy() < 0)
    if negative.any():
        position = int(np.flatnonzero(negative)[0])
        raise InputError(
            f"{_row_label(source, position)}: row_off and col_off must be >= 0 "
            f"(got {records['row_off'].iloc[position]}, {records['col_off'].iloc[position]})"
        )
    not_positive = records["patch_size"].to_numpy() <= 0
    if not_positive.any():
        position = int(np.flatnonzero(not_positive)[0])
        raise InputError(
            f"{_row_label(source, position)}: patch_size must be > 0 "
            f"(got {records['patch_size'].iloc[position]})"
        )
    for column in ("image_path", "mask_path"):
        codes, unique = pd.factorize(records[column], use_na_sentinel=True)
        blank = np.asarray([not str(path).strip() for path in unique], dtype=bool)
        empty = (codes < 0) | np.append(blank, False)[codes]
        if empty.any():
            position = int(np.flatnonzero(empty)[0])
            raise InputError(f"{_row_label(source, position)}: {column} is empty")
        records[column] = resolve_paths(records[column], base_dir)
    _check_unique_keys(records, source)
    return records


def _check_unique_keys(records: pd.DataFrame, source: str) -> None:
    """Raise `InputError` naming the rows of the first duplicated key and counting the keys."""
    duplicated = records.duplicated(list(KEY_COLUMNS), keep=False).to_numpy()
    if not duplicated.any():
        return
    groups = records.groupby(list(KEY_COLUMNS), sort=False).ngroup().to_numpy()
    first = int(np.flatnonzero(duplicated)[0])
    rows = np.flatnonzero(groups == groups[first])
    key = tuple(
        value.item() if hasattr(value, "item") else value
        for value in records.loc[first, list(KEY_COLUMNS)].tolist()
    )
    more = f" and {rows.size - 2} more" if rows.size > 2 else ""
    n_keys = np.unique(groups[duplicated]).size
    raise InputError(
        f"{source}: duplicate patch key (image_path, row_off, col_off, patch_size) = {key} "
        f"at {_row_label(source, int(rows[0]))} and {_row_label(source, int(rows[1]))}{more}; "
        f"{n_keys} key(s) occur more than once ({int(duplicated.sum())} rows in all); "
        "remove the duplicates"
    )


def resolve_paths(paths: pd.Series, base_dir: Path) -> pd.Series:
    """Return the paths as absolute path strings, as a categorical column (one string per file).

    Relative paths are taken against `base_dir`; each distinct path is resolved once.
    """
    codes, unique = pd.factorize(paths)
    resolved = [str(resolve_path(str(path), base_dir)) for path in unique]
    # Two spellings of one file ('a.tif', './a.tif') become one category.
    merged, categories = pd.factorize(pd.Index(resolved, dtype=object))
    return pd.Series(
        pd.Categorical.from_codes(merged[codes], categories=categories), index=paths.index
    )


def records_from_list(config: BalancedDatasetConfig) -> pd.DataFrame:
    """Return the records given inline under `input.patch_records`."""
    items = config.input.patch_records or []
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(f"input.patch_records[{position}]: expected a mapping of columns")
    return validate_records(pd.DataFrame(items), "input.patch_records", config.base_dir)


def records_from_file(config: BalancedDatasetConfig) -> pd.DataFrame:
    """Return the records of the CSV or Parquet file named by `input.records_path`."""
    path = Path(config.input.records_path or "")
    check_table_file(path, "records file (input.records_path)")
    records = read_table(
        path, text_columns=("image_path", "mask_path"), what="records table", categorical=True
    )
    return validate_records(records, str(path), config.base_dir)


def _pairs_from_globs(config: BalancedDatasetConfig) -> list[tuple[str, str]]:
    source = config.input
    image_pattern, mask_pattern = source.image_glob or "", source.mask_glob or ""
    images = {Path(path).stem: path for path in sorted(glob.glob(image_pattern, recursive=True))}
    masks = {Path(path).stem: path for path in sorted(glob.glob(mask_pattern, recursive=True))}
    if not images:
        raise InputError(f"input.image_glob: no file matches {image_pattern}")
    if not masks:
        raise InputError(f"input.mask_glob: no file matches {mask_pattern}")
    unmatched = sorted(set(images) ^ set(masks))
    if unmatched:
        raise InputError(
            f"input.image_glob/mask_glob: {len(unmatched)} file stem(s) have no partner, e.g. "
            f"'{unmatched[0]}'; image and mask files are paired by file name without extension"
        )
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def grid_windows(
    height: int, width: int, patch_size: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (row_off, col_off) of the full windows of a regular grid, row-major."""
    rows = np.arange(0, height - patch_size + 1, stride, dtype=np.int64)
    cols = np.arange(0, width - patch_size + 1, stride, dtype=np.int64)
    row_grid, col_grid = np.meshgrid(rows, cols, indexing="ij")
    return row_grid.ravel(), col_grid.ravel()


def _raster_pairs(config: BalancedDatasetConfig) -> list[tuple[str, str]]:
    source = config.input
    if source.rasters is not None:
        return [(pair.image_path, pair.mask_path) for pair in source.rasters]
    return _pairs_from_globs(config)


def grid_window_count(
    config: BalancedDatasetConfig, infos: dict[str, RasterInfo] | None = None
) -> int:
    """Return how many grid windows the rasters source has (0 for a raster it cannot open).

    Only the files' headers are read: the scheduler is chosen by this count before the
    class-centred window search, which runs on it. The headers read go into `infos`.
    """
    size = int(config.input.patch_size or 0)
    stride = int(config.input.stride or size)
    total = 0
    for image_path, _ in _raster_pairs(config):
        try:
            info = _probed(image_path, infos)
        except (RasterioError, OSError):
            continue
        rows, cols = grid_windows(info.height, info.width, size, stride)
        total += len(rows)
    return total


def _probed(path: str, infos: dict[str, RasterInfo] | None) -> RasterInfo:
    """Return the header of raster `path`, read once per build: `infos` keeps those read."""
    if infos is not None and path in infos:
        return infos[path]
    info = probe_raster(path)
    if infos is not None:
        infos[path] = info
    return info


def records_from_rasters(
    config: BalancedDatasetConfig,
    notes: dict[str, object] | None = None,
    compute: Compute | None = None,
    infos: dict[str, RasterInfo] | None = None,
) -> pd.DataFrame:
    """Return the full grid windows over each image/mask pair of `input.rasters` or the globs.

    With `placement: class_centred`, the class-centred windows follow the grid ones (their
    search runs a raster per task on `compute`), and the placement figures go into
    `notes["placement"]` when `notes` is given. The raster headers read go into `infos`, so
    that later stages need not read them again.
    """
    source: InputConfig = config.input
    pairs = _raster_pairs(config)
    patch_size = int(source.patch_size or 0)
    stride = int(source.stride or patch_size)
    frames = []
    mask_infos = []
    for image_path, mask_path in pairs:
        headers = []
        for path in (image_path, mask_path):
            if not os.path.exists(path):
                raise InputError(f"{path}: raster not found (input.rasters)")
            try:
                headers.append(_probed(path, infos))
            except Exception as exc:  # noqa: BLE001 - any GDAL failure is reported the same way
                raise InputError(f"{path}: cannot open raster: {gdal_message(exc)}") from exc
        image, mask = headers
        difference = pair_difference(image, mask)
        if difference:
            raise InputError(
                f"input.rasters: {difference}; a pair must have the same size, geotransform and "
                "CRS, aligned pixel for pixel"
            )
        mask_infos.append(mask)
        rows, cols = grid_windows(image.height, image.width, patch_size, stride)
        frames.append(
            pd.DataFrame(
                {
                    "image_path": image_path,
                    "mask_path": mask_path,
                    "row_off": rows,
                    "col_off": cols,
                    "patch_size": np.int64(patch_size),
                }
            )
        )
    records = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if records.empty:
        raise InputError(
            f"input.rasters: no full {patch_size}x{patch_size} window fits in any raster; "
            "use a smaller patch_size"
        )
    band_counts = {info.path: info.count for info in mask_infos}
    check_band(band_counts, config.exclusion.mask_band, "exclusion.mask_band")
    if config.placement == "class_centred":
        records, figures = _with_class_windows(config, records, pairs, mask_infos, compute)
        if notes is not None:
            notes["placement"] = figures
    return validate_records(records, "input.rasters", config.base_dir)


def _with_class_windows(
    config: BalancedDatasetConfig,
    grid: pd.DataFrame,
    pairs: list[tuple[str, str]],
    mask_infos: list,
    compute: Compute | None = None,
) -> tuple[pd.DataFrame, dict[str, object]]:
    """Return the grid records followed by the class-centred windows (SPEC §2.1)."""
    from patchbalance.sources.placement import PlacementSettings, class_centred_records

    source = config.input
    patch_size = int(source.patch_size or 0)
    settings = PlacementSettings(
        patch_size=patch_size,
        stride=int(source.stride or patch_size),
        rare_below=source.rare_below,
        rare_classes=tuple(source.rare_classes or ()),
        windows_per_raster=source.class_windows_per_raster,
        min_pixels=source.class_min_pixels,
        max_overlap=source.max_overlap,
        classes=None if config.clustering.classes is None else tuple(config.clustering.classes),
        nodata=config.exclusion.nodata_class,
        mask_band=config.exclusion.mask_band,
        seed=config.seed,
    )
    added, figures = class_centred_records(pairs, mask_infos, settings, compute)
    log.info(
        "class_centred: rare classes %s, %d windows added beside %d grid windows",
        figures["rare_classes"],
        len(added),
        len(grid),
    )
    grid = grid.assign(placement="grid")
    figures["grid_windows"] = len(grid)
    return (pd.concat([grid, added], ignore_index=True) if len(added) else grid), figures
