"""`build_balanced_dataset`: runs the stages of SPEC §3 in order and times each one.

records -> mask statistics -> exclusion -> composition clusters -> embeddings -> uniqueness ->
weights -> outputs. Nothing is written until every stage has succeeded.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchbalance.atomic import (
    check_writable,
    check_writable_folder,
    output_set,
    remove_stale_temporaries,
    write_json,
)
from patchbalance.balancing.composition import CompositionResult, fit_composition_clusters
from patchbalance.balancing.exclusion import REASONS, ExclusionFlags, exclusion_flags
from patchbalance.balancing.outputs import check_footprint_writer, write_footprints
from patchbalance.balancing.raster_reading import RasterReading, read_rasters
from patchbalance.balancing.result_table import ResultTable
from patchbalance.balancing.stats import MaskStatistics, nodata_ratios
from patchbalance.balancing.summary import BuildSummary, StageResults, summary_text
from patchbalance.compute import Compute, open_compute
from patchbalance.config import (
    BalancedDatasetConfig,
    ClusteringConfig,
    ExclusionConfig,
    WeightsConfig,
    config_from_mapping,
    load_config,
)
from patchbalance.config.loading import is_resolved
from patchbalance.errors import InputError
from patchbalance.paths import FOOTPRINT_FORMATS, default_summary_path, footprint_format
from patchbalance.progress import StageClock, progress_bar
from patchbalance.sampling.figures import SamplingFigures, sampling_figures
from patchbalance.sampling.registry import Signals, sampling_scores
from patchbalance.sampling.scores import normalise_weights, sampler_weights
from patchbalance.sources import SourceRecords, load_records
from patchbalance.sources.local import grid_window_count
from patchbalance.table import KEY_COLUMNS, write_table_chunks
from patchbalance.windows import RasterInfo

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """What a build produced: the table (as written), its summary and the files written.

    `table` is made from the stages' arrays the first time it is asked for; a command that
    only writes the files never holds the whole table as a DataFrame.
    """

    rows: ResultTable
    summary: BuildSummary
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def figures(self) -> SamplingFigures:
        """Return the sampling figures of the weights (SPEC §5), as the summary records them."""
        return self.summary.figures

    @property
    def summary_text(self) -> str:
        """Return the end-of-run text for the terminal."""
        return self.summary.text()

    @cached_property
    def table(self) -> pd.DataFrame:
        """Return the table the build wrote (or would write), as one DataFrame."""
        return self.rows.to_frame()


def _as_config(
    config: BalancedDatasetConfig | dict[str, Any] | str | os.PathLike[str],
) -> BalancedDatasetConfig:
    if isinstance(config, BalancedDatasetConfig):
        # Resolved once, at load; one changed in Python since then is resolved (and checked) again.
        return config if is_resolved(config) else config.with_resolved_paths()
    if isinstance(config, dict):
        return config_from_mapping(config)
    return load_config(config)


OUTPUT_LABELS = {
    "table": "the balanced table (output.csv_path)",
    "summary": "the summary (output.summary_path)",
    "geojson": "the GeoJSON footprints (output.footprints_path)",
    "geopackage": "the GeoPackage footprints (output.footprints_path)",
    "geoparquet": "the GeoParquet footprints (output.footprints_path)",
    "cache": "the embeddings cache (embeddings.parquet_path)",
}


def output_paths(config: BalancedDatasetConfig) -> dict[str, Path]:
    """Return the output paths (absolute since the config was loaded): table, summary, footprints.

    The footprints' key is their format (`geojson`, `geopackage` or `geoparquet`).
    """
    table_path = Path(config.output.csv_path)
    summary_path = Path(config.output.summary_path or default_summary_path(table_path))
    paths = {"table": table_path, "summary": summary_path}
    if config.output.footprints_path:
        footprints = Path(config.output.footprints_path)
        paths[footprint_format(footprints)] = footprints
    return paths


def _nodata_defined(
    exclusion: ExclusionConfig,
    classes: list[int] | None,
    records: pd.DataFrame,
    infos: dict[str, RasterInfo],
) -> np.ndarray:
    if exclusion.nodata_class is not None or classes is not None:
        return np.ones(len(records), dtype=bool)
    with_nodata = [path for path, info in infos.items() if info.nodata is not None]
    return records["mask_path"].isin(with_nodata).to_numpy()


def _uniqueness_stage(
    config: BalancedDatasetConfig,
    source: SourceRecords,
    active: np.ndarray,
    clock: StageClock,
    progress: bool,
    infos: dict[str, RasterInfo],
    compute: Compute,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Return uniqueness scores for the active patches (embeddings mode) and summary notes."""
    records = source.records
    notes: dict[str, Any] = {}
    if source.uniqueness is not None:
        scores = np.asarray(source.uniqueness, dtype=np.float64)[active]
        unknown = ~np.isfinite(scores)
        if unknown.all():
            raise InputError("the source's uniqueness_score is NULL for every active patch")
        scores[unknown] = np.median(scores[~unknown])
        notes["uniqueness_from_source"] = True
        notes["uniqueness_unknown_set_to_median"] = int(unknown.sum())
        return scores, notes
    from patchbalance.balancing.uniqueness import compute_uniqueness

    if source.embeddings is not None:
        vectors = np.asarray(source.embeddings, dtype=np.float32)[active]
        notes["embeddings_from_source"] = True
    else:
        from patchbalance.embeddings import extract_embeddings

        with clock.stage("embeddings"):
            result = extract_embeddings(
                records.loc[active, list(KEY_COLUMNS)].reset_index(drop=True),
                config.embeddings,
                seed=config.seed,
                progress=progress,
                infos=infos,
                compute=compute,
            )
        vectors = result.vectors
        notes["embeddings"] = result.summary
    labels = None
    if source.embeddings is not None:
        # Name patches in errors about vectors that came from the source (e.g. NaN in a table).
        keys = records.loc[active, list(KEY_COLUMNS)]
        labels = (
            "("
            + keys["image_path"].astype(str)
            + ", "
            + keys["row_off"].astype(str)
            + ", "
            + keys["col_off"].astype(str)
            + ", "
            + keys["patch_size"].astype(str)
            + ")"
        ).tolist()
    with clock.stage("uniqueness"):
        result = compute_uniqueness(vectors, config.uniqueness, config.seed, row_labels=labels)
    notes["uniqueness"] = result.summary
    return np.asarray(result.scores, dtype=np.float64), notes


