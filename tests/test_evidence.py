"""`bench/evidence.py`: class maps, pairing, conversion, statistics, and the quick path end to end.

The end-to-end test uses a small synthetic dataset in the form of the acceptance data: RGB PNG
chips and PNG masks that encode the class as a grey value with all three channels equal.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench" / "evidence.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("evidence", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["evidence"] = module
    spec.loader.exec_module(module)
    return module


evidence = load_bench()


def write_class_map(path: Path, classes: list[dict], nodata=(), **extra) -> Path:
    path.write_text(json.dumps({"classes": classes, "nodata": list(nodata), **extra}))
    return path


def grey_dataset(root: Path, count: int = 6, size: int = 96, seed: int = 0) -> Path:
    """Write RGB chips and grey masks (values 0, 10, 20, 30; 30 rare) under root/images, labels."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for n in range(count):
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[: size // 2] = 10
        mask[:, size // 3 : size // 3 + 8] = 20
        row, col = rng.integers(0, size - 6, size=2)
        mask[row : row + 6, col : col + 6] = 30
        colours = np.array([[40, 120, 40], [200, 190, 170], [90, 90, 90], [20, 60, 220]])
        image = colours[mask // 10] + rng.normal(0, 6, (size, size, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"c{n}.png")
        grey = np.repeat(mask[..., None], 3, axis=2)  # the class as grey, all channels equal
        Image.fromarray(grey).save(root / "labels" / f"c{n}.png")
    return root


GREY_CLASSES = [
    {"index": 0, "name": "ground", "values": [0], "catch_all": True},
    {"index": 1, "name": "field", "values": [10]},
    {"index": 2, "name": "road", "values": [20]},
    {"index": 3, "name": "pool", "values": [30]},
]


def test_grey_masks_with_equal_channels_become_class_indices(tmp_path):
    class_map = evidence.ClassMap.load(write_class_map(tmp_path / "m.json", GREY_CLASSES))
    grey = np.array([[0, 10], [20, 30]], dtype=np.uint8)
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(tmp_path / "g.png")

    np.testing.assert_array_equal(class_map.classes_of(tmp_path / "g.png"), [[0, 1], [2, 3]])


def test_colour_masks_merged_classes_and_nodata(tmp_path):
    classes = [
        {"index": 0, "name": "a", "values": ["#FF0000", "#00FF00"]},
        {"index": 1, "name": "b", "values": ["#0000FF"]},
    ]
    class_map = evidence.ClassMap.load(write_class_map(tmp_path / "m.json", classes, ["#000000"]))
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 0, 0]]], dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")

    np.testing.assert_array_equal(class_map.classes_of(tmp_path / "c.png"), [[0, 0], [1, 255]])


def test_an_unmapped_mask_value_is_an_error_naming_the_file_and_value(tmp_path):
    class_map = evidence.ClassMap.load(write_class_map(tmp_path / "m.json", GREY_CLASSES[:2]))
    Image.fromarray(np.array([[0, 77]], dtype=np.uint8)).save(tmp_path / "g.png")

    with pytest.raises(SystemExit, match=r"g\.png: mask value 77 is not in the class map"):
        class_map.classes_of(tmp_path / "g.png")
    lenient = evidence.ClassMap.load(
        write_class_map(tmp_path / "n.json", GREY_CLASSES[:2], unmapped="nodata")
    )
    np.testing.assert_array_equal(lenient.classes_of(tmp_path / "g.png"), [[0, 255]])


def test_the_presets_load_and_map_every_documented_value():
    dubai = evidence.ClassMap.load(evidence.CLASS_MAPS / "dubai-aerial.json")
    harvey = evidence.ClassMap.load(evidence.CLASS_MAPS / "harvey-suav.json")

    assert dubai.colour and dubai.names[3] == "Road" and dubai.catch_all == {0}
    assert not harvey.colour and sorted(harvey.lookup) == list(range(25))
    assert harvey.lookup[4] == harvey.lookup[24] == 4  # boats merge into vehicles


