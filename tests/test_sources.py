"""Segmentation sources: the synthetic scene set, patch-label rules and the source registry."""

from __future__ import annotations

import dataclasses
import inspect
import io
from collections import Counter
from fractions import Fraction

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from generator.errors import PatchAtlasError, UnknownName
from generator.png import mask_png_bytes, png_bytes, png_cell
from generator.sources import synthetic
from generator.sources.base import SegmentationSource
from generator.sources.labels import (
    LABEL_RULES,
    nearest_exact_indices,
    patch_labels,
    patch_labels_majority,
    patch_labels_nearest,
    pixel_cells,
    resize_mask,
)
from generator.sources.registry import SOURCES, SourceEntry, load_source, source_names
from generator.sources.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_IGNORE_INDEX,
    render_scene,
    synthetic_revision,
    synthetic_scenes,
)

N_SET = 16
SIDE = 224
OBJECT_IDS = [c.id for c in SYNTHETIC_CLASSES if not c.is_background]
VALID_IDS = {c.id for c in SYNTHETIC_CLASSES} | {SYNTHETIC_IGNORE_INDEX}


@pytest.fixture(scope="module")
def scene_set() -> list[tuple[np.ndarray, np.ndarray]]:
    return [render_scene(i, SIDE, 0) for i in range(N_SET)]


# ------------------------------------------------------------------------------------------------
# Synthetic scenes


def test_render_scene_shapes_and_determinism():
    image, mask = render_scene(5, 96, 3)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert mask.shape == (96, 96) and mask.dtype == np.uint8
    again_image, again_mask = render_scene(5, 96, 3)
    assert image.tobytes() == again_image.tobytes()
    assert mask.tobytes() == again_mask.tobytes()


def test_scene_does_not_depend_on_set_size():
    small = synthetic_scenes(n_images=2, size=48, seed=4)
    large = synthetic_scenes(n_images=5, size=48, seed=4)
    for i in range(2):
        for column in ("image", "mask"):
            assert np.array_equal(np.asarray(small.dataset[i][column]), np.asarray(large.dataset[i][column]))
        image, mask = render_scene(i, 48, 4)
        assert np.array_equal(np.asarray(large.dataset[i]["image"]), image)
        assert np.array_equal(np.asarray(large.dataset[i]["mask"]), mask)


def test_different_seed_or_index_gives_a_different_scene():
    image, mask = render_scene(0, 64, 0)
    for other_image, other_mask in (render_scene(0, 64, 1), render_scene(1, 64, 0)):
        assert not np.array_equal(image, other_image)
        assert not np.array_equal(mask, other_mask)


def test_layout_is_the_same_at_every_size():
    _, mask_small = render_scene(7, 64, 2)
    _, mask_large = render_scene(7, 256, 2)
    agree = (resize_mask(mask_large, (64, 64)) == mask_small).mean()
    assert agree > 0.9
    # Control: another scene agrees far less.
    _, other = render_scene(8, 64, 2)
    assert (other == mask_small).mean() < agree - 0.2


def test_masks_hold_only_class_ids_or_ignore(scene_set):
    for _, mask in scene_set:
        assert set(np.unique(mask).tolist()) <= VALID_IDS


@pytest.mark.parametrize("seed", [0, 11])
def test_every_class_and_the_ignore_label_appear_in_a_set_of_16(seed):
    present = set()
    for i in range(N_SET):
        present |= set(np.unique(render_scene(i, 64, seed)[1]).tolist())
    assert present == VALID_IDS


def test_ignore_band_is_a_thin_outline_between_an_object_and_anything_else(scene_set):
    for _, mask in scene_set:
        ignore_fraction = (mask == SYNTHETIC_IGNORE_INDEX).mean()
        assert 0 < ignore_fraction < 0.05
        # No object pixel touches a pixel of another class directly: the band always separates them.
        for a, b in ((mask[:, :-1], mask[:, 1:]), (mask[:-1, :], mask[1:, :])):
            differ = (a != b) & (a != SYNTHETIC_IGNORE_INDEX) & (b != SYNTHETIC_IGNORE_INDEX)
            touches_object = np.isin(a, OBJECT_IDS) | np.isin(b, OBJECT_IDS)
            assert not (differ & touches_object).any()
        # Every ignore pixel lies close to an object pixel (acute corners and slivers thinner than the
        # band are all outline, hence a few pixels rather than one).
        distance_to_object = ndimage.distance_transform_edt(~np.isin(mask, OBJECT_IDS))
        assert distance_to_object[mask == SYNTHETIC_IGNORE_INDEX].max() <= 4.5


