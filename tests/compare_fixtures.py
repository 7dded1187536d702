"""Tiny comparisons on the demo data, shared by the `compare` tests."""

from __future__ import annotations

import time
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


def sleepy_training(job: tuple[str, float, str]) -> float:
    """Stand in for a training run (in a worker process): mark its start, sleep, mark its end."""
    name, seconds, folder = job
    (Path(folder) / f"{name}.started").touch()
    time.sleep(seconds)
    (Path(folder) / f"{name}.finished").touch()
    return seconds


def error_line(result) -> str:
    """Return the one `error:` line a command printed (asserting one, and no traceback)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]
