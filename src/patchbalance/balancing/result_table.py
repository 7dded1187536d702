"""The balanced table of a build: numeric arrays in memory, rows made a chunk at a time.

A build of millions of patches holds its per-patch results as arrays aligned with the records
(class counts, flags as bits, clusters, scores, weights). The text columns (`class_dist_json`,
`exclusion_reason`, the paths, `crs`) are made only when rows are asked for, one chunk at a
time, so that writing the table never needs the whole table as Python strings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from patchbalance.balancing.exclusion import ExclusionFlags
from patchbalance.balancing.stats import MaskStatistics, statistics_columns
from patchbalance.table import SAMPLER_WEIGHT
from patchbalance.windows import RasterInfo, tile_bound_columns

log = logging.getLogger(__name__)

# Rows made and written at once: one Parquet row group, a few tens of MB of text at most.
ROWS_PER_CHUNK = 100_000


@dataclass
class ResultTable:
    """The rows a build writes, made on demand from the stages' arrays.

    Args:
        records: the patch records (keys and any extra input columns), all patches.
        infos: the probed rasters, for the tile bounds.
        stats: the mask statistics of all patches.
        computed: which patches have statistics (read, in bounds).
        exclusion: the exclusion flags of all patches.
        active: which patches take part (not excluded).
        composition: the composition clusters of the active patches.
        uniqueness: the uniqueness scores of the active patches (embeddings mode), else None.
        weights: the sampler weight of every patch.
        include_excluded: whether excluded patches are rows of the table too.
    """

    records: pd.DataFrame
    infos: dict[str, RasterInfo]
    stats: MaskStatistics
    computed: np.ndarray
    exclusion: ExclusionFlags
    active: np.ndarray
    composition: Any
    uniqueness: np.ndarray | None
    weights: np.ndarray
    include_excluded: bool = True
    rows: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.records)
        self.rows = np.arange(n) if self.include_excluded else np.flatnonzero(self.active)
        self._cluster_id = np.full(n, -1, dtype=np.int64)
        self._cluster_id[self.active] = self.composition.labels
        self._cluster_size = np.zeros(n, dtype=np.int64)
        self._cluster_size[self.active] = self.composition.cluster_size
        self._composition_score = np.full(n, np.nan)
        self._composition_score[self.active] = self.composition.composition_score
        self._uniqueness = None
        if self.uniqueness is not None:
            self._uniqueness = np.full(n, np.nan)
            self._uniqueness[self.active] = self.uniqueness
        computed_names = self._generated(self.rows[:0], self.records.iloc[:0]).columns
        self._clashing = [c for c in self.records.columns if c in computed_names]
        if self._clashing:
            log.info("input columns recomputed by this run: %s", ", ".join(self._clashing))

    def __len__(self) -> int:
        """Return the number of rows the table has."""
        return len(self.rows)

    def frame(self, start: int, stop: int) -> pd.DataFrame:
        """Return rows `start` to `stop` of the table as a DataFrame (paths as text).

        Args:
            start: the first row (of the table, not of the records).
            stop: one past the last row.

        Returns:
            The rows, with the input columns first and the computed ones after.
        """
        rows = self.rows[start:stop]
        records = self.records.iloc[rows].reset_index(drop=True)
        for column in ("image_path", "mask_path"):
            if isinstance(records[column].dtype, pd.CategoricalDtype):
                records[column] = records[column].astype(object)
        generated = self._generated(rows, records)
        return pd.concat([records.drop(columns=self._clashing), generated], axis=1)

    def _generated(self, rows: np.ndarray, records: pd.DataFrame) -> pd.DataFrame:
        active = self.active[rows]
        cluster_size = pd.array(self._cluster_size[rows], dtype="Int64")
        cluster_size[~active] = pd.NA
        generated = pd.concat(
            [
                tile_bound_columns(records, self.infos),
                statistics_columns(self.stats, self.computed, rows),
                self.exclusion.columns(rows),
                pd.DataFrame(
                    {
                        "freq_cluster_id": self._cluster_id[rows],
                        "freq_cluster_size": cluster_size,
                        "composition_score": self._composition_score[rows],
                    }
                ),
            ],
            axis=1,
        )
        if self._uniqueness is not None:
            generated["uniqueness_score"] = self._uniqueness[rows]
        generated[SAMPLER_WEIGHT] = self.weights[rows]
        return generated

    def chunks(self, rows_per_chunk: int = ROWS_PER_CHUNK) -> Iterator[pd.DataFrame]:
        """Return the table's rows in consecutive chunks.

        Args:
            rows_per_chunk: the most rows per chunk.

        Yields:
            DataFrames of up to `rows_per_chunk` rows, in table order.
        """
        for start in range(0, max(len(self), 1), rows_per_chunk):
            yield self.frame(start, start + rows_per_chunk)

    def to_frame(self) -> pd.DataFrame:
        """Return the whole table as one DataFrame."""
        return self.frame(0, len(self))