def test_objects_vary_in_position_and_size(scene_set):
    centroids, areas, touches_border = [], [], 0
    for _, mask in scene_set:
        objects = np.isin(mask, OBJECT_IDS)
        ys, xs = np.nonzero(objects)
        centroids.append((ys.mean(), xs.mean()))
        areas.append(objects.mean())
        border = np.concatenate([objects[0], objects[-1], objects[:, 0], objects[:, -1]])
        touches_border += bool(border.any())
    centroids = np.array(centroids)
    assert (centroids.std(axis=0) > 0.1 * SIDE).all()
    assert max(areas) > 3 * min(areas)
    assert 0 < touches_border < N_SET
    counts = [len(set(np.unique(m).tolist()) & set(OBJECT_IDS)) for _, m in scene_set]
    assert min(counts) >= 1 and max(counts) >= 3


def test_background_has_two_or_three_stuff_regions(scene_set):
    stuff_ids = [c.id for c in SYNTHETIC_CLASSES if c.is_background]
    for _, mask in scene_set:
        present = [c for c in stuff_ids if (mask == c).mean() > 0.02]
        assert 2 <= len(present) <= 3


def test_classes_are_told_apart_by_colour_and_vary_within(scene_set):
    means = {c.id: [] for c in SYNTHETIC_CLASSES}
    for image, mask in scene_set:
        for cls in means:
            region = mask == cls
            if region.sum() > 50:
                means[cls].append(image[region].mean(axis=0) / 255.0)
    overall = {cls: np.mean(v, axis=0) for cls, v in means.items()}
    ids = sorted(overall)
    gaps = [np.linalg.norm(overall[a] - overall[b]) for i, a in enumerate(ids) for b in ids[i + 1:]]
    assert min(gaps) > 0.08
    # Within-class jitter: the same class does not have one fixed colour.
    for cls, values in means.items():
        assert len(values) >= 2 and np.std(values, axis=0).max() > 0.01, SYNTHETIC_CLASSES[cls].name


def test_class_hierarchy_is_consistent():
    classes = SYNTHETIC_CLASSES
    assert [c.id for c in classes] == list(range(len(classes)))
    assert len({c.name for c in classes}) == len(classes)
    assert SYNTHETIC_IGNORE_INDEX not in {c.id for c in classes}
    stuff = [c for c in classes if c.is_background]
    things = [c for c in classes if not c.is_background]
    stuff_supers = {c.super_name for c in stuff}
    thing_supers = {c.super_name for c in things}
    assert len(stuff) >= 3 and 1 <= len(stuff_supers) <= 2
    assert len(things) >= 4 and len(thing_supers) >= 2
    assert not stuff_supers & thing_supers
    # Each object super class groups at least two fine classes, so "same super, other fine" exists.
    assert all(sum(c.super_name == s for c in things) >= 2 for s in thing_supers)


def test_dataset_columns_decode_to_rgb_images_and_l_masks():
    source = synthetic_scenes(n_images=3, size=40, seed=1)
    assert isinstance(source, SegmentationSource)
    assert source.name == "synthetic-scenes" and source.license == "CC0-1.0" and source.description
    assert source.params == {"n_images": 3, "size": 40, "seed": 1}
    assert source.ignore_index == SYNTHETIC_IGNORE_INDEX and source.classes == SYNTHETIC_CLASSES
    dataset = source.dataset
    assert dataset.column_names == ["image_id", "image", "mask"]
    assert isinstance(dataset.features["image"], datasets.Image)
    assert isinstance(dataset.features["mask"], datasets.Image)
    assert dataset.features["image_id"] == datasets.Value("string")
    assert dataset["image_id"] == ["scene-0000", "scene-0001", "scene-0002"]
    row = dataset[2]
    assert row["image"].mode == "RGB" and row["image"].size == (40, 40)
    assert row["mask"].mode == "L" and row["mask"].size == (40, 40)
    image, mask = render_scene(2, 40, 1)
    assert np.array_equal(np.asarray(row["image"]), image)
    assert np.array_equal(np.asarray(row["mask"]), mask)


def test_revision_changes_with_params_and_drawing_version(monkeypatch):
    base = synthetic_revision(16, 224, 0)
    assert base == synthetic_revision(16, 224, 0)
    assert len({base, synthetic_revision(17, 224, 0), synthetic_revision(16, 128, 0),
                synthetic_revision(16, 224, 1)}) == 4
    assert synthetic_scenes(n_images=1, size=16).revision == synthetic_revision(1, 16, 0)
    monkeypatch.setattr(synthetic, "SYNTHETIC_VERSION", synthetic.SYNTHETIC_VERSION + "-next")
    assert synthetic_revision(16, 224, 0) != base


@pytest.mark.parametrize("kwargs", [
    {"n_images": 0}, {"size": 8}, {"size": "64"}, {"seed": -1}, {"n_images": 2.5}, {"n_images": True},
])
def test_bad_scene_arguments_are_refused(kwargs):
    with pytest.raises(PatchAtlasError, match=next(iter(kwargs))):
        synthetic_scenes(**kwargs)


