"""Shared by the training tests: a small model and a small run configuration."""

from __future__ import annotations

from pathlib import Path

# A small Unet (3 encoder stages) keeps CPU steps fast; the default is resnet18 with 5 stages.
SMALL_MODEL = {
    "_target_": "segmentation_models_pytorch.Unet",
    "encoder_name": "resnet18",
    "encoder_depth": 3,
    "decoder_channels": [32, 16, 8],
}


def small_config(train_table: Path, val_table: Path, output_dir: Path) -> dict:
    """Return a two-step weighted training run of the small model on two tables."""
    return {
        "train_dataset": {
            "_target_": "patchbalance.data.CSVWindowedSegmentationDataset",
            "input_csv_path": str(train_table),
            "n_classes": 4,
            "augmentation_list": [{"_target_": "albumentations.HorizontalFlip", "p": 0.5}],
            "data_loader": {"shuffle": True, "weighted_sampler": True, "num_workers": 0},
        },
        "val_dataset": {"input_csv_path": str(val_table), "data_loader": {"num_workers": 0}},
        "model": dict(SMALL_MODEL),
        "hyperparameters": {"batch_size": 4, "max_steps": 2, "lr": 0.01},
        "device": "cpu",
        "seed": 3,
        "output_dir": str(output_dir),
    }
