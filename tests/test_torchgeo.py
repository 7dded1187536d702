"""`patchbalance.torchgeo.WeightedGeoSampler` on real TorchGeo datasets over GeoTIFFs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from scipy.stats import chisquare

pytest.importorskip("torchgeo")

from torch.utils.data import DataLoader  # noqa: E402
from torchgeo.datasets import RasterDataset, stack_samples  # noqa: E402

from patchbalance.balancing.pipeline import run_build  # noqa: E402
from patchbalance.config import config_from_mapping  # noqa: E402
from patchbalance.errors import InputError  # noqa: E402
from patchbalance.torchgeo import WeightedGeoSampler  # noqa: E402
from rasters import write_geotiff  # noqa: E402

SIZE = 96
PATCH = 32


class Images(RasterDataset):
    filename_glob = "*.tif"
    is_image = True


class Masks(RasterDataset):
    filename_glob = "*.tif"
    is_image = False


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Two adjacent 96 px scenes (random RGB, 4-class masks) and their balanced table."""
    folder = tmp_path_factory.mktemp("torchgeo")
    rng = np.random.default_rng(11)
    pairs = []
    for j, name in enumerate(("west", "east")):
        transform = from_origin(300_000 + j * SIZE * 0.5, 2_780_000, 0.5, 0.5)
        image = rng.integers(1, 256, (3, SIZE, SIZE), dtype=np.uint8)
        mask = rng.choice(4, (SIZE, SIZE), p=[0.7, 0.2, 0.08, 0.02]).astype(np.uint8)
        mask[: 16 * (j + 1), : 16 * (j + 2)] = 3
        pairs.append(
            {
                "image_path": str(
                    write_geotiff(folder / "images" / f"{name}.tif", image, transform=transform)
                ),
                "mask_path": str(
                    write_geotiff(folder / "masks" / f"{name}.tif", mask, transform=transform)
                ),
            }
        )
    config = config_from_mapping(
        {
            "input": {"rasters": pairs, "patch_size": PATCH},
            "clustering": {"k_selection": "fixed", "k": 4},
            "output": {"csv_path": str(folder / "table.csv")},
            "num_workers": 1,
        }
    )
    table = run_build(config, write=False).table
    assert (table["sampler_weight"] > 0).sum() >= 12 and table["sampler_weight"].nunique() > 2
    return folder, table


def _read(path: str, row_off: int, col_off: int) -> np.ndarray:
    with rasterio.open(path) as dataset:
        return dataset.read(window=Window(col_off, row_off, PATCH, PATCH))


def test_every_sample_holds_the_table_windows_pixels(scene):
    folder, table = scene
    images = Images(paths=folder / "images")
    dataset = images & Masks(paths=folder / "masks")
    sampler = WeightedGeoSampler(dataset, table, num_samples=48, seed=5)
    rows = sampler.rows()
    queries = list(sampler)
    assert len(queries) == len(rows) == len(sampler) == 48
    for query, row in zip(queries, rows, strict=True):
        x, y, t = query
        assert isinstance(x, slice) and x.step == images.res[0] and y.step == images.res[1]
        patch = table.iloc[row]
        sample = dataset[query]
        np.testing.assert_array_equal(
            sample["image"].numpy(), _read(patch["image_path"], patch["row_off"], patch["col_off"])
        )
        np.testing.assert_array_equal(
            sample["mask"].numpy(), _read(patch["mask_path"], patch["row_off"], patch["col_off"])[0]
        )
        only_image = images[query]["image"].numpy()
        np.testing.assert_array_equal(only_image, sample["image"].numpy())

    loader = DataLoader(
        dataset,
        batch_size=8,
        sampler=WeightedGeoSampler(dataset, table, num_samples=16, seed=5),
        collate_fn=stack_samples,
    )
    batches = list(loader)
    assert [tuple(b["image"].shape) for b in batches] == [(8, 3, PATCH, PATCH)] * 2


def test_draw_frequencies_follow_the_weights(scene):
    folder, table = scene
    dataset = Images(paths=folder / "images")
    sampler = WeightedGeoSampler(dataset, table, num_samples=20_000, seed=2024)
    row_of = {
        (minx, miny): row
        for row, (minx, miny) in enumerate(
            table[["tile_minx", "tile_miny"]].itertuples(index=False)
        )
    }
    counts = np.bincount([row_of[(q[0].start, q[1].start)] for q in sampler], minlength=len(table))
    weights = table["sampler_weight"].to_numpy()
    assert counts[weights == 0].sum() == 0
    positive = weights > 0
    expected = 20_000 * weights[positive] / weights[positive].sum()
    assert chisquare(counts[positive], expected).pvalue > 0.001


def test_epochs_are_seeded_and_set_epoch_replays_one(scene):
    folder, table = scene
    dataset = Images(paths=folder / "images")
    sampler = WeightedGeoSampler(dataset, table, num_samples=50, seed=1)
    first, second = list(sampler), list(sampler)
    assert first != second  # the epoch advances after each iteration
    sampler.set_epoch(0)
    assert list(sampler) == first
    again = WeightedGeoSampler(dataset, table, num_samples=50, seed=1)
    again.set_epoch(1)
    assert list(again) == second


