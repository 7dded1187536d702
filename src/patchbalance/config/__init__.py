"""Configuration: YAML loading with OmegaConf, validation with pydantic, upstream synonyms.

`load_config(path)` returns a validated `BalancedDatasetConfig`. Every user mistake becomes a
`ConfigError` whose one-line message names the file and the key (and, for a typo, the closest
valid key); the reading and the messages are in `config.loading`, shared with the `coreset:`
(`coreset.config`) and `train` (`train.config`) files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from patchbalance.config.input import InputConfig
from patchbalance.config.loading import (
    Seed,
    StrictModel,
    load_model_file,
    mark_resolved,
    model_from_mapping,
)
from patchbalance.config.output import OutputConfig
from patchbalance.errors import ConfigError, PatchbalanceError
from patchbalance.paths import (
    check_distinct_files,
    default_summary_path,
    resolve_path,
)
from patchbalance.sampling.registry import (
    MethodParams,
    get_sampling_method,
    parameter_owners,
)

# The default method (SPEC §3.7); its parameters' defaults are in its model in the registry.
DEFAULT_SAMPLING_METHOD = "class_target"


class ClusteringConfig(StrictModel):
    k_min: int = Field(default=4, ge=1)
    k_max: int = Field(default=16, ge=1)
    k_selection: Literal["elbow", "fixed"] = "elbow"
    k: int | None = Field(default=None, ge=1)
    random_state: Seed | None = None
    n_init: int = Field(default=3, ge=1)
    sweep_sample: int = Field(default=20_000, ge=100)
    pseudo_count: float = Field(default=0.5, gt=0)
    classes: list[int] | None = None

    @model_validator(mode="after")
    def _check_k(self) -> ClusteringConfig:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) is larger than k_max ({self.k_max})")
        if self.k_selection == "fixed" and self.k is None:
            raise ValueError("k_selection: fixed needs k")
        if self.classes is not None:
            if not self.classes:
                raise ValueError("classes, when given, must list at least one class value")
            if len(set(self.classes)) != len(self.classes):
                raise ValueError("classes lists a value twice")
        return self


class ExclusionConfig(StrictModel):
    synonyms: ClassVar[dict[str, str]] = {
        "exclude_mask_border_nodata": "exclude_border_nodata",
        "exclude_image_black_border": "exclude_black_border",
        "black_border_tolerance": "black_tolerance",
        "min_entropy_threshold": "min_entropy",
    }
    exclude_border_nodata: bool = True
    exclude_black_border: bool = True
    black_tolerance: float = Field(default=0, ge=0)
    black_border_min_fraction: float = Field(default=0.5, gt=0, le=1)
    max_nodata_ratio: float = Field(default=1.0, ge=0, le=1)
    min_entropy: float = Field(default=0.0, ge=0)
    nodata_class: int | None = None
    mask_band: int = Field(default=1, ge=1)


class EmbeddingsConfig(StrictModel):
    backbone: Literal["dinov2", "efficientnet_lite0"] = "dinov2"
    dino_model: str = "facebook/dinov2-small"
    bands: list[int] | None = None
    value_range: tuple[float, float] | None = None
    image_size: int = Field(default=224, gt=0)
    pooling: Literal["cls", "mean", "cls+mean"] = "cls"
    batch_size: int = Field(default=32, gt=0)
    num_workers: int = Field(default=4, ge=0)
    use_gpu: bool = False
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    parquet_path: str | None = None
    checkpoint_every: int = Field(default=50, gt=0)

    @field_validator("bands")
    @classmethod
    def _bands_one_based(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError("bands are 1-based band numbers, e.g. [1, 2, 3]")
        return value

    @field_validator("value_range")
    @classmethod
    def _range_increasing(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not value[0] < value[1]:
            raise ValueError("value_range must be [low, high] with low < high")
        return value


class UniquenessConfig(StrictModel):
    """`uniqueness:` (SPEC §3.6, §10): the kNN backend and its parameters."""

    k_neighbors: int = Field(default=5, ge=1)
    backend: Literal["auto", "exact", "hnsw", "faiss", "faiss_ivf", "sklearn"] = "auto"
    M: int = Field(default=16, ge=2)
    ef_construction: int = Field(default=200, ge=1)
    ef_search: int = Field(default=100, ge=1)
    block_size: int = Field(default=4096, ge=1)
    # faiss_ivf: inverted lists ("auto": about 4·sqrt(N)) and how many of them a query visits.
    nlist: int | Literal["auto"] = "auto"
    nprobe: int = Field(default=16, ge=1)

    @field_validator("nlist", mode="before")
    @classmethod
    def _positive_nlist(cls, value: Any) -> Any:
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            return value
        raise ValueError(f"nlist must be 'auto' or a positive integer, got {value!r}")

    @model_validator(mode="after")
    def _nprobe_within_nlist(self) -> UniquenessConfig:
        # Only a contradiction the user wrote is an error; the default nprobe, or any nprobe
        # above an nlist that `auto` or a small N lowers, is clamped when the index is built.
        if (
            "nprobe" in self.model_fields_set
            and isinstance(self.nlist, int)
            and self.nprobe > self.nlist
        ):
            raise ValueError(
                f"nprobe ({self.nprobe}) is larger than nlist ({self.nlist}); a query cannot "
                "visit more lists than there are: lower nprobe or raise nlist"
            )
        return self


class WeightsConfig(StrictModel):
    """The `weights:` block (SPEC §3.7).

    Its own fields are the keys every method shares. The other keys are a method's own
    parameters (`target_share` and `min_ess` of class_target, `sqrt` of inverse_frequency, ...):
    the registry's model of the named method validates them (`bind`), and `params` holds the
    result. A key that only another method declares is checked by that method's model and not
    used; a key no method declares is an error naming it.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True, validate_default=True)

    power: float = Field(default=1.0, ge=0)
    max_weight: float | None = Field(default=None, ge=1)
    uniform_mix: float = Field(default=0.0, ge=0, le=1)

    _params: MethodParams | None = PrivateAttr(default=None)
    _bound_to: str | None = PrivateAttr(default=None)

    @classmethod
    def extra_keys(cls) -> list[str]:
        """Return the method keys the block accepts besides its own fields."""
        return list(parameter_owners())

    def bind(self, method: str) -> WeightsConfig:
        """Validate the method keys for `method` and keep its parameters; return self."""
        given = dict(self.model_extra or {})
        owners = parameter_owners()
        unknown = {key: value for key, value in given.items() if key not in owners}
        if unknown:
            MethodParams.model_validate(unknown)  # an error naming the unknown key
        chosen = get_sampling_method(method)
        own = {key: value for key, value in given.items() if key in chosen.params.model_fields}
        for key, value in given.items():
            if key not in own:
                get_sampling_method(owners[key][0]).parse_params({key: value})
        self._params, self._bound_to = chosen.parse_params(own), method
        return self

    @property
    def params(self) -> MethodParams:
        """Return the named method's validated parameters."""
        if self._params is None:
            raise RuntimeError("WeightsConfig.params before bind(): validate the whole config")
        return self._params

    def params_for(self, method: str) -> MethodParams:
        """Return `method`'s parameters, validating them again when the configuration was
        bound to another method (a `sampling_method` changed in Python after loading)."""
        return self.params if self._bound_to == method else self.bind(method).params