def _embedding_band(config: BalancedDatasetConfig, source: SourceRecords) -> tuple[str, int] | None:
    """Return ("embeddings.bands", its highest band) when this build embeds the images."""
    bands = config.embeddings.bands
    embeds = config.mode == "embeddings" and source.uniqueness is None
    if not bands or not embeds or source.embeddings is not None:
        return None
    return "embeddings.bands", max(bands)


def _check_outputs(
    config: BalancedDatasetConfig, paths: dict[str, Path], dry_run: bool = False
) -> None:
    """Check every output target before the first stage, rather than fail on it at the end.

    With `dry_run`, a missing output folder is not made: its nearest existing parent must
    take files.
    """
    targets = {OUTPUT_LABELS[name]: path for name, path in paths.items()}
    if config.mode == "embeddings" and config.embeddings.parquet_path:
        targets[OUTPUT_LABELS["cache"]] = Path(config.embeddings.parquet_path or "")
    for what, path in targets.items():
        if dry_run and not path.is_dir():
            check_writable_folder(path.parent, f"the folder of {what}")
        else:
            check_writable(path, what)
            remove_stale_temporaries(path)
    for name in paths:
        if name in FOOTPRINT_FORMATS.values():
            check_footprint_writer(name)
    if config.output.postgres_table is not None:
        from patchbalance.balancing.postgres_table import check_postgres_table

        # Before any work: an existing table under if_exists: fail, or the source itself.
        check_postgres_table(config)


def _exclusion_stage(
    exclusion: ExclusionConfig,
    classes: list[int] | None,
    records: pd.DataFrame,
    reading: RasterReading,
) -> ExclusionFlags:
    """Return the exclusion flags of every patch; raise when no patch is left."""
    stats, computed = reading.stats, reading.computed
    stats.check_listed_classes(classes)
    flags = exclusion_flags(
        exclusion,
        nodata_defined=_nodata_defined(exclusion, classes, records, reading.infos),
        border_nodata=stats.border_nodata,
        black_border=stats.black_border,
        nodata_ratio=nodata_ratios(stats, computed),
        entropy=np.where(computed, stats.entropy, np.nan),
        valid_pixels=stats.valid_pixels,
        out_of_bounds=reading.out_of_bounds,
        read_error=reading.read_error,
    )
    if flags.excluded.all():
        counted = ", ".join(f"{name}: {count}" for name, count in flags.counts().items() if count)
        raise InputError(
            f"every one of the {len(records)} patches is excluded ({counted}); nothing to weight"
        )
    return flags


