"""Evidence on real imagery: do the sampler weights help a segmentation model on rare classes?

Data: "Semantic segmentation of aerial imagery" (satellite imagery of Dubai from the Mohammed Bin
Rashid Space Centre, annotated by Humans in the Loop; public domain, CC0): 8 tiles, 72 RGB JPEG
images with RGB PNG masks (the mask colours are not the ones its classes.json lists; black is
unannotated).

The script
1. converts the pairs into GeoTIFF images and class-index masks (nodata 255) under `--work`,
   each with a made-up but valid georeference (UTM zone 40N, the parts of a tile laid out side
   by side) so that tile bounds, the report map and GeoJSON work. By default the imagery is
   reduced 2x (images area-averaged, masks by majority vote), so that a CPU run sees more
   ground per training step;
2. holds out whole images for validation (`--val-parts` parts of every tile, drawn by `--seed`)
   and cuts the rest into training patches (`--patch` px, stride = size);
3. builds the sampler weights of every method with `patchbalance.pipeline.run_build`;
   `uniform` is the same pool of active patches with every weight 1 (`weights.power: 0`), so
   the only difference between runs is the weighting;
4. prints per method what the weights will do (class pixel share per epoch, ESS, largest
   expected repeat count) and writes each method's HTML report;
5. trains the same smp Unet (resnet18 encoder, no pretrained weights) through
   `patchbalance.train.train_from_config` with each method's weights, with the same steps and
   the same seeds (one seed fixes the model's initial weights and the sampler's draws), and
   prints validation IoU per class and mIoU after the last step (the run's only validation:
   one "epoch" is exactly steps x batch draws), as mean +- sample std over seeds, and the gain
   over uniform for the two rarest classes of the training set (paired by seed).

With `--embeddings auto` (the default) the full run adds `rank_max` and `cluster_balanced`
with uniqueness from the offline EfficientNet-Lite0 backbone when `patchbalance.embeddings`
has it.

Methods whose weights are identical to an earlier method's (`rank_max` equals
`composition_only` in masks_only mode) are trained once and reported under both names.

    python bench/evidence_dubai.py --quick            # < 15 min on 2 CPU cores
    python bench/evidence_dubai.py --work /tmp/dubai  # the full benchmark
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
from PIL import Image
from rasterio.transform import from_origin

# The shared benchmark helpers sit next to this script.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from geotiff import (  # noqa: E402
    CLASS_COLOURS,
    DUBAI_DATA,
    MASK_NODATA,
    NODATA_COLOUR,  # noqa: F401 - part of this script's interface (its tests use it)
    REPO,
    mask_to_classes,
    write_geotiff,
)

DEFAULT_DATA = DUBAI_DATA
CLASS_NAMES = {index: name for index, (name, _) in CLASS_COLOURS.items()}
PART_GAP = 32  # metres between the parts of a tile, so no two footprints overlap
TILE_GAP = 400

# name -> build settings. Every method builds from the same records, clusters and exclusions.
METHODS: dict[str, dict[str, Any]] = {
    "uniform": {"sampling_method": "composition_only", "weights": {"power": 0.0}},
    "composition_only": {"sampling_method": "composition_only"},
    "rank_max": {"sampling_method": "rank_max"},
    "cluster_balanced_p0.5": {"sampling_method": "cluster_balanced", "weights": {"power": 0.5}},
    "cluster_balanced_p1.0": {"sampling_method": "cluster_balanced", "weights": {"power": 1.0}},
    "repeat_factor": {"sampling_method": "repeat_factor"},
    "inverse_frequency": {"sampling_method": "inverse_frequency"},
}
# With visual uniqueness from the offline EfficientNet-Lite0 backbone (mode embeddings).
EMBEDDING_METHODS: dict[str, dict[str, Any]] = {
    "rank_max_emb": {"sampling_method": "rank_max"},
    "cluster_balanced_emb": {"sampling_method": "cluster_balanced"},
}
QUICK_METHODS = ["uniform", "rank_max", "cluster_balanced_p1.0", "repeat_factor"]


def log(message: str) -> None:
    """Print a progress line at once (the full run goes to a log file)."""
    print(message, flush=True)


# --------------------------------------------------------------------------------------------
# 1. Conversion


def downsample_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Return the (H, W, 3) image reduced `factor` times by area averaging."""
    if factor == 1:
        return image
    height, width = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[: height * factor, : width * factor].reshape(height, factor, width, factor, 3)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """Return the class mask reduced `factor` times by majority vote; ties go to the lower class,
    and nodata wins only where no class pixel is in the block."""
    if factor == 1:
        return mask
    height, width = mask.shape[0] // factor, mask.shape[1] // factor
    blocks = mask[: height * factor, : width * factor].reshape(height, factor, width, factor)
    votes = np.stack([(blocks == value).sum(axis=(1, 3)) for value in CLASS_COLOURS])
    majority = votes.argmax(axis=0).astype(np.uint8)
    return np.where(votes.max(axis=0) > 0, majority, MASK_NODATA).astype(np.uint8)


