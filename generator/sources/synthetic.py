"""Synthetic scenes: deterministic images with exact per-pixel class masks.

The offline default dataset. Every scene is a background of two or three textured "stuff"
regions (sky above a tilted horizon, one or two kinds of ground split by a line) with one to
four objects painted over it. Each class has its own texture and colour, jittered per scene,
and a known fine -> super class, so every protocol of the atlas (clustering, probes, retrieval
by fine / super class) has a ground truth it can be checked against.

Masks follow painting order (a later object hides an earlier one). Object outlines carry a thin
band of the ignore label, where the image blends an object into what lies behind it.

Scene ``i`` depends only on ``(seed, i)``: its layout and colours come from a generator seeded
with ``(seed, i)`` and are drawn in units of the image side, so the same scene at a different
``size`` has the same layout; only the pixel noise differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from generator.errors import PatchAtlasError
from generator.png import png_cell
from generator.sources.base import SOURCE_FEATURES, ClassInfo, SegmentationSource

# Bumped whenever the drawing code changes what any scene looks like; part of the revision.
SYNTHETIC_VERSION = "1"
SYNTHETIC_NAME = "synthetic-scenes"
SYNTHETIC_IGNORE_INDEX = 255
MAX_SIZE = 4096

SKY, GRASS, SAND, WATER, BALL, RING, BOX, ROOF = range(8)
SYNTHETIC_CLASSES: list[ClassInfo] = [
    ClassInfo(SKY, "sky", "sky", is_background=True),
    ClassInfo(GRASS, "grass", "ground", is_background=True),
    ClassInfo(SAND, "sand", "ground", is_background=True),
    ClassInfo(WATER, "water", "ground", is_background=True),
    ClassInfo(BALL, "ball", "round"),
    ClassInfo(RING, "ring", "round"),
    ClassInfo(BOX, "box", "angular"),
    ClassInfo(ROOF, "roof", "angular"),
]
GROUND_CLASSES = (GRASS, SAND, WATER)
OBJECT_CLASSES = (BALL, RING, BOX, ROOF)

BASE_COLOURS = {
    SKY: (0.50, 0.70, 0.95),
    GRASS: (0.25, 0.60, 0.20),
    SAND: (0.88, 0.78, 0.52),
    WATER: (0.10, 0.32, 0.65),
    BALL: (0.90, 0.20, 0.12),
    RING: (0.72, 0.25, 0.80),
    BOX: (0.60, 0.38, 0.16),
    ROOF: (0.15, 0.55, 0.55),
}


@dataclass(frozen=True)
class _Frame:
    """Pixel-centre coordinates of one image, in pixels."""

    yy: np.ndarray
    xx: np.ndarray
    size: int

    @classmethod
    def of(cls, size: int) -> _Frame:
        centres = np.arange(size, dtype=np.float32) + 0.5
        yy, xx = np.meshgrid(centres, centres, indexing="ij")
        return cls(yy, xx, size)


@dataclass(frozen=True)
class _Object:
    cls: int
    cx: float  # centre, in units of the image side
    cy: float
    angle: float
    dims: tuple[float, ...]  # shape sizes, in units of the image side
    colour: np.ndarray
    pattern: float  # a per-object texture parameter (stripe count, checker cells, ...)


# ---------------------------------------------------------------------------------------------
# Small texture helpers (pure)

def _jitter_colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    base = np.asarray(BASE_COLOURS[cls], dtype=np.float32)
    tint = np.exp(rng.normal(0.0, 0.10, 3)).astype(np.float32)
    brightness = np.float32(rng.uniform(0.85, 1.1))
    return np.clip(base * tint * brightness, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.random((cells + 1, cells + 1), dtype=np.float32)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def _shade(colour: np.ndarray, shade: np.ndarray) -> np.ndarray:
    return shade[..., None] * colour[None, None, :]


# ---------------------------------------------------------------------------------------------
# Background ("stuff") textures, in image coordinates

def _sky(rng: np.random.Generator, frame: _Frame, colour: np.ndarray) -> np.ndarray:
    # Brighter toward the horizon, with soft white clouds.
    rgb = _shade(colour, 0.8 + 0.35 * frame.yy / frame.size)
    cloud = np.clip((_smooth_noise(rng, frame.size, 4) - 0.5) * 3.0, 0.0, 1.0)[..., None]
    return rgb * (1.0 - cloud) + 0.97 * cloud


def _grass(rng: np.random.Generator, frame: _Frame, colour: np.ndarray) -> np.ndarray:
    # Fine vertical blades whose phase wanders, plus per-pixel grain.
    period = max(2.5, frame.size / 40.0)
    warp = _smooth_noise(rng, frame.size, 6) * 6.0
    blades = np.sin(2.0 * np.pi * frame.xx / period + warp)
    grain = rng.standard_normal(frame.yy.shape, dtype=np.float32) * 0.07
    return _shade(colour, 0.82 + 0.2 * blades + grain)


def _sand(rng: np.random.Generator, frame: _Frame, colour: np.ndarray) -> np.ndarray:
    # Speckle on gentle diagonal ripples.
    angle = rng.uniform(0.3, 1.2)
    period = frame.size / 12.0
    ripple = np.sin(2.0 * np.pi * (frame.xx * np.cos(angle) + frame.yy * np.sin(angle)) / period)
    speckle = rng.standard_normal(frame.yy.shape, dtype=np.float32) * 0.09
    return _shade(colour, 0.92 + 0.06 * ripple + speckle)


def _water(rng: np.random.Generator, frame: _Frame, colour: np.ndarray) -> np.ndarray:
    # Horizontal waves bent by a slow swell, with glints on the crests.
    period, swell = frame.size / 18.0, frame.size / 4.0
    phase = rng.uniform(0.0, 2.0 * np.pi)
    waves = np.sin(2.0 * np.pi * frame.yy / period + 1.5 * np.sin(2.0 * np.pi * frame.xx / swell + phase))
    rgb = _shade(colour, 0.85 + 0.15 * waves)
    glint = np.clip((waves - 0.85) * 4.0, 0.0, 0.6)[..., None]
    return rgb * (1.0 - glint) + glint


_BACKGROUND_TEXTURES = {SKY: _sky, GRASS: _grass, SAND: _sand, WATER: _water}


# ---------------------------------------------------------------------------------------------
# Objects: a signed distance (pixels, positive inside) and a texture in the object's own frame

def _local(obj: _Object, frame: _Frame) -> tuple[np.ndarray, np.ndarray]:
    dx = frame.xx - np.float32(obj.cx * frame.size)
    dy = frame.yy - np.float32(obj.cy * frame.size)
    c, s = np.float32(np.cos(obj.angle)), np.float32(np.sin(obj.angle))
    return c * dx + s * dy, -s * dx + c * dy


def _triangle_vertices(width: float, height: float) -> np.ndarray:
    """An isosceles triangle, apex up, centroid at the origin (image y points down)."""
    return np.array([[-width / 2, height / 3], [width / 2, height / 3], [0.0, -2 * height / 3]])


def _convex_polygon_distance(vertices: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Exact signed distance (positive inside) to a convex polygon, vertices counter-clockwise on screen.

    Inside, the distance to the nearest edge line is exact; outside, the distance to the nearest
    edge segment is used, so corners get no spikes of ignore band.
    """
    inside, outside = None, None
    for a, b in zip(vertices, np.roll(vertices, -1, axis=0)):
        edge = (b - a).astype(np.float32)
        length2 = np.float32(edge @ edge)
        du, dv = u - np.float32(a[0]), v - np.float32(a[1])
        # With y pointing down, (ey, -ex) is the inward normal of a counter-clockwise polygon.
        plane = (edge[1] * du - edge[0] * dv) / np.sqrt(length2)
        t = np.clip((du * edge[0] + dv * edge[1]) / length2, 0.0, 1.0)
        segment = np.hypot(du - t * edge[0], dv - t * edge[1])
        inside = plane if inside is None else np.minimum(inside, plane)
        outside = segment if outside is None else np.minimum(outside, segment)
    return np.where(inside >= 0, inside, -outside)


