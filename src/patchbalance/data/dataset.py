"""`CSVWindowedSegmentationDataset`: one training item per row of a patch table.

Each row names an image raster, a mask raster and a square window (`row_off`, `col_off`,
`patch_size`). An item is the image window as a float tensor `(C, H, W)` and the mask window as a
long tensor `(H, W)` of class indices, under the keys `"image"` and `"mask"`.

Masks become class indices as follows (the loss and the metrics skip `ignore_index`):
- `class_values: [v0, v1, ...]` maps raw mask value `v_i` to class `i`; every other value (the
  mask's nodata, say) becomes `ignore_index` (default 255).
- without `class_values`, raw values `0 .. n_classes - 1` are the classes and every other value
  becomes `ignore_index`.
- `mask_class_mapping: {raw: new}` (the upstream key) renames raw values first, e.g. `{5: 3}`
  merges class 5 into class 3 and `{4: 255}` sends class 4 to the ignore index.

Images: the window is converted to `image_dtype` before the augmentations (albumentations expects
uint8 or float32; a conversion that could lose values is an error). After the augmentations, an
image that is still unsigned 8- or 16-bit integer is scaled to [0, 1] by dividing by 255 or
65535; a float image (e.g. after `albumentations.Normalize`) is kept as it is.

A window that cannot be read raises `WindowReadError` naming the row and the file; another row
is never substituted, since that would silently change the sampling distribution.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rasterio.errors import RasterioError
from torch.utils.data import Dataset

from patchbalance.data.arguments import band_numbers, whole_number
from patchbalance.errors import ConfigError, InputError
from patchbalance.paths import resolve_path
from patchbalance.table import (
    EXCLUDED,
    SAMPLER_WEIGHT,
    check_table_file,
    excluded_column,
    read_table,
    row_numbers,
    rows_text,
    separator_hint,
    table_columns,
)
from patchbalance.windows import RasterHandleCache, gdal_message, read_window

log = logging.getLogger(__name__)


class WindowReadError(InputError):
    """A window of the patch table could not be read; the message names the row and file.

    When the error happens in a DataLoader worker, torch re-raises it in the main process as
    `WindowReadError("Caught WindowReadError in DataLoader worker ...\\nOriginal Traceback ...")`;
    the constructor keeps only the original one-line message, so the command line still prints
    one line.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


def instantiate_from_mapping(spec: Any, where: str, **kwargs: Any) -> Any:
    """Return `hydra.utils.instantiate(spec, **kwargs)`, or a one-line `ConfigError` naming `where`."""
    from hydra.errors import HydraException
    from hydra.utils import instantiate

    target = spec.get("_target_") if isinstance(spec, Mapping) else None
    if isinstance(spec, Mapping) and not target:
        raise ConfigError(f"{where}: a mapping here needs a '_target_' key naming the class")
    try:
        return instantiate(spec, **kwargs)
    except HydraException as exc:
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        text = str(cause).split(", set env var HYDRA_FULL_ERROR")[0]
        text = " ".join(text.split())
        raise ConfigError(f"{where}: cannot instantiate '{target}': {text}") from exc


def build_augmentation(augmentation_list: Any) -> Any:
    """Return an `albumentations.Compose` of the given transforms, or None for no transforms.

    `augmentation_list` may be a Compose, a single transform, or a list whose items are
    transform objects or `_target_` mappings (instantiated with `hydra.utils.instantiate`).
    """
    if augmentation_list is None:
        return None
    from albumentations.core.composition import BaseCompose
    from albumentations.core.transforms_interface import BasicTransform

    if isinstance(augmentation_list, BaseCompose):
        return augmentation_list
    if isinstance(augmentation_list, Mapping) or not isinstance(augmentation_list, Sequence):
        augmentation_list = [augmentation_list]
    transforms = []
    for i, item in enumerate(augmentation_list):
        if isinstance(item, Mapping):
            item = instantiate_from_mapping(item, f"augmentation_list[{i}]")
        if not isinstance(item, BasicTransform | BaseCompose):
            raise ConfigError(
                f"augmentation_list[{i}]: expected an albumentations transform, got "
                f"{type(item).__name__}"
            )
        transforms.append(item)
    if not transforms:
        return None
    from albumentations import Compose

    return Compose(transforms)


