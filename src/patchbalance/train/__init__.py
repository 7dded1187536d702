"""`train`: segmentation training with the weighted sampler (SPEC §7).

`command` serves the command line, `run` holds the plain loop, `engine` the run on Lightning's Trainer (with
`segmentation_module` and `trainer_options`), `outputs` what a run writes, `config` the train
YAML's models, `plan` what is checked before training, `components` the model, loss and
optimiser, `metrics` the validation metrics, `schedules` the sampler schedules, `encoders` the
offline pretrained encoders.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_train_command", "train_from_config"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the package's submodules import torch.
    if name == "run_train_command":
        from patchbalance.train import command

        return command.run_train_command
    if name in __all__:
        from patchbalance.train import run

        return getattr(run, name)
    raise AttributeError(f"module 'patchbalance.train' has no attribute {name!r}")