def test_two_ranks_draw_disjoint_slices_of_one_global_draw(scene):
    folder, table = scene
    dataset = Images(paths=folder / "images")
    whole = WeightedGeoSampler(dataset, table, num_samples=101, seed=9, num_replicas=1, rank=0)
    ranks = [
        WeightedGeoSampler(dataset, table, num_samples=101, seed=9, num_replicas=2, rank=r)
        for r in (0, 1)
    ]
    for sampler in [whole, *ranks]:
        sampler.set_epoch(3)
    global_draw = list(whole)
    rank0, rank1 = (list(s) for s in ranks)
    assert len(rank0) == len(rank1) == 51 == len(ranks[0])
    padded = global_draw + global_draw[:1]  # padded to 102 as DistributedSampler does
    assert rank0 == padded[0::2] and rank1 == padded[1::2]
    with pytest.raises(ValueError, match="explicit seed"):
        WeightedGeoSampler(dataset, table, num_replicas=2, rank=0)


def test_a_footprint_in_another_crs_is_reprojected(scene):
    folder, table = scene
    dataset = Images(paths=folder / "images")
    inside = table.index[
        (table["sampler_weight"] > 0) & (table["row_off"] == PATCH) & (table["col_off"] == PATCH)
    ][0]
    lonlat = table.loc[[inside]].copy()
    box = lonlat[["tile_minx", "tile_miny", "tile_maxx", "tile_maxy"]].iloc[0].to_numpy()
    lonlat[["tile_minx", "tile_miny", "tile_maxx", "tile_maxy"]] = transform_bounds(
        "EPSG:32640", "EPSG:4326", *box, densify_pts=21
    )
    lonlat["crs"] = "EPSG:4326"
    (query,) = list(WeightedGeoSampler(dataset, lonlat, num_samples=1, seed=0))
    got = np.array([query[0].start, query[1].start, query[0].stop, query[1].stop])
    # The lon/lat box holds the window, and its reprojection holds it too, by a small margin.
    assert (got[:2] <= box[:2]).all() and (got[2:] >= box[2:]).all()
    assert np.abs(got - box).max() < 0.05 * PATCH * 0.5
    assert dataset[query]["image"].shape[0] == 3


def test_rows_marked_excluded_are_never_drawn_whatever_their_weight(scene):
    folder, table = scene
    dataset = Images(paths=folder / "images")
    marked = table.copy()
    chosen = np.flatnonzero(marked["sampler_weight"].to_numpy() > 0)[:3]
    marked["excluded"] = False
    marked.loc[chosen, "excluded"] = True
    marked.loc[chosen, "sampler_weight"] = 50.0  # heavy, so a draw that ignored them would hit
    sampler = WeightedGeoSampler(dataset, marked, num_samples=2000, seed=3)
    drawn = np.concatenate([sampler.rows() for sampler.epoch in range(3)])
    assert drawn.size == 6000
    assert not np.isin(drawn, chosen).any()
    assert np.isin(drawn, np.flatnonzero(~marked["excluded"].to_numpy())).all()


def test_a_footprint_outside_the_dataset_is_an_error_naming_its_row(scene, tmp_path):
    folder, table = scene
    dataset = Images(paths=folder / "images")
    moved = table.copy()
    row = int(np.flatnonzero(moved["sampler_weight"] > 0)[3])
    moved.loc[row, ["tile_minx", "tile_maxx"]] += 10_000
    with pytest.raises(InputError, match=rf"row {row + 1} \(.*\.tif at row_off"):
        WeightedGeoSampler(dataset, moved, seed=0)
    excluded = moved.copy()
    excluded.loc[row, "sampler_weight"] = 0.0  # never drawn, so never checked
    WeightedGeoSampler(dataset, excluded, seed=0)
    unplaced = table.copy()
    unplaced.loc[row, "crs"] = ""
    with pytest.raises(InputError, match=rf"row {row + 1} .*no footprint"):
        WeightedGeoSampler(dataset, unplaced, seed=0)
    path = tmp_path / "table.parquet"
    table.drop(columns=["crs"]).to_parquet(path)
    with pytest.raises(InputError, match="lacks the column.*crs"):
        WeightedGeoSampler(dataset, path, seed=0)
    table.to_parquet(path)
    assert len(WeightedGeoSampler(dataset, path, seed=0)) == len(table)


def test_a_sampler_resumed_mid_epoch_yields_the_rest_of_the_uninterrupted_draws(scene):
    folder, table = scene
    dataset = Images(paths=folder / "images")
    whole = WeightedGeoSampler(dataset, table, num_samples=30, seed=4, num_replicas=2, rank=1)
    whole.set_epoch(2)
    expected = list(whole)
    interrupted = WeightedGeoSampler(dataset, table, num_samples=30, seed=4, num_replicas=2, rank=1)
    interrupted.set_epoch(2)
    head = list(itertools.islice(iter(interrupted), 6))
    state = interrupted.state_dict()
    assert (state["epoch"], state["position"]) == (2, 6)
    resumed = WeightedGeoSampler(dataset, table, num_samples=30, seed=4, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what a training loop calls before the epoch: the position stays
    assert head + list(resumed) == expected
