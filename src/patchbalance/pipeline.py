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

from patchbalance import __version__
from patchbalance.atomic import check_writable
from patchbalance.composition import cluster_profiles, fit_composition_clusters
from patchbalance.compute import Compute, open_compute
from patchbalance.config import (
    BalancedDatasetConfig,
    EmbeddingsConfig,
    config_from_mapping,
    load_config,
)
from patchbalance.errors import InputError
from patchbalance.exclusion import REASONS, ExclusionFlags, exclusion_flags
from patchbalance.outputs import (
    FOOTPRINT_FORMATS,
    check_footprint_writer,
    footprint_format,
    write_footprints,
    write_json,
)
from patchbalance.progress import StageClock, progress_bar
from patchbalance.report import figures_text, sampling_figures
from patchbalance.result_table import ResultTable
from patchbalance.sources import SourceRecords, load_records
from patchbalance.sources.local import grid_window_count
from patchbalance.stats import (
    BorderCheck,
    MaskStatistics,
    class_entropy,
    compute_mask_statistics,
    nodata_ratios,
    statistics_from_counts,
)
from patchbalance.table import KEY_COLUMNS, class_proportions, lookup_by_path, write_table_chunks
from patchbalance.weights import normalise_weights, sampler_weights, sampling_scores
from patchbalance.windows import RasterInfo, probe_rasters, windows_in_bounds

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """What a build produced: the table (as written), the summary and its text form.

    `table` is made from the stages' arrays the first time it is asked for; a command that
    only writes the files never holds the whole table as a DataFrame.
    """

    rows: ResultTable
    summary: dict[str, Any]
    summary_text: str
    outputs: dict[str, str] = field(default_factory=dict)

    @cached_property
    def table(self) -> pd.DataFrame:
        """Return the table the build wrote (or would write), as one DataFrame."""
        return self.rows.to_frame()


def _as_config(
    config: BalancedDatasetConfig | dict[str, Any] | str | os.PathLike[str],
) -> BalancedDatasetConfig:
    if isinstance(config, BalancedDatasetConfig):
        return config
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
    """Return the resolved output paths: table, summary and (optionally) footprints.

    The footprints' key is their format (`geojson`, `geopackage` or `geoparquet`).
    """
    table_path = config.resolve(config.output.csv_path)
    summary_path = (
        config.resolve(config.output.summary_path)
        if config.output.summary_path
        else table_path.with_name(f"{table_path.stem}.summary.json")
    )
    paths = {"table": table_path, "summary": summary_path}
    if config.output.footprints_path:
        footprints = config.resolve(config.output.footprints_path)
        paths[footprint_format(footprints)] = footprints
    return paths


def _first_problem(records: pd.DataFrame, rows: np.ndarray, messages: dict[str, str] | None) -> str:
    row = int(rows[0])
    image, mask = records.at[row, "image_path"], records.at[row, "mask_path"]
    if messages:
        for path in (mask, image):
            if path in messages:
                return f"{path}: {messages[path]}"
    return f"row {row + 1}: window ({records.at[row, 'row_off']}, {records.at[row, 'col_off']}) of {image}"


