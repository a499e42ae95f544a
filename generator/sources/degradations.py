"""Image degradations and geometric transforms for the robustness and retrieval protocols.

Photometric degradations (robustness curves, after the local-representations paper):

- ``box_blur``: a k x k mean filter, k in 2/4/6/8 px;
- ``gaussian_noise``: additive N(0, sigma^2) on the 0-255 scale, sigma in 10/20/30/40, rounded and
  clipped;
- ``frequency_band_noise``: Gaussian noise kept in one of four radial frequency bands of its
  Fourier transform, transformed back and added to the image.

Geometric transforms (patch retrieval): ``shift``, ``rotate`` and ``scale`` move the image and
its class mask together and return the affine map from each transformed pixel back to the
original pixel it was sampled from, so the true source patch of every transformed patch is
known (``patch_correspondence``) and same-patch retrieval has an exact upper bound.

Conventions: images are uint8 [H, W, 3] (or [H, W]); masks are integer [H, W] class ids;
coordinates are (row, col) with pixel centres at integers, so the image covers
[-0.5, H - 0.5) x [-0.5, W - 0.5). Randomness comes only from the ``seed`` arguments.
Everything here is pure numpy/scipy: arrays in, arrays out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from generator.errors import PatchAtlasError, UnknownName
from generator.sources.geometry import InputGeometry, squash_geometry

__all__ = [
    "DEGRADATIONS",
    "FREQUENCY_NOISE_SIGMA",
    "N_FREQUENCY_BANDS",
    "TRANSFORMS",
    "AffineMap",
    "Transformed",
    "apply_degradation",
    "apply_transform",
    "box_blur",
    "frequency_band_mask",
    "frequency_band_noise",
    "gaussian_noise",
    "patch_correspondence",
    "rotate",
    "scale",
    "shift",
]

N_FREQUENCY_BANDS = 4
# Standard deviation of the white noise before band masking (the strongest Gaussian noise level).
FREQUENCY_NOISE_SIGMA = 40.0

# Robustness curves (analysis 9): name -> levels, mildest first.
DEGRADATIONS: dict[str, tuple] = {
    "blur": (2, 4, 6, 8),  # box kernel size, px
    "noise": (10, 20, 30, 40),  # Gaussian std on 0-255
    "frequency_band": (0, 1, 2, 3),  # band index, lowest frequencies first
}

# Retrieval under transformations (analysis 10): name -> levels.
TRANSFORMS: dict[str, tuple] = {
    "shift": (1, 2, 3, 4),  # diagonal shift, px (right and down)
    "rotate": (5, 10, 15, 20),  # degrees, counterclockwise
    "scale": (0.8, 0.9, 1.1, 1.2),  # zoom factor about the centre
    "blur": DEGRADATIONS["blur"],
    "noise": DEGRADATIONS["noise"],
}


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _check_image(img) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise PatchAtlasError(f"image of dtype {img.dtype}: expected uint8 pixels on 0-255 (convert with astype)")
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)) or min(img.shape[:2]) < 1:
        raise PatchAtlasError(f"image of shape {img.shape}: expected [H, W] or [H, W, 3]")
    return img


def _check_mask(mask, hw: tuple[int, int], ignore_index: int) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != hw:
        raise PatchAtlasError(f"mask of shape {mask.shape}: expected the image's height and width {hw}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise PatchAtlasError(f"mask of dtype {mask.dtype}: expected integer class ids")
    info = np.iinfo(mask.dtype)
    if not info.min <= ignore_index <= info.max:
        raise PatchAtlasError(
            f"ignore_index {ignore_index} does not fit the mask dtype {mask.dtype}: widen the mask dtype"
        )
    return mask


def _check_number(value, what: str, low: float, low_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PatchAtlasError(f"{what} {value!r}: expected a number")
    value = float(value)
    if not math.isfinite(value) or value < low or (value == low and not low_inclusive):
        bound = ">=" if low_inclusive else ">"
        raise PatchAtlasError(f"{what} {value!r}: expected a finite number {bound} {low}")
    return value


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Photometric degradations
# --------------------------------------------------------------------------------------------


def box_blur(img, kernel_px: int) -> np.ndarray:
    """Mean over a ``kernel_px`` x ``kernel_px`` window, per channel, rounded to uint8.

    An even kernel has no centre pixel: the window covers rows/cols
    [i - k//2, i + k - 1 - k//2] (one more pixel before than after), the anchor convention of
    OpenCV's ``cv2.blur``; borders are mirrored without repeating the edge pixel
    (``BORDER_REFLECT_101``, scipy's ``mirror``). ``kernel_px`` = 1 returns the image unchanged.
    """
    img = _check_image(img)
    if isinstance(kernel_px, bool) or not isinstance(kernel_px, (int, np.integer)) or kernel_px < 1:
        raise PatchAtlasError(f"kernel_px {kernel_px!r}: expected a positive integer kernel size in pixels")
    k = int(kernel_px)
    if k == 1:
        return img.copy()
    size = (k, k) if img.ndim == 2 else (k, k, 1)
    return _to_uint8(ndimage.uniform_filter(img.astype(np.float64), size=size, mode="mirror"))


def gaussian_noise(img, sigma: float, seed: int = 0) -> np.ndarray:
    """``img`` + N(0, sigma^2) noise drawn independently per pixel and channel, rounded and
    clipped to 0-255. The same seed gives the same noise."""
    img = _check_image(img)
    sigma = _check_number(sigma, "sigma", 0.0)
    noise = np.random.default_rng(seed).normal(0.0, sigma, size=img.shape)
    return _to_uint8(img.astype(np.float64) + noise)


def _radial_frequency(h: int, w: int) -> np.ndarray:
    """|f| in cycles per pixel for every bin of an unshifted 2-D FFT of an h x w array."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    return np.sqrt(fy * fy + fx * fx)


def frequency_band_mask(h: int, w: int, band: int, n_bands: int = N_FREQUENCY_BANDS) -> np.ndarray:
    """Boolean [h, w] mask (unshifted FFT layout) of one radial frequency band.

    The radial frequency |f| (cycles per pixel, same units along both axes so bands are rings
    whatever the aspect ratio) is cut at multiples of 0.5 / n_bands: band b keeps
    b * 0.5 / n_bands <= |f| < (b + 1) * 0.5 / n_bands, and the last band also keeps the corners
    beyond the axis Nyquist frequency 0.5. The bands tile the spectrum; band 0 holds the mean.
    """
    if isinstance(n_bands, bool) or not isinstance(n_bands, (int, np.integer)) or n_bands < 1:
        raise PatchAtlasError(f"n_bands {n_bands!r}: expected a positive integer")
    if isinstance(band, bool) or not isinstance(band, (int, np.integer)) or not 0 <= band < n_bands:
        raise PatchAtlasError(f"band {band!r}: expected an integer in [0, {n_bands})")
    width = 0.5 / n_bands
    r = _radial_frequency(h, w)
    low = r >= band * width
    high = r < (band + 1) * width if band < n_bands - 1 else np.ones_like(low)
    return low & high


def frequency_band_noise(
    img,
    band: int,
    sigma: float = FREQUENCY_NOISE_SIGMA,
    seed: int = 0,
    *,
    n_bands: int = N_FREQUENCY_BANDS,
    match_std: bool = False,
) -> np.ndarray:
    """``img`` + Gaussian noise restricted to one radial frequency band, rounded and clipped.

    White noise N(0, sigma^2) of the image's shape is Fourier transformed per channel, multiplied
    by ``frequency_band_mask`` and transformed back; the real result is added to the image (the
    paper's x + F^-1(M . F(n))). The band-limited noise then has std about
    sigma * sqrt(band area share), so wider outer bands carry more energy; ``match_std=True``
    rescales it to std sigma so that bands differ in frequency only.
    """
    img = _check_image(img)
    sigma = _check_number(sigma, "sigma", 0.0)
    h, w = img.shape[:2]
    mask = frequency_band_mask(h, w, band, n_bands)
    noise = np.random.default_rng(seed).normal(0.0, sigma, size=img.shape)
    spectrum = np.fft.fft2(noise, axes=(0, 1))
    if img.ndim == 3:
        spectrum *= mask[:, :, None]
    else:
        spectrum *= mask
    # The mask is symmetric under f -> -f, so the inverse is real up to rounding.
    band_noise = np.fft.ifft2(spectrum, axes=(0, 1)).real
    if match_std:
        std = band_noise.std()
        if std > 0:
            band_noise *= sigma / std
    return _to_uint8(img.astype(np.float64) + band_noise)


# --------------------------------------------------------------------------------------------
# Geometric transforms
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AffineMap:
    """(row, col) -> A @ (row, col) + b: from transformed-image pixel coordinates to the
    original image's. ``matrix`` is the 2 x 2 A, ``offset`` the b."""

    matrix: tuple[tuple[float, float], tuple[float, float]]
    offset: tuple[float, float]

    @staticmethod
    def identity() -> AffineMap:
        return AffineMap(((1.0, 0.0), (0.0, 1.0)), (0.0, 0.0))

    def __call__(self, points) -> np.ndarray:
        """Map points [..., 2] (row, col) to float64 [..., 2]."""
        p = np.asarray(points, dtype=np.float64)
        if p.shape[-1:] != (2,):
            raise PatchAtlasError(f"points of shape {p.shape}: expected (row, col) pairs in the last axis")
        return p @ np.asarray(self.matrix).T + np.asarray(self.offset)

    def inverse(self) -> AffineMap:
        a = np.linalg.inv(np.asarray(self.matrix))
        b = -a @ np.asarray(self.offset)
        return AffineMap(tuple(map(tuple, a.tolist())), tuple(b.tolist()))


@dataclass
class Transformed:
    """A transformed image, its mask (None if none was given) and the map to original coordinates."""

    image: np.ndarray
    mask: np.ndarray | None
    to_source: AffineMap


def _about_centre(matrix: np.ndarray, h: int, w: int) -> AffineMap:
    """The affine map p -> c + matrix (p - c), c the image centre."""
    c = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    return AffineMap(tuple(map(tuple, matrix.tolist())), tuple((c - matrix @ c).tolist()))


def _warp(img: np.ndarray, mask: np.ndarray | None, to_source: AffineMap, fill: int, ignore_index: int) -> Transformed:
    """Resample image (bilinear) and mask (nearest) at the source point of every output pixel.

    Output pixels whose source point falls outside the original image get ``fill`` and
    ``ignore_index``; image and mask use the same domain test, so they agree on what is defined.
    """
    h, w = img.shape[:2]
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    src = to_source(np.stack([rows, cols], axis=-1))
    sr, sc = src[..., 0], src[..., 1]
    inside = (sr >= -0.5) & (sr < h - 0.5) & (sc >= -0.5) & (sc < w - 0.5)
    channels = img[..., None] if img.ndim == 2 else img
    # Sampling clamps at the edge; pixels outside the image are overwritten with fill below.
    out = np.stack(
        [ndimage.map_coordinates(channels[..., ch].astype(np.float64), [sr, sc], order=1, mode="nearest")
         for ch in range(channels.shape[2])],
        axis=-1,
    )
    out = _to_uint8(out)
    out[~inside] = fill
    out = out[..., 0] if img.ndim == 2 else out
    new_mask = None
    if mask is not None:
        # floor(x + 0.5) is the pixel whose footprint holds x; clipping only touches outside points.
        mr = np.clip(np.floor(sr + 0.5).astype(np.int64), 0, h - 1)
        mc = np.clip(np.floor(sc + 0.5).astype(np.int64), 0, w - 1)
        new_mask = mask[mr, mc].copy()
        new_mask[~inside] = ignore_index
    return Transformed(out, new_mask, to_source)


def _check_fill(fill) -> int:
    if isinstance(fill, bool) or not isinstance(fill, (int, np.integer)) or not 0 <= fill <= 255:
        raise PatchAtlasError(f"fill {fill!r}: expected an integer pixel value in 0-255")
    return int(fill)


def shift(img, mask=None, dx: float = 0, dy: float = 0, *, fill: int = 0, ignore_index: int = 255) -> Transformed:
    """Move the content ``dx`` px right and ``dy`` px down (negative: left / up), same size.

    The strip uncovered at the border is ``fill`` in the image and ``ignore_index`` in the mask.
    Integer shifts copy pixels exactly; fractional ones interpolate bilinearly.
    """
    img = _check_image(img)
    mask = _check_mask(mask, img.shape[:2], ignore_index)
    dx, dy = _check_number(dx, "dx", -math.inf), _check_number(dy, "dy", -math.inf)
    to_source = AffineMap(((1.0, 0.0), (0.0, 1.0)), (-dy, -dx))
    return _warp(img, mask, to_source, _check_fill(fill), ignore_index)


def rotate(img, mask=None, degrees: float = 0.0, *, fill: int = 0, ignore_index: int = 255) -> Transformed:
    """Rotate ``degrees`` counterclockwise (as seen on screen) about the image centre, same size.

    Corners rotated in from outside the original are ``fill`` / ``ignore_index``.
    """
    img = _check_image(img)
    mask = _check_mask(mask, img.shape[:2], ignore_index)
    theta = math.radians(_check_number(degrees, "degrees", -math.inf))
    cos, sin = math.cos(theta), math.sin(theta)
    # Rows grow downwards, so a counterclockwise turn sends (row, col) offsets (0, 1) to (-1, 0)
    # forward; this is its inverse, from output to source.
    to_source = np.array([[cos, sin], [-sin, cos]])
    h, w = img.shape[:2]
    return _warp(img, mask, _about_centre(to_source, h, w), _check_fill(fill), ignore_index)


def scale(img, mask=None, factor: float = 1.0, *, fill: int = 0, ignore_index: int = 255) -> Transformed:
    """Zoom by ``factor`` about the image centre, same size: > 1 enlarges (the border is cropped),
    < 1 shrinks (a ``fill`` / ``ignore_index`` frame appears)."""
    img = _check_image(img)
    mask = _check_mask(mask, img.shape[:2], ignore_index)
    factor = _check_number(factor, "factor", 0.0, low_inclusive=False)
    h, w = img.shape[:2]
    return _warp(img, mask, _about_centre(np.eye(2) / factor, h, w), _check_fill(fill), ignore_index)


def patch_correspondence(to_source: AffineMap, image_hw: tuple[int, int], grid_hw: tuple[int, int],
                         geometry: InputGeometry | None = None) -> np.ndarray:
    """Source patch (row, col) of every patch of a transformed image: int64 [gh, gw, 2].

    The source patch is the one of the original image's grid that contains the source point of
    the transformed patch's centre (the paper's definition); -1 where that point lies outside
    the original image or outside the part of it the model sees. ``geometry`` is how an image of
    ``image_hw`` becomes the model input (``sources.geometry.input_geometry``; the transformed
    image has the original's size, so both follow the same one); None: the whole image resized
    to the input, so a patch spans H / gh x W / gw image pixels.
    """
    h, w = (int(v) for v in image_hw)
    gh, gw = (int(v) for v in grid_hw)
    if min(h, w, gh, gw) < 1:
        raise PatchAtlasError(f"image_hw {image_hw!r} and grid_hw {grid_hw!r}: expected positive sizes")
    geometry = geometry or squash_geometry((h, w), (gh, gw))

    def window(axis, n):  # where the kept window starts, and one patch's span, in image pixels
        scale = axis.source / axis.resized
        return axis.offset * scale, (axis.length / n) * scale

    def to_image(axis, n):  # patch centres, in image pixel indices (centre of pixel y is y)
        start, span = window(axis, n)
        return start + (np.arange(n) + 0.5) * span - 0.5

    def to_patch(axis, n, y):  # the patch holding image point y (pixel index coordinates)
        start, span = window(axis, n)
        return np.floor((y + 0.5 - start) / span).astype(np.int64)

    rows, cols = np.meshgrid(to_image(geometry.rows, gh), to_image(geometry.cols, gw), indexing="ij")
    src = to_source(np.stack([rows, cols], axis=-1))
    pr, pc = to_patch(geometry.rows, gh, src[..., 0]), to_patch(geometry.cols, gw, src[..., 1])
    valid = (pr >= 0) & (pr < gh) & (pc >= 0) & (pc < gw)
    out = np.stack([pr, pc], axis=-1)
    out[~valid] = -1
    return out


# --------------------------------------------------------------------------------------------
# Dispatch by name
# --------------------------------------------------------------------------------------------


def apply_degradation(img, name: str, level, *, seed: int = 0) -> np.ndarray:
    """The photometric degradation ``name`` of ``DEGRADATIONS`` at ``level``."""
    if name == "blur":
        return box_blur(img, level)
    if name == "noise":
        return gaussian_noise(img, level, seed)
    if name == "frequency_band":
        return frequency_band_noise(img, level, FREQUENCY_NOISE_SIGMA, seed)
    raise UnknownName(f"degradation {name!r}: expected one of {', '.join(DEGRADATIONS)}")


def apply_transform(
    img, mask, name: str, level, *, seed: int = 0, fill: int = 0, ignore_index: int = 255
) -> Transformed:
    """The transform ``name`` of ``TRANSFORMS`` at ``level``, with its map back to the original.

    Photometric ones (blur, noise) leave geometry alone: their map is the identity.
    """
    if name == "shift":
        return shift(img, mask, level, level, fill=fill, ignore_index=ignore_index)
    if name == "rotate":
        return rotate(img, mask, level, fill=fill, ignore_index=ignore_index)
    if name == "scale":
        return scale(img, mask, level, fill=fill, ignore_index=ignore_index)
    if name in ("blur", "noise"):
        image = apply_degradation(img, name, level, seed=seed)
        checked = _check_mask(mask, image.shape[:2], ignore_index)
        return Transformed(image, None if checked is None else checked.copy(), AffineMap.identity())
    raise UnknownName(f"transform {name!r}: expected one of {', '.join(TRANSFORMS)}")
