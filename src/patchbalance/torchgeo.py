"""`WeightedGeoSampler`: a TorchGeo sampler that draws a balanced table's patches by weight.

TorchGeo's samplers yield geographic queries, not row indices, so PyTorch's
`WeightedRandomSampler` cannot drive a TorchGeo `GeoDataset`, and TorchGeo has no weighted sampler
of its own (its issue #757). This one draws the table's footprints (`tile_minx, tile_miny,
tile_maxx, tile_maxy` in `crs`) in proportion to `sampler_weight` and yields each as the query
that `RasterDataset`, `IntersectionDataset` and the other `GeoDataset`s of TorchGeo 0.8 to 0.10
take:
``(slice(xmin, xmax, xres), slice(ymin, ymax, yres), slice(tmin, tmax))``.

The draw itself is `patchbalance.data.DistributedWeightedSampler`'s: one global draw per epoch
from the seed and the epoch, of which each DDP rank keeps a disjoint slice.

Needs the `torchgeo` extra: ``pip install "patchbalance[torchgeo]"``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from patchbalance.balanced_table import BalancedTable, read_balanced_table
from patchbalance.data.samplers import DistributedWeightedSampler, _seed_from_torch
from patchbalance.errors import InputError, MissingDependencyError
from patchbalance.table import CRS_COLUMN, FOOTPRINT_BOUNDS, SAMPLER_WEIGHT

try:
    import shapely
    from pyproj import CRS, Transformer
    from torchgeo.datasets import GeoDataset
    from torchgeo.samplers import GeoSampler
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("torchgeo (WeightedGeoSampler)", "torchgeo", "torchgeo") from exc

FOOTPRINT_COLUMNS = (*FOOTPRINT_BOUNDS, CRS_COLUMN)

# TorchGeo 0.8 and 0.9's GeoSampler takes the dataset; 0.10's has no constructor of its own.
_BASE_TAKES_DATASET = "dataset" in inspect.signature(GeoSampler.__init__).parameters

# Points per footprint edge when a footprint is reprojected: the bounding box of the densified
# ring, not of the four corners, contains the whole reprojected footprint.
_EDGE_POINTS = 21


class WeightedGeoSampler(GeoSampler):
    """Sample a balanced table's patch footprints by `sampler_weight`, as TorchGeo queries.

    Each epoch draws `num_samples` rows, with replacement by default, from
    `numpy.random.default_rng([seed, epoch])`, exactly as `DistributedWeightedSampler` does; with
    `num_replicas > 1` every rank computes the same global draw and yields its own disjoint slice
    of it (positions `rank, rank + num_replicas, ...`). The epoch advances by one after every
    iteration, and `set_epoch` sets it (as Lightning and DDP loops call it), so a run is
    reproducible from `seed`. Rows of weight 0 (excluded patches) are never drawn.

    A footprint in another CRS than the dataset's is reprojected: the query is the bounding box of
    its reprojected outline, so the chip holds the whole patch (and a sliver more where the grids
    are rotated against each other). A drawable footprint that is not inside the dataset's files
    is an error that names its row, raised here rather than when the DataLoader reaches it.
    """

    def __init__(
        self,
        dataset: GeoDataset,
        table: pd.DataFrame | str | os.PathLike[str],
        num_samples: int | None = None,
        seed: int | None = None,
        replacement: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        """Initialise a sampler over `table`'s footprints for `dataset`.

        Args:
            dataset: the TorchGeo dataset to query (a `RasterDataset`, an
                `IntersectionDataset` of image and mask, ...).
            table: a balanced table (DataFrame, or the path of its CSV or Parquet file) with
                `tile_minx, tile_miny, tile_maxx, tile_maxy, crs` and `sampler_weight`.
            num_samples: draws per epoch over all ranks (default: the table's row count).
            seed: seed of every epoch's draw; default: drawn from torch's global generator (so
                `torch.manual_seed` fixes it). Required with more than one replica.
            replacement: draw with replacement (default) or without.
            num_replicas: DDP world size (default: the process group's, or 1 without one).
            rank: this process's rank (default: the process group's, or 0 without one).
            drop_last: cut the global draw to a multiple of `num_replicas` instead of padding it.

        Raises:
            InputError: a required column is missing, a weight is NaN or negative, every weight
                is 0, or a drawable footprint has no CRS or lies outside the dataset.
        """
        if _BASE_TAKES_DATASET:
            super().__init__(dataset)
        # TorchGeo 0.8 and 0.9 keep the resolution in the base class; 0.10's base holds nothing.
        self.res = dataset.res
        balanced = _as_table(table)
        num_replicas, rank = _replicas(num_replicas, rank)
        if seed is None:
            if num_replicas > 1:
                raise ValueError(
                    "WeightedGeoSampler needs an explicit seed with num_replicas > 1, so that "
                    "every rank draws the same global sample"
                )
            seed = _seed_from_torch()
        # Drawn as every other consumer draws: an excluded row gets weight 0.
        self.draws = DistributedWeightedSampler(
            balanced.drawn_weights(),
            num_samples=len(balanced.frame) if num_samples is None else num_samples,
            replacement=replacement,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
            drop_last=drop_last,
        )
        self.footprints = _dataset_footprints(balanced, self.draws.weights > 0, dataset)
        _check_inside(self.footprints, self.draws.weights > 0, balanced, dataset)
        time = dataset.bounds[2]
        self.time = slice(time.start, time.stop)
        self.epoch = 0
        self._resuming = False

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield the draw of `epoch`.

        Right after `load_state_dict`, setting the saved epoch keeps the saved position.

        Args:
            epoch: the epoch number; with the seed, it fixes the global draw on every rank.
        """
        if self._resuming and int(epoch) == self.draws.epoch:
            return
        self.epoch = int(epoch)
        self._resuming = False

    def rows(self) -> np.ndarray:
        """Return the table rows (0-based positions) this rank yields in the current epoch.

        Returns:
            int64 array of `len(self)` row positions, in the order of iteration.
        """
        self.draws.set_epoch(self.epoch)
        return self.draws.rank_indices()

    def state_dict(self) -> dict[str, Any]:
        """Return what resumes the draws: seed, epoch and position (`DistributedWeightedSampler`'s).

        Returns:
            A mapping for `torch.save`; `position` counts this rank's queries of the epoch
            already yielded.
        """
        return self.draws.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict()`: the next iteration resumes the saved epoch's position.

        Args:
            state: what `state_dict()` returned (of a sampler over the same table).
        """
        self.draws.load_state_dict(state)
        self.epoch = self.draws.epoch
        self._resuming = True

    def __iter__(self) -> Iterator[tuple[slice, slice, slice]]:
        """Yield the current epoch's queries (the rest of it after `load_state_dict`), then
        advance the epoch by one.

        Yields:
            ``(slice(xmin, xmax, xres), slice(ymin, ymax, yres), slice(tmin, tmax))`` in the
            dataset's CRS, one per drawn row.
        """
        if not self._resuming:
            self.draws.set_epoch(self.epoch)
        self._resuming = False
        self.epoch += 1
        xres, yres = self.res
        for row in self.draws:
            xmin, ymin, xmax, ymax = self.footprints[row].tolist()
            yield slice(xmin, xmax, xres), slice(ymin, ymax, yres), self.time

    def __len__(self) -> int:
        """Return the number of queries this rank yields per epoch.

        Returns:
            the per-rank sample count (the global `num_samples` split over the replicas).
        """
        return len(self.draws)


def _as_table(table: pd.DataFrame | str | os.PathLike[str]) -> BalancedTable:
    balanced = read_balanced_table(
        table if isinstance(table, pd.DataFrame) else Path(table),
        where="the table" if isinstance(table, pd.DataFrame) else None,
    )
    missing = [c for c in (*FOOTPRINT_COLUMNS, SAMPLER_WEIGHT) if c not in balanced.frame.columns]
    if missing:
        raise InputError(
            f"{balanced.prefix}the table lacks the column(s) {', '.join(missing)}; "
            "WeightedGeoSampler needs a balanced table written by build-balanced-dataset"
        )
    return balanced


def _replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if distributed else 1
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    return int(num_replicas), int(rank)


def _dataset_footprints(
    balanced: BalancedTable, drawable: np.ndarray, dataset: GeoDataset
) -> np.ndarray:
    """Return (N, 4) footprint bounds xmin, ymin, xmax, ymax in the dataset's CRS.

    Rows that cannot be drawn are NaN; a drawable row without bounds or CRS is an error.
    """
    bounds, crs_text = balanced.footprints()
    unplaced = drawable & (~np.isfinite(bounds).all(axis=1) | (crs_text == ""))
    if unplaced.any():
        raise InputError(
            f"{balanced.label(int(np.flatnonzero(unplaced)[0]))} has sampler_weight > 0 "
            f"but no footprint (empty tile bounds or crs), like {int(unplaced.sum())} row(s) in "
            "all: its raster has no CRS, so it cannot be found in a GeoDataset"
        )
    result = np.full_like(bounds, np.nan)
    target = CRS.from_user_input(dataset.crs)
    codes, texts = pd.factorize(crs_text)
    for code, text in enumerate(texts):
        chosen = drawable & (codes == code)
        if not chosen.any():
            continue
        source = CRS.from_user_input(text)
        if source == target:
            result[chosen] = bounds[chosen]
        else:
            result[chosen] = _reproject_bounds(bounds[chosen], source, target)
    return result


def _reproject_bounds(bounds: np.ndarray, source: CRS, target: CRS) -> np.ndarray:
    """Return the target-CRS bounding boxes of the densified outlines of `bounds` (n, 4)."""
    step = np.linspace(0.0, 1.0, _EDGE_POINTS)
    xmin, ymin, xmax, ymax = (bounds[:, [j]] for j in range(4))
    width, height = xmax - xmin, ymax - ymin
    # The outline, edge by edge: south, east, north, west.
    xs = np.hstack(
        [
            xmin + width * step,
            np.repeat(xmax, step.size, 1),
            xmax - width * step,
            np.repeat(xmin, step.size, 1),
        ]
    )
    ys = np.hstack(
        [
            np.repeat(ymin, step.size, 1),
            ymin + height * step,
            np.repeat(ymax, step.size, 1),
            ymax - height * step,
        ]
    )
    transformer = Transformer.from_crs(source, target, always_xy=True)
    out_x, out_y = transformer.transform(xs.ravel(), ys.ravel())
    out_x = np.asarray(out_x).reshape(xs.shape)
    out_y = np.asarray(out_y).reshape(ys.shape)
    return np.column_stack([out_x.min(1), out_y.min(1), out_x.max(1), out_y.max(1)])


def _check_inside(
    footprints: np.ndarray, drawable: np.ndarray, balanced: BalancedTable, dataset: GeoDataset
) -> None:
    """Raise `InputError` naming the first drawable footprint not covered by the dataset's files."""
    rows = np.flatnonzero(drawable)
    # A hundredth of a pixel absorbs the rounding between the table's bounds and the index's.
    tolerance = 0.01 * min(abs(r) for r in dataset.res)
    coverage = shapely.union_all(dataset.index.geometry.to_numpy()).buffer(tolerance)
    boxes = shapely.box(*footprints[rows].T)
    outside = ~shapely.covers(coverage, boxes)
    if outside.any():
        row = int(rows[np.flatnonzero(outside)[0]])
        x, y, _ = dataset.bounds
        box = ", ".join(f"{v:.6g}" for v in footprints[row])
        raise InputError(
            f"{balanced.label(row)}: its footprint [{box}] (in the dataset's CRS "
            f"{CRS.from_user_input(dataset.crs).to_string()}) is not inside the dataset, whose "
            f"bounds are [{x.start:.6g}, {y.start:.6g}, {x.stop:.6g}, {y.stop:.6g}]; "
            f"{int(outside.sum())} drawable footprint(s) lie outside it. Build the dataset over "
            "the rasters the table was made from"
        )


__all__ = ["WeightedGeoSampler"]