def _read_rasters(
    config: BalancedDatasetConfig,
    source: SourceRecords,
    clock: StageClock,
    progress: bool,
    strict: bool,
    compute: Compute,
) -> tuple[dict[str, RasterInfo], MaskStatistics, np.ndarray, np.ndarray, dict[str, Any]]:
    """Return raster infos, mask statistics, out-of-bounds and read-error flags, and notes."""
    records = source.records
    n = len(records)
    notes: dict[str, Any] = {}
    # Statistics from the source and no border check: the masks are never opened, not even
    # probed, so sizes and bounds come from the images alone.
    skip_masks = source.class_counts is not None and not (
        config.exclusion.exclude_border_nodata or config.exclusion.exclude_black_border
    )
    with clock.stage("rasters"):
        probed = [records["image_path"]] + ([] if skip_masks else [records["mask_path"]])
        paths = pd.concat(probed).unique()
        infos, open_errors = probe_rasters(paths, config.num_workers)
    image_paths = records["image_path"]
    mask_paths = image_paths if skip_masks else records["mask_path"]
    read_error = (
        image_paths.isin(list(open_errors)).to_numpy()
        | mask_paths.isin(list(open_errors)).to_numpy()
    )
    heights = np.minimum(
        lookup_by_path(image_paths, {p: i.height for p, i in infos.items()}, 0),
        lookup_by_path(mask_paths, {p: i.height for p, i in infos.items()}, 0),
    ).astype(np.int64)
    widths = np.minimum(
        lookup_by_path(image_paths, {p: i.width for p, i in infos.items()}, 0),
        lookup_by_path(mask_paths, {p: i.width for p, i in infos.items()}, 0),
    ).astype(np.int64)
    in_bounds = windows_in_bounds(
        records["row_off"].to_numpy(),
        records["col_off"].to_numpy(),
        records["patch_size"].to_numpy(),
        heights,
        widths,
    )
    out_of_bounds = ~read_error & ~in_bounds
    to_read = ~read_error & in_bounds

    exclusion = config.exclusion
    nodata_by_mask = {
        path: (exclusion.nodata_class if exclusion.nodata_class is not None else info.nodata)
        for path, info in infos.items()
    }
    border_check = (
        BorderCheck(exclusion.black_tolerance, exclusion.black_border_min_fraction)
        if exclusion.exclude_black_border
        else None
    )
    use_source_counts = source.class_counts is not None
    need_windows = not use_source_counts or exclusion.exclude_border_nodata or border_check
    with clock.stage("mask_statistics"):
        if need_windows:
            bar = progress_bar(int(to_read.sum()), "mask statistics", progress)
            with bar:
                stats = compute_mask_statistics(
                    records,
                    np.flatnonzero(to_read),
                    nodata_by_mask,
                    classes=config.clustering.classes,
                    mask_band=exclusion.mask_band,
                    border_check=border_check,
                    image_has_mask={p: i.has_mask for p, i in infos.items()},
                    block_shapes={p: i.block_shape for p, i in infos.items()},
                    progress=bar.update,
                    compute=compute,
                )
        if use_source_counts:
            table_stats = statistics_from_counts(
                source.class_values,
                source.class_counts,
                records["patch_size"].to_numpy(dtype=np.int64) ** 2,
            )
            if need_windows:
                table_stats.border_nodata = stats.border_nodata
                table_stats.black_border = stats.black_border
                table_stats.read = stats.read | ~to_read
                table_stats.errors = stats.errors
            stats = table_stats
            notes["statistics_from_source"] = True
    window_errors = np.zeros(n, dtype=bool)
    if stats.errors:
        window_errors[list(stats.errors)] = True
    read_error |= window_errors
    messages = dict(open_errors)
    for i, message in stats.errors.items():
        messages.setdefault(records.at[i, "mask_path"], message)
    notes["read_errors"] = int(read_error.sum())
    notes["out_of_bounds"] = int(out_of_bounds.sum())
    notes["unreadable_files"] = {
        path: message for path, message in sorted(open_errors.items())[:20]
    }
    if stats.errors:
        first = min(stats.errors)
        notes["first_window_error"] = f"{records.at[first, 'mask_path']}: {stats.errors[first]}"
    if strict and (read_error.any() or out_of_bounds.any()):
        if read_error.any():
            problem = _first_problem(records, np.flatnonzero(read_error), messages)
            if window_errors.any():
                problem = notes["first_window_error"]
            raise InputError(
                f"--strict: {int(read_error.sum())} patch(es) could not be read, first: {problem}"
            )
        problem = _first_problem(records, np.flatnonzero(out_of_bounds), None)
        raise InputError(
            f"--strict: {int(out_of_bounds.sum())} window(s) lie outside their raster, first: {problem}"
        )
    for path, message in sorted(open_errors.items())[:5]:
        log.warning("cannot read %s: %s (its patches are excluded: read_error)", path, message)
    if stats.errors:
        log.warning(
            "%d window(s) could not be read (excluded: read_error), first: %s",
            len(stats.errors),
            notes["first_window_error"],
        )
    if out_of_bounds.any():
        log.warning(
            "%d window(s) lie outside their raster (excluded: window_out_of_bounds)",
            out_of_bounds.sum(),
        )
    return infos, stats, out_of_bounds, read_error, notes


