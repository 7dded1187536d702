"""Checks of a training table made when it is read, before the first step (SPEC §7, §8).

A window that runs past its raster, or a class the table counts but the dataset has no label
for, would otherwise surface only when that row is drawn, or never: a class above
`n_classes` silently becomes the ignore index. Both checks work on a
`CSVWindowedSegmentationDataset`; other datasets are left as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbalance.errors import InputError
from patchbalance.table import class_columns, read_table, rows_text, table_columns
from patchbalance.windows import check_band, probe_rasters


def _shapes(files: list[str], use_rasterio: bool, workers: int) -> np.ndarray:
    """Return (F, 3) height, width and band count of each file, each opened once."""
    if use_rasterio:
        infos, errors = probe_rasters(files, workers)
        if errors:
            path = sorted(errors)[0]
            raise InputError(f"{path}: cannot open the raster: {errors[path]}")
        return np.asarray(
            [(infos[p].height, infos[p].width, infos[p].count) for p in files], dtype=np.int64
        )
    from PIL import Image

    shapes = []
    for path in files:
        try:
            with Image.open(path) as image:
                shapes.append((image.height, image.width, len(image.getbands())))
        except OSError as exc:
            raise InputError(f"{path}: cannot open the image: {exc}") from exc
    return np.asarray(shapes, dtype=np.int64).reshape(-1, 3)


def check_windows_inside_rasters(dataset: Any, workers: int = 4, where: str = "dataset") -> None:
    """Raise `InputError` naming the first row whose window runs past its image or mask, or
    naming `where.selected_bands` or `where.mask_band` and a file that lacks that band.

    Every image and mask file is opened once, for its size and band count; the windows are
    compared with the sizes all at once.
    """
    if not hasattr(dataset, "_image_codes") or len(dataset) == 0:
        return
    ends_row = dataset.row_off + dataset.patch_size
    ends_col = dataset.col_off + dataset.patch_size
    bands = {
        "image": (max(dataset.selected_bands or [1]), f"{where}.selected_bands"),
        "mask": (dataset.mask_band, f"{where}.mask_band"),
    }
    for kind, files, codes in (
        ("image", dataset.image_files, dataset._image_codes),
        ("mask", dataset.mask_files, dataset._mask_codes),
    ):
        shapes = _shapes(list(files), dataset.use_rasterio, workers)
        band, key = bands[kind]
        check_band(dict(zip(files, shapes[:, 2].tolist(), strict=True)), band, key, kind)
        sizes = shapes[codes]
        outside = (ends_row > sizes[:, 0]) | (ends_col > sizes[:, 1])
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            height, width = sizes[first, :2]
            count = f" ({int(outside.sum())} rows in all)" if outside.sum() > 1 else ""
            raise InputError(
                f"{dataset.input_csv_path}: row {int(dataset.row_numbers[first])}: the window "
                f"(row_off {int(dataset.row_off[first])}, col_off {int(dataset.col_off[first])}, "
                f"patch_size {int(dataset.patch_size[first])}) runs past "
                f"{files[codes[first]]}, which is {width}x{height} pixels{count}; fix or drop "
                "those rows"
            )


def check_classes_have_labels(dataset: Any) -> None:
    """Raise `InputError` when the table's `px_<value>` columns count a class with no label.

    A mask value becomes a label through `class_values`, `mask_class_mapping` (which may send
    it to the ignore index on purpose) or, without them, by being below `n_classes`. A value
    that none of them covers, yet has pixels in the rows trained on, would silently be
    ignored.
    """
    if not hasattr(dataset, "_label_keys"):
        return
    path = Path(dataset.input_csv_path)
    columns, values = class_columns(pd.DataFrame(columns=table_columns(path)))
    unlabelled = [
        (name, value)
        for name, value in zip(columns, values, strict=True)
        if value not in set(dataset._label_keys.tolist())
    ]
    if not unlabelled:
        return
    counts = read_table(path, columns=[name for name, _ in unlabelled])
    rows = np.asarray(dataset.row_numbers, dtype=np.int64) - 1
    for name, value in unlabelled:
        pixels = pd.to_numeric(counts[name], errors="coerce").to_numpy(np.float64)[rows]
        present = np.flatnonzero(np.nan_to_num(pixels) > 0)
        if present.size:
            raise InputError(
                f"{path}: column '{name}' counts pixels of class {value} in "
                f"{rows_text(np.asarray(dataset.row_numbers)[present], numbered=True)}, but "
                f"n_classes is {dataset.n_classes} and no label is given for the value "
                f"{value}; raise n_classes, list the values under class_values, or map it "
                f"with mask_class_mapping (e.g. {{{value}: {dataset.ignore_index}}} to ignore it)"
            )