def _composition_stage(
    clustering: ClusteringConfig, seed: int, active_counts: np.ndarray, progress: bool
) -> CompositionResult:
    """Return the composition clusters of the active patches (SPEC §3.4)."""
    candidates = 0 if clustering.k_selection == "fixed" else clustering.k_max - clustering.k_min + 1
    with progress_bar(candidates, "composition k sweep", progress, unit="k") as bar:
        return fit_composition_clusters(active_counts, clustering, seed, progress=bar.update)


def _weights_stage(
    method: str,
    weights_config: WeightsConfig,
    stats: MaskStatistics,
    active: np.ndarray,
    composition: CompositionResult,
    uniqueness: np.ndarray | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Return the sampler weight of every patch (0 for excluded ones) and the weights' notes."""
    signals = Signals(
        counts=stats.counts[active],
        class_values=[int(v) for v in stats.class_values],
        window_pixels=stats.window_pixels[active],
        composition_score=composition.composition_score,
        cluster_id=composition.labels,
        uniqueness=uniqueness,
    )
    scores, weight_notes = sampling_scores(method, signals, weights_config.params_for(method))
    if "reduced" in weight_notes:
        log.info("%s", weight_notes["reduced"])
    active_weights = normalise_weights(
        scores,
        weights_config.power,
        weights_config.max_weight,
        weights_config.uniform_mix,
        notes=weight_notes,
    )
    return sampler_weights(active, active_weights), weight_notes


def _write_outputs(
    config: BalancedDatasetConfig,
    table: ResultTable,
    paths: dict[str, Path],
) -> tuple[dict[str, str], dict[str, Any]]:
    """Write the table, footprints and PostgreSQL table; return what was written where, and
    what writing reported for the summary (features written, footprints skipped, the table)."""
    write_table_chunks(table.chunks(), paths["table"])
    outputs = {"table": str(paths["table"])}
    notes: dict[str, Any] = {}
    infos = table.infos
    footprint_kinds = [kind for kind in FOOTPRINT_FORMATS.values() if kind in paths]
    written = table.to_frame() if footprint_kinds or config.output.postgres_table else None
    for kind in footprint_kinds:
        if any(info.has_crs for info in infos.values()):
            notes[f"{kind}_features"] = write_footprints(written, infos, paths[kind])
            outputs[kind] = str(paths[kind])
        else:
            log.warning(
                "no footprints written: the rasters have no CRS, so footprints cannot "
                "be placed on a map (%s)",
                paths[kind],
            )
            notes[f"{kind}_skipped"] = "rasters have no CRS"
    if config.output.postgres_table is not None:
        from patchbalance.balancing.postgres_table import describe, write_postgres_table

        notes["postgres_table"] = write_postgres_table(written, infos, config)
        outputs["postgres_table"] = describe(config)
    return outputs, notes


def _start_compute(
    stack: ExitStack, clock: StageClock, config: BalancedDatasetConfig, n: int
) -> Compute:
    """Return the run's `Compute`; a cluster it starts stops when `stack` closes."""
    with clock.stage("scheduler"):
        return stack.enter_context(open_compute(config.compute, n, config.num_workers))


def run_build(
    config: BalancedDatasetConfig | dict[str, Any] | str | os.PathLike[str],
    strict: bool = False,
    progress: bool = False,
    write: bool = True,
) -> BuildResult:
    """Run the whole pipeline and return the table, the summary and its text.

    With `write`, the table, summary and footprints are written (atomically) once every stage has
    succeeded; a failure leaves any earlier outputs as they were. The per-raster stages run
    where `compute.scheduler` says (SPEC §10); a cluster started for the run stops before the
    weights are computed.
    """
    config = _as_config(config)
    clock = StageClock()
    paths = output_paths(config)
    if write:
        _check_outputs(config, paths)
    with ExitStack() as stack:
        source, compute = _records_and_compute(stack, clock, config)
        records = source.records
        reading = read_rasters(
            source,
            config.exclusion,
            config.clustering.classes,
            compute,
            clock,
            progress,
            strict,
            image_band=_embedding_band(config, source),
        )
        with clock.stage("exclusion"):
            flags = _exclusion_stage(config.exclusion, config.clustering.classes, records, reading)
        active = ~flags.excluded
        with clock.stage("composition"):
            composition = _composition_stage(
                config.clustering, config.kmeans_seed, reading.stats.counts[active], progress
            )
        uniqueness, uniqueness_notes = None, {}
        if config.mode == "embeddings":
            uniqueness, uniqueness_notes = _uniqueness_stage(
                config, source, active, clock, progress, reading.infos, compute
            )
        compute_notes = compute.describe()

    with clock.stage("weights"):
        weights, weight_notes = _weights_stage(
            config.sampling_method, config.weights, reading.stats, active, composition, uniqueness
        )
    stages = StageResults(
        n=len(records),
        reading=reading,
        exclusion=flags,
        composition=composition,
        weight_notes=weight_notes,
        uniqueness=uniqueness,
        uniqueness_notes=uniqueness_notes,
        source_notes=source.notes,
        compute=compute_notes,
    )
    with clock.stage("outputs"):
        return _finish(config, records, stages, weights, clock, paths, write)


def _records_and_compute(
    stack: ExitStack, clock: StageClock, config: BalancedDatasetConfig
) -> tuple[SourceRecords, Compute]:
    """Return the records and the run's `Compute`, started on `stack` (its cluster stops with it)."""
    compute = None
    infos: dict[str, RasterInfo] = {}  # raster headers, each read once in the build
    if config.placement == "class_centred":
        # The class-centred window search runs on the workers too: start them first.
        compute = _start_compute(stack, clock, config, grid_window_count(config, infos))
    with clock.stage("records"):
        source = load_records(config, compute, infos)
    log.info("records: %d patches", len(source.records))
    if config.mode == "embeddings" and source.uniqueness is None and source.embeddings is None:
        from patchbalance.embeddings import check_model_available

        # Fail on an unavailable model before the statistics are computed.
        check_model_available(config.embeddings)
    if compute is None:
        compute = _start_compute(stack, clock, config, len(source.records))
    return source, compute


def _finish(
    config: BalancedDatasetConfig,
    records: pd.DataFrame,
    stages: StageResults,
    weights: np.ndarray,
    clock: StageClock,
    paths: dict[str, Path],
    write: bool,
) -> BuildResult:
    """Return the build's result; with `write`, write the table, footprints and summary."""
    reading, active = stages.reading, stages.active
    table = ResultTable(
        records,
        reading.infos,
        reading.stats,
        reading.computed,
        stages.exclusion,
        active,
        stages.composition,
        stages.uniqueness,
        weights,
        include_excluded=config.output.include_excluded,
    )
    class_values = [int(v) for v in reading.stats.class_values]
    figures = sampling_figures(reading.stats.counts, weights, active, class_values)
    if not write:
        return BuildResult(table, BuildSummary.create(config, stages, figures, clock.seconds))
    # One set: every file is complete before the first replaces its old version, and the
    # summary, which holds the others' SHA-256, is made then and moved into place last (SPEC §4).
    with output_set() as written:
        outputs, output_notes = _write_outputs(config, table, paths)
        outputs["summary"] = str(paths["summary"])
        summary = BuildSummary.create(
            config,
            stages,
            figures,
            clock.seconds,
            outputs=outputs,
            output_notes=output_notes,
            output_sha256=written.hashes(outputs),
        )
        write_json(summary.to_dict(), paths["summary"])
    return BuildResult(table, summary, outputs)


def build_balanced_dataset(
    config: BalancedDatasetConfig | dict[str, Any] | str | os.PathLike[str],
    strict: bool = False,
    progress: bool = False,
) -> pd.DataFrame:
    """Return the balanced table (and write the outputs the configuration names)."""
    return run_build(config, strict=strict, progress=progress).table


__all__ = [
    "BuildResult",
    "build_balanced_dataset",
    "run_build",
    "summary_text",
    "REASONS",
]
