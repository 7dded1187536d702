"""`patchbalance demo`: a small georeferenced sample dataset, built and reported on, offline.

The scenes are synthetic but shaped like the real problem: a projected CRS (UTM zone 40N),
tiled deflate-compressed GeoTIFFs, a mask with four classes where class 3 ("building") covers
about 2 % of the pixels and sits in a few patches, a nodata (255) margin in one mask and a black
margin in one image.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from rasterio.transform import from_origin
from scipy import ndimage

from patchbalance.atomic import atomic_writer, check_writable_folder
from patchbalance.errors import MissingDependencyError, OutputError
from patchbalance.geotiff import write_geotiff
from patchbalance.table import write_table

CLASS_NAMES = {0: "bare soil", 1: "vegetation", 2: "water", 3: "building"}
CLASS_COLOURS = {0: (196, 170, 130), 1: (70, 120, 50), 2: (40, 80, 140), 3: (200, 60, 60)}
MASK_NODATA = 255
SCENE_SIZE = 512
PATCH_SIZE = 64
CRS = "EPSG:32640"
SCENES = (1, 2, 3, 4)  # scene 4 is held out for validation
# What the demo writes besides its rasters, relative to its folder.
DEMO_FILES = (
    "records.csv",
    "val.csv",
    "balanced_train.yaml",
    "balanced_train.csv",
    "balanced_train.geojson",
    "balanced_train.summary.json",
    "report.html",
)


def demo_files(out_dir: Path) -> list[Path]:
    """Return every file that `patchbalance demo` writes under `out_dir`."""
    rasters = [f"{kind}/scene_{scene}.tif" for kind in ("images", "masks") for scene in SCENES]
    return [Path(out_dir) / name for name in (*rasters, *DEMO_FILES)]


def check_demo_folder(out_dir: Path) -> None:
    """Raise `OutputError` when `out_dir` already holds a file that the demo would write."""
    present = [path for path in demo_files(out_dir) if os.path.lexists(path)]
    if present:
        more = f" and {len(present) - 1} more of the demo's files" if len(present) > 1 else ""
        raise OutputError(
            f"demo --out {out_dir}: the folder already holds {present[0].relative_to(out_dir)}"
            f"{more}; the demo does not overwrite files: give a new or empty folder"
        )


def _smooth_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return (field - field.mean()) / field.std()


def _scene(rng: np.random.Generator, size: int, water_bias: float) -> np.ndarray:
    """Return a class mask: soil everywhere, vegetation and water blobs, a few rare buildings."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[_smooth_field(rng, size, 18) > 0.6] = 1
    mask[_smooth_field(rng, size, 30) > 1.5 - water_bias] = 2
    # Buildings: small rectangles in one neighbourhood, ~2 % of the scene.
    centre_row, centre_col = rng.integers(96, size - 96, size=2)
    target = int(0.02 * size * size)
    placed = 0
    while placed < target:
        height, width = rng.integers(5, 11, size=2)
        row = int(np.clip(centre_row + rng.normal(0, 40), 0, size - height))
        col = int(np.clip(centre_col + rng.normal(0, 40), 0, size - width))
        before = int((mask[row : row + height, col : col + width] == 3).sum())
        mask[row : row + height, col : col + width] = 3
        placed += height * width - before
    return mask