# ------------------------------------------------------------------------------------------------
# Patch labels


def _torch_nearest(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=size_hw, mode="nearest-exact")[0, 0].numpy()


def _random_mask(rng: np.random.Generator, shape, n_classes: int, ignore_fraction: float) -> np.ndarray:
    mask = rng.integers(0, n_classes, shape).astype(np.uint8)
    mask[rng.random(shape) < ignore_fraction] = 255
    return mask


def test_nearest_indices_match_torch_for_every_small_size():
    mismatches = []
    for n_in in range(1, 161):
        column = torch.arange(n_in, dtype=torch.float32).reshape(1, 1, n_in, 1)
        for n_out in range(1, 41):
            ref = torch.nn.functional.interpolate(column, size=(n_out, 1), mode="nearest-exact")[0, 0, :, 0]
            if not np.array_equal(nearest_exact_indices(n_in, n_out), ref.numpy().astype(np.int64)):
                mismatches.append((n_in, n_out))
    assert not mismatches


@pytest.mark.parametrize("shape,grid", [
    ((224, 224), (14, 14)), ((224, 224), (16, 16)), ((518, 518), (37, 37)), ((100, 37), (7, 5)),
    ((57, 91), (13, 9)), ((5, 7), (11, 13)), ((2, 2), (41, 41)),
])
def test_nearest_rule_equals_opencv_nearest_exact(shape, grid):
    # OpenCV's rule (the authors' cv2.resize), not torch's: the two part at exact ties, e.g. 2 -> 41.
    from test_geometry import opencv4_nearest_exact

    mask = _random_mask(np.random.default_rng(sum(shape) + sum(grid)), shape, 20, 0.1)
    labels = patch_labels_nearest(mask, grid)
    assert labels.dtype == np.int16 and labels.shape == grid
    assert np.array_equal(labels, opencv4_nearest_exact(mask, grid).astype(np.int16))


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_resize_mask_equals_torch_and_keeps_dtype(dtype):
    mask = np.random.default_rng(3).integers(0, 200, (75, 130)).astype(dtype)
    for size in ((224, 224), (60, 61), (75, 130)):
        resized = resize_mask(mask, size)
        assert resized.dtype == dtype and resized.shape == size
        assert np.array_equal(resized, _torch_nearest(mask, size).astype(dtype))


def _brute_force_majority(mask: np.ndarray, grid: tuple[int, int], ignore_index: int) -> np.ndarray:
    """Per-cell loop: a pixel belongs to the cell that holds its centre (exact fractions)."""
    height, width = mask.shape
    gh, gw = grid
    out = np.empty(grid, dtype=np.int64)
    for i in range(gh):
        rows = [y for y in range(height) if i <= Fraction(2 * y + 1, 2 * height) * gh < i + 1]
        for j in range(gw):
            cols = [x for x in range(width) if j <= Fraction(2 * x + 1, 2 * width) * gw < j + 1]
            votes = Counter(int(mask[y, x]) for y in rows for x in cols if mask[y, x] != ignore_index)
            if not votes:
                out[i, j] = ignore_index
            else:
                best = max(votes.values())
                out[i, j] = min(c for c, n in votes.items() if n == best)
    return out


@pytest.mark.parametrize("shape,grid,n_classes,ignore_fraction", [
    ((64, 64), (4, 4), 3, 0.2), ((60, 45), (7, 4), 4, 0.3), ((33, 50), (5, 6), 2, 0.5),
    ((28, 28), (14, 14), 3, 0.6), ((20, 9), (6, 5), 5, 0.0), ((9, 11), (12, 3), 3, 0.1),
])
def test_majority_rule_equals_a_per_cell_loop(shape, grid, n_classes, ignore_fraction):
    mask = _random_mask(np.random.default_rng(shape[0] * 100 + shape[1]), shape, n_classes, ignore_fraction)
    got = patch_labels_majority(mask, grid)
    assert got.dtype == np.int16
    assert np.array_equal(got, _brute_force_majority(mask, grid, 255))


def test_majority_rule_with_a_custom_ignore_label():
    rng = np.random.default_rng(8)
    mask = rng.integers(-1, 4, (30, 42)).astype(np.int16)
    assert np.array_equal(patch_labels_majority(mask, (5, 6), ignore_index=-1), _brute_force_majority(mask, (5, 6), -1))


def test_cells_are_equal_when_the_grid_divides_the_mask():
    assert np.array_equal(pixel_cells(224, 14), np.arange(224) // 16)
    sizes = np.bincount(pixel_cells(100, 7))
    assert sizes.sum() == 100 and sizes.max() - sizes.min() <= 1


def test_all_ignore_cell_is_ignore_and_ignore_does_not_vote():
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:4, :4] = 255                 # cell (0, 0): nothing labelled
    mask[:4, 4:] = 255
    mask[0, 4] = 7                     # cell (0, 1): one labelled pixel among ignores wins
    labels = patch_labels_majority(mask, (2, 2))
    assert labels.tolist() == [[255, 7], [0, 0]]
    assert (patch_labels_majority(np.full((8, 8), 255, np.uint8), (2, 2)) == 255).all()


