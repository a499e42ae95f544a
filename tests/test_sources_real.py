"""Real-data sources: local folders (checked file by file), Hub datasets (offline behaviour and
reshaping), and the few-shot protocol presets (splits and tiling)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from generator.errors import PatchAtlasError
from generator.sources import hub
from generator.sources.hub import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABELS,
    HUB_DATASETS,
    VOC_CLASSES,
    hub_source,
    label_lut,
    remap_mask,
)
from generator.sources.local_folder import local_folder_source
from generator.sources.presets import (
    CITYSCAPES_TRAIN_CITIES,
    CITYSCAPES_VAL_CITIES,
    ade20k_fewshot_split,
    cityscapes_72_30_split,
    tile_256,
    tile_image,
)

CLASSES = [
    {"id": 0, "name": "road", "super_name": "flat", "is_background": True},
    {"id": 1, "name": "car", "super_name": "vehicle", "is_background": False},
    {"id": 2, "name": "bus", "super_name": "vehicle", "is_background": False},
]
H, W = 12, 16


def _mask_array(seed: int) -> np.ndarray:
    mask = np.random.default_rng(seed).integers(0, 3, (H, W)).astype(np.uint8)
    mask[0, :3] = 255
    return mask


def _write_folder(root: Path) -> dict[str, np.ndarray]:
    """A good folder with one image per awkward mode; returns the masks written, by id."""
    (root / "images" / "city").mkdir(parents=True)
    (root / "masks" / "city").mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps(CLASSES))
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "images" / "a_rgb.png")
    Image.fromarray(rgb[..., 0]).save(root / "images" / "b_grey.png")
    Image.fromarray(np.dstack([rgb, np.full((H, W), 7, np.uint8)])).save(root / "images" / "c_rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "images" / "d_cmyk.jpg")
    Image.fromarray(np.full((H, W), 65535, np.uint16)).save(root / "images" / "e_16bit.png")
    Image.fromarray(rgb).save(root / "images" / "city" / "f_nested.jpeg")
    masks = {}
    for i, key in enumerate(["a_rgb", "b_grey", "c_rgba", "d_cmyk", "e_16bit", "city/f_nested"]):
        masks[key] = _mask_array(i)
        Image.fromarray(masks[key]).save(root / "masks" / f"{key}.png")
    # A palette mask whose colours would read as other numbers if converted to grey: the
    # source must use the indices.
    palette_mask = Image.frombytes("P", (W, H), masks["a_rgb"].tobytes())
    palette = [0] * 768
    palette[0:9] = [200, 10, 10, 10, 200, 10, 10, 10, 200]
    palette[255 * 3:255 * 3 + 3] = [255, 255, 255]
    palette_mask.putpalette(palette)
    palette_mask.save(root / "masks" / "a_rgb.png")
    return masks


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "scenes"
    masks = _write_folder(root)
    return root, masks


def test_local_folder_loads_every_image_mode(folder):
    root, masks = folder
    source = local_folder_source(str(root))
    ds = source.dataset
    assert ds.column_names == ["image_id", "image", "mask"]
    assert ds["image_id"] == sorted(masks)
    assert [c.name for c in source.classes] == ["road", "car", "bus"]
    assert source.classes[0].is_background and source.classes[1].super_name == "vehicle"
    assert source.ignore_index == 255 and source.name == "local-scenes"
    for row in ds:
        image, mask = row["image"], np.asarray(row["mask"])
        assert image.mode == "RGB" and image.size == (W, H)
        np.testing.assert_array_equal(mask, masks[row["image_id"]])  # palette indices, not colours
    by_id = {row["image_id"]: np.asarray(row["image"]) for row in ds}
    assert (by_id["e_16bit"] == 255).all()  # 16-bit full scale -> 8-bit full scale
    np.testing.assert_array_equal(by_id["c_rgba"], by_id["a_rgb"])  # alpha dropped, colour kept
    assert np.ptp(by_id["b_grey"].astype(int), axis=2).max() == 0  # grey -> equal channels


def test_local_folder_revision_is_stable_and_follows_content(folder):
    root, masks = folder
    first = local_folder_source(str(root)).revision
    assert local_folder_source(str(root)).revision == first
    changed = masks["b_grey"].copy()
    changed[5, 5] = (changed[5, 5] + 1) % 3
    Image.fromarray(changed).save(root / "masks" / "b_grey.png")
    second = local_folder_source(str(root)).revision
    assert second != first
    classes = json.loads((root / "classes.json").read_text())
    classes[2]["name"] = "tram"
    (root / "classes.json").write_text(json.dumps(classes))
    assert local_folder_source(str(root)).revision not in (first, second)


def _break_missing_mask(root):
    (root / "masks" / "b_grey.png").unlink()
    return "b_grey"


def _break_missing_image(root):
    (root / "images" / "d_cmyk.jpg").unlink()
    return "d_cmyk.png"


def _break_size(root):
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(root / "masks" / "c_rgba.png")
    return "c_rgba.png"


def _break_values(root):
    mask = _mask_array(1)
    mask[3, 3] = 9
    Image.fromarray(mask).save(root / "masks" / "b_grey.png")
    return "b_grey.png"


def _break_corrupt(root):
    (root / "images" / "a_rgb.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return "a_rgb.png"


def _break_rgb_mask(root):
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "masks" / "e_16bit.png")
    return "e_16bit.png"


def _break_empty(root):
    for sub in ("images", "masks"):
        for path in sorted((root / sub).rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
    return "images"


def _break_classes_missing(root):
    (root / "classes.json").unlink()
    return "classes.json"


def _break_classes_duplicate(root):
    (root / "classes.json").write_text(json.dumps(CLASSES + [{"id": 1, "name": "van"}]))
    return "classes.json"


def _break_jpeg_mask(root):
    (root / "masks" / "a_rgb.jpg").write_bytes(b"")
    return "a_rgb.jpg"


# Layout problems fail the whole folder. One unusable pair (_break_size, _break_values,
# _break_corrupt) is skipped and recorded instead: tests/test_bad_inputs.py.
BAD_INPUTS = {
    "image without mask": _break_missing_mask,
    "mask without image": _break_missing_image,
    "rgb mask": _break_rgb_mask,
    "empty folder": _break_empty,
    "no class list": _break_classes_missing,
    "duplicate class id": _break_classes_duplicate,
    "jpeg mask": _break_jpeg_mask,
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_local_folder_names_the_bad_file(folder, case):
    root, _ = folder
    culprit = BAD_INPUTS[case](root)
    with pytest.raises(PatchAtlasError, match=culprit):
        local_folder_source(str(root))


def test_local_folder_missing_folder_and_missing_path(tmp_path):
    with pytest.raises(PatchAtlasError, match="nowhere.*not found"):
        local_folder_source(str(tmp_path / "nowhere"))
    with pytest.raises(PatchAtlasError, match="path="):
        local_folder_source("")


def test_local_folder_rgb_mask_message_says_what_to_do(folder):
    root, _ = folder
    _break_rgb_mask(root)
    with pytest.raises(PatchAtlasError, match="single-channel"):
        local_folder_source(str(root))


# ---------------------------------------------------------------------------------------------
# Hub


@pytest.fixture
def offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_hub_offline_fails_fast_and_points_to_local_folder(offline):
    with pytest.raises(PatchAtlasError) as err:
        hub_source("scene_parse_150", split="validation")
    message = str(err.value)
    assert "scene_parse_150" in message
    assert "--source local-folder" in message and "path=" in message


def test_hub_unreachable_network_fails_fast(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)

    def never(*args, **kwargs):
        raise AssertionError("load_dataset must not be tried without a network")

    monkeypatch.setattr(datasets, "load_dataset", never)
    with pytest.raises(PatchAtlasError, match="owner/cityscapes.*unreachable.*local-folder"):
        hub_source("owner/cityscapes", classes="cityscapes")


def test_hub_unknown_layout_is_an_error():
    with pytest.raises(PatchAtlasError, match="no known layout"):
        hub_source("someone/unknown-set")
    with pytest.raises(PatchAtlasError, match="not a known layout"):
        hub_source("someone/unknown-set", classes="coco")


def test_class_tables_match_the_official_definitions():
    assert len(ADE20K_CLASSES) == 150 and len({c.name for c in ADE20K_CLASSES}) == 150
    assert [ADE20K_CLASSES[i].name for i in (0, 2, 12, 149)] == ["wall", "sky", "person", "flag"]
    assert [c.id for c in CITYSCAPES_CLASSES] == list(range(19))
    assert [c.name for c in CITYSCAPES_CLASSES] == [
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
        "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    assert {c.super_name for c in CITYSCAPES_CLASSES} == {
        "flat", "construction", "object", "nature", "sky", "human", "vehicle"}
    assert [c.is_background for c in CITYSCAPES_CLASSES].count(False) == 8  # the instance classes
    assert len(CITYSCAPES_LABELS) == 35 and [lab.id for lab in CITYSCAPES_LABELS[:-1]] == list(range(34))
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[15].name == "person" and VOC_CLASSES[0].is_background


def test_label_maps_remap_raw_masks():
    ade = label_lut(HUB_DATASETS["ade20k"].label_map, 255)
    np.testing.assert_array_equal(remap_mask(np.array([[0, 1], [150, 3]]), ade), [[255, 0], [149, 2]])
    city = label_lut(HUB_DATASETS["cityscapes"].label_map, 255)
    # unlabeled, road, parking (not evaluated), car, bicycle, license plate region stored as 0
    raw = np.array([[0, 7, 9], [26, 33, 0]])
    np.testing.assert_array_equal(remap_mask(raw, city), [[255, 0, 255], [13, 18, 255]])
    np.testing.assert_array_equal(remap_mask(raw, None), raw)
    with pytest.raises(PatchAtlasError, match="single-channel"):
        remap_mask(np.zeros((2, 2, 3), int), city)


def _fake_split(column: str, masks: list[np.ndarray]) -> datasets.Dataset:
    images = [Image.fromarray(np.full(m.shape + (3,), 40 * i, np.uint8)) for i, m in enumerate(masks)]
    return datasets.Dataset.from_dict(
        {"image": images, column: [Image.fromarray(m) for m in masks], "scene_category": [0] * len(masks)},
        features=datasets.Features({"image": datasets.Image(), column: datasets.Image(),
                                    "scene_category": datasets.Value("int32")}))


def test_hub_source_reshapes_a_loaded_split(monkeypatch):
    raw_masks = [np.array([[0, 1, 2], [150, 149, 0]], np.uint8), np.array([[5, 5, 5], [0, 0, 1]], np.uint8)]
    calls = []

    def fake_load(repo_id, config=None, split=None, revision=None):
        calls.append((repo_id, config, split, revision))
        return _fake_split("annotation", raw_masks)

    monkeypatch.setattr(hub, "_offline_flag", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    source = hub_source("scene_parse_150", split="validation", limit=2, min_side=1)  # 3x2 px images
    assert calls == [("scene_parse_150", None, "validation", None)]
    assert source.num_classes == 150 and source.ignore_index == 255
    assert source.dataset.column_names == ["image_id", "image", "mask"]
    assert source.dataset["image_id"] == ["validation-000000", "validation-000001"]
    np.testing.assert_array_equal(np.asarray(source.dataset[0]["mask"]), [[255, 0, 1], [149, 148, 255]])
    np.testing.assert_array_equal(np.asarray(source.dataset[1]["mask"]), [[4, 4, 4], [255, 255, 0]])
    assert source.dataset[1]["image"].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(source.dataset[1]["image"]), np.full((2, 3, 3), 40, np.uint8))
    assert source.revision and "/" not in source.name


def test_hub_source_names_a_missing_column(monkeypatch):
    monkeypatch.setattr(hub, "_offline_flag", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: _fake_split("label", [np.zeros((2, 2), np.uint8)]))
    with pytest.raises(PatchAtlasError, match="semantic_segmentation.*mask_column"):
        hub_source("owner/cityscapes", classes="cityscapes")
    source = hub_source("owner/cityscapes", classes="cityscapes", mask_column="label", min_side=1)
    assert (np.asarray(source.dataset[0]["mask"]) == 255).all()  # label id 0 = unlabeled


# ---------------------------------------------------------------------------------------------
# Presets

def _cityscapes_records(per_city: int = 12) -> list[tuple[str, str]]:
    cities = CITYSCAPES_TRAIN_CITIES + CITYSCAPES_VAL_CITIES + ("berlin",)  # berlin: test split, ignored
    return [(f"{city}_{seq:06d}_000019", city) for city in cities for seq in range(per_city)]


def test_cityscapes_split_counts_and_quotas():
    records = _cityscapes_records()
    train, val = cityscapes_72_30_split(records, seed=0)
    assert len(train) == 72 and len(val) == 30 and not set(train) & set(val)
    city = dict(records)
    train_cities = [city[i] for i in train]
    val_cities = [city[i] for i in val]
    assert {c: train_cities.count(c) for c in set(train_cities)} == {c: 4 for c in CITYSCAPES_TRAIN_CITIES}
    assert {c: val_cities.count(c) for c in set(val_cities)} == {c: 10 for c in CITYSCAPES_VAL_CITIES}


def test_cityscapes_split_is_deterministic_and_seeded():
    records = _cityscapes_records()
    first = cityscapes_72_30_split(records, seed=0)
    shuffled = [records[i] for i in np.random.default_rng(1).permutation(len(records))]
    assert cityscapes_72_30_split(shuffled, seed=0) == first
    # Plain Cityscapes ids carry their city in the name.
    assert cityscapes_72_30_split([f"train/{c}/{i}_leftImg8bit" for i, c in records], seed=0)[0] == \
        [f"train/{city}/{i}_leftImg8bit" for i, city in records if i in set(first[0])]
    assert cityscapes_72_30_split(records, seed=1) != first
    # Each city draws on its own: leaving one out or reordering the cities changes no other pick.
    fewer = cityscapes_72_30_split(records, seed=0, train_cities=CITYSCAPES_TRAIN_CITIES[1:])
    assert fewer[0] == [i for i in first[0] if not i.startswith("aachen")]
    flipped = cityscapes_72_30_split(records, seed=0, val_cities=CITYSCAPES_VAL_CITIES[::-1])
    assert sorted(flipped[1]) == sorted(first[1])
    # More images in one city change that city's picks only.
    extra = records + [(f"aachen_{seq:06d}_000019", "aachen") for seq in range(100, 140)]
    again = cityscapes_72_30_split(extra, seed=0)
    assert again[1] == first[1]
    assert [i for i in again[0] if not i.startswith("aachen")] == [i for i in first[0] if not i.startswith("aachen")]


def test_cityscapes_split_rejects_a_short_city():
    records = [r for r in _cityscapes_records() if not (r[1] == "lindau" and int(r[0].split("_")[1]) >= 9)]
    with pytest.raises(PatchAtlasError, match="lindau.*9 images"):
        cityscapes_72_30_split(records)


def test_ade20k_split():
    ids = [f"ADE_val_{i:08d}" for i in range(1, 201)]
    train, val = ade20k_fewshot_split(ids, 50, 30, seed=3)
    assert len(train) == 50 and len(val) == 30 and not set(train) & set(val) and set(train) <= set(ids)
    assert ade20k_fewshot_split(ids[::-1], 50, 30, seed=3) == (train, val)
    assert ade20k_fewshot_split(ids, 50, 30, seed=4) != (train, val)
    with pytest.raises(PatchAtlasError, match="exceeds"):
        ade20k_fewshot_split(ids, 150, 51)


def test_tile_256_geometry_on_a_planted_frame():
    rows, cols = np.divmod(np.arange(32), 8)
    tile_index = np.repeat(np.repeat(np.arange(32).reshape(4, 8), 256, axis=0), 256, axis=1)
    image = np.stack([tile_index * 7 % 256, tile_index, 255 - tile_index], axis=-1).astype(np.uint8)
    tiles = tile_256(image, tile_index.astype(np.uint8))
    # Tiles stay at 256 px: each encoder resizes them, and labels are read from the 256-px mask.
    assert tiles.grid == (4, 8) and tiles.images.shape == (32, 256, 256, 3) and tiles.masks.shape == (32, 256, 256)
    assert tiles.origins[9] == (256, 256) and tiles.origins[31] == (768, 1792)
    for k in range(32):
        assert (tiles.masks[k] == k).all()
        assert (tiles.images[k] == image[rows[k] * 256, cols[k] * 256]).all()  # flat tile stays flat


def test_tile_image_pads_and_resizes_like_pil():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, (300, 500)).astype(np.uint8)
    tiles = tile_image(image, mask, tile=256, out_side=224, ignore_index=255)
    assert tiles.grid == (2, 2) and tiles.images.shape == (4, 224, 224, 3)
    padded = np.zeros((256, 256, 3), np.uint8)
    padded[:, :244] = image[:256, 256:]
    expected = np.asarray(Image.fromarray(padded).resize((224, 224), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(tiles.images[1], expected)
    # Bottom-right tile: 44 real rows and 244 real columns of 256; the rest is padding.
    corner = tiles.masks[3]
    real_rows, real_cols = (corner != 255).any(axis=1).sum(), (corner != 255).any(axis=0).sum()
    assert abs(real_rows - 44 * 224 / 256) <= 1 and abs(real_cols - 244 * 224 / 256) <= 1
    assert set(np.unique(corner)) <= set(range(5)) | {255}
    assert (tiles.masks[0] != 255).all()
    assert tiles.images[3][-10:, -10:].max() == 0  # zero padding
