"""Where patch records come from (SPEC §2.1): one function per kind of source."""

from __future__ import annotations

from patchbalance.compute import Compute
from patchbalance.config import BalancedDatasetConfig
from patchbalance.sources.local import (
    KEY_COLUMNS,
    RECORD_COLUMNS,
    records_from_file,
    records_from_list,
    records_from_rasters,
    validate_records,
)
from patchbalance.sources.records import SourceRecords
from patchbalance.windows import RasterInfo

__all__ = [
    "KEY_COLUMNS",
    "RECORD_COLUMNS",
    "SourceRecords",
    "load_records",
    "validate_records",
]


def load_records(
    config: BalancedDatasetConfig,
    compute: Compute | None = None,
    infos: dict[str, RasterInfo] | None = None,
) -> SourceRecords:
    """Return the validated records of the configured source.

    `compute` runs the class-centred window search of the rasters source (SPEC §2.1, §10);
    `infos` holds raster headers read already (and takes those the source reads).
    """
    kind = config.input.source_kind
    if kind == "patch_records":
        return SourceRecords(records_from_list(config))
    if kind == "records_path":
        return SourceRecords(records_from_file(config))
    if kind == "rasters":
        notes: dict[str, object] = {}
        infos = {} if infos is None else infos
        records = records_from_rasters(config, notes, compute, infos)
        return SourceRecords(records, notes=notes, infos=infos)
    if kind == "postgres":
        from patchbalance.sources.postgres import records_from_postgres

        return records_from_postgres(config)
    raise ValueError(f"unknown source kind {kind!r}")