def test_majority_ties_go_to_the_smallest_class_id():
    cell = np.array([[5, 3], [3, 5]], dtype=np.uint8)
    assert patch_labels_majority(cell, (1, 1)).item() == 3
    cell = np.array([[9, 4], [255, 255]], dtype=np.uint8)
    assert patch_labels_majority(cell, (1, 1)).item() == 4


def test_nearest_and_majority_disagree_where_the_centre_pixel_is_a_minority():
    # A 4x4 patch of class 1 with a 2x2 dot of class 2 at its centre: the sample hits the dot.
    mask = np.ones((4, 4), dtype=np.uint8)
    mask[1:3, 1:3] = 2
    assert patch_labels_nearest(mask, (1, 1)).item() == 2
    assert patch_labels_majority(mask, (1, 1)).item() == 1
    # Control: on a uniform mask the two rules agree.
    uniform = np.full((4, 4), 6, dtype=np.uint8)
    assert patch_labels_nearest(uniform, (1, 1)).item() == patch_labels_majority(uniform, (1, 1)).item() == 6


def test_patch_labels_dispatches_by_rule(scene_set):
    _, mask = scene_set[0]
    assert LABEL_RULES == ("nearest", "majority")
    assert np.array_equal(patch_labels(mask, (14, 14), "nearest"), patch_labels_nearest(mask, (14, 14)))
    assert np.array_equal(patch_labels(mask, (14, 14), "majority"), patch_labels_majority(mask, (14, 14)))
    with pytest.raises(PatchAtlasError, match=r"'mode'.*nearest, majority"):
        patch_labels(mask, (14, 14), "mode")


@pytest.mark.parametrize("mask,grid,match", [
    (np.zeros((4, 4), np.float32), (2, 2), "dtype"),
    (np.zeros((4, 4, 3), np.uint8), (2, 2), "shape"),
    (np.zeros((4, 4), np.uint8), (0, 2), "grid"),
    (np.zeros((4, 4), np.uint8), (2,), "grid"),
    (np.full((4, 4), 40000, np.int64), (2, 2), "int16"),
])
def test_bad_label_inputs_are_refused(mask, grid, match):
    for rule in LABEL_RULES:
        with pytest.raises(PatchAtlasError, match=match):
            patch_labels(mask, grid, rule)


# ------------------------------------------------------------------------------------------------
# Registry


def test_source_names_are_the_registry_rows_sorted():
    assert source_names() == sorted(SOURCES) and "synthetic-scenes" in source_names()


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_registry_row_is_a_frozen_entry_whose_defaults_fit_its_loader(name):
    entry = SOURCES[name]
    assert isinstance(entry, SourceEntry) and entry.name == name and entry.description
    inspect.signature(entry.loader).bind(**entry.default_params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.name = "other"  # type: ignore[misc]


def test_load_source_applies_params_over_defaults():
    source = load_source("synthetic-scenes", n_images=2, size=32)
    assert len(source) == 2 and source.params == {"n_images": 2, "size": 32, "seed": 0}
    assert source.revision == synthetic_revision(2, 32, 0)


def test_unknown_source_suggests_near_matches_and_lists_known_names():
    with pytest.raises(UnknownName, match=r"(?i)did you mean 'synthetic-scenes'") as err:
        load_source("synthetic-scene")
    assert ("Known sources: content-free, hub, local-folder, paper-ade20k, paper-cityscapes, synthetic-scenes"
            in str(err.value))
    with pytest.raises(UnknownName) as err:
        load_source("qqqq-zzzz")
    assert "did you mean" not in str(err.value).lower() and "synthetic-scenes" in str(err.value)


def test_unknown_source_parameter_names_the_key_and_the_valid_keys():
    with pytest.raises(PatchAtlasError, match=r"'n_image'.*n_images, seed, size"):
        load_source("synthetic-scenes", n_image=3)


def test_png_bytes_is_lossless_and_deterministic_and_mask_png_bytes_widens_past_255():
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    data = png_bytes(rgb)
    assert data == png_bytes(Image.fromarray(rgb)) == png_bytes(rgb.copy())
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), rgb)
    assert png_cell(rgb) == {"path": None, "bytes": data}
    small = np.array([[0, 3], [255, 1]])
    wide = np.array([[0, 300], [1000, 1]])
    assert Image.open(io.BytesIO(mask_png_bytes(small))).mode == "L"
    assert Image.open(io.BytesIO(mask_png_bytes(wide))).mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(mask_png_bytes(wide)))), wide)