def _bad_rows(mask: np.ndarray, numbers: np.ndarray) -> str:
    """Return "2 row(s): rows 4, 9" for the rows of `mask`; `numbers` are their table rows."""
    return f"{int(np.count_nonzero(mask))} row(s): {rows_text(numbers[mask], numbered=True)}"


def read_patch_table(
    path: Path, columns: Sequence[str], optional: Sequence[str] = ()
) -> pd.DataFrame:
    """Return the `columns` (and those of `optional` that exist) of the CSV or Parquet table."""
    check_table_file(path)
    present = table_columns(path)
    missing = [c for c in columns if c not in present]
    if missing:
        names = ", ".join(f"'{c}'" for c in missing)
        raise InputError(
            f"{path}: the table lacks the column(s) {names}; a patch table needs "
            f"{', '.join(columns)} (set image_key/mask_key/row_off_key/col_off_key/"
            f"patch_size_key if yours are named differently){separator_hint(present)}"
        )
    wanted = list(columns) + [c for c in optional if c in present and c not in columns]
    return read_table(path, columns=wanted)


def _integer_column(
    table: pd.DataFrame, column: str, path: Path, minimum: int, numbers: np.ndarray
) -> np.ndarray:
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values != np.round(values)) | (values < minimum)
    if bad.any():
        raise InputError(
            f"{path}: column '{column}' must hold integers >= {minimum}; it does not in "
            f"{_bad_rows(bad, numbers)}"
        )
    return values.astype(np.int64)