def test_pairs_match_by_what_the_wildcards_match(tmp_path):
    for tile in (1, 2):
        for kind, ext in (("images", "jpg"), ("masks", "png")):
            folder = tmp_path / f"tile_{tile}" / kind
            folder.mkdir(parents=True)
            (folder / f"part_001.{ext}").write_bytes(b"")
    pairs = evidence.pair_files(
        str(tmp_path / "tile_*" / "images" / "*.jpg"), str(tmp_path / "tile_*" / "masks" / "*.png")
    )

    assert [name for _, _, name in pairs] == ["1_part_001", "2_part_001"]
    assert all(image.parent.parent == mask.parent.parent for image, mask, _ in pairs)


def test_downsampled_masks_take_the_majority_class_and_nodata_only_when_nothing_else():
    mask = np.array(
        [[1, 1, 2, 255], [1, 3, 255, 255], [255, 255, 4, 5], [255, 255, 5, 4]], dtype=np.uint8
    )

    np.testing.assert_array_equal(
        evidence.downsample_mask(mask, 2, 6), np.array([[1, 2], [255, 4]], dtype=np.uint8)
    )


def test_paired_gain_interval_is_a_student_t_interval_over_seeds():
    from patchbalance.compare.statistics import paired_gain

    pairs = [(0.30, 0.35), (0.20, 0.24), (0.40, 0.47)]
    uniform = pd.Series([base for base, _ in pairs], index=range(3))
    better = pd.Series([value for _, value in pairs], index=range(3))
    gain = paired_gain(better, uniform)

    # Differences 0.05, 0.04, 0.07: mean 0.05333, s 0.015275, t(0.975, 2) = 4.3027.
    assert gain["mean"] == pytest.approx((0.05 + 0.04 + 0.07) / 3)
    half = 4.3027 * 0.015275 / 3**0.5
    assert gain["low"] == pytest.approx(0.053333 - half, rel=1e-4)
    assert gain["high"] == pytest.approx(0.053333 + half, rel=1e-4)
    assert gain["wins"] == 3 and gain["n"] == 3 and gain["method"] == "student_t"


def test_quick_path_runs_end_to_end_on_grey_png_masks(tmp_path, capsys):
    data = grey_dataset(tmp_path / "data")
    class_map = write_class_map(tmp_path / "classes.json", GREY_CLASSES)
    work = tmp_path / "work"

    results = evidence.main(
        [
            "--images", str(data / "images" / "*.png"),
            "--masks", str(data / "labels" / "*.png"),
            "--class-map", str(class_map),
            "--quick", "--patch", "32", "--steps", "2", "--eval-every", "1",
            "--encoder", "mobilenet_v2", "--work", str(work),
        ]
    )  # fmt: skip

    printed = capsys.readouterr().out
    assert "command: " in printed and "Gain over uniform" in printed
    # The rarest real classes leave out the catch-all class 0.
    assert results["rarest_classes"] == [3, 2]
    methods = [row["method"] for row in results["sampling"]]
    n_methods = len(evidence.METHODS)
    assert methods[:n_methods] == list(evidence.METHODS)
    assert methods[n_methods].endswith("+mix0.33")
    by_method = {row["method"]: row for row in results["sampling"]}
    assert by_method["uniform"]["ess_share"] == pytest.approx(1.0)
    assert by_method["class_target_sqrt"]["share_3"] > by_method["uniform"]["share_3"]
    # class_centred adds windows beside the grid.
    assert by_method["class_target_sqrt_centred"]["n_rows"] > by_method["uniform"]["n_rows"]
    # `default` names no method and no placement: the product's default, class-centred windows
    # on the classes under rare_below included.
    assert by_method["default"]["n_rows"] > by_method["uniform"]["n_rows"]
    assert by_method["default"]["share_3"] > by_method["uniform"]["share_3"]
    long = results["summary"]["long_tau0"]
    assert long["step"] == 2 and results["summary"]["short_tau0"]["step"] == 1
    assert long["arms"]["rank_max"]["3"]["gain_iou"]["n"] == 2
    runs = pd.read_csv(work / "runs.csv")
    assert set(runs["tau"]) == {0.0, 1.0}
    # arms (methods + mix) x seeds x steps x taus x (4 classes + mIoU)
    assert len(runs) == (n_methods + 1) * 2 * 2 * 2 * 5
    with rasterio.open(next((work / "rasters" / "masks").glob("*.tif"))) as mask:
        assert mask.crs is not None and mask.nodata == 255
    assert (work / "results.json").is_file() and (work / "results.md").is_file()