def _nodata_defined(
    config: BalancedDatasetConfig, records: pd.DataFrame, infos: dict[str, RasterInfo]
) -> np.ndarray:
    if config.exclusion.nodata_class is not None or config.clustering.classes is not None:
        return np.ones(len(records), dtype=bool)
    with_nodata = [path for path, info in infos.items() if info.nodata is not None]
    return records["mask_path"].isin(with_nodata).to_numpy()


def embeddings_config(config: BalancedDatasetConfig) -> EmbeddingsConfig:
    """Return `config.embeddings` with its paths resolved against the configuration's folder.

    `dino_model` is a path only when it names an existing folder there; otherwise it stays a
    model id (e.g. facebook/dinov2-small).
    """
    embeddings = config.embeddings
    update: dict[str, Any] = {}
    if embeddings.parquet_path:
        update["parquet_path"] = str(config.resolve(embeddings.parquet_path))
    model_folder = config.resolve(embeddings.dino_model)
    if not os.path.isabs(os.path.expanduser(embeddings.dino_model)) and model_folder.is_dir():
        update["dino_model"] = str(model_folder)
    return embeddings.model_copy(update=update) if update else embeddings


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
    from patchbalance.uniqueness import compute_uniqueness

    if source.embeddings is not None:
        vectors = np.asarray(source.embeddings, dtype=np.float32)[active]
        notes["embeddings_from_source"] = True
    else:
        from patchbalance.embeddings import extract_embeddings

        with clock.stage("embeddings"):
            result = extract_embeddings(
                records.loc[active, list(KEY_COLUMNS)].reset_index(drop=True),
                embeddings_config(config),
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


def _check_outputs(config: BalancedDatasetConfig, paths: dict[str, Path]) -> None:
    """Check every output target before the first stage, rather than fail on it at the end."""
    targets = {OUTPUT_LABELS[name]: path for name, path in paths.items()}
    if config.mode == "embeddings" and config.embeddings.parquet_path:
        targets[OUTPUT_LABELS["cache"]] = Path(embeddings_config(config).parquet_path or "")
    for what, path in targets.items():
        check_writable(path, what)
    for name in paths:
        if name in FOOTPRINT_FORMATS.values():
            check_footprint_writer(name)
    if config.output.postgres_table is not None:
        from patchbalance.postgres_table import check_postgres_table

        # Before any work: an existing table under if_exists: fail, or the source itself.
        check_postgres_table(config)


def _exclusion_stage(
    config: BalancedDatasetConfig,
    records: pd.DataFrame,
    infos: dict[str, RasterInfo],
    stats: MaskStatistics,
    computed: np.ndarray,
    out_of_bounds: np.ndarray,
    read_error: np.ndarray,
) -> ExclusionFlags:
    """Return the exclusion flags of every patch; raise when no patch is left."""
    flags = exclusion_flags(
        config.exclusion,
        nodata_defined=_nodata_defined(config, records, infos),
        border_nodata=stats.border_nodata,
        black_border=stats.black_border,
        nodata_ratio=nodata_ratios(stats, computed),
        entropy=np.where(computed, class_entropy(stats.counts), np.nan),
        valid_pixels=stats.valid_pixels,
        out_of_bounds=out_of_bounds,
        read_error=read_error,
    )
    if flags.excluded.all():
        counted = ", ".join(f"{name}: {count}" for name, count in flags.counts().items() if count)
        raise InputError(
            f"every one of the {len(records)} patches is excluded ({counted}); nothing to weight"
        )
    return flags


def _composition_stage(config: BalancedDatasetConfig, active_counts: np.ndarray, progress: bool):
    """Return the composition clusters of the active patches (SPEC §3.4)."""
    clustering = config.clustering
    candidates = 0 if clustering.k_selection == "fixed" else clustering.k_max - clustering.k_min + 1
    with progress_bar(candidates, "composition k sweep", progress, unit="k") as bar:
        return fit_composition_clusters(
            active_counts, clustering, config.kmeans_seed, progress=bar.update
        )


def _weights_stage(
    config: BalancedDatasetConfig,
    stats: MaskStatistics,
    active: np.ndarray,
    composition: Any,
    uniqueness: np.ndarray | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Return the sampler weight of every patch (0 for excluded ones) and the weights' notes."""
    weights_config = config.weights
    scores, weight_notes = sampling_scores(
        config.sampling_method,
        composition_score=composition.composition_score,
        cluster_id=composition.labels,
        counts=stats.counts[active],
        window_pixels=stats.window_pixels[active],
        uniqueness=uniqueness,
        min_pixels=weights_config.min_pixels,
        repeat_threshold=weights_config.repeat_threshold,
        sqrt=weights_config.sqrt,
        target_share=weights_config.target_share,
        min_ess=weights_config.min_ess,
        class_values=[int(v) for v in stats.class_values],
    )
    if "reduced" in weight_notes:
        log.info("%s", weight_notes["reduced"])
    active_weights = normalise_weights(
        scores, weights_config.power, weights_config.max_weight, weights_config.uniform_mix
    )
    return sampler_weights(active, active_weights), weight_notes


def _write_outputs(
    config: BalancedDatasetConfig,
    table: ResultTable,
    paths: dict[str, Path],
    summary: dict[str, Any],
) -> dict[str, str]:
    """Write the table, footprints and PostgreSQL table; return what was written where."""
    write_table_chunks(table.chunks(), paths["table"])
    outputs = {"table": str(paths["table"])}
    infos = table.infos
    footprint_kinds = [kind for kind in FOOTPRINT_FORMATS.values() if kind in paths]
    written = table.to_frame() if footprint_kinds or config.output.postgres_table else None
    for kind in footprint_kinds:
        if any(info.has_crs for info in infos.values()):
            summary[f"{kind}_features"] = write_footprints(written, infos, paths[kind])
            outputs[kind] = str(paths[kind])
        else:
            log.warning(
                "no footprints written: the rasters have no CRS, so footprints cannot "
                "be placed on a map (%s)",
                paths[kind],
            )
            summary[f"{kind}_skipped"] = "rasters have no CRS"
    if config.output.postgres_table is not None:
        from patchbalance.postgres_table import describe, write_postgres_table

        summary["postgres_table"] = write_postgres_table(written, infos, config)
        outputs["postgres_table"] = describe(config)
    return outputs


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
    embeddings_mode = config.mode == "embeddings"
    if write:
        _check_outputs(config, paths)

    with ExitStack() as stack:
        compute = None
        if config.input.placement == "class_centred":
            # The class-centred window search runs on the workers too: start them first.
            compute = _start_compute(stack, clock, config, grid_window_count(config))
        with clock.stage("records"):
            source = load_records(config, compute)
        records = source.records
        n = len(records)
        log.info("records: %d patches", n)
        if embeddings_mode and source.uniqueness is None and source.embeddings is None:
            from patchbalance.embeddings import check_model_available

            # Fail on an unavailable model before the statistics are computed.
            check_model_available(embeddings_config(config))
        if compute is None:
            compute = _start_compute(stack, clock, config, n)
        infos, stats, out_of_bounds, read_error, read_notes = _read_rasters(
            config, source, clock, progress, strict, compute
        )
        with clock.stage("exclusion"):
            computed = stats.read & ~read_error & ~out_of_bounds
            flags = _exclusion_stage(
                config, records, infos, stats, computed, out_of_bounds, read_error
            )
            active = ~flags.excluded
            reasons = flags.counts()
        with clock.stage("composition"):
            composition = _composition_stage(config, stats.counts[active], progress)
        uniqueness = None
        uniqueness_notes: dict[str, Any] = {}
        if embeddings_mode:
            uniqueness, uniqueness_notes = _uniqueness_stage(
                config, source, active, clock, progress, infos, compute
            )
        compute_notes = compute.describe()

    with clock.stage("weights"):
        weights, weight_notes = _weights_stage(config, stats, active, composition, uniqueness)

    with clock.stage("outputs"):
        table = ResultTable(
            records,
            infos,
            stats,
            computed,
            flags,
            active,
            composition,
            uniqueness,
            weights,
            include_excluded=config.output.include_excluded,
        )
        figures = sampling_figures(
            stats.counts, weights, active, [int(v) for v in stats.class_values]
        )
        summary = _summary(
            config,
            n,
            active,
            reasons,
            read_notes,
            stats,
            composition,
            weight_notes,
            uniqueness,
            uniqueness_notes,
            figures,
            paths,
            source.notes,
        )
        summary["compute"] = compute_notes
        warnings = figures.starvation_warnings(config.sampling_method)
        for line in warnings:
            log.warning("%s", line)
        summary["warnings"] = warnings
        outputs = _write_outputs(config, table, paths, summary) if write else {}
    summary["timings_s"] = clock.seconds
    summary["outputs"] = outputs
    if write:
        outputs["summary"] = str(paths["summary"])
        write_json(summary, paths["summary"])
    return BuildResult(table, summary, summary_text(summary, figures), outputs)


def _versions() -> dict[str, str]:
    import rasterio
    import sklearn

    return {
        "patchbalance": __version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "scikit-learn": sklearn.__version__,
    }


def _summary(
    config: BalancedDatasetConfig,
    n: int,
    active: np.ndarray,
    reasons: dict[str, int],
    read_notes: dict[str, Any],
    stats: MaskStatistics,
    composition: Any,
    weight_notes: dict[str, Any],
    uniqueness: np.ndarray | None,
    uniqueness_notes: dict[str, Any],
    figures: Any,
    paths: dict[str, Path],
    source_notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    proportions = class_proportions(stats.counts[active])
    summary: dict[str, Any] = {
        "config": str(config.source_path) if config.source_path else None,
        "mode": config.mode,
        "sampling_method": config.sampling_method,
        "seed": config.seed,
        "n_patches": n,
        "n_active": int(active.sum()),
        "n_excluded": int((~active).sum()),
        "excluded_by_reason": reasons,
        "read_errors": read_notes.get("read_errors", 0),
        "unreadable_files": read_notes.get("unreadable_files", {}),
        "class_values": [int(v) for v in stats.class_values],
        "pixels_outside_classes": stats.outside_class_pixels,
        "pseudo_count": config.clustering.pseudo_count,
        "clustering": {
            "k_selection": config.clustering.k_selection,
            "k": composition.k,
            "sweep_inertia": {str(k): round(v, 4) for k, v in composition.sweep.items()},
            "sweep_sample": composition.sweep_sample,
            "notes": composition.notes,
            "clusters": cluster_profiles(
                composition.labels, composition.sizes, proportions, stats.class_values
            ),
        },
        "weights": {
            "power": config.weights.power,
            "uniform_mix": config.weights.uniform_mix,
            "max_weight": config.weights.max_weight,
            **{
                key: (value.tolist() if isinstance(value, np.ndarray) else value)
                for key, value in weight_notes.items()
            },
        },
        "sampling": figures.to_dict(),
        "versions": _versions(),
    }
    target_figures = summary["weights"].get("class_target")
    if target_figures is not None:
        # The shares of the final weights, after power, uniform_mix and max_weight.
        target_figures["share_reached"] = {
            str(v): round(float(x), 6)
            for v, x in zip(stats.class_values, figures.weighted_share, strict=True)
        }
        target_figures["effective_sample_size"] = round(figures.ess, 3)
    if source_notes:
        summary["source"] = source_notes
    if "first_window_error" in read_notes:
        summary["first_window_error"] = read_notes["first_window_error"]
    if uniqueness is not None:
        notes = dict(uniqueness_notes)
        if "embeddings" in notes:
            summary["embeddings"] = notes.pop("embeddings")
        summary["uniqueness"] = {
            "min": float(np.min(uniqueness)),
            "median": float(np.median(uniqueness)),
            "max": float(np.max(uniqueness)),
            **notes,
        }
    return summary


def summary_text(summary: dict[str, Any], figures: Any) -> str:
    """Return the end-of-run summary for the terminal."""
    lines = [
        f"patches: {summary['n_patches']:,}  active: {summary['n_active']:,}  "
        f"excluded: {summary['n_excluded']:,}"
    ]
    excluded = {k: v for k, v in summary["excluded_by_reason"].items() if v}
    if excluded:
        lines.append(
            "  excluded by reason: " + ", ".join(f"{k} {v:,}" for k, v in excluded.items())
        )
    clustering = summary["clustering"]
    sizes = ", ".join(str(c["size"]) for c in clustering["clusters"])
    lines.append(
        f"composition clusters: k={clustering['k']} ({clustering['k_selection']}); sizes {sizes}"
    )
    if "embeddings" in summary:
        from patchbalance.embeddings import extraction_text

        e = summary["embeddings"]
        lines.append(
            f"embeddings: {e.get('model_id')} ({e.get('dim')}-d, {e.get('device')}): "
            + extraction_text(e)
        )
    if "uniqueness" in summary:
        u = summary["uniqueness"]
        search = u.get("uniqueness", {})
        line = f"uniqueness: min {u['min']:.4f}  median {u['median']:.4f}  max {u['max']:.4f}"
        if search:
            line += f"  ({search.get('backend')}, k={search.get('k')}"
            if "recall_at_k" in search:
                line += f", estimated recall@k {search['recall_at_k']:.3f}"
            line += ")"
        lines.append(line)
    weights = summary["weights"]
    line = f"weights: {summary['sampling_method']} (power {weights['power']}"
    if weights.get("uniform_mix"):
        line += f", uniform_mix {weights['uniform_mix']}"
    lines.append(line + ")")
    placement = summary.get("source", {}).get("placement")
    if placement:
        added = ", ".join(f"class {v} {n}" for v, n in placement["class_windows"].items())
        lines.append(
            f"class-centred windows: {added or 'none'} beside {placement['grid_windows']:,} "
            f"grid windows (rare classes {placement['rare_classes']})"
        )
    target = weights.get("class_target")
    if target:
        lines.append(
            f"class targets ({target['target_share']}): "
            + ", ".join(
                f"class {v} {share:.2%} (reached {target['share_reached'][v]:.2%})"
                for v, share in target["target"].items()
            )
        )
        lines += [f"  note: {note}" for note in target["notes"]]
    lines.append(figures_text(figures))
    timings = summary.get("timings_s", {})
    if timings:
        lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    for name, path in summary.get("outputs", {}).items():
        lines.append(f"wrote {name}: {path}")
    return "\n".join(lines)


def build_balanced_dataset(
    config: BalancedDatasetConfig | dict[str, Any] | str | os.PathLike[str],
    strict: bool = False,
    progress: bool = False,
) -> pd.DataFrame:
    """Return the balanced table (and write the outputs the configuration names)."""
    return run_build(config, strict=strict, progress=progress).table


def plan_text(config: BalancedDatasetConfig) -> str:
    """Return the dry-run plan: patches, files, stages to run, caches to reuse, outputs."""
    source = load_records(config)
    records = source.records
    paths = pd.concat([records["image_path"], records["mask_path"]]).unique()
    missing = [path for path in paths if not os.path.exists(path)]
    stages = ["records", "mask statistics", "exclusion", "composition clusters"]
    if config.mode == "embeddings" and source.uniqueness is None:
        if source.embeddings is None:
            stages.append("embeddings")
        stages.append("uniqueness")
    stages += ["weights", "outputs"]
    lines = [
        f"plan for {config.source_path or 'the configuration'}:",
        f"  patches: {len(records):,} from {len(paths):,} raster files"
        + (f" ({len(missing)} missing, e.g. {missing[0]})" if missing else ""),
        f"  mode: {config.mode}; sampling_method: {config.sampling_method}",
        f"  stages: {' -> '.join(stages)}",
    ]
    if config.mode == "embeddings" and config.embeddings.parquet_path:
        cache = config.resolve(config.embeddings.parquet_path)
        lines.append(
            f"  embeddings cache: {cache} ({'exists, matching rows reused' if cache.exists() else 'new'})"
        )
    for name, path in output_paths(config).items():
        lines.append(f"  output {name}: {path}")
    if config.output.postgres_table is not None:
        from patchbalance.postgres_table import describe

        table = config.output.postgres_table
        lines.append(f"  output postgres_table: {describe(config)} (if_exists: {table.if_exists})")
    return "\n".join(lines)


__all__ = ["BuildResult", "build_balanced_dataset", "plan_text", "run_build", "REASONS"]