def _build_label_lookup(
    n_classes: int,
    class_values: Sequence[int | float] | None,
    mask_class_mapping: Mapping[Any, Any] | None,
    ignore_index: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Return `(source_values, labels)`: sorted raw mask values and the label each maps to."""
    if class_values is not None:
        values = [v for v in class_values]
        if len(values) != n_classes:
            raise ConfigError(
                f"class_values has {len(values)} values but n_classes is {n_classes}; "
                "give one raw mask value per class"
            )
        if len(set(values)) != len(values):
            raise ConfigError(f"class_values must be distinct, got {values}")
        source = {v: i for i, v in enumerate(values)}
    else:
        source = {v: v for v in range(n_classes)}
    if mask_class_mapping:
        if class_values is not None:
            raise ConfigError("give either class_values or mask_class_mapping, not both")
        for raw, new in dict(mask_class_mapping).items():
            new = int(new)
            if not (0 <= new < n_classes or new == ignore_index):
                raise ConfigError(
                    f"mask_class_mapping maps {raw} to {new}, which is neither a class "
                    f"(0..{n_classes - 1}) nor the ignore index {ignore_index}"
                )
            source[raw] = new
    keys = np.asarray(sorted(source), dtype=np.float64)
    labels = np.asarray([source[k] for k in sorted(source)], dtype=np.int64)
    return keys, labels


class CSVWindowedSegmentationDataset(Dataset):
    """Image and mask windows listed in a patch table (CSV or Parquet), one item per row.

    Arguments (the upstream ones first):
        input_csv_path: the table; needs `image_key`, `mask_key`, `row_off_key`, `col_off_key`
            and `patch_size_key` columns. Relative raster paths are resolved against `root_dir`,
            or else the table's folder.
        n_classes: number of classes the model predicts.
        use_rasterio: read windows with rasterio (default); False crops the window from the
            whole image opened with PIL (for PNG/JPEG tiles).
        image_dtype: dtype the image window is converted to before the augmentations.
        augmentation_list: albumentations transforms, as objects or `_target_` mappings.
        selected_bands: 1-based image bands to read (default all).
        mask_band: 1-based band of the mask raster holding the classes.
        class_values: raw mask value of each class, in class order (see the module docstring).
        ignore_index: label of pixels that are no class (nodata, values outside the classes).
        mask_class_mapping: upstream `{raw: new}` renaming applied to the raw mask values.
        weight_key: column with the sampler weights (needed only by the weighted sampler).
        drop_excluded: leave out rows whose `excluded` column is true.
        n_first_rows_to_read: read only the first rows of the table (quick experiments).
        data_loader: the config's `data_loader` block, kept as `self.data_loader`.
    """

    def __init__(
        self,
        input_csv_path: str | os.PathLike[str],
        n_classes: int,
        use_rasterio: bool = True,
        image_dtype: str = "uint8",
        augmentation_list: Any = None,
        image_key: str = "image_path",
        mask_key: str = "mask_path",
        selected_bands: Sequence[int] | None = None,
        mask_band: int = 1,
        class_values: Sequence[int | float] | None = None,
        ignore_index: int = 255,
        mask_class_mapping: Mapping[Any, Any] | None = None,
        row_off_key: str = "row_off",
        col_off_key: str = "col_off",
        patch_size_key: str = "patch_size",
        weight_key: str = SAMPLER_WEIGHT,
        root_dir: str | os.PathLike[str] | None = None,
        drop_excluded: bool = False,
        n_first_rows_to_read: int | None = None,
        data_loader: Mapping[str, Any] | None = None,
    ) -> None:
        self.input_csv_path = Path(input_csv_path)
        self.n_classes = whole_number(n_classes, "n_classes", 1)
        self.use_rasterio = bool(use_rasterio)
        try:
            self.image_dtype = np.dtype(image_dtype)
        except TypeError as exc:
            raise ConfigError(f"image_dtype {image_dtype!r} is not a numpy dtype") from exc
        self.selected_bands = band_numbers(selected_bands, "selected_bands")
        self.mask_band = whole_number(mask_band, "mask_band", 1)
        self.ignore_index = whole_number(ignore_index, "ignore_index")
        if 0 <= self.ignore_index < n_classes:
            raise ConfigError(
                f"ignore_index {self.ignore_index} is one of the classes 0..{n_classes - 1}; "
                "choose a value outside them (default 255)"
            )
        self._label_keys, self._label_values = _build_label_lookup(
            n_classes, class_values, mask_class_mapping, self.ignore_index
        )
        self.class_values = None if class_values is None else list(class_values)
        self.data_loader = dict(data_loader) if data_loader is not None else {}
        self.transform = build_augmentation(augmentation_list)

        keys = [image_key, mask_key, row_off_key, col_off_key, patch_size_key]
        table, numbers = self._read_rows(keys, weight_key, drop_excluded, n_first_rows_to_read)

        path = self.input_csv_path
        self.row_off = _integer_column(table, row_off_key, path, 0, numbers)
        self.col_off = _integer_column(table, col_off_key, path, 0, numbers)
        self.patch_size = _integer_column(table, patch_size_key, path, 1, numbers)
        # The table's 1-based data rows, so errors name the row a user sees in a spreadsheet,
        # even after drop_excluded.
        self.row_numbers = numbers
        base = (
            resolve_path(root_dir, Path.cwd())
            if root_dir is not None
            else self.input_csv_path.resolve().parent
        )
        # Paths stored once per distinct file plus an int32 code per row: no per-row Python
        # objects, which DataLoader workers would otherwise copy page by page on access.
        self._image_codes, self.image_files = self._factorise_paths(
            table[image_key], base, image_key
        )
        self._mask_codes, self.mask_files = self._factorise_paths(table[mask_key], base, mask_key)
        self.sampler_weights: np.ndarray | None = None
        if weight_key in table.columns:
            self.sampler_weights = pd.to_numeric(table[weight_key], errors="coerce").to_numpy(
                dtype=np.float64
            )
        self.weight_key = weight_key
        self.excluded: np.ndarray | None = excluded_column(table, str(self.input_csv_path))
        # Rows that a build's class-centred placement added (SPEC §2.1 `placement` column).
        self.class_centred_rows = (
            int((table["placement"].astype(str) != "grid").sum())
            if "placement" in table.columns
            else 0
        )
        self._handles = RasterHandleCache()

    def _read_rows(
        self,
        keys: list[str],
        weight_key: str,
        drop_excluded: bool,
        n_first_rows_to_read: int | None,
    ) -> tuple[pd.DataFrame, np.ndarray]:
        """Return the table's rows to train on and their 1-based row numbers in the file."""
        table = read_patch_table(
            self.input_csv_path, keys, optional=(weight_key, EXCLUDED, "placement")
        )
        if n_first_rows_to_read is not None:
            table = table.iloc[: whole_number(n_first_rows_to_read, "n_first_rows_to_read", 1)]
        numbers = row_numbers(np.arange(len(table)))
        excluded = excluded_column(table, str(self.input_csv_path)) if drop_excluded else None
        if excluded is not None:
            keep = ~excluded
            table = table.loc[keep]
            numbers = numbers[keep]
        if len(table) == 0:
            raise InputError(f"{self.input_csv_path}: the table has no rows to train on")
        return table, numbers

    def _factorise_paths(
        self, column: pd.Series, base: Path, key: str
    ) -> tuple[np.ndarray, list[str]]:
        """Return an int32 code per row and the distinct files, resolved against `base`."""
        if column.isna().any():
            raise InputError(
                f"{self.input_csv_path}: column '{key}' is empty in "
                f"{_bad_rows(column.isna().to_numpy(), self.row_numbers)}"
            )
        codes, uniques = pd.factorize(column.astype(str))
        return codes.astype(np.int32), [str(resolve_path(p, base)) for p in uniques]

    def __len__(self) -> int:
        return int(self.row_off.size)

    # -- weights ----------------------------------------------------------------------------

    def require_sampler_weights(self) -> np.ndarray:
        """Return the sampler weight of every row, or raise `InputError` when the column is absent."""
        if self.sampler_weights is None:
            raise InputError(
                f"{self.input_csv_path}: weighted_sampler: true needs a '{self.weight_key}' "
                "column; write the table with 'patchbalance build-balanced-dataset' or set "
                "data_loader.weighted_sampler: false"
            )
        return self.sampler_weights

    # -- reading ----------------------------------------------------------------------------

    def _where(self, index: int, path: str) -> str:
        return (
            f"{self.input_csv_path}: row {int(self.row_numbers[index])} ({path}, "
            f"row_off={int(self.row_off[index])}, col_off={int(self.col_off[index])}, "
            f"patch_size={int(self.patch_size[index])})"
        )

    def _read_rasterio(
        self, path: str, index: int, bands: Sequence[int] | int | None
    ) -> np.ndarray:
        dataset = self._handles.get(path)
        wanted = [bands] if isinstance(bands, int) else bands
        if wanted is not None and max(wanted) > dataset.count:
            raise WindowReadError(
                f"{self._where(index, path)}: band {max(wanted)} asked for, but the raster has "
                f"{dataset.count} band(s)"
            )
        size = int(self.patch_size[index])
        row, col = int(self.row_off[index]), int(self.col_off[index])
        if row + size > dataset.height or col + size > dataset.width:
            raise WindowReadError(
                f"{self._where(index, path)}: the window runs past the raster's "
                f"{dataset.width}x{dataset.height} pixels"
            )
        return read_window(dataset, row, col, size, bands)

    def _read_pil(self, path: str, index: int, bands: Sequence[int] | int | None) -> np.ndarray:
        from PIL import Image

        size = int(self.patch_size[index])
        row, col = int(self.row_off[index]), int(self.col_off[index])
        with Image.open(path) as image:
            if row + size > image.height or col + size > image.width:
                raise WindowReadError(
                    f"{self._where(index, path)}: the window runs past the image's "
                    f"{image.width}x{image.height} pixels"
                )
            pixels = np.asarray(image.crop((col, row, col + size, row + size)))
        stack = pixels[np.newaxis] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
        wanted = [bands] if isinstance(bands, int) else bands
        if wanted is not None and max(wanted) > stack.shape[0]:
            raise WindowReadError(
                f"{self._where(index, path)}: band {max(wanted)} asked for, but the image has "
                f"{stack.shape[0]} band(s)"
            )
        if isinstance(bands, int):
            return stack[bands - 1]
        if bands is None:
            return stack
        return stack[[b - 1 for b in bands]]

    def _read(
        self, path: str, index: int, bands: Sequence[int] | int | None, what: str
    ) -> np.ndarray:
        reader = self._read_rasterio if self.use_rasterio else self._read_pil
        try:
            return reader(path, index, bands)
        except WindowReadError:
            raise
        except (RasterioError, OSError, ValueError, IndexError) as exc:
            raise WindowReadError(
                f"{self._where(index, path)}: cannot read the {what} window: {gdal_message(exc)}"
            ) from exc

    def map_mask(self, raw: np.ndarray) -> np.ndarray:
        """Return the class index of every raw mask value (`ignore_index` for no class)."""
        keys, labels = self._label_keys, self._label_values
        position = np.clip(np.searchsorted(keys, raw), 0, keys.size - 1)
        hit = keys[position] == raw
        # uint8 when it fits: albumentations' OpenCV transforms take uint8 masks, not int64.
        fits = 0 <= self.ignore_index <= 255 and self.n_classes <= 256
        out_dtype = np.uint8 if fits else np.int32
        return np.where(hit, labels[position], self.ignore_index).astype(out_dtype)

    def _image_to_float(self, image: Any) -> torch.Tensor:
        if isinstance(image, torch.Tensor):  # ToTensorV2 already made it (C, H, W)
            if image.dtype == torch.uint8:
                return image.float().div_(255.0)
            if image.dtype == getattr(torch, "uint16", None):
                return image.float().div_(65535.0)
            return image.float()
        # Scale in numpy: torch before 2.3 has no uint16 tensors.
        chw = np.moveaxis(np.asarray(image), -1, 0)
        if chw.dtype == np.uint8:
            chw = chw.astype(np.float32) / np.float32(255.0)
        elif chw.dtype == np.uint16:
            chw = chw.astype(np.float32) / np.float32(65535.0)
        return torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float32))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        index %= len(self)
        image_path = self.image_files[self._image_codes[index]]
        mask_path = self.mask_files[self._mask_codes[index]]
        image = self._read(image_path, index, self.selected_bands, "image")
        raw_mask = self._read(mask_path, index, self.mask_band, "mask")
        if image.dtype != self.image_dtype:
            if not (
                np.can_cast(image.dtype, self.image_dtype, "safe") or self.image_dtype.kind == "f"
            ):
                raise WindowReadError(
                    f"{self._where(index, image_path)}: image pixels are {image.dtype} and "
                    f"cannot become image_dtype {self.image_dtype} without loss; set "
                    f"image_dtype: {image.dtype} or float32"
                )
            image = image.astype(self.image_dtype)
        mask = self.map_mask(raw_mask)
        image_hwc = np.ascontiguousarray(np.moveaxis(image, 0, -1))
        if self.transform is not None:
            out = self.transform(image=image_hwc, mask=mask)
            image_hwc, mask = out["image"], out["mask"]
        return {
            "image": self._image_to_float(image_hwc),
            "mask": torch.as_tensor(
                np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask
            ).long(),
        }

    # -- helpers for training ---------------------------------------------------------------

    def image_band_count(self) -> int:
        """Return the number of image channels an item has (opens the first image if needed)."""
        if self.selected_bands is not None:
            return len(self.selected_bands)
        path = self.image_files[self._image_codes[0]]
        try:
            if self.use_rasterio:
                return int(self._handles.get(path).count)
            from PIL import Image

            with Image.open(path) as image:
                return len(image.getbands())
        except (RasterioError, OSError) as exc:
            raise InputError(
                f"{self._where(0, path)}: cannot open the image: {gdal_message(exc)}"
            ) from exc

    def set_augmentation_seed(self, seed: int) -> None:
        """Seed the augmentations' random generators (called once per DataLoader worker)."""
        # albumentations >= 2 keeps its own generators; older versions use numpy's global one,
        # which the DataLoader's worker_init_fn seeds.
        if self.transform is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(int(seed) % 2**32)

    def missing_files(self) -> list[str]:
        """Return the raster files named by the table that do not exist."""
        return [p for p in (*self.image_files, *self.mask_files) if not os.path.exists(p)]