SCHEDULERS = ("auto", "local", "threads", "synchronous")
SCHEDULER_ADDRESS = re.compile(r"^(tcp|tls|ucx|inproc)://\S+$")


class ComputeConfig(StrictModel):
    """The `compute:` block (SPEC §10): where the per-raster work runs."""

    scheduler: str = "auto"
    # `auto` runs in-process up to this many patches and on a LocalCluster above.
    cluster_above: int = Field(default=20_000, ge=0)
    # Worker processes of `local` (one thread each); None: one per core.
    workers: int | None = Field(default=None, ge=1)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value in SCHEDULERS or SCHEDULER_ADDRESS.match(value):
            return value
        raise ValueError(
            f"expected {', '.join(SCHEDULERS)} or a Dask scheduler address such as "
            f"tcp://host:8786, not {value!r}"
        )


class BalancedDatasetConfig(StrictModel):
    """The `balanced_dataset:` block (SPEC §2)."""

    mode: Literal["masks_only", "embeddings"] = "masks_only"
    # Any name of the registry in patchbalance.sampling.registry (SPEC §3.7).
    sampling_method: str = DEFAULT_SAMPLING_METHOD
    num_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    seed: Seed = 42
    input: InputConfig
    clustering: ClusteringConfig = Field(default_factory=ClusteringConfig)
    uniqueness: UniquenessConfig = Field(default_factory=UniquenessConfig)
    embeddings: EmbeddingsConfig = Field(default_factory=EmbeddingsConfig)
    exclusion: ExclusionConfig = Field(default_factory=ExclusionConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    output: OutputConfig
    compute: ComputeConfig = Field(default_factory=ComputeConfig)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source_path: Path | None = PrivateAttr(default=None)
    _resolved_as: str | None = PrivateAttr(default=None)

    @field_validator("mode", mode="before")
    @classmethod
    def _both_means_embeddings(cls, value: Any) -> Any:
        return "embeddings" if value == "both" else value

    @model_validator(mode="after")
    def _postgres_output_can_connect(self) -> BalancedDatasetConfig:
        table = self.output.postgres_table
        if table is not None and not table.has_connection and self.input.source_kind != "postgres":
            raise ValueError(
                "output.postgres_table needs connection keys (dsn, or host, port, database, "
                "user, password) when the input is not a PostgreSQL table"
            )
        return self

    @field_validator("sampling_method")
    @classmethod
    def _registered_method(cls, value: str) -> str:
        return get_sampling_method(value).name

    @field_validator("weights")
    @classmethod
    def _method_parameters(cls, value: WeightsConfig, info: ValidationInfo) -> WeightsConfig:
        # sampling_method is validated first (declared first); when it failed, that is the error.
        method = info.data.get("sampling_method")
        return value.bind(method) if method is not None else value

    @model_validator(mode="after")
    def _method_fits_mode(self) -> BalancedDatasetConfig:
        if self.mode == "masks_only" and get_sampling_method(self.sampling_method).needs_uniqueness:
            raise ValueError(
                f"sampling_method '{self.sampling_method}' needs visual uniqueness; "
                "use mode: embeddings (or another sampling_method)"
            )
        return self

    @property
    def sampling_method_is_default(self) -> bool:
        """Return True when the configuration names no sampling_method (SPEC §3.7)."""
        return "sampling_method" not in self.model_fields_set

    @property
    def placement_is_default(self) -> bool:
        """Return True when the default's class-centred windows apply (docs/benchmarks.md).

        That is a rasters source whose configuration names neither `sampling_method` nor
        `input.placement`: the default method then comes with class-centred windows, the
        settings that the round-three evidence supports. Naming either keeps the grid default.
        """
        source = self.input
        return (
            self.sampling_method_is_default
            and source.source_kind == "rasters"
            and "placement" not in source.model_fields_set
        )

    @property
    def placement(self) -> str:
        """Return the window placement over rasters: `class_centred` by default, else as written."""
        return "class_centred" if self.placement_is_default else self.input.placement

    @property
    def base_dir(self) -> Path:
        """Return the folder that relative paths in this configuration are resolved against."""
        return self._base_dir

    @property
    def source_path(self) -> Path | None:
        """Return the configuration file this was loaded from, if any."""
        return self._source_path

    @property
    def kmeans_seed(self) -> int:
        """Return the KMeans random state: `clustering.random_state`, else `seed`."""
        return self.seed if self.clustering.random_state is None else self.clustering.random_state

    def with_resolved_paths(self) -> BalancedDatasetConfig:
        """Return a copy whose file paths are absolute, taken against `base_dir` (once, at load).

        `embeddings.dino_model` becomes a path only when it names an existing folder there;
        otherwise it stays a model id (e.g. facebook/dinov2-small).
        """

        def absolute(path: str | None) -> str | None:
            return None if path is None else str(self.resolve(path))

        source = self.input
        rasters = None
        if source.rasters is not None:
            rasters = [
                pair.model_copy(
                    update={
                        "image_path": absolute(pair.image_path),
                        "mask_path": absolute(pair.mask_path),
                    }
                )
                for pair in source.rasters
            ]
        embeddings = self.embeddings
        model = embeddings.dino_model
        folder = self.resolve(model)
        if not os.path.isabs(os.path.expanduser(model)) and folder.is_dir():
            model = str(folder)
        output = self.output
        resolved = self.model_copy(
            update={
                "input": source.model_copy(
                    update={
                        "records_path": absolute(source.records_path),
                        "image_glob": absolute(source.image_glob),
                        "mask_glob": absolute(source.mask_glob),
                        "rasters": rasters,
                    }
                ),
                "output": output.model_copy(
                    update={
                        "csv_path": absolute(output.csv_path),
                        "summary_path": absolute(output.summary_path),
                        "footprints_path": absolute(output.footprints_path),
                    }
                ),
                "embeddings": embeddings.model_copy(
                    update={"parquet_path": absolute(embeddings.parquet_path), "dino_model": model}
                ),
            }
        )
        resolved._base_dir, resolved._source_path = self._base_dir, self._source_path
        check_build_files(resolved)  # before any stage: no output may replace another or an input
        mark_resolved(resolved)
        return resolved

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """Return `path` resolved against the configuration file's folder."""
        return resolve_path(path, self._base_dir)


# --------------------------------------------------------------------------------------------
# Loading


def load_config(
    path: str | os.PathLike[str], overrides: list[str] | None = None
) -> BalancedDatasetConfig:
    """Return the validated `balanced_dataset` configuration read from the YAML file `path`.

    The file may be the block itself or hold it under `balanced_dataset:`. `overrides` are
    `key.path=value` strings applied on top (the CLI's `--set`).
    """
    config = load_model_file(BalancedDatasetConfig, "balanced_dataset", path, overrides or [])
    return config.with_resolved_paths()


def config_from_mapping(
    data: dict[str, Any], base_dir: str | os.PathLike[str] | None = None
) -> BalancedDatasetConfig:
    """Return a validated configuration built from a mapping (the Python API's entry point)."""
    return model_from_mapping(
        BalancedDatasetConfig, "balanced_dataset", data, base_dir
    ).with_resolved_paths()


def check_build_files(config: BalancedDatasetConfig) -> None:
    """Raise `ConfigError` when two of the build's outputs, or an output and an input, are one file.

    The outputs are the table, the summary (by default `<csv_path stem>.summary.json`), the
    footprints and, in mode embeddings, the embeddings cache; the inputs are the records file
    and the rasters of `input.rasters`. `config`'s paths must be absolute (as loaded).
    """
    output = config.output
    outputs = {
        "output.csv_path": output.csv_path,
        "output.summary_path": output.summary_path or default_summary_path(output.csv_path),
        "output.footprints_path": output.footprints_path,
    }
    if config.mode == "embeddings":
        outputs["embeddings.parquet_path"] = config.embeddings.parquet_path
    try:
        check_distinct_files(outputs, build_inputs(config))
    except ConfigError as exc:
        where = f"{config.source_path}: " if config.source_path else ""
        raise ConfigError(f"{where}{exc}") from None


def build_inputs(config: BalancedDatasetConfig) -> dict[str, str | None]:
    """Return the files a build reads, by the key that names each: records, listed rasters."""
    inputs: dict[str, str | None] = {"input.records_path": config.input.records_path}
    for position, pair in enumerate(config.input.rasters or []):
        inputs[f"input.rasters.{position}.image_path"] = pair.image_path
        inputs[f"input.rasters.{position}.mask_path"] = pair.mask_path
    return inputs


def table_files(table_path: str | os.PathLike[str]) -> dict[str, Path]:
    """Return the files that belong with a balanced table, by what each is.

    The table and its summary (`<stem>.summary.json`), and as far as the summary tells: the
    build's other outputs, its configuration and the inputs that configuration names. A
    missing or unreadable summary, or a configuration that no longer loads, tells nothing more.
    """
    table_path = Path(table_path)
    summary_path = default_summary_path(table_path)
    files = {"the table": table_path, "the table's summary": summary_path}
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        outputs = dict(summary.get("outputs") or {})
        config_path = summary.get("config")
    except (OSError, ValueError, TypeError, AttributeError):
        return files
    files.update({f"the build's {name}": Path(str(path)) for name, path in outputs.items()})
    if not config_path or not Path(config_path).is_file():
        return files
    files["the build's configuration"] = Path(config_path)
    try:
        inputs = build_inputs(load_config(config_path))
    except PatchbalanceError:
        return files
    files.update({f"the build's {key}": Path(path) for key, path in inputs.items() if path})
    return files