def convert_dataset(
    data_dir: Path,
    out_dir: Path,
    tiles: Sequence[int],
    val_parts: int,
    seed: int,
    downsample: int = 1,
) -> pd.DataFrame:
    """Return one row per converted pair (tile, part, paths, size, split), writing the GeoTIFFs.

    Tiles sit in rows 4 tiles wide; inside a tile its parts sit on a 3 x 3 grid, each part
    with its own transform. `val_parts` parts of every tile go to validation, drawn by `seed`.
    With `downsample` > 1 images are area-averaged and masks majority-voted by that factor.
    """
    pixel = float(downsample)
    rng = np.random.default_rng(seed)
    rows = []
    tile_x, tile_y, row_height = 300_000.0, 2_800_000.0, 0.0
    for n, tile in enumerate(tiles):
        images = sorted((data_dir / f"tile_{tile}" / "images").glob("*.jpg"))
        if not images:
            raise FileNotFoundError(f"{data_dir / f'tile_{tile}'}: no images/*.jpg")
        held_out = set(rng.choice(len(images), size=min(val_parts, len(images) - 1), replace=False))
        if n and n % 4 == 0:
            tile_x, tile_y, row_height = 300_000.0, tile_y - row_height - TILE_GAP, 0.0
        cell_width = cell_height = 0.0
        pairs = []
        for image_path in images:
            mask_path = image_path.parent.parent / "masks" / f"{image_path.stem}.png"
            image = np.asarray(Image.open(image_path).convert("RGB"))
            mask = mask_to_classes(np.asarray(Image.open(mask_path).convert("RGB")), str(mask_path))
            # An image and its mask differ by a pixel now and then: keep the common area.
            height = min(image.shape[0], mask.shape[0])
            width = min(image.shape[1], mask.shape[1])
            image = downsample_image(image[:height, :width], downsample)
            mask = downsample_mask(mask[:height, :width], downsample)
            pairs.append((image_path, image, mask))
            cell_width = max(cell_width, mask.shape[1] * pixel)
            cell_height = max(cell_height, mask.shape[0] * pixel)
        for part, (image_path, image, mask) in enumerate(pairs):
            column, line = part % 3, part // 3
            transform = from_origin(
                tile_x + column * (cell_width + PART_GAP),
                tile_y - line * (cell_height + PART_GAP),
                pixel,
                pixel,
            )
            name = f"tile{tile}_{image_path.stem}"
            image_tif = out_dir / "images" / f"{name}.tif"
            mask_tif = out_dir / "masks" / f"{name}.tif"
            write_geotiff(image_tif, image.transpose(2, 0, 1), transform)
            write_geotiff(mask_tif, mask, transform, MASK_NODATA)
            rows.append(
                {
                    "tile": tile,
                    "part": image_path.stem,
                    "image_path": str(image_tif),
                    "mask_path": str(mask_tif),
                    "height": mask.shape[0],
                    "width": mask.shape[1],
                    "split": "val" if part in held_out else "train",
                }
            )
        tile_x += 3 * (cell_width + PART_GAP) + TILE_GAP
        row_height = max(row_height, 3 * (cell_height + PART_GAP))
    return pd.DataFrame(rows)


