"""Palette and PNG helpers: exact colours, lossless round trips, atomic deterministic files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from generator.errors import PatchAtlasError
from generator.figures.maps import label_map_png, save_png, thumbnail, to_png_bytes, upsample_nearest
from generator.figures.palette import IGNORE_COLOR, PALETTE, colorize


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------ palette


def test_palette_is_64_distinct_colours_away_from_black():
    assert PALETTE.shape == (64, 3) and PALETTE.dtype == np.uint8
    colours = PALETTE.astype(np.float64)
    dist = np.sqrt(((colours[:, None] - colours[None]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    assert dist.min() > 20
    # The first ten (the most used ids) are strongly distinct.
    assert dist[:10, :10].min() > 60
    assert np.sqrt((colours ** 2).sum(-1)).min() > 60  # none could be mistaken for "ignored"
    assert IGNORE_COLOR.tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        PALETTE[0, 0] = 1


def test_colorize_maps_ids_to_palette_and_ignore_to_black():
    labels = np.array([[0, 1, 255], [63, 64, 130]])
    rgb = colorize(labels, ignore_index=255)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], PALETTE[0])
    np.testing.assert_array_equal(rgb[0, 1], PALETTE[1])
    np.testing.assert_array_equal(rgb[0, 2], IGNORE_COLOR)
    np.testing.assert_array_equal(rgb[1, 0], PALETTE[63])
    np.testing.assert_array_equal(rgb[1, 1], PALETTE[0])  # ids wrap around the palette
    np.testing.assert_array_equal(rgb[1, 2], PALETTE[130 % 64])


def test_colorize_honours_a_custom_ignore_index():
    rgb = colorize(np.array([[-1, 2]]), ignore_index=-1)
    np.testing.assert_array_equal(rgb[0, 0], IGNORE_COLOR)
    np.testing.assert_array_equal(rgb[0, 1], PALETTE[2])


def test_colorize_rejects_bad_maps():
    with pytest.raises(PatchAtlasError, match="2-D"):
        colorize(np.zeros((2, 2, 2), dtype=np.int64))
    with pytest.raises(PatchAtlasError, match="integer"):
        colorize(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(PatchAtlasError, match="negative"):
        colorize(np.array([[0, -3]]))


# ------------------------------------------------------------------ resizing


@pytest.mark.parametrize("src,dst", [((3, 5), (7, 11)), ((14, 14), (224, 224)), ((37, 23), (224, 100)), ((5, 5), (3, 2))])
def test_upsample_nearest_matches_pil_nearest(src, dst):
    rgb = _random_rgb(*src, seed=1)
    ref = np.asarray(Image.fromarray(rgb).resize((dst[1], dst[0]), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(upsample_nearest(rgb, dst), ref)


def test_upsample_nearest_makes_whole_blocks():
    labels = np.array([[0, 1], [2, 3]])
    up = upsample_nearest(labels, (4, 6))
    np.testing.assert_array_equal(up, np.kron(labels, np.ones((2, 3), dtype=int)))
    with pytest.raises(PatchAtlasError, match="size_hw"):
        upsample_nearest(labels, (0, 4))


def test_thumbnail_averages_areas_and_keeps_aspect():
    rgb = _random_rgb(8, 4, seed=2)
    small = thumbnail(rgb, 4)
    assert small.shape == (4, 2, 3)
    block_means = rgb.astype(np.float64).reshape(4, 2, 2, 2, 3).mean(axis=(1, 3))
    assert np.abs(small.astype(np.float64) - block_means).max() <= 1.0
    np.testing.assert_array_equal(thumbnail(rgb, 8), rgb)  # already small enough
    wide = thumbnail(_random_rgb(100, 300), 60)
    assert wide.shape == (20, 60, 3)


# ------------------------------------------------------------------ PNG encoding and files


def test_png_round_trips_exactly_and_deterministically():
    rgb = _random_rgb(17, 23, seed=3)
    data = to_png_bytes(rgb)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(_decode(data), rgb)
    assert to_png_bytes(rgb.copy()) == data
    with pytest.raises(PatchAtlasError, match="uint8"):
        to_png_bytes(rgb.astype(np.float32))
    with pytest.raises(PatchAtlasError, match="RGB"):
        to_png_bytes(rgb[..., 0])


def test_save_png_is_atomic_and_deterministic(tmp_path):
    rgb = _random_rgb(9, 9, seed=4)
    target = tmp_path / "maps" / "a.png"
    first = save_png(rgb, target)
    assert first == target
    first_bytes = target.read_bytes()
    save_png(rgb, target)
    assert target.read_bytes() == first_bytes == to_png_bytes(rgb)
    assert [p.name for p in target.parent.iterdir()] == ["a.png"]  # no temporary left behind
    save_png(rgb[::-1].copy(), target)  # overwrite in place
    np.testing.assert_array_equal(_decode(target.read_bytes()), rgb[::-1])


def test_label_map_png_colours_each_patch_block(tmp_path):
    labels = np.array([[0, 5], [255, 70]])
    path = label_map_png(labels, tmp_path / "m.png", size_hw=(8, 8))
    img = _decode(path.read_bytes())
    assert img.shape == (8, 8, 3)
    np.testing.assert_array_equal(img[:4, :4], np.broadcast_to(PALETTE[0], (4, 4, 3)))
    np.testing.assert_array_equal(img[:4, 4:], np.broadcast_to(PALETTE[5], (4, 4, 3)))
    np.testing.assert_array_equal(img[4:, :4], np.broadcast_to(IGNORE_COLOR, (4, 4, 3)))
    np.testing.assert_array_equal(img[4:, 4:], np.broadcast_to(PALETTE[70 % 64], (4, 4, 3)))
    assert label_map_png(labels, tmp_path / "default.png").exists()
    assert _decode((tmp_path / "default.png").read_bytes()).shape == (224, 224, 3)
