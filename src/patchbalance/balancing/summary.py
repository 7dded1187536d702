"""The build's summary (the JSON written beside the table) and its text for the terminal.

`BuildSummary.create` makes the summary once, after the outputs are written: from what the
stages returned (`StageResults`), the sampling figures, what writing reported and the written
files' SHA-256. Its mapping is the JSON of SPEC §3.7 and §4; `text()` is the end-of-run text
the command prints.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from patchbalance.balancing.composition import CompositionResult, cluster_profiles
from patchbalance.balancing.exclusion import ExclusionFlags
from patchbalance.balancing.raster_reading import RasterReading
from patchbalance.config import BalancedDatasetConfig
from patchbalance.measures import class_proportions
from patchbalance.sampling.figures import SamplingFigures, figures_text
from patchbalance.version import __version__

log = logging.getLogger(__name__)


@dataclass
class StageResults:
    """What the stages of one build returned: the summary's input.

    Args:
        n: the number of patches.
        reading: the raster stage's findings.
        exclusion: the exclusion flags.
        composition: the composition clusters of the active patches.
        weight_notes: what the weights stage recorded.
        uniqueness: the active patches' uniqueness scores (embeddings mode), else None.
        uniqueness_notes: what the uniqueness stage recorded (the kNN search, the embeddings).
        source_notes: what the source recorded (e.g. the class-centred placement).
        compute: the scheduler block.
    """

    n: int
    reading: RasterReading
    exclusion: ExclusionFlags
    composition: CompositionResult
    weight_notes: dict[str, Any]
    uniqueness: np.ndarray | None = None
    uniqueness_notes: dict[str, Any] = field(default_factory=dict)
    source_notes: dict[str, Any] = field(default_factory=dict)
    compute: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> np.ndarray:
        """Return which patches take part (not excluded)."""
        return ~self.exclusion.excluded


@dataclass(frozen=True)
class BuildSummary(Mapping[str, Any]):
    """The build's summary, made once; as a mapping, the JSON written beside the table.

    Attributes:
        blocks: what the stages found (counts, exclusion, clustering, weights, sampling, ...).
        figures: the sampling figures of the weights (SPEC §5).
        warnings: the build's warnings.
        timings_s: seconds per stage.
        outputs: the files written, by kind (empty when nothing was written).
        output_notes: what writing the footprints and the PostgreSQL table reported.
        output_sha256: the written files' SHA-256 by kind (absent when nothing was written).
    """

    blocks: dict[str, Any]
    figures: SamplingFigures
    warnings: list[str]
    timings_s: dict[str, float]
    outputs: dict[str, str] = field(default_factory=dict)
    output_notes: dict[str, Any] = field(default_factory=dict)
    output_sha256: dict[str, str] | None = None

    @classmethod
    def create(
        cls,
        config: BalancedDatasetConfig,
        stages: StageResults,
        figures: SamplingFigures,
        timings_s: dict[str, float],
        **written: Any,
    ) -> BuildSummary:
        """Return the summary of a build from its stages' results and what was written."""
        blocks = build_summary(config, stages, figures)
        warnings = build_warnings(config, stages, figures)
        # The stage times so far, as written: the summary does not change after it is made.
        return cls(blocks, figures, warnings, dict(timings_s), **written)

    @cached_property
    def _mapping(self) -> dict[str, Any]:
        mapping = {**self.blocks, "warnings": self.warnings, **self.output_notes}
        mapping.update(timings_s=self.timings_s, outputs=self.outputs)
        if self.output_sha256 is not None:
            mapping["output_sha256"] = self.output_sha256
        return mapping

    def __getitem__(self, key: str) -> Any:
        return self._mapping[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping)

    def __len__(self) -> int:
        return len(self._mapping)

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as the JSON object written beside the table."""
        return dict(self._mapping)

    def text(self) -> str:
        """Return the end-of-run text for the terminal."""
        return summary_text(self, self.figures)


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


def build_summary(
    config: BalancedDatasetConfig, stages: StageResults, figures: SamplingFigures
) -> dict[str, Any]:
    """Return the build's summary (less its timings and outputs, which come last)."""
    stats, read_notes, active = stages.reading.stats, stages.reading.notes, stages.active
    composition = stages.composition
    summary: dict[str, Any] = {
        "config": str(config.source_path) if config.source_path else None,
        "mode": config.mode,
        "sampling_method": config.sampling_method,
        "sampling_method_is_default": config.sampling_method_is_default,
        "placement_is_default": config.placement_is_default,
        "seed": config.seed,
        "n_patches": stages.n,
        "n_active": int(active.sum()),
        "n_excluded": int((~active).sum()),
        "excluded_by_reason": stages.exclusion.counts(),
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
                composition.labels,
                composition.sizes,
                class_proportions(stats.counts[active]),
                stats.class_values,
            ),
        },
        "weights": _weights_block(config, stages.weight_notes, stats.class_values, figures),
        "sampling": figures.to_dict(),
        "versions": _versions(),
    }
    if stages.source_notes:
        summary["source"] = stages.source_notes
    if "first_window_error" in read_notes:
        summary["first_window_error"] = read_notes["first_window_error"]
    if stages.uniqueness is not None:
        summary.update(_uniqueness_blocks(stages.uniqueness, stages.uniqueness_notes))
    summary["compute"] = stages.compute
    return summary