def grid_records(pairs: pd.DataFrame, window: int) -> pd.DataFrame:
    """Return the full `window` x `window` grid windows (stride = window) of every pair."""
    frames = []
    for pair in pairs.itertuples(index=False):  # one row per raster, not per patch
        rows, cols = np.meshgrid(
            np.arange(0, pair.height - window + 1, window),
            np.arange(0, pair.width - window + 1, window),
            indexing="ij",
        )
        frames.append(
            pd.DataFrame(
                {
                    "image_path": pair.image_path,
                    "mask_path": pair.mask_path,
                    "row_off": rows.ravel(),
                    "col_off": cols.ravel(),
                    "patch_size": window,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------
# 3. Weights


def build_config(
    method: dict[str, Any], train_pairs: pd.DataFrame, patch: int, table_path: Path, seed: int
) -> dict[str, Any]:
    """Return the balanced-dataset configuration mapping of one method."""
    config: dict[str, Any] = {
        "mode": method.get("mode", "masks_only"),
        "sampling_method": method["sampling_method"],
        "seed": seed,
        "num_workers": 2,
        "input": {
            "rasters": train_pairs[["image_path", "mask_path"]].to_dict("records"),
            "patch_size": patch,
            "stride": patch,
        },
        "clustering": {"k_min": 4, "k_max": 16, "classes": sorted(CLASS_COLOURS)},
        "exclusion": {"exclude_border_nodata": True, "exclude_black_border": True},
        "weights": dict(method.get("weights", {})),
        "output": {"csv_path": str(table_path)},
    }
    if "embeddings" in method:
        # One cache next to the tables: the embedding methods compute the vectors once.
        config["embeddings"] = {
            **method["embeddings"],
            "parquet_path": str(table_path.parent / method["embeddings"]["parquet_path"]),
        }
    return config


def sampling_row(name: str, figures: Any) -> dict[str, Any]:
    """Return the SPEC §5 figures of one method as a flat row."""
    row: dict[str, Any] = {"method": name}
    for j, value in enumerate(figures.class_values):
        row[f"share_{value}"] = float(figures.weighted_share[j])
    row.update(
        n_active=figures.n_active,
        ess=figures.ess,
        ess_share=figures.ess / figures.n_active,
        expected_distinct=figures.expected_distinct,
        max_expected_repeats=figures.max_expected_repeats,
    )
    return row


# --------------------------------------------------------------------------------------------
# 5. Training

AUGMENT = [
    {"_target_": "albumentations.HorizontalFlip", "p": 0.5},
    {"_target_": "albumentations.VerticalFlip", "p": 0.5},
    {"_target_": "albumentations.RandomRotate90", "p": 0.5},
]
NORMALISE = [
    {
        "_target_": "albumentations.Normalize",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    },
    {"_target_": "albumentations.pytorch.ToTensorV2"},
]


def train_config(
    table_path: Path, val_path: Path, out_dir: Path, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Return the `patchbalance train` configuration mapping of one run."""
    dataset = {
        "_target_": "patchbalance.data.CSVWindowedSegmentationDataset",
        "n_classes": len(CLASS_COLOURS),
        "use_rasterio": True,
        "image_dtype": "uint8",
    }
    return {
        "hyperparameters": {"batch_size": args.batch_size, "max_steps": args.steps, "lr": args.lr},
        "seed": seed,
        "device": "cpu",
        "output_dir": str(out_dir),
        "train_dataset": {
            **dataset,
            "input_csv_path": str(table_path),
            "augmentation_list": AUGMENT + NORMALISE,
            # One "epoch" of exactly the run's draws, so validation runs once, at the end.
            "data_loader": {
                "num_workers": args.loader_workers,
                "weighted_sampler": True,
                "weighted_sampler_num_samples": args.steps * args.batch_size,
            },
        },
        "val_dataset": {
            **dataset,
            "input_csv_path": str(val_path),
            "augmentation_list": NORMALISE,
            "data_loader": {"shuffle": False, "num_workers": args.loader_workers},
        },
        "model": {
            "_target_": "segmentation_models_pytorch.Unet",
            "encoder_name": "resnet18",
            "encoder_weights": None,
            "in_channels": 3,
            "classes": len(CLASS_COLOURS),
        },
        "loss": {"_target_": "torch.nn.CrossEntropyLoss", "ignore_index": MASK_NODATA},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": args.lr, "weight_decay": 1e-4},
    }


# --------------------------------------------------------------------------------------------
# Printing


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def _pm(values: np.ndarray, scale: float = 100.0, signed: bool = False) -> str:
    mean, std = _mean_std(values)
    if not np.isfinite(mean):
        return "-"
    sign = "+" if signed else ""
    # Round first so that a tiny negative mean does not print as "-0.0".
    mean = round(mean * scale, 1) + 0.0
    return f"{mean:{sign}.1f} ± {std * scale:.1f}"


def sampling_text(rows: list[dict[str, Any]]) -> str:
    """Return the per-method table of what the weights will do."""
    header = "method                  " + "".join(
        f"{CLASS_NAMES[c][:9]:>10}" for c in CLASS_COLOURS
    )
    lines = [
        "class pixel share per epoch (%), ESS and largest expected repeats of one patch",
        header + "      ESS (share)   distinct  max rep.",
    ]
    for row in rows:
        shares = "".join(f"{row[f'share_{c}'] * 100:10.2f}" for c in CLASS_COLOURS)
        lines.append(
            f"{row['method']:<24}{shares}  {row['ess']:7.0f} ({row['ess_share']:5.1%})"
            f"  {row['expected_distinct']:9.0f}  {row['max_expected_repeats']:8.2f}"
        )
    return "\n".join(lines)


def results_text(
    runs: pd.DataFrame, methods: list[str], rarest: list[int], seeds: list[int]
) -> str:
    """Return the IoU table (mean ± std over seeds) and the gains over uniform."""
    lines = [
        f"validation IoU (%), mean ± sample std over {len(seeds)} seed(s) {seeds}",
        "method                  "
        + "".join(f"{CLASS_NAMES[c][:11]:>14}" for c in CLASS_COLOURS)
        + "          mIoU",
    ]
    for method in methods:
        subset = runs[runs["method"] == method]
        cells = "".join(f"{_pm(subset[f'iou_{c}'].to_numpy()):>14}" for c in CLASS_COLOURS)
        lines.append(f"{method:<24}{cells}{_pm(subset['miou'].to_numpy()):>14}")
    names = " and ".join(f"{CLASS_NAMES[c]} ({c})" for c in rarest)
    lines += [
        "",
        f"gain over uniform in IoU points, paired by seed (rarest training classes: {names});",
        "'wins' counts the seeds where the method beat uniform",
        "method                  "
        + "".join(f"{CLASS_NAMES[c][:20]:>22}" for c in rarest)
        + f"{'mIoU':>22}",
    ]
    uniform = runs[runs["method"] == "uniform"].set_index("seed")
    for method in methods:
        if method == "uniform":
            continue
        subset = runs[runs["method"] == method].set_index("seed")
        cells = ""
        for column in [*(f"iou_{c}" for c in rarest), "miou"]:
            gain = (subset[column] - uniform[column]).dropna().to_numpy()
            # A win is a gain that survives rounding to the 0.1 point the table shows.
            wins = int((np.round(gain * 100, 1) > 0).sum())
            cells += f"{_pm(gain, signed=True):>16} ({wins}/{len(gain)})"
        lines.append(f"{method:<24}{cells}")
    return "\n".join(lines)


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    """Return the versions of Python and the packages that shape the results."""
    import segmentation_models_pytorch
    import sklearn
    import torch

    import patchbalance

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "patchbalance": patchbalance.__version__,
        "patchbalance_commit": _git_commit(),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "segmentation_models_pytorch": segmentation_models_pytorch.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "scikit-learn": sklearn.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "cpu_count": str(os.cpu_count()),
    }


# --------------------------------------------------------------------------------------------
# The run


def embeddings_available() -> bool:
    """Return whether the embeddings stage with the offline EfficientNet-Lite0 backbone exists."""
    try:
        import patchbalance.embeddings  # noqa: F401
    except ImportError:
        return False
    from patchbalance.config import EmbeddingsConfig

    return "efficientnet_lite0" in str(EmbeddingsConfig.model_fields["backbone"].annotation)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command line; --quick changes the defaults that were not given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, methods and seeds")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    parser.add_argument("--tiles", type=int, nargs="+", default=list(range(1, 9)))
    parser.add_argument("--val-parts", type=int, default=None, help="held-out parts per tile")
    parser.add_argument("--patch", type=int, default=None, help="training patch size (px)")
    parser.add_argument("--val-window", type=int, default=None, help="validation window (px)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per run")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=None, help="training seeds per method")
    parser.add_argument("--seed", type=int, default=42, help="split, clustering, first run seed")
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--embeddings", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument(
        "--downsample", type=int, default=None, help="reduce the imagery this many times"
    )
    # One thread: on a busy machine torch's spinning worker threads cost more than they give.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's own)")
    args = parser.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    args.command = shlex.join([sys.executable, os.path.relpath(__file__), *given])
    common = {"downsample": 2, "patch": 128, "val_window": 128, "batch_size": 8}
    quick = {**common, "val_parts": 1, "steps": 40, "seeds": 2}
    full = {**common, "val_parts": 2, "steps": 150, "seeds": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.methods is None:
        args.methods = list(QUICK_METHODS if args.quick else METHODS)
        if not args.quick and args.embeddings != "off" and embeddings_available():
            args.methods += list(EMBEDDING_METHODS)
    if args.embeddings == "on":
        args.methods += [m for m in EMBEDDING_METHODS if m not in args.methods]
    unknown = [m for m in args.methods if m not in METHODS and m not in EMBEDDING_METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {[*METHODS, *EMBEDDING_METHODS]}")
    if "uniform" not in args.methods:
        args.methods.insert(0, "uniform")  # the baseline every gain is measured against
    return args


def method_settings(name: str) -> dict[str, Any]:
    """Return the build settings of a method name."""
    if name in EMBEDDING_METHODS:
        return {
            **EMBEDDING_METHODS[name],
            "mode": "embeddings",
            "embeddings": {
                "backbone": "efficientnet_lite0",
                "batch_size": 32,
                "num_workers": 1,
                "parquet_path": "embeddings_cache.parquet",
            },
        }
    return METHODS[name]


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the benchmark in `work`; print as it goes and return the results."""
    import torch

    from patchbalance.pipeline import run_build
    from patchbalance.report import figures_from_table
    from patchbalance.report_html import write_html_report
    from patchbalance.train import train_from_config

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = versions()
    log("command: " + args.command)
    log("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    log(
        f"settings: tiles {args.tiles}, imagery reduced {args.downsample}x, "
        f"{args.val_parts} validation part(s) per tile, "
        f"patches {args.patch} px, validation windows {args.val_window} px, {args.steps} steps "
        f"of batch {args.batch_size}, lr {args.lr}, {args.seeds} seed(s), work folder {work}"
    )

    # 1-2. Conversion and split.
    pairs = convert_dataset(
        args.data, work / "rasters", args.tiles, args.val_parts, args.seed, args.downsample
    )
    train_pairs = pairs[pairs["split"] == "train"]
    val_pairs = pairs[pairs["split"] == "val"]
    val_records = grid_records(val_pairs, args.val_window)
    val_path = work / "val.csv"
    val_records.to_csv(val_path, index=False)
    held = ", ".join(f"{r.tile}/{r.part}" for r in val_pairs.itertuples())
    log(
        f"converted {len(pairs)} pairs in {time.perf_counter() - started:.0f} s: "
        f"{len(train_pairs)} training images, {len(val_pairs)} held out ({held}); "
        f"{len(val_records)} validation windows"
    )

    # 3-4. Weights per method, and what they will do.
    tables: dict[str, Path] = {}
    sampling_rows = []
    weight_vectors: dict[str, np.ndarray] = {}
    same_as: dict[str, str] = {}
    for name in args.methods:
        clock = time.perf_counter()
        table_path = work / "weights" / f"{name}.csv"
        config = build_config(method_settings(name), train_pairs, args.patch, table_path, args.seed)
        result = run_build(config, write=True)
        figures = figures_from_table(result.table)
        write_html_report(
            result.table,
            figures,
            work / "reports" / f"{name}.html",
            title=f"Dubai aerial, {name}",
            class_names=CLASS_NAMES,
        )
        tables[name] = table_path
        sampling_rows.append(sampling_row(name, figures))
        weights = result.table["sampler_weight"].to_numpy()
        for earlier, vector in weight_vectors.items():
            if np.allclose(weights, vector, rtol=1e-12, atol=1e-12):
                same_as[name] = earlier
                break
        weight_vectors[name] = weights
        excluded = int(result.table["excluded"].sum())
        note = f"; same weights as {same_as[name]}" if name in same_as else ""
        log(
            f"weights {name}: {len(result.table)} patches, {excluded} excluded, "
            f"k = {result.summary['clustering']['k']}, "
            f"{time.perf_counter() - clock:.1f} s{note}"
        )
    log("")
    log(sampling_text(sampling_rows))
    uniform_row = sampling_rows[0]
    shares = np.array([uniform_row[f"share_{c}"] for c in CLASS_COLOURS])
    rarest = [int(c) for c in np.argsort(shares)[:2]]
    log(
        "rarest classes of the training set: "
        + ", ".join(f"{CLASS_NAMES[c]} ({shares[c]:.2%})" for c in rarest)
    )
    log("")

    # 5. Training.
    seeds = [args.seed + i for i in range(args.seeds)]
    runs = []
    trained = [name for name in args.methods if name not in same_as]
    total = len(trained) * len(seeds)
    count = 0
    for seed in seeds:
        for name in trained:
            count += 1
            clock = time.perf_counter()
            out_dir = work / "runs" / f"{name}_seed{seed}"
            config = train_config(tables[name], val_path, out_dir, seed, args)
            result = train_from_config(config, base_dir=work)
            row = {"method": name, "seed": seed, "miou": result.best_miou, "steps": result.steps}
            last = result.metrics.iloc[-1]
            row.update({f"iou_{c}": float(last[f"iou_{c}"]) for c in CLASS_COLOURS})
            row["miou"] = float(last["miou"])
            row["train_loss"] = float(last["train_loss"])
            row["seconds"] = time.perf_counter() - clock
            runs.append(row)
            for alias, original in same_as.items():
                if original == name:
                    runs.append({**row, "method": alias})
            log(
                f"[{count}/{total}] {name} seed {seed}: mIoU {row['miou']:.4f}, "
                f"train loss {row['train_loss']:.3f}, {row['seconds']:.0f} s"
            )
    runs_frame = pd.DataFrame(runs)
    runs_frame.to_csv(work / "runs.csv", index=False)
    log("")
    log(results_text(runs_frame, args.methods, rarest, seeds))
    elapsed = time.perf_counter() - started
    log(f"\ntotal time {elapsed / 60:.1f} min; results in {work / 'results.json'}")
    results = {
        "command": args.command,
        "versions": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "validation_images": [f"tile_{r.tile}/{r.part}" for r in val_pairs.itertuples()],
        "n_validation_windows": len(val_records),
        "class_names": CLASS_NAMES,
        "rarest_classes": rarest,
        "same_weights": same_as,
        "sampling": sampling_rows,
        "runs": runs,
        "seconds": elapsed,
    }
    (work / "results.json").write_text(json.dumps(results, indent=2, default=float))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark from the command line; return the results."""
    args = parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: the Dubai aerial data is not there; pass --data DIR")
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        return run(args, args.work.resolve())
    with tempfile.TemporaryDirectory(prefix="evidence_dubai_") as scratch:
        return run(args, Path(scratch))


if __name__ == "__main__":
    main()
