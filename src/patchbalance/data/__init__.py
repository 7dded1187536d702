"""Training integration: the windowed Dataset, weighted samplers and the DataLoader builder."""

from patchbalance.balanced_table import check_weights as validate_weights
from patchbalance.data.dataset import (
    CSVWindowedSegmentationDataset,
    WindowReadError,
    build_augmentation,
    read_patch_table,
)
from patchbalance.data.loader import build_dataloader, build_weighted_sampler, dataset_weights
from patchbalance.data.samplers import (
    TORCH_MULTINOMIAL_MAX_CATEGORIES,
    DistributedWeightedSampler,
    NumpyWeightedRandomSampler,
)

__all__ = [
    "TORCH_MULTINOMIAL_MAX_CATEGORIES",
    "CSVWindowedSegmentationDataset",
    "DistributedWeightedSampler",
    "NumpyWeightedRandomSampler",
    "WindowReadError",
    "build_augmentation",
    "build_dataloader",
    "build_weighted_sampler",
    "dataset_weights",
    "read_patch_table",
    "validate_weights",
]
