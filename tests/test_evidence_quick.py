"""`bench/evidence_dubai.py`: its conversion, and its quick path end to end in a tiny setting.

The end-to-end test runs on the real Dubai aerial data when it is there (two tiles), else on a
small synthetic dataset in the same layout and mask colours, so the script cannot rot.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench" / "evidence_dubai.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("evidence_dubai", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["evidence_dubai"] = module
    spec.loader.exec_module(module)
    return module


evidence = load_bench()
COLOURS = {index: colour for index, (_, colour) in evidence.CLASS_COLOURS.items()}
COLOURS[evidence.MASK_NODATA] = evidence.NODATA_COLOUR


def rgb_of(indices: np.ndarray) -> np.ndarray:
    """Return the RGB mask that paints each class index in the data's mask colour."""
    rgb = np.zeros((*indices.shape, 3), dtype=np.uint8)
    for index, colour in COLOURS.items():
        rgb[indices == index] = [(colour >> 16) & 255, (colour >> 8) & 255, colour & 255]
    return rgb


def synthetic_indices(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Return a class-index mask of land with water, road, building, vegetation and rare blocks."""
    mask = np.full((height, width), 2, dtype=np.uint8)
    mask[: height // 3] = 1
    mask[:, width // 2 : width // 2 + 6] = 3
    for value, size in ((4, 24), (5, 16), (0, 6)):
        for _ in range(3):
            row, col = rng.integers(0, height - size), rng.integers(0, width - size)
            mask[row : row + size, col : col + size] = value
    mask[-3:, :] = evidence.MASK_NODATA  # an unannotated black strip
    return mask


def write_synthetic_dataset(root: Path, tiles=(1, 2), parts=3, seed=0) -> Path:
    """Write JPEG images and colour PNG masks in the Dubai layout; return the data folder."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 230, size=(256, 3))
    for tile in tiles:
        for part in range(1, parts + 1):
            height, width = 200 + 8 * tile, 260 + part  # parts differ by a pixel, as in the data
            indices = synthetic_indices(rng, height, width)
            image = np.clip(palette[indices] + rng.normal(0, 8, (height, width, 3)), 0, 255)
            folder = root / f"tile_{tile}"
            (folder / "images").mkdir(parents=True, exist_ok=True)
            (folder / "masks").mkdir(parents=True, exist_ok=True)
            name = f"image_part_{part:03d}"
            Image.fromarray(image.astype(np.uint8)).save(folder / "images" / f"{name}.jpg")
            Image.fromarray(rgb_of(indices)).save(folder / "masks" / f"{name}.png")
    return root


def test_mask_colours_become_class_indices_and_black_becomes_nodata():
    indices = np.array([[0, 1, 2, 3], [4, 5, 255, 2]], dtype=np.uint8)

    np.testing.assert_array_equal(evidence.mask_to_classes(rgb_of(indices), "m.png"), indices)


def test_an_unknown_mask_colour_is_an_error_naming_the_file_and_colour():
    rgb = rgb_of(np.zeros((2, 2), dtype=np.uint8))
    rgb[0, 0] = [0x50, 0xE3, 0xC2]  # classes.json's "Water" colour, which the masks never use

    with pytest.raises(
        ValueError, match=r"m\.png: 1 pixel\(s\) of unknown mask colour\(s\) #50E3C2"
    ):
        evidence.mask_to_classes(rgb, "m.png")


def test_downsampled_masks_take_the_majority_class_and_nodata_only_when_nothing_else():
    mask = np.array(
        [
            [1, 1, 2, 255],
            [1, 3, 255, 255],
            [255, 255, 4, 5],
            [255, 255, 5, 4],
        ],
        dtype=np.uint8,
    )

    # Blocks: {1,1,1,3} -> 1; {2,255,255,255} -> 2; all nodata -> 255; {4,5,5,4} tie -> 4.
    np.testing.assert_array_equal(
        evidence.downsample_mask(mask, 2), np.array([[1, 2], [255, 4]], dtype=np.uint8)
    )


def test_conversion_writes_georeferenced_pairs_and_a_seeded_split(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data")

    pairs = evidence.convert_dataset(data, tmp_path / "out", [1, 2], val_parts=1, seed=5)
    again = evidence.convert_dataset(data, tmp_path / "again", [1, 2], val_parts=1, seed=5)

    assert len(pairs) == 6
    assert pairs.groupby("tile")["split"].apply(lambda s: (s == "val").sum()).tolist() == [1, 1]
    assert pairs["split"].tolist() == again["split"].tolist()
    footprints = []
    for pair in pairs.itertuples():
        source = data / f"tile_{pair.tile}" / "masks" / f"{pair.part}.png"
        expected = evidence.mask_to_classes(np.asarray(Image.open(source).convert("RGB")), "")
        with rasterio.open(pair.mask_path) as mask, rasterio.open(pair.image_path) as image:
            assert mask.crs.to_epsg() == 32640 and mask.nodata == 255
            assert image.count == 3 and image.transform == mask.transform
            np.testing.assert_array_equal(mask.read(1), expected)
            footprints.append(mask.bounds)
    # No two parts overlap on the made-up map.
    for i, a in enumerate(footprints):
        for b in footprints[i + 1 :]:
            assert a.right <= b.left or b.right <= a.left or a.top <= b.bottom or b.top <= a.bottom


def test_quick_path_runs_end_to_end_in_a_tiny_configuration(tmp_path, capsys):
    data = evidence.DEFAULT_DATA
    if not (data / "tile_1").is_dir():
        data = write_synthetic_dataset(tmp_path / "data")
    work = tmp_path / "work"

    results = evidence.main(
        [
            "--quick",
            "--data",
            str(data),
            "--tiles",
            "1",
            "2",
            "--patch",
            "64",
            "--val-window",
            "64",
            "--steps",
            "2",
            "--seeds",
            "1",
            "--methods",
            "composition_only",
            "rank_max",
            "repeat_factor",
            "--work",
            str(work),
        ]
    )

    printed = capsys.readouterr().out
    assert "command: " in printed and "torch " in printed
    assert "validation IoU (%)" in printed and "gain over uniform" in printed
    # uniform is added as the baseline; rank_max equals composition_only without embeddings.
    sampling = {row["method"]: row for row in results["sampling"]}
    assert list(sampling) == ["uniform", "composition_only", "rank_max", "repeat_factor"]
    assert results["same_weights"] == {"rank_max": "composition_only"}
    for row in sampling.values():
        shares = [row[f"share_{c}"] for c in evidence.CLASS_COLOURS]
        assert math.isclose(sum(shares), 1.0, rel_tol=1e-9)
    assert sampling["uniform"]["ess"] == pytest.approx(sampling["uniform"]["n_active"])
    assert sampling["uniform"]["max_expected_repeats"] == pytest.approx(1.0)
    rarest = results["rarest_classes"][0]
    assert sampling["repeat_factor"][f"share_{rarest}"] > sampling["uniform"][f"share_{rarest}"]
    # Three trainings, rank_max reported from composition_only's run.
    runs = results["runs"]
    assert sorted(r["method"] for r in runs) == sorted(sampling)
    assert all(r["steps"] == 2 for r in runs)
    assert all(0.0 <= r["miou"] <= 1.0 for r in runs)
    by_method = {r["method"]: r for r in runs}
    assert by_method["rank_max"]["miou"] == by_method["composition_only"]["miou"]
    assert (work / "results.json").is_file() and (work / "runs.csv").is_file()
    assert (work / "reports" / "repeat_factor.html").is_file()
