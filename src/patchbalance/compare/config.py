"""The `compare:` configuration (SPEC §11): its keys, and each arm's merged build and train config.

A comparison names the user's build config and train config, and a set of arms: overrides of
either, deep-merged onto them, or a CoreSet selection over the arm's table. Every arm's merged
configs are validated with the same models as `build-balanced-dataset` and `train` before
anything runs, so a mistyped key in an arm is one line naming the arm and the key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from patchbalance.config import BalancedDatasetConfig
from patchbalance.config.loading import (
    StrictModel,
    create_config,
    describe_validation_error,
    load_model_file,
    read_yaml_mapping,
)
from patchbalance.config.secrets import safe_cause
from patchbalance.errors import ConfigError
from patchbalance.paths import resolve_path
from patchbalance.train.config import TrainConfig, load_train_config, resolve_config_mapping

# The baseline the command provides when `baseline` is `uniform` and no arm has that name: the
# same pool and sampler with every active patch weighted 1 (power 0), so weighting is the only
# difference between it and the other arms.
UNIFORM = "uniform"
UNIFORM_BUILD: dict[str, Any] = {
    "mode": "masks_only",
    "sampling_method": "composition_only",
    "weights": {"power": 0.0},
}
# A CoreSet arm draws its selected rows with equal weights unless it says otherwise.
CORESET_DEFAULTS: dict[str, Any] = {"sampler_weights": "uniform"}
# `coreset: {method: random}`: a seeded random subset of the pool, the control a CoreSet is
# measured against.
RANDOM_SUBSET = "random"
ARM_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
# Paired seeds beyond this many cost weeks of training and resolve nothing more.
MAX_SEEDS = 1000
REPLACE = "_replace_"
# Training length keys that the comparison sets for every run.
LENGTH_KEYS = ("epochs", "num_epochs", "max_epochs", "max_steps")


class ArmConfig(StrictModel):
    """One arm: overrides of the build and train configs, or a CoreSet over its table."""

    build: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    coreset: dict[str, Any] | None = None


def _check_arm_names(names: list[str]) -> None:
    """Raise `ValueError` for an arm name that cannot name its own folder."""
    if not names:
        raise ValueError("arms is empty: name at least one arm to compare with the baseline")
    bad = [name for name in names if not ARM_NAME.fullmatch(name) or set(name) == {"."}]
    if bad:
        raise ValueError(
            f"arm name {bad[0]!r} may hold only letters, digits and _ . + -, and not be . or .. "
            "(it names a folder)"
        )
    seen: dict[str, str] = {UNIFORM: UNIFORM}
    for name in names:
        other = seen.setdefault(name.lower(), name)
        if other != name:
            raise ValueError(
                f"arm names {other!r} and {name!r} differ only in case; their folders would be "
                "one on a case-insensitive file system: rename one"
            )


class CompareConfig(StrictModel):
    """The `compare:` block (SPEC §11)."""

    build: str
    train: str
    arms: dict[str, ArmConfig]
    baseline: str = UNIFORM
    seeds: int = Field(default=5, ge=2, le=MAX_SEEDS)
    steps: int = Field(default=400, ge=1)
    eval_every: int = Field(default=100, ge=1)
    short_steps: int | None = Field(default=None, ge=1)
    classes_of_interest: list[int] | None = None
    catch_all: list[int] = Field(default_factory=list)
    class_names: dict[int, str] | None = None
    jobs: int = Field(default=1, ge=1)
    threads: int = Field(default=1, ge=1)
    output_dir: str = "compare_output"
    plateau_tolerance: float = Field(default=0.01, ge=0)

    @field_validator("classes_of_interest")
    @classmethod
    def _some_classes_of_interest(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and not value:
            raise ValueError(
                "is empty; list the classes the comparison is about, or leave the key out "
                "for the two rarest classes of the baseline's table"
            )
        return value

    @model_validator(mode="after")
    def _budgets_fit_the_validation_interval(self) -> CompareConfig:
        if self.steps % self.eval_every:
            raise ValueError(
                f"steps ({self.steps}) must be a multiple of eval_every ({self.eval_every})"
            )
        if self.short_steps is not None and (
            self.short_steps % self.eval_every or self.short_steps > self.steps
        ):
            raise ValueError(
                f"short_steps ({self.short_steps}) must be a multiple of eval_every "
                f"({self.eval_every}) and at most steps ({self.steps})"
            )
        _check_arm_names(list(self.arms))
        return self

    @property
    def short_budget(self) -> int:
        """Return the short budget: `short_steps`, else a third of `steps` on the eval grid."""
        if self.short_steps is not None:
            return self.short_steps
        return max(self.eval_every, self.steps // 3 // self.eval_every * self.eval_every)


@dataclass
class Arm:
    """One arm, its configs merged and validated."""

    name: str
    build: dict[str, Any]  # the balanced_dataset mapping, paths absolute
    train: dict[str, Any]  # the train mapping, interpolations resolved, paths absolute
    coreset: dict[str, Any] | None
    build_base: Path  # the build config's folder (relative override paths resolve there)


@dataclass
class ComparePlan:
    """A validated comparison: its settings and every arm, the baseline first."""

    config: CompareConfig
    arms: dict[str, Arm]
    output_dir: Path
    where: str
    configs: dict[str, Path] = field(default_factory=dict)  # the config files, by what they hold

    @property
    def baseline(self) -> str:
        """Return the baseline arm's name."""
        return self.config.baseline

    @property
    def first_seed(self) -> int:
        """Return the first training seed: the train config's `seed` (the others follow it)."""
        return int(self.arms[self.baseline].train.get("seed", 42))

    @property
    def seeds(self) -> list[int]:
        """Return the paired training seeds."""
        return [self.first_seed + k for k in range(self.config.seeds)]