def _signed_distance(obj: _Object, u: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    """Signed distance in pixels from the object's outline, positive inside."""
    dims = [d * size for d in obj.dims]
    if obj.cls == BALL:
        return dims[0] - np.hypot(u, v)
    if obj.cls == RING:
        r = np.hypot(u, v)
        return np.minimum(r - dims[1], dims[0] - r)
    if obj.cls == BOX:
        half_u, half_v = dims
        return _convex_polygon_distance(
            np.array([[-half_u, half_v], [half_u, half_v], [half_u, -half_v], [-half_u, -half_v]]), u, v)
    if obj.cls == ROOF:
        return _convex_polygon_distance(_triangle_vertices(dims[0], dims[1]), u, v)
    raise ValueError(f"not an object class: {obj.cls}")


def _object_texture(rng: np.random.Generator, obj: _Object, u: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    dims = [d * size for d in obj.dims]
    grain = rng.standard_normal(u.shape, dtype=np.float32) * 0.03
    if obj.cls == BALL:
        # A lit sphere: Lambert shading from the upper left plus a specular spot.
        radius = dims[0]
        nx, ny = u / radius, v / radius
        nz = np.sqrt(np.clip(1.0 - nx * nx - ny * ny, 0.0, 1.0))
        light = np.clip(-0.45 * nx - 0.45 * ny + 0.77 * nz, 0.0, 1.0)
        rgb = _shade(obj.colour, 0.3 + 0.8 * light + grain)
        spot = (np.clip(light - 0.93, 0.0, None) * 8.0)[..., None]
        return rgb * (1.0 - spot) + spot
    if obj.cls == RING:
        # Alternating sectors around the ring.
        sectors = np.sin(obj.pattern * np.arctan2(v, u)) > 0
        return _shade(obj.colour, np.where(sectors, 1.0, 0.5) + grain)
    if obj.cls == BOX:
        cell = 2.0 * dims[0] / obj.pattern
        checker = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
        return _shade(obj.colour, np.where(checker, 1.05, 0.6) + grain)
    if obj.cls == ROOF:
        # Rows of shingles: a dark line at the bottom of each row.
        period = dims[1] / obj.pattern
        rows = np.mod(v / period, 1.0) < 0.72
        return _shade(obj.colour, np.where(rows, 1.0, 0.55) + grain)
    raise ValueError(f"not an object class: {obj.cls}")


def _draw_object(layout: np.random.Generator, cls: int) -> _Object:
    """Every parameter comes from the layout stream, so an object does not depend on the size."""
    cx, cy = layout.uniform(0.05, 0.95, 2)
    colour = _jitter_colour(layout, cls)
    if cls == BALL:
        return _Object(cls, cx, cy, 0.0, (layout.uniform(0.06, 0.2),), colour, 0.0)
    if cls == RING:
        outer = layout.uniform(0.09, 0.22)
        return _Object(cls, cx, cy, layout.uniform(0, np.pi), (outer, outer * layout.uniform(0.4, 0.6)), colour,
                       float(layout.integers(3, 7)))
    if cls == BOX:
        half = layout.uniform(0.06, 0.18, 2)
        return _Object(cls, cx, cy, layout.uniform(-np.pi / 4, np.pi / 4), tuple(half), colour,
                       float(layout.integers(3, 6)))
    width = layout.uniform(0.18, 0.42)
    return _Object(cls, cx, cy, layout.uniform(-0.3, 0.3), (width, width * layout.uniform(0.5, 0.9)), colour,
                   float(layout.integers(4, 7)))


# ---------------------------------------------------------------------------------------------
# Scenes

def _background_regions(layout: np.random.Generator, index: int, frame: _Frame) -> tuple[np.ndarray, list[int]]:
    """A label map of the background and the stuff classes it uses.

    The main ground class cycles with the index and the sky is left out of every fourth scene
    only, so any three consecutive scenes show every stuff class.
    """
    size = frame.size
    u, v = frame.xx / size, frame.yy / size
    ground = GROUND_CLASSES[index % len(GROUND_CLASSES)]
    others = [c for c in GROUND_CLASSES if c != ground]
    second = others[int(layout.integers(len(others)))]
    has_sky = index % 4 != 3
    labels = np.full((size, size), ground, dtype=np.uint8)
    if has_sky:
        level, slope = layout.uniform(0.3, 0.55), layout.uniform(-0.3, 0.3)
        split, lean = layout.uniform(0.3, 0.7), layout.uniform(-0.6, 0.6)
        if layout.random() < 0.5:
            labels[u > split + lean * (v - level)] = second
        labels[v < level + slope * (u - 0.5)] = SKY
    else:
        px, py = layout.uniform(0.35, 0.65, 2)
        angle = layout.uniform(0.0, np.pi)
        labels[(u - px) * np.cos(angle) + (v - py) * np.sin(angle) > 0] = second
    used = [c for c in (SKY, *GROUND_CLASSES) if (labels == c).any()]
    return labels, used


def _scene_streams(index: int, seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Two generators for scene ``index``: layout (size-independent draws) and pixel noise."""
    layout_seq, noise_seq = np.random.SeedSequence([seed, index]).spawn(2)
    return np.random.default_rng(layout_seq), np.random.default_rng(noise_seq)


def _check_int(value, name: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PatchAtlasError(f"{name}={value!r}: expected an integer")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise PatchAtlasError(f"{name}={value}: must be {bound}")
    return int(value)


def render_scene(index: int, size: int = 224, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index``: an RGB image (uint8 [size, size, 3]) and its fine-class mask (uint8 [size, size]).

    Mask values are ids of ``SYNTHETIC_CLASSES`` or ``SYNTHETIC_IGNORE_INDEX`` on object outlines.
    """
    index = _check_int(index, "index", 0)
    size = _check_int(size, "size", 16, MAX_SIZE)
    seed = _check_int(seed, "seed", 0)
    layout, noise = _scene_streams(index, seed)
    frame = _Frame.of(size)

    background, stuff = _background_regions(layout, index, frame)
    image = np.zeros((size, size, 3), dtype=np.float32)
    colours = {cls: _jitter_colour(layout, cls) for cls in (SKY, *GROUND_CLASSES)}
    for cls in stuff:
        region = background == cls
        image[region] = _BACKGROUND_TEXTURES[cls](noise, frame, colours[cls])[region]
    mask = background.copy()

    # One object class cycles with the index (any four consecutive scenes show every class) and
    # is painted last, so it is never hidden.
    n_objects = int(layout.integers(1, 5))
    classes = [OBJECT_CLASSES[int(c)] for c in layout.integers(len(OBJECT_CLASSES), size=n_objects - 1)]
    classes.append(OBJECT_CLASSES[index % len(OBJECT_CLASSES)])
    objects = [_draw_object(layout, cls) for cls in classes]

    band = max(0.75, size / 300.0)  # half-width of the ignore band, pixels
    for obj in objects:
        u, v = _local(obj, frame)
        distance = _signed_distance(obj, u, v, size)
        near = distance > -band
        if not near.any():
            continue
        texture = _object_texture(noise, obj, u[near], v[near], size)
        alpha = np.clip(distance[near] + 0.5, 0.0, 1.0)[:, None]
        image[near] = image[near] * (1.0 - alpha) + texture * alpha
        mask[distance >= 0] = obj.cls
        mask[np.abs(distance) < band] = SYNTHETIC_IGNORE_INDEX

    image += noise.standard_normal(image.shape, dtype=np.float32) * 0.015
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), mask


def synthetic_revision(n_images: int, size: int, seed: int) -> str:
    """A short content hash: changes with the drawing code's version or any parameter."""
    key = json.dumps({"version": SYNTHETIC_VERSION, "n_images": n_images, "size": size, "seed": seed},
                     sort_keys=True)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def synthetic_scenes(n_images: int = 16, size: int = 224, seed: int = 0) -> SegmentationSource:
    """``n_images`` synthetic scenes of ``size`` x ``size`` pixels as a segmentation source."""
    import datasets

    n_images = _check_int(n_images, "n_images", 1)
    size = _check_int(size, "size", 16, MAX_SIZE)
    seed = _check_int(seed, "seed", 0)
    ids, images, masks = [], [], []
    for index in range(n_images):
        rgb, mask = render_scene(index, size, seed)
        ids.append(f"scene-{index:04d}")
        images.append(png_cell(rgb))
        masks.append(png_cell(mask))
    dataset = datasets.Dataset.from_dict({"image_id": ids, "image": images, "mask": masks}, features=SOURCE_FEATURES)
    return SegmentationSource(
        name=SYNTHETIC_NAME,
        dataset=dataset,
        classes=list(SYNTHETIC_CLASSES),
        ignore_index=SYNTHETIC_IGNORE_INDEX,
        revision=synthetic_revision(n_images, size, seed),
        license="CC0-1.0",
        description=(
            "Synthetic scenes drawn by PatchAtlas: textured sky / grass / sand / water regions with balls, "
            "rings, boxes and roofs painted over them, exact per-pixel masks (255 on object outlines)."),
        params={"n_images": n_images, "size": size, "seed": seed},
    )