def build_warnings(
    config: BalancedDatasetConfig, stages: StageResults, figures: SamplingFigures
) -> list[str]:
    """Return the build's warnings for the summary, logging those not logged yet.

    The weights stage has logged its own (a moved class target, a dual solve that stopped
    short, a failed solver, a max_weight that cannot hold); the starved classes (SPEC §5) and
    very concentrated weights (SPEC §3.7) are logged here.
    """
    notes = stages.weight_notes
    lines = [f"class_target: {note}" for note in notes.get("class_target", {}).get("notes", [])]
    if "max_weight" in notes:
        lines.append(str(notes["max_weight"]))
    found = figures.starvation_warnings(config.sampling_method)
    concentrated = figures.concentration_warning()
    if concentrated:
        found.append(concentrated)
    for line in found:
        log.warning("%s", line)
    return lines + found


def _weights_block(
    config: BalancedDatasetConfig,
    weight_notes: dict[str, Any],
    class_values: np.ndarray,
    figures: SamplingFigures,
) -> dict[str, Any]:
    block = {
        **config.weights.params_for(config.sampling_method).summary_block(),
        "power": config.weights.power,
        "uniform_mix": config.weights.uniform_mix,
        "max_weight": config.weights.max_weight,
        **{
            key: (value.tolist() if isinstance(value, np.ndarray) else value)
            for key, value in weight_notes.items()
        },
    }
    target_figures = block.get("class_target")
    if target_figures is not None:
        # The shares of the final weights, after power, uniform_mix and max_weight.
        target_figures["share_reached"] = {
            str(v): round(float(x), 6)
            for v, x in zip(class_values, figures.weighted_share, strict=True)
        }
        target_figures["effective_sample_size"] = round(figures.ess, 3)
    return block


def _uniqueness_blocks(uniqueness: np.ndarray, notes: dict[str, Any]) -> dict[str, Any]:
    """Return the `uniqueness` block (the kNN search and the scores' spread) and `embeddings`."""
    notes = dict(notes)
    blocks: dict[str, Any] = {}
    if "embeddings" in notes:
        blocks["embeddings"] = notes.pop("embeddings")
    search = notes.pop("uniqueness", {})
    block = {**search, **notes}
    if "distribution" not in block:  # scores the source gave: no search ran
        block["distribution"] = {
            "min": float(np.min(uniqueness)),
            "median": float(np.median(uniqueness)),
            "max": float(np.max(uniqueness)),
        }
    blocks["uniqueness"] = block
    return blocks


def summary_text(summary: Mapping[str, Any], figures: SamplingFigures) -> str:
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
        spread = u["distribution"]
        line = (
            f"uniqueness: min {spread['min']:.4f}  median {spread['median']:.4f}  "
            f"max {spread['max']:.4f}"
        )
        if "backend" in u:
            line += f"  ({u['backend']}, k={u.get('k')}"
            if "recall_at_k" in u:
                line += f", estimated recall@k {u['recall_at_k']:.3f}"
            line += ")"
        lines.append(line)
    weights = summary["weights"]
    default = ", the default" if summary.get("sampling_method_is_default") else ""
    line = f"weights: {summary['sampling_method']}{default} (power {weights['power']}"
    if "min_ess" in weights:
        line += f", min_ess {weights['min_ess']:g}"
    if weights.get("uniform_mix"):
        line += f", uniform_mix {weights['uniform_mix']}"
    lines.append(line + ")")
    placement = summary.get("source", {}).get("placement")
    if placement:
        added = ", ".join(f"class {v} {n}" for v, n in placement["class_windows"].items())
        line = (
            f"class-centred windows: {added or 'none'} beside {placement['grid_windows']:,} "
            f"grid windows (rare classes {placement['rare_classes']})"
        )
        if summary.get("placement_is_default"):
            # A validation set cut with the default would hold them too: say how to leave them out.
            line += "; the default with the default method (input.placement: grid leaves them out)"
        lines.append(line)
    target = weights.get("class_target")
    if target:
        lines.append(
            f"class targets ({target['target_share']}): "
            + ", ".join(
                f"class {v} {share:.2%} (reached {target['share_reached'][v]:.2%})"
                for v, share in target.get("target", {}).items()
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