def _image(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """Return an RGB uint8 image whose colours follow the mask, with texture and noise."""
    palette = np.array([CLASS_COLOURS[c] for c in range(4)], dtype=np.float64)
    colour = palette[np.minimum(mask, 3)].transpose(2, 0, 1)
    texture = 12 * _smooth_field(rng, mask.shape[0], 3)[None]
    noise = rng.normal(0, 6, size=colour.shape)
    return np.clip(colour + texture + noise, 1, 255).astype(np.uint8)


def demo_scene(
    rng: np.random.Generator, size: int = SCENE_SIZE, water_bias: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Return `(mask, image)` of one scene: a (size, size) class mask, its (3, size, size) RGB."""
    mask = _scene(rng, size, water_bias)
    return mask, _image(rng, mask)


def write_demo_dataset(out_dir: Path, seed: int = 7) -> dict[str, Path]:
    """Write the sample rasters, records and configurations under `out_dir`; return their paths.

    Scenes 1-3 are for training, scene 4 is held out for validation (`val.csv`).
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    records = []
    for scene in SCENES:
        mask, image = demo_scene(rng, SCENE_SIZE, water_bias=0.4 if scene == 2 else 0.0)
        if scene == 2:
            mask[:, -40:] = MASK_NODATA  # an unlabelled margin along the east edge
        if scene == 3:
            image[:, :, :24] = 0  # a black margin along the west edge
            image[:, 200, 130] = 0  # one dark pixel on a patch edge: not a border
        transform = from_origin(300_000 + 2_000 * scene, 2_780_000, 0.5, 0.5)
        image_path = out_dir / "images" / f"scene_{scene}.tif"
        mask_path = out_dir / "masks" / f"scene_{scene}.tif"
        write_geotiff(image_path, image, crs=CRS, transform=transform, block=128)
        write_geotiff(mask_path, mask, crs=CRS, transform=transform, nodata=MASK_NODATA, block=128)
        rows, cols = np.meshgrid(
            np.arange(0, SCENE_SIZE, PATCH_SIZE),
            np.arange(0, SCENE_SIZE, PATCH_SIZE),
            indexing="ij",
        )
        records.append(
            pd.DataFrame(
                {
                    "image_path": f"images/scene_{scene}.tif",
                    "mask_path": f"masks/scene_{scene}.tif",
                    "row_off": rows.ravel(),
                    "col_off": cols.ravel(),
                    "patch_size": PATCH_SIZE,
                    "scene": scene,
                }
            )
        )
    all_records = pd.concat(records, ignore_index=True)
    train = all_records[all_records["scene"] < 4].reset_index(drop=True)
    val = all_records[all_records["scene"] == 4].reset_index(drop=True)
    records_path = out_dir / "records.csv"
    val_path = out_dir / "val.csv"
    write_table(train, records_path)
    absolute_val = val.assign(
        image_path=[str((out_dir / p).resolve()) for p in val["image_path"]],
        mask_path=[str((out_dir / p).resolve()) for p in val["mask_path"]],
    )
    write_table(absolute_val, val_path)

    config = {
        "balanced_dataset": {
            "mode": "masks_only",
            "input": {"records_path": "records.csv"},
            "clustering": {"k_min": 4, "k_max": 12, "k_selection": "elbow", "random_state": 42},
            "exclusion": {"exclude_border_nodata": True, "exclude_black_border": True},
            "output": {
                "csv_path": "balanced_train.csv",
                "geojson_path": "balanced_train.geojson",
            },
        }
    }
    config_path = out_dir / "balanced_train.yaml"
    with atomic_writer(config_path) as stream:
        stream.write(yaml.safe_dump(config, sort_keys=False))
    return {
        "config": config_path,
        "records": records_path,
        "val": val_path,
        "table": out_dir / "balanced_train.csv",
        "geojson": out_dir / "balanced_train.geojson",
    }


def run_demo_command(out_dir: Path, progress: bool = True, scheduler: str | None = None) -> str:
    """Write the demo data, build the balanced table, report on it; return the text to print."""
    from patchbalance.balancing.pipeline import run_build
    from patchbalance.config import load_config
    from patchbalance.reporting.html import write_html_report

    check_writable_folder(Path(out_dir), "the demo folder (--out)")
    check_demo_folder(Path(out_dir))
    paths = write_demo_dataset(out_dir)
    overrides = [f"compute.scheduler={scheduler}"] if scheduler else []
    result = run_build(load_config(paths["config"], overrides), progress=progress)
    lines = [
        f"demo data written to {Path(out_dir).resolve()} "
        f"(4 scenes of {SCENE_SIZE}x{SCENE_SIZE} px; scene 4 held out in {paths['val'].name})",
        "classes: " + ", ".join(f"{value} = {name}" for value, name in CLASS_NAMES.items()),
        "",
        result.summary_text,
    ]
    html_path = Path(out_dir) / "report.html"
    try:
        write_html_report(
            result.table,
            result.figures,
            html_path,
            title="demo",
            class_names=CLASS_NAMES,
        )
        lines.append(f"wrote report: {html_path}")
    except MissingDependencyError as exc:
        # The page needs matplotlib, an optional extra; the demo's data and table stand alone.
        lines.append(f"note: skipped the HTML report ({exc})")
    lines += [
        "",
        "next: patchbalance report " + str(paths["table"]),
        f"      patchbalance build-balanced-dataset {paths['config']} --set sampling_method=rank_max",
    ]
    return "\n".join(lines)
