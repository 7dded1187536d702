"""The sizes the GPU check runs at: the full run on a GPU, and a tiny run for the CPU test."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSize:
    """A DINOv2 architecture built from `Dinov2Config` with random weights."""

    name: str  # e.g. "ViT-S/14"
    key: str  # used in file names and gpu.json keys
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int


VIT_S14 = ModelSize("ViT-S/14", "vit_s14", 384, 12, 6, 1536)
VIT_B14 = ModelSize("ViT-B/14", "vit_b14", 768, 12, 12, 3072)
# Scaled-down stand-ins for the CPU test: the same code paths, a fraction of the arithmetic.
TINY_S = ModelSize("tiny stand-in for ViT-S/14", "vit_s14", 48, 2, 2, 96)
TINY_B = ModelSize("tiny stand-in for ViT-B/14", "vit_b14", 96, 2, 4, 192)

# A DataLoader worker count large enough that reading is not the bottleneck, leaving cores for
# the main process.
SPARE_CORES = 2


@dataclass(frozen=True)
class Sizes:
    """Every size the check uses, so that the full and the small run differ only here."""

    # Data: mosaics of demo scenes (512 px each), windows on a grid with overlap.
    patches: int
    patch: int
    stride: int
    scenes_per_side: int
    distinct_scenes: int
    # Embeddings.
    models: tuple[ModelSize, ...]
    image_size: int
    batch_size: int
    forward_batches: int  # batches timed for the forward-only baseline (at most)
    # kNN.
    knn_n: int
    knn_dim: int
    knn_centres: int
    # CoreSet.
    coreset_n: int
    coreset_dim: int
    coreset_budget: float
    fd_k_max: int
    # Training.
    train_batch: int
    train_steps_per_epoch: int
    train_epochs: int
    val_patches: int
    # DataLoader workers that read windows (None: the machine's cores but SPARE_CORES).
    loader_workers: int | None
    train_model: dict = field(default_factory=dict)
    # Seconds each step may take at most (the whole run also has a budget).
    budgets: dict = field(default_factory=dict)

    @property
    def raster_side(self) -> int:
        """Return the side in pixels of one mosaic raster."""
        return 512 * self.scenes_per_side

    @property
    def windows_per_raster(self) -> int:
        """Return how many grid windows one mosaic holds."""
        per_side = (self.raster_side - self.patch) // self.stride + 1
        return per_side * per_side


FULL = Sizes(
    patches=20_000,
    patch=224,
    stride=112,
    scenes_per_side=8,
    distinct_scenes=32,
    models=(VIT_S14, VIT_B14),
    image_size=224,
    batch_size=64,
    forward_batches=120,
    knn_n=155_000,
    knn_dim=768,
    knn_centres=300,
    coreset_n=155_000,
    coreset_dim=768,
    coreset_budget=0.1,
    fd_k_max=20,
    train_batch=16,
    train_steps_per_epoch=60,
    train_epochs=2,
    val_patches=128,
    loader_workers=None,
    train_model={},  # the product's default: Unet, resnet18 encoder, no pretrained weights
    budgets={
        "data": 60,
        "embeddings_vit_s14": 100,
        "embeddings_vit_b14": 110,
        "knn": 150,
        "coreset": 150,
        "train": 120,
    },
)

SMALL = Sizes(
    patches=128,
    patch=56,
    stride=56,
    scenes_per_side=1,
    distinct_scenes=2,
    models=(TINY_S, TINY_B),
    image_size=56,
    batch_size=16,
    forward_batches=8,
    knn_n=3_000,
    knn_dim=32,
    knn_centres=20,
    coreset_n=2_000,
    coreset_dim=32,
    coreset_budget=0.1,
    fd_k_max=6,
    train_batch=4,
    train_steps_per_epoch=3,
    train_epochs=2,
    val_patches=16,
    loader_workers=0,
    train_model={
        "_target_": "segmentation_models_pytorch.Unet",
        "encoder_name": "resnet18",
        "encoder_depth": 3,
        "decoder_channels": [32, 16, 8],
    },
    budgets={
        "data": 60,
        "embeddings_vit_s14": 60,
        "embeddings_vit_b14": 60,
        "knn": 60,
        "coreset": 60,
        "train": 90,
    },
)
