"""CSVWindowedSegmentationDataset: exact windows, transforms, bands, labels and read errors."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.windows import Window
from torch.utils.data import DataLoader

from data_fixtures import grid_rows, write_scene, write_table
from patchbalance.data import CSVWindowedSegmentationDataset, WindowReadError
from patchbalance.errors import ConfigError, InputError
from rasters import write_geotiff

WINDOWS = [(0, 0, 32), (16, 40, 24), (64, 64, 32), (5, 71, 25)]


@pytest.fixture
def scene(tmp_path):
    image_path, mask_path, image, mask = write_scene(tmp_path, "scene", size=96, seed=1)
    table = pd.DataFrame(
        {
            "image_path": str(image_path),
            "mask_path": str(mask_path),
            "row_off": [w[0] for w in WINDOWS],
            "col_off": [w[1] for w in WINDOWS],
            "patch_size": [w[2] for w in WINDOWS],
            "sampler_weight": [1.0, 2.0, 0.0, 1.0],
        }
    )
    return {
        "table": write_table(table, tmp_path / "patches.csv"),
        "image_path": image_path,
        "mask_path": mask_path,
        "image": image,
        "mask": mask,
    }


def rasterio_window(path, row, col, size, bands=None):
    with rasterio.open(path) as dataset:
        return dataset.read(bands, window=Window(col, row, size, size))


def test_items_are_the_exact_window_pixels_of_a_direct_rasterio_read(scene):
    dataset = CSVWindowedSegmentationDataset(scene["table"], n_classes=4)
    assert len(dataset) == len(WINDOWS)
    for i, (row, col, size) in enumerate(WINDOWS):
        item = dataset[i]
        expected_image = rasterio_window(scene["image_path"], row, col, size) / np.float32(255)
        expected_mask = rasterio_window(scene["mask_path"], row, col, size, 1)
        assert item["image"].dtype == torch.float32 and item["mask"].dtype == torch.int64
        assert tuple(item["image"].shape) == (3, size, size)
        np.testing.assert_array_equal(item["image"].numpy(), expected_image.astype(np.float32))
        # Classes 0..3 pass through; the mask's nodata 255 is the default ignore index.
        np.testing.assert_array_equal(item["mask"].numpy(), expected_mask.astype(np.int64))
    assert (dataset[0]["mask"].numpy()[:4, :4] == 255).all()


def test_mapping_transforms_are_applied_to_the_window_pixels(scene):
    augmentation = [
        {"_target_": "albumentations.HorizontalFlip", "p": 1.0},
        {"_target_": "albumentations.pytorch.ToTensorV2"},
    ]
    dataset = CSVWindowedSegmentationDataset(
        scene["table"], n_classes=4, augmentation_list=augmentation
    )
    row, col, size = WINDOWS[1]
    item = dataset[1]
    image = rasterio_window(scene["image_path"], row, col, size)
    mask = rasterio_window(scene["mask_path"], row, col, size, 1)
    expected_image = image[:, :, ::-1].astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(item["image"].numpy(), expected_image)
    np.testing.assert_array_equal(item["mask"].numpy(), mask[:, ::-1].astype(np.int64))


def test_transform_objects_work_and_normalised_output_is_kept_as_float(scene):
    normalise = A.Normalize(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), max_pixel_value=255.0)
    dataset = CSVWindowedSegmentationDataset(
        scene["table"], n_classes=4, augmentation_list=[normalise]
    )
    row, col, size = WINDOWS[0]
    image = rasterio_window(scene["image_path"], row, col, size).astype(np.float32)
    expected = (image / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(dataset[0]["image"].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_selected_bands_reads_those_bands_in_the_given_order(scene):
    dataset = CSVWindowedSegmentationDataset(scene["table"], n_classes=4, selected_bands=[3, 1])
    row, col, size = WINDOWS[3]
    expected = rasterio_window(scene["image_path"], row, col, size, [3, 1]) / np.float32(255)
    np.testing.assert_array_equal(dataset[3]["image"].numpy(), expected.astype(np.float32))
    assert dataset.image_band_count() == 2


def test_band_beyond_the_raster_is_an_error_naming_row_and_file(scene):
    dataset = CSVWindowedSegmentationDataset(scene["table"], n_classes=4, selected_bands=[4])
    with pytest.raises(WindowReadError, match=r"row 1 .*scene\.tif.*band 4"):
        dataset[0]


def test_class_values_map_raw_values_to_classes_and_the_rest_to_ignore_index(tmp_path):
    raw = np.array([[10, 20, 30, 40], [30, 20, 10, 255]] * 2, dtype=np.uint8)
    image_path = write_geotiff(tmp_path / "i.tif", np.zeros((1, 4, 4), dtype=np.uint8))
    mask_path = write_geotiff(tmp_path / "m.tif", raw)
    table = write_table(grid_rows(image_path, mask_path, 4, 4), tmp_path / "t.csv")
    dataset = CSVWindowedSegmentationDataset(
        table, n_classes=3, class_values=[10, 20, 30], ignore_index=-100
    )
    expected = np.array([[0, 1, 2, -100], [2, 1, 0, -100]] * 2)
    np.testing.assert_array_equal(dataset[0]["mask"].numpy(), expected)
    # Upstream's mask_class_mapping renames first; values >= n_classes become ignore_index.
    merged = CSVWindowedSegmentationDataset(
        table, n_classes=2, mask_class_mapping={10: 0, 20: 1, 30: 1}
    )
    np.testing.assert_array_equal(
        merged[0]["mask"].numpy(), np.array([[0, 1, 1, 255], [1, 1, 0, 255]] * 2)
    )
    with pytest.raises(ConfigError, match="class_values has 2 values but n_classes is 3"):
        CSVWindowedSegmentationDataset(table, n_classes=3, class_values=[10, 20])


def test_missing_column_is_an_error_at_construction_naming_it(tmp_path, scene):
    frame = pd.read_csv(scene["table"]).drop(columns=["row_off"])
    table = write_table(frame, tmp_path / "bad.csv")
    with pytest.raises(InputError, match="lacks the column\\(s\\) 'row_off'"):
        CSVWindowedSegmentationDataset(table, n_classes=4)


def test_non_integer_offsets_are_an_error_naming_the_rows(tmp_path, scene):
    frame = pd.read_csv(scene["table"])
    frame.loc[2, "col_off"] = -3
    table = write_table(frame, tmp_path / "bad.csv")
    with pytest.raises(InputError, match=r"'col_off' must hold integers >= 0.*rows?.*: row 3$"):
        CSVWindowedSegmentationDataset(table, n_classes=4)


def test_unreadable_file_raises_an_error_naming_the_row_and_file(tmp_path, scene):
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"this is not a tiff")
    frame = pd.read_csv(scene["table"])
    frame.loc[2, "image_path"] = str(broken)
    table = write_table(frame, tmp_path / "with_broken.csv")
    dataset = CSVWindowedSegmentationDataset(table, n_classes=4)
    assert dataset[1]["image"].shape == (3, 24, 24)  # other rows still read
    with pytest.raises(WindowReadError, match=r"row 3 \(.*broken\.tif.*cannot read the image"):
        dataset[2]
    # Through DataLoader workers the error arrives as one line, not a worker traceback.
    loader = DataLoader(torch.utils.data.Subset(dataset, [2]), batch_size=1, num_workers=1)
    with pytest.raises(WindowReadError) as caught:
        next(iter(loader))
    assert "\n" not in str(caught.value) and "row 3" in str(caught.value)


def test_window_past_the_raster_edge_is_an_error_not_a_smaller_item(tmp_path, scene):
    frame = pd.read_csv(scene["table"])
    frame.loc[0, ["row_off", "col_off"]] = [80, 80]
    dataset = CSVWindowedSegmentationDataset(write_table(frame, tmp_path / "t.csv"), n_classes=4)
    with pytest.raises(WindowReadError, match="row 1 .*runs past the raster's 96x96"):
        dataset[0]


def test_relative_paths_resolve_against_the_table_folder_and_parquet_reads(tmp_path, scene):
    frame = pd.read_csv(scene["table"])
    frame["image_path"] = "images/scene.tif"
    frame["mask_path"] = "masks/scene.tif"
    table = write_table(frame, tmp_path / "relative.parquet")
    dataset = CSVWindowedSegmentationDataset(table, n_classes=4)
    reference = CSVWindowedSegmentationDataset(scene["table"], n_classes=4)
    assert torch.equal(dataset[3]["image"], reference[3]["image"])
    np.testing.assert_array_equal(dataset.sampler_weights, [1.0, 2.0, 0.0, 1.0])


def test_pil_reader_crops_the_same_window(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, size=(40, 50), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "tile.png")
    Image.fromarray(mask).save(tmp_path / "tile_mask.png")
    table = pd.DataFrame(
        {
            "image_path": ["tile.png"],
            "mask_path": ["tile_mask.png"],
            "row_off": [7],
            "col_off": [11],
            "patch_size": [16],
        }
    )
    dataset = CSVWindowedSegmentationDataset(
        write_table(table, tmp_path / "t.csv"), n_classes=3, use_rasterio=False
    )
    item = dataset[0]
    expected = np.moveaxis(image[7:23, 11:27], -1, 0).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(item["image"].numpy(), expected)
    np.testing.assert_array_equal(item["mask"].numpy(), mask[7:23, 11:27])


def test_worker_processes_read_the_same_items_as_the_main_process(scene):
    dataset = CSVWindowedSegmentationDataset(scene["table"], n_classes=4)
    expected = [dataset[i] for i in range(len(dataset))]  # opens handles before the fork
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    for got, want in zip(loader, expected, strict=True):
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["mask"], want["mask"])


def test_image_dtype_that_would_lose_values_is_an_error_and_uint16_scales(tmp_path):
    image_path, mask_path, image, _ = write_scene(tmp_path, "u16", size=32, dtype="uint16")
    table = write_table(grid_rows(image_path, mask_path, 32, 32), tmp_path / "t.csv")
    with pytest.raises(WindowReadError, match="uint16 and cannot become image_dtype uint8"):
        CSVWindowedSegmentationDataset(table, n_classes=4)[0]
    item = CSVWindowedSegmentationDataset(table, n_classes=4, image_dtype="uint16")[0]
    np.testing.assert_allclose(item["image"].numpy(), image / 65535.0, rtol=1e-6)


def test_drop_excluded_leaves_out_excluded_rows_but_errors_name_table_rows(tmp_path, scene):
    frame = pd.read_csv(scene["table"])
    frame["excluded"] = [False, True, False, False]
    frame.loc[3, "row_off"] = 90
    dataset = CSVWindowedSegmentationDataset(
        write_table(frame, tmp_path / "t.csv"), n_classes=4, drop_excluded=True
    )
    assert len(dataset) == 3
    np.testing.assert_array_equal(dataset.sampler_weights, [1.0, 0.0, 1.0])
    with pytest.raises(WindowReadError, match="row 4 "):
        dataset[2]
