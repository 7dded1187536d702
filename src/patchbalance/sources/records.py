"""`SourceRecords`: what a source of patch records returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from patchbalance.windows import RasterInfo


@dataclass
class SourceRecords:
    """The records of a source, plus what a source may already know about each patch.

    `class_counts` (with `class_values`) replaces reading masks for statistics, `uniqueness`
    replaces the uniqueness stage (NaN = unknown), `embeddings` replaces extraction; each is
    aligned with `records` row by row, or None when the source does not provide it.
    """

    records: pd.DataFrame
    class_values: np.ndarray | None = None
    class_counts: np.ndarray | None = None
    uniqueness: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    notes: dict[str, object] = field(default_factory=dict)
    # Raster headers the source has read already (path -> RasterInfo), so none is read twice.
    infos: dict[str, RasterInfo] = field(default_factory=dict)
