"""The `coreset:` configuration (SPEC §6): its keys, and reading it from YAML or a mapping.

The file paths are resolved once, when the configuration is loaded: relative to the YAML
file's folder (or the `base_dir` of a mapping), with `~` expanded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from patchbalance.config.loading import (
    Seed,
    StrictModel,
    load_model_file,
    mark_resolved,
    model_from_mapping,
)
from patchbalance.errors import ConfigError
from patchbalance.paths import check_distinct_files, default_summary_path, resolve_path
from patchbalance.table import table_suffix

# The keys that hold file paths; an empty one (the Python API's default) stays empty.
PATH_KEYS = ("input_csv_path", "output_csv_path", "parquet_path", "summary_path")


class CoresetConfig(StrictModel):
    """The `coreset:` block (SPEC §6)."""

    method: Literal["lc", "cb", "fa", "fd", "lc_fd", "fa_cb"] = "lc"
    budget: float = Field(default=0.3, gt=0)
    budget_mode: Literal["fraction", "count"] = "fraction"
    input_csv_path: str
    output_csv_path: str
    embedding_column: str | None = None
    parquet_path: str | None = None
    device: str | None = None
    cb_use_spatial: bool = False
    fd_use_spatial: bool = False
    exclude_low_entropy: bool = True
    fd_k_min: int = Field(default=2, ge=1)
    fd_k_max: int = Field(default=20, ge=1)
    fd_use_vendi: bool = False
    fd_vendi_delta: float = Field(default=0.005, gt=0)
    lc_fd_cutoff_m: int | None = Field(default=None, ge=0)
    fa_cb_lambda: float = Field(default=0.5, ge=0, le=1)
    score_column: str = "coreset_score"
    sampler_weights: Literal["inverse_frequency", "repeat_factor", "uniform", "keep"] = (
        "inverse_frequency"
    )
    max_weight: float | None = Field(default=10.0, ge=1)
    seed: Seed = 42
    summary_path: str | None = None

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source_path: Path | None = PrivateAttr(default=None)
    _resolved_as: str | None = PrivateAttr(default=None)

    @field_validator("output_csv_path")
    @classmethod
    def _table_format(cls, value: str) -> str:
        return table_suffix(value)

    @model_validator(mode="after")
    def _check_k_range(self) -> CoresetConfig:
        if self.fd_k_min > self.fd_k_max:
            raise ValueError(
                f"fd_k_min ({self.fd_k_min}) is larger than fd_k_max ({self.fd_k_max})"
            )
        if self.budget_mode == "count" and self.budget != int(self.budget):
            raise ValueError(f"budget_mode: count needs a whole number, got {self.budget}")
        if self.budget_mode == "fraction" and self.budget > 1:
            raise ValueError(
                f"budget {self.budget:g} is above 1: with budget_mode: fraction it is a share of "
                "the pool (for a number of patches set budget_mode: count)"
            )
        return self

    @property
    def base_dir(self) -> Path:
        """Return the folder that relative paths in this configuration are resolved against."""
        return self._base_dir

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """Return `path` resolved against the configuration file's folder."""
        return resolve_path(path, self._base_dir)


def with_resolved_paths(config: CoresetConfig) -> CoresetConfig:
    """Return a copy of `config` whose non-empty path keys are absolute (against `base_dir`).

    Args:
        config: a configuration, loaded or built by hand; resolving twice changes nothing.

    Returns:
        The copy; empty paths (the Python API's default for the command's files) stay empty.
    """
    update = {
        key: str(config.resolve(getattr(config, key))) for key in PATH_KEYS if getattr(config, key)
    }
    resolved = config.model_copy(update=update)
    check_coreset_files(resolved)
    mark_resolved(resolved)
    return resolved


def check_coreset_files(config: CoresetConfig) -> None:
    """Raise `ConfigError` when the outputs name one file, or an output names an input or an
    input's summary (`<stem>.summary.json`).

    Writing the CoreSet onto `input_csv_path` would replace the build's `sampler_weight` with
    the CoreSet's (0 outside it) and could not be undone or rerun, so it is refused: the CoreSet
    goes to a file of its own.
    """
    output = config.output_csv_path
    outputs = {
        "output_csv_path": output,
        "summary_path": config.summary_path or (default_summary_path(output) if output else None),
    }
    inputs = {"input_csv_path": config.input_csv_path, "parquet_path": config.parquet_path}
    # An input's summary describes that input (the build's figures, its hashes): replacing it
    # would make `report` check the build's table against the CoreSet's summary.
    for key, path in list(inputs.items()):
        if path:
            inputs[f"the summary of {key}"] = str(default_summary_path(path))
    try:
        check_distinct_files(outputs, inputs)
    except ConfigError as exc:
        where = f"{config._source_path}: " if config._source_path else ""
        raise ConfigError(f"{where}{exc}") from None


def load_coreset_config(
    path: str | os.PathLike[str], overrides: list[str] | None = None
) -> CoresetConfig:
    """Return the validated `coreset` configuration read from the YAML file `path`.

    Args:
        path: the YAML file; it may be the block itself or hold it under `coreset:`.
        overrides: `key.path=value` strings applied on top (the CLI's `--set`).

    Returns:
        The configuration, its file paths resolved against the file's folder.
    """
    return with_resolved_paths(load_model_file(CoresetConfig, "coreset", path, overrides or []))


def coreset_config_from_mapping(
    data: dict[str, Any], base_dir: str | os.PathLike[str] | None = None
) -> CoresetConfig:
    """Return a validated CoreSet configuration built from a mapping.

    Args:
        data: the `coreset` block, or a mapping that holds it under `coreset:`.
        base_dir: the folder relative paths are relative to (default: the current folder).

    Returns:
        The configuration, its file paths resolved against `base_dir`.
    """
    return with_resolved_paths(model_from_mapping(CoresetConfig, "coreset", data, base_dir))
