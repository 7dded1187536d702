"""The footprints map of the HTML report: each patch's window on the ground, by weight.

One panel per raster (a few rasters) or per CRS (many); drawn with `matplotlib.figure.Figure`,
never pyplot, so the caller's matplotlib state is left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from patchbalance.table import CRS_COLUMN, FOOTPRINT_BOUNDS, SAMPLER_WEIGHT

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# One map panel per CRS; a table spanning more CRSs than this shows the most populated ones.
MAX_MAP_PANELS = 4
# Up to this many rasters get a map panel each.
MAX_RASTER_PANELS = 8
# Weights whose largest/smallest ratio exceeds this are drawn on log scales, where a few heavy
# patches no longer flatten the rest into one colour or one bin.
WIDE_WEIGHT_RANGE = 10.0
EXCLUDED_COLOUR = "#d9d9d9"


def _footprint_rows(table: pd.DataFrame) -> np.ndarray | None:
    """Return a boolean mask of rows with finite tile bounds and a CRS, or None if there are none."""
    if not all(column in table.columns for column in (*FOOTPRINT_BOUNDS, CRS_COLUMN)):
        return None
    bounds = table[list(FOOTPRINT_BOUNDS)].apply(pd.to_numeric, errors="coerce").to_numpy()
    crs = table[CRS_COLUMN].fillna("").astype(str).str.strip()
    usable = np.isfinite(bounds).all(axis=1) & (crs != "").to_numpy()
    return usable if usable.any() else None


def _rectangles(bounds: np.ndarray) -> np.ndarray:
    """Return the (n, 4, 2) corners of the rectangles whose (n, 4) bounds are minx, miny, maxx, maxy."""
    minx, miny, maxx, maxy = bounds.T
    return np.stack(
        [
            np.stack([minx, miny], axis=1),
            np.stack([maxx, miny], axis=1),
            np.stack([maxx, maxy], axis=1),
            np.stack([minx, maxy], axis=1),
        ],
        axis=1,
    )


def _map_groups(table: pd.DataFrame, usable: np.ndarray) -> tuple[np.ndarray, list[str], int]:
    """Return a panel key per row, the keys to draw (largest first) and how many are left out.

    Rasters of one CRS may lie kilometres apart, which shrinks each to a speck on a shared map:
    a few rasters get one panel each, many rasters one panel per CRS.
    """
    crs = table[CRS_COLUMN].fillna("").astype(str).str.strip().to_numpy()
    if "image_path" in table.columns:
        images, image_index = np.unique(table["image_path"].astype(str), return_inverse=True)
        if len(np.unique(image_index[usable])) <= MAX_RASTER_PANELS:
            file_names = np.array([Path(image).name for image in images])
            keys = np.char.add(np.char.add(file_names[image_index], " - "), crs.astype(str))
            return keys, list(np.unique(keys[usable])), 0
    names, counts = np.unique(crs[usable], return_counts=True)
    order = names[np.argsort(-counts, kind="stable")]
    return crs, list(order[:MAX_MAP_PANELS]), max(0, len(order) - MAX_MAP_PANELS)


def footprint_map(
    table: pd.DataFrame, weights: np.ndarray, active: np.ndarray
) -> tuple[Figure, int] | None:
    """Return the map of patch footprints coloured by weight, and how many CRSs it leaves out.

    Args:
        table: a balanced table with tile bounds and `crs` (and `image_path`).
        weights: (N,) the weight each row is drawn with.
        active: (N,) which rows are active; the others are drawn grey and hatched.

    Returns:
        `(figure, hidden)`, or None when no row has finite tile bounds and a CRS.
    """
    usable = _footprint_rows(table)
    if usable is None:
        return None
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    bounds = table[list(FOOTPRINT_BOUNDS)].apply(pd.to_numeric, errors="coerce").to_numpy()
    keys, shown, hidden = _map_groups(table, usable)
    positive = weights[active & usable]
    positive = positive[positive > 0]
    if len(positive) and positive.max() / positive.min() > WIDE_WEIGHT_RANGE:
        norm: Normalize = LogNorm(vmin=positive.min(), vmax=positive.max())
    else:
        norm = Normalize(vmin=0.0, vmax=max(float(weights[usable].max()), 1e-12))
    n_columns = min(len(shown), 4)
    n_rows = -(-len(shown) // n_columns)
    panel_width = 5.5 if len(shown) <= 2 else 3.4
    # Panels take the shape of the footprints' extent, within limits.
    extents = [bounds[usable & (keys == key)][:, [0, 1, 2, 3]] for key in shown]
    aspect = float(
        np.median(
            [
                (e[:, 3].max() - e[:, 1].min()) / max(e[:, 2].max() - e[:, 0].min(), 1e-9)
                for e in extents
            ]
        )
    )
    panel_height = panel_width * min(max(aspect, 0.35), 1.5)
    figure = Figure(
        figsize=(panel_width * n_columns + 1.2, panel_height * n_rows + 0.6),
        layout="constrained",
    )
    panels = figure.subplots(n_rows, n_columns, squeeze=False).ravel()
    collection = None
    for panel, key in zip(panels, shown, strict=False):
        rows = usable & (keys == key)
        corners = _rectangles(bounds[rows])
        drawn = active[rows]
        if (~drawn).any():
            panel.add_collection(
                PolyCollection(
                    corners[~drawn], facecolors=EXCLUDED_COLOUR, edgecolors="none", hatch="///"
                )
            )
        collection = PolyCollection(
            corners[drawn], cmap="viridis", norm=norm, edgecolors="white", linewidths=0.2
        )
        collection.set_array(weights[rows][drawn])
        panel.add_collection(collection)
        panel.set_xlim(bounds[rows, 0].min(), bounds[rows, 2].max())
        panel.set_ylim(bounds[rows, 1].min(), bounds[rows, 3].max())
        panel.set_aspect("equal")
        panel.set_title(f"{key}\n{int(rows.sum()):,} patches", fontsize=9)
        panel.tick_params(labelsize=7)
        panel.ticklabel_format(useOffset=False, style="plain")
        # Projected coordinates are long numbers: three ticks per axis keep them apart.
        panel.xaxis.set_major_locator(MaxNLocator(3))
        panel.yaxis.set_major_locator(MaxNLocator(3))
    for panel in panels[len(shown) :]:
        panel.set_visible(False)
    if collection is not None:
        colourbar = figure.colorbar(collection, ax=list(panels[: len(shown)]), shrink=0.85)
        colourbar.set_label(SAMPLER_WEIGHT)
    return figure, hidden
