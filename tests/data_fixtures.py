"""Small GeoTIFF scenes and patch tables for the training-integration tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rasters import write_geotiff

MASK_NODATA = 255


def write_scene(
    folder: Path,
    name: str,
    size: int = 64,
    bands: int = 3,
    seed: int = 0,
    dtype: str = "uint8",
) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """Write a random image and a class mask (0..3, a nodata corner) and return paths and arrays."""
    rng = np.random.default_rng(seed)
    high = 256 if dtype == "uint8" else 60_000
    image = rng.integers(0, high, size=(bands, size, size)).astype(dtype)
    # Class blocks of 8 px, so that windows hold several classes; class 3 is rare.
    blocks = rng.choice(4, size=(size // 8, size // 8), p=[0.45, 0.3, 0.2, 0.05])
    mask = np.kron(blocks, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
    mask[:4, :4] = MASK_NODATA
    image_path = write_geotiff(folder / "images" / f"{name}.tif", image)
    mask_path = write_geotiff(folder / "masks" / f"{name}.tif", mask, nodata=MASK_NODATA)
    return image_path, mask_path, image, mask


def grid_rows(image_path: Path, mask_path: Path, size: int, patch: int) -> pd.DataFrame:
    """Return the records of a regular grid of `patch`-pixel windows over a `size` scene."""
    rows, cols = np.meshgrid(np.arange(0, size, patch), np.arange(0, size, patch), indexing="ij")
    return pd.DataFrame(
        {
            "image_path": str(image_path),
            "mask_path": str(mask_path),
            "row_off": rows.ravel(),
            "col_off": cols.ravel(),
            "patch_size": patch,
        }
    )


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """Write `frame` as CSV or Parquet (by suffix) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def write_training_tables(folder: Path, size: int = 64, patch: int = 32) -> tuple[Path, Path]:
    """Write two train scenes and one validation scene; return (train table, val table).

    The train table has `sampler_weight` (0 for one excluded row) and `excluded` columns.
    """
    frames = []
    for i in range(2):
        image_path, mask_path, _, _ = write_scene(folder, f"train_{i}", size=size, seed=10 + i)
        frames.append(grid_rows(image_path, mask_path, size, patch))
    train = pd.concat(frames, ignore_index=True)
    weights = np.linspace(0.5, 2.0, len(train))
    weights[0] = 0.0
    train["sampler_weight"] = weights
    train["excluded"] = weights == 0
    image_path, mask_path, _, _ = write_scene(folder, "val", size=size, seed=99)
    val = grid_rows(image_path, mask_path, size, patch)
    return write_table(train, folder / "train.csv"), write_table(val, folder / "val.csv")


def method_scores(
    method: str,
    composition_score: np.ndarray,
    cluster_id: np.ndarray,
    counts: np.ndarray,
    window_pixels: np.ndarray,
    uniqueness: np.ndarray | None = None,
    class_values: list[int] | None = None,
    **settings: object,
) -> tuple[np.ndarray, dict]:
    """Return a registered sampling method's scores for hand-made signals.

    `settings` are the method's own keys of the `weights:` block, validated by its model.
    """
    from patchbalance.sampling.registry import Signals, get_sampling_method, sampling_scores

    counts = np.asarray(counts, dtype=np.float64)
    signals = Signals(
        counts=counts,
        class_values=list(range(counts.shape[1])) if class_values is None else class_values,
        window_pixels=np.asarray(window_pixels, dtype=np.float64),
        composition_score=np.asarray(composition_score, dtype=np.float64),
        cluster_id=np.asarray(cluster_id),
        uniqueness=uniqueness,
    )
    return sampling_scores(method, signals, get_sampling_method(method).parse_params(settings))


def write_train_config(folder: Path, **keys: object) -> Path:
    """Write the training tables and a minimal train config (4 classes, plus `keys`)."""
    import yaml

    train_table, val_table = write_training_tables(folder)
    config = {
        "train_dataset": {"input_csv_path": str(train_table), "n_classes": 4},
        "val_dataset": {"input_csv_path": str(val_table)},
        "output_dir": str(folder / "out"),
        **keys,
    }
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
