"""Tiny `compare` configurations over the demo data, shared by the comparison tests."""

from __future__ import annotations

from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "conf" / "examples"


def tiny_configs(root: Path, demo: dict, **compare) -> Path:
    """Write a tiny train config (small Unet, 8 validation windows) and a compare config."""
    train = yaml.safe_load((EXAMPLES / "compare_train.yaml").read_text())
    train["train_dataset"]["input_csv_path"] = str(demo["table"])
    train["val_dataset"]["input_csv_path"] = str(demo["val"])
    train["val_dataset"]["n_first_rows_to_read"] = 8
    train["hyperparameters"]["batch_size"] = 4
    (root / "train.yaml").write_text(yaml.safe_dump(train))
    block = {
        "build": str(demo["config"]),
        "train": "train.yaml",
        "arms": {"rank_max": {"build": {"sampling_method": "rank_max"}}},
        "seeds": 2,
        "steps": 2,
        "eval_every": 1,
        "output_dir": "out",
        **compare,
    }
    (root / "compare.yaml").write_text(yaml.safe_dump({"compare": block}))
    return root / "compare.yaml"