def digest(value: Any) -> str:
    """Return a short SHA-256 of `value` as sorted JSON (what decides that work is reusable)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `override` merged in: mappings key by key, anything else replaced.

    A mapping in `override` that holds `_replace_: true` replaces the mapping of `base` whole
    (e.g. a `loss:` block of another shape) instead of being merged into it.
    """
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and value.get(REPLACE):
            merged[key] = {k: copy.deepcopy(v) for k, v in value.items() if k != REPLACE}
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _arm_build(
    name: str, base: dict[str, Any], override: dict[str, Any], folder: Path, where: str
) -> dict[str, Any]:
    """Return the arm's build mapping, validated, its paths absolute."""
    merged = deep_merge(base, override)
    try:
        config = BalancedDatasetConfig.model_validate(merged)
    except ValidationError as exc:
        message = describe_validation_error(
            exc, BalancedDatasetConfig, f"arms.{name}.build", data=merged
        )
        raise ConfigError(f"{where}: arm '{name}': {message}") from safe_cause(exc)
    config._base_dir = folder
    # Only the keys the configs wrote (and the resolved paths): a key left out keeps meaning
    # "the default" when the arm is built, as `sampling_method` does (SPEC §3.7).
    return config.with_resolved_paths().model_dump(mode="json", by_alias=True, exclude_unset=True)


def _arm_train(
    name: str, base: dict[str, Any], override: dict[str, Any], folder: Path, where: str
) -> dict[str, Any]:
    """Return the arm's train mapping, validated, its paths absolute."""
    label = f"{where}: arm '{name}': arms.{name}.train"
    merged = resolve_config_mapping(deep_merge(base, override), (), label)
    try:
        TrainConfig.model_validate(merged)
    except ValidationError as exc:
        message = describe_validation_error(exc, TrainConfig, f"arms.{name}.train")
        raise ConfigError(f"{where}: arm '{name}': {message}") from exc
    resolved = load_train_config(merged, folder, label)
    merged["val_dataset"] = resolved.val_dataset
    return merged


def _check_coreset(name: str, block: dict[str, Any] | None, where: str) -> None:
    """Raise `ConfigError` for a CoreSet override that `select-coreset` would not take.

    `method: random` takes the budget keys of `select-coreset` only, checked by its rules.
    """
    if block is None:
        return
    from patchbalance.coreset.config import CoresetConfig

    given = dict(block)
    if block.get("method") == RANDOM_SUBSET:
        unknown = sorted(set(block) - {"method", "budget", "budget_mode", "exclude_low_entropy"})
        if unknown:
            raise ConfigError(
                f"{where}: arm '{name}': unknown key 'arms.{name}.coreset.{unknown[0]}' for "
                "method: random (it takes budget, budget_mode, exclude_low_entropy)"
            )
        given.pop("method")
    checked = {**CORESET_DEFAULTS, "input_csv_path": "", "output_csv_path": "", **given}
    try:
        CoresetConfig.model_validate(checked)
    except ValidationError as exc:
        message = describe_validation_error(exc, CoresetConfig, f"arms.{name}.coreset")
        raise ConfigError(f"{where}: arm '{name}': {message}") from exc


def train_classes(dataset: dict[str, Any]) -> list[int] | None:
    """Return the raw class values a train dataset labels (None when it cannot tell)."""
    if dataset.get("class_values"):
        return [int(v) for v in dataset["class_values"]]
    if dataset.get("mask_class_mapping"):
        return sorted(int(v) for v in dataset["mask_class_mapping"])
    if dataset.get("n_classes") is not None:
        return list(range(int(dataset["n_classes"])))
    return None


def check_class_keys(config: CompareConfig, classes: Any, where: str, whose: str) -> None:
    """Raise `ConfigError` naming the key when `classes_of_interest`, `catch_all` or
    `class_names` names a class that is not among `classes` (`whose` says where those are from).
    """
    known = sorted(int(value) for value in classes)
    for key, named in (
        ("classes_of_interest", config.classes_of_interest or []),
        ("catch_all", config.catch_all),
        ("class_names", list(config.class_names or {})),
    ):
        unknown = sorted(set(named) - set(known))
        if unknown:
            raise ConfigError(
                f"{where}: {key} names class {', '.join(map(str, unknown))}, which is not a "
                f"class of {whose} (its classes: {', '.join(map(str, known))})"
            )


