"""Degradations and geometric transforms: known effects on planted images."""

from __future__ import annotations

import numpy as np
import pytest

from generator.errors import PatchAtlasError, UnknownName
from generator.sources.degradations import (
    DEGRADATIONS,
    TRANSFORMS,
    AffineMap,
    apply_degradation,
    apply_transform,
    box_blur,
    frequency_band_mask,
    frequency_band_noise,
    gaussian_noise,
    patch_correspondence,
    rotate,
    scale,
    shift,
)


def noise_image(h=64, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def gray(h=96, w=96, value=128):
    return np.full((h, w, 3), value, dtype=np.uint8)


def high_frequency_energy(img):
    """Energy of the mean-removed image above half the Nyquist radius."""
    x = img.astype(np.float64)
    spec = np.abs(np.fft.fft2(x - x.mean(axis=(0, 1)), axes=(0, 1))) ** 2
    fy = np.fft.fftfreq(img.shape[0])[:, None]
    fx = np.fft.fftfreq(img.shape[1])[None, :]
    return spec[np.sqrt(fy**2 + fx**2) > 0.25].sum()


def test_tables_match_the_protocol():
    assert DEGRADATIONS == {"blur": (2, 4, 6, 8), "noise": (10, 20, 30, 40), "frequency_band": (0, 1, 2, 3)}
    assert TRANSFORMS["shift"] == (1, 2, 3, 4)
    assert TRANSFORMS["rotate"] == (5, 10, 15, 20)
    assert TRANSFORMS["scale"] == (0.8, 0.9, 1.1, 1.2)
    assert TRANSFORMS["blur"] == DEGRADATIONS["blur"] and TRANSFORMS["noise"] == DEGRADATIONS["noise"]


# --------------------------------------------------------------------------------------------
# Photometric
# --------------------------------------------------------------------------------------------


def test_blur_keeps_constant_image_and_reduces_high_frequencies_monotonically():
    for k in DEGRADATIONS["blur"]:
        np.testing.assert_array_equal(box_blur(gray(value=77), k), gray(value=77))
    img = noise_image()
    energies = [high_frequency_energy(img)] + [high_frequency_energy(box_blur(img, k)) for k in (2, 4, 6, 8)]
    assert all(a > b for a, b in zip(energies, energies[1:])), energies
    assert energies[-1] < 0.05 * energies[0]
    np.testing.assert_array_equal(box_blur(img, 1), img)


def test_blur_matches_explicit_window_mean_with_even_kernel_alignment():
    img = noise_image(20, 24)
    for k in (2, 3, 4):
        out = box_blur(img, k)
        before, after = k // 2, k - 1 - k // 2
        padded = np.pad(img.astype(np.float64), ((before, after), (before, after), (0, 0)), mode="reflect")
        ref = np.zeros(img.shape)
        for dy in range(k):
            for dx in range(k):
                ref += padded[dy : dy + 20, dx : dx + 24]
        np.testing.assert_array_equal(out, np.clip(np.rint(ref / k / k), 0, 255).astype(np.uint8))
    # A single bright pixel spreads over rows/cols [i - k//2, i + k - 1 - k//2].
    spot = np.zeros((9, 9), np.uint8)
    spot[4, 4] = 200
    assert np.argwhere(box_blur(spot, 2) > 0).tolist() == [[4, 4], [4, 5], [5, 4], [5, 5]]


def test_gaussian_noise_std_and_determinism():
    base = gray(256, 256)
    for sigma in DEGRADATIONS["noise"]:
        out = gaussian_noise(base, sigma, seed=3)
        diff = out.astype(np.float64) - base
        assert diff.mean() == pytest.approx(0.0, abs=0.3)
        # Rounding adds 1/12 to the variance; clipping is negligible at 128 +- 3.2 sigma.
        assert diff.std() == pytest.approx(np.sqrt(sigma**2 + 1 / 12), rel=0.02)
        np.testing.assert_array_equal(out, gaussian_noise(base, sigma, seed=3))
    assert not np.array_equal(gaussian_noise(base, 10, seed=1), gaussian_noise(base, 10, seed=2))
    np.testing.assert_array_equal(gaussian_noise(base, 0, seed=1), base)
    # Clipping: a white image cannot get brighter.
    assert gaussian_noise(gray(value=255), 40, seed=0).max() == 255


def band_energy_shares(diff: np.ndarray) -> np.ndarray:
    spec = np.abs(np.fft.fft2(diff, axes=(0, 1))) ** 2
    h, w = diff.shape[:2]
    return np.array([spec[frequency_band_mask(h, w, b)].sum() for b in range(4)]) / spec.sum()


def test_frequency_band_noise_energy_lies_in_its_band():
    masks = [frequency_band_mask(96, 128, b) for b in range(4)]
    total = sum(m.astype(int) for m in masks)
    assert (total == 1).all()  # the bands tile the spectrum
    assert masks[0][0, 0]  # the mean is in the lowest band
    base = gray(96, 128)
    for band in range(4):
        out = frequency_band_noise(base, band, sigma=40, seed=5)
        shares = band_energy_shares(out.astype(np.float64) - base)
        assert shares[band] > 0.95, (band, shares)
        np.testing.assert_array_equal(out, frequency_band_noise(base, band, sigma=40, seed=5))
    # Without rescaling the noise std follows the band's share of the spectrum.
    stds = [np.std(frequency_band_noise(base, b, sigma=40, seed=5).astype(float) - base) for b in range(4)]
    area = [frequency_band_mask(96, 128, b).mean() for b in range(4)]
    np.testing.assert_allclose(stds, 40 * np.sqrt(area), rtol=0.08)
    matched = frequency_band_noise(base, 0, sigma=20, seed=5, match_std=True).astype(float) - base
    assert matched.std() == pytest.approx(20, rel=0.05)


def test_frequency_band_control_white_noise_spreads_over_all_bands():
    base = gray(96, 128)
    shares = band_energy_shares(gaussian_noise(base, 20, seed=0).astype(np.float64) - base)
    area = np.array([frequency_band_mask(96, 128, b).mean() for b in range(4)])
    np.testing.assert_allclose(shares, area, atol=0.02)


def test_photometric_bad_input():
    with pytest.raises(PatchAtlasError, match="uint8"):
        box_blur(np.zeros((4, 4, 3), np.float32), 2)
    with pytest.raises(PatchAtlasError, match="kernel_px"):
        box_blur(gray(), 0)
    with pytest.raises(PatchAtlasError, match="sigma"):
        gaussian_noise(gray(), -1)
    with pytest.raises(PatchAtlasError, match="band"):
        frequency_band_noise(gray(), 4)
    with pytest.raises(UnknownName):
        apply_degradation(gray(), "jpeg", 50)


# --------------------------------------------------------------------------------------------
# Geometric
# --------------------------------------------------------------------------------------------


def planted_pixel(h=64, w=64, at=(20, 30)):
    img = np.zeros((h, w, 3), np.uint8)
    img[at] = 255
    mask = np.zeros((h, w), np.uint8)
    mask[at] = 7
    return img, mask


def test_shift_moves_planted_pixel_and_mask():
    img, mask = planted_pixel()
    for dx, dy in ((3, 0), (0, 2), (4, 4), (-2, 1)):
        out = shift(img, mask, dx, dy)
        assert np.argwhere(out.image[..., 0] == 255).tolist() == [[20 + dy, 30 + dx]]
        assert out.mask[20 + dy, 30 + dx] == 7 and (out.mask == 7).sum() == 1
        np.testing.assert_allclose(out.to_source([20 + dy, 30 + dx]), [20, 30])
    out = shift(img, mask, 3, 2)
    assert (out.mask[:2] == 255).all() and (out.mask[:, :3] == 255).all()
    assert (out.mask[2:, 3:] != 255).all()
    assert (out.image[:2] == 0).all()


def blob_image(h=96, w=96, at=(30.0, 62.0)):
    """A smooth bright blob whose centroid is the planted point, sub-pixel accurately."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blob = 250 * np.exp(-((rows - at[0]) ** 2 + (cols - at[1]) ** 2) / (2 * 2.0**2))
    return np.repeat(np.rint(blob).astype(np.uint8)[..., None], 3, axis=2)


def centroid(img):
    weight = img[..., 0].astype(np.float64)
    rows, cols = np.meshgrid(np.arange(img.shape[0]), np.arange(img.shape[1]), indexing="ij")
    return np.array([(weight * rows).sum(), (weight * cols).sum()]) / weight.sum()


@pytest.mark.parametrize("name,level", [("rotate", 20), ("rotate", -10), ("scale", 0.8), ("scale", 1.2), ("shift", 3)])
def test_planted_blob_maps_back_to_where_it_was(name, level):
    at = (30.0, 62.0)
    out = apply_transform(blob_image(at=at), None, name, level)
    np.testing.assert_allclose(out.to_source(centroid(out.image)), at, atol=1.0)


def test_rotate_direction_is_counterclockwise():
    img, mask = planted_pixel(65, 65, at=(32, 52))  # right of the centre (32, 32)
    out = rotate(img, mask, 90)
    assert np.argwhere(out.mask == 7).tolist() == [[12, 32]]  # now above the centre


@pytest.mark.parametrize("name,level", [("rotate", 15), ("scale", 0.9), ("scale", 1.1), ("rotate", 5)])
def test_patch_centres_round_trip_within_one_pixel(name, level):
    h = w = 224
    out = apply_transform(gray(h, w), np.zeros((h, w), np.uint8), name, level)
    forward = out.to_source.inverse()
    centres = np.stack(np.meshgrid(np.arange(14) * 16 + 7.5, np.arange(14) * 16 + 7.5, indexing="ij"), -1)
    np.testing.assert_allclose(out.to_source(forward(centres)), centres, atol=1e-9)
    # The correspondence agrees with the map: a transformed patch's source patch holds the
    # source point of its centre, within a pixel of that patch's footprint.
    corr = patch_correspondence(out.to_source, (h, w), (14, 14))
    src = out.to_source(centres)
    ok = corr[..., 0] >= 0
    assert ok.mean() > 0.6
    lo = corr[ok] * 16 - 0.5 - 1.0
    hi = corr[ok] * 16 + 15.5 + 1.0
    assert ((src[ok] >= lo) & (src[ok] <= hi)).all()
    # Where the source point is outside the original, there is no corresponding patch.
    outside = (src < -0.5).any(-1) | (src >= 223.5).any(-1)
    np.testing.assert_array_equal(~ok, outside)


def test_correspondence_identity_shift_and_rotation_upper_bound():
    ident = patch_correspondence(AffineMap.identity(), (224, 224), (14, 14))
    np.testing.assert_array_equal(ident[..., 0], np.repeat(np.arange(14)[:, None], 14, 1))
    np.testing.assert_array_equal(ident[..., 1], np.repeat(np.arange(14)[None, :], 14, 0))
    # A 4 px shift keeps every patch centre inside its own source patch (8 px from its edge).
    moved = apply_transform(gray(224, 224), None, "shift", 4)
    np.testing.assert_array_equal(patch_correspondence(moved.to_source, (224, 224), (14, 14)), ident)
    # Rotation loses the corners: the same-patch upper bound falls with the angle.
    bounds = []
    for deg in TRANSFORMS["rotate"]:
        out = apply_transform(gray(224, 224), None, "rotate", deg)
        bounds.append((patch_correspondence(out.to_source, (224, 224), (14, 14))[..., 0] >= 0).mean())
    assert 1.0 >= bounds[0] > bounds[-1] > 0.7
    assert all(a >= b for a, b in zip(bounds, bounds[1:]))


def test_transform_masks_are_nearest_and_mark_undefined():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 5, (64, 64)).astype(np.uint8)
    img = noise_image(64, 64)
    for name, level in (("rotate", 10), ("scale", 0.8), ("scale", 1.2), ("shift", 2)):
        out = apply_transform(img, mask, name, level)
        assert out.mask.dtype == mask.dtype
        assert set(np.unique(out.mask)) <= {0, 1, 2, 3, 4, 255}  # no blended ids
        # Each defined mask pixel is the original class at its rounded source point.
        rows, cols = np.nonzero(out.mask != 255)
        src = np.floor(out.to_source(np.stack([rows, cols], -1)) + 0.5).astype(int)
        np.testing.assert_array_equal(out.mask[rows, cols], mask[src[:, 0], src[:, 1]])
    assert (apply_transform(img, mask, "scale", 0.8).mask == 255).any()
    assert not (apply_transform(img, mask, "scale", 1.2).mask == 255).any()
    blurred = apply_transform(img, mask, "blur", 4)
    np.testing.assert_array_equal(blurred.mask, mask)
    assert blurred.to_source == AffineMap.identity()


def test_geometric_bad_input():
    img, mask = planted_pixel()
    with pytest.raises(PatchAtlasError, match="mask of shape"):
        shift(img, mask[:10], 1, 1)
    with pytest.raises(PatchAtlasError, match="factor"):
        scale(img, mask, 0)
    with pytest.raises(PatchAtlasError, match="does not fit"):
        rotate(img, mask.astype(np.int8), 5)
    with pytest.raises(UnknownName):
        apply_transform(img, mask, "shear", 5)