def _read_block(path: Path, block: str, what: str, where: str) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(
            f"{where}: the {what} config {path} is a folder; check '{what}:' names the YAML file"
        )
    if not path.is_file():
        raise ConfigError(f"{where}: the {what} config {path} does not exist; check '{what}:'")
    raw = read_yaml_mapping(path)
    mapping = dict(raw[block]) if isinstance(raw.get(block), dict) else raw
    create_config(mapping, path)  # a malformed `${` is named here, with its file and key
    return mapping


def plan_compare(config: CompareConfig, base_dir: Path, where: str) -> ComparePlan:
    """Return the comparison's plan: every arm's configs merged onto the user's and validated.

    Raises `ConfigError` naming the arm and the key for an override that the build or train
    config does not have, a baseline that is not an arm, or a train config without
    `val_dataset`; nothing is built or trained before this returns.
    """
    build_path = resolve_path(config.build, base_dir)
    train_path = resolve_path(config.train, base_dir)
    build_base = _read_block(build_path, "balanced_dataset", "build", where)
    train_base = _read_block(train_path, "train", "train", where)
    if "val_dataset" not in train_base:
        raise ConfigError(
            f"{train_path}: a comparison validates every run on 'val_dataset'; add a "
            "val_dataset block (a table of held-out windows) to the train config"
        )
    train_base = {key: value for key, value in train_base.items() if key not in ("output_dir",)}
    dataset = train_base.get("train_dataset") or {}
    known = train_classes(dataset)
    if known is not None:
        check_class_keys(
            config, known, where, f"the train config (n_classes {dataset.get('n_classes')})"
        )
    specs = dict(config.arms)
    if config.baseline == UNIFORM and UNIFORM not in specs:
        specs = {UNIFORM: ArmConfig(build=UNIFORM_BUILD), **specs}
    if config.baseline not in specs:
        raise ConfigError(
            f"{where}: baseline '{config.baseline}' is not an arm; name one of "
            f"{', '.join(specs)} (or leave baseline out for the uniform arm)"
        )
    order = [config.baseline, *(name for name in specs if name != config.baseline)]
    arms = {}
    for name in order:
        spec = specs[name]
        _check_coreset(name, spec.coreset, where)
        arms[name] = Arm(
            name=name,
            build=_arm_build(name, build_base, spec.build, build_path.parent, where),
            train=_arm_train(name, train_base, spec.train, train_path.parent, where),
            coreset=None if spec.coreset is None else dict(spec.coreset),
            build_base=build_path.parent,
        )
    output_dir = resolve_path(config.output_dir, base_dir)
    configs = {"build": build_path, "train": train_path}
    return ComparePlan(config, arms, output_dir, where, configs)


ARM_KEY = re.compile(r"unknown key 'arms\.[^.']+\.[^.']+'")


def _with_arm_hint(error: ConfigError) -> ConfigError:
    """Return `error`, saying what an arm takes when it is about an unknown key of an arm."""
    message = str(error)
    if ARM_KEY.search(message):
        return ConfigError(f"{message}; an arm takes build, train and coreset")
    return error


def load_compare_config(
    path: str | os.PathLike[str], overrides: list[str] | None = None
) -> ComparePlan:
    """Return the plan of the comparison in the YAML file `path` (its `compare:` block).

    Relative paths (`build`, `train`, `output_dir`) are taken against the file's folder.
    """
    path = Path(path)
    raw = read_yaml_mapping(path)
    if "compare" not in raw and not {"build", "train", "arms"} & set(raw):
        found = ", ".join(f"'{key}'" for key in list(raw)[:3]) or "no keys"
        raise ConfigError(
            f"{path}: not a comparison file: it has no 'compare:' block (found {found}); write "
            "compare: {build: ..., train: ..., arms: {...}}"
        )
    try:
        config = load_model_file(CompareConfig, "compare", path, overrides or [])
    except ConfigError as exc:
        raise _with_arm_hint(exc) from exc
    plan = plan_compare(config, path.resolve().parent, str(path))
    plan.configs["compare"] = resolve_path(path, Path.cwd())
    return plan


def compare_plan_from_mapping(
    data: dict[str, Any], base_dir: str | os.PathLike[str] | None = None
) -> ComparePlan:
    """Return the plan of a comparison given as a mapping (the Python API's entry point)."""
    try:
        config = CompareConfig.model_validate(data.get("compare", data))
    except ValidationError as exc:
        message = describe_validation_error(exc, CompareConfig, "<compare>")
        raise _with_arm_hint(ConfigError(message)) from safe_cause(exc)
    base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    return plan_compare(config, base, "<compare>")
