"""Few-shot protocol presets: which images, and how they are cut, for the published protocols.

All pure functions over image ids (or ``(image_id, city)`` records) and arrays:

- ``cityscapes_72_30_split``: 4 images from each of the 18 Cityscapes train cities (72) train
  the probes, 10 from each of the 3 val cities (30) evaluate them.
- ``tile_256``: a 1024 x 2048 Cityscapes frame, zero-padded to a multiple of 256 if needed,
  cut into 256 x 256 tiles (4 x 8), kept at 256: each encoder resizes a tile to its input (224
  in the paper) and patch labels are read from the 256-px mask, as the authors' code does.
- ``ade20k_fewshot_split``: disjoint random train / val subsets of ADE20K ids.
- ``ade20k_train_val_split``: ``n_train`` ids drawn from the ADE20K training split and
  ``n_val`` from the validation split.

Choices are seeded per city (from the seed and the city's name), so adding or dropping one
city never changes the images picked in another, and the same seed always gives the same split.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from generator.errors import PatchAtlasError
from generator.sources.labels import resize_mask

CITYSCAPES_TRAIN_CITIES: tuple[str, ...] = (
    "aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt", "hamburg", "hanover",
    "jena", "krefeld", "monchengladbach", "strasbourg", "stuttgart", "tubingen", "ulm", "weimar", "zurich",
)
CITYSCAPES_VAL_CITIES: tuple[str, ...] = ("frankfurt", "lindau", "munster")
CITYSCAPES_TRAIN_PER_CITY = 4
CITYSCAPES_VAL_PER_CITY = 10
TILE_SIDE = 256


# ---------------------------------------------------------------------------------------------
# Splits

def cityscapes_city(image_id: str) -> str:
    """The city of a Cityscapes id such as ``aachen_000000_000019_leftImg8bit`` or ``train/aachen/aachen_...``."""
    stem = PurePosixPath(str(image_id).replace("\\", "/")).name
    city = stem.split("_", 1)[0]
    if not city or city == stem:
        raise PatchAtlasError(f"image id {image_id!r}: not a Cityscapes name <city>_<sequence>_<frame>; "
                              "pass (image_id, city) records instead")
    return city


def _records(records: Iterable[str | tuple[str, str]]) -> dict[str, list[str]]:
    """Image ids grouped by city, each group sorted; duplicates rejected."""
    by_city: dict[str, list[str]] = {}
    seen: set[str] = set()
    for record in records:
        if isinstance(record, str):
            image_id, city = record, cityscapes_city(record)
        else:
            try:
                image_id, city = record
            except (TypeError, ValueError):
                raise PatchAtlasError(f"record {record!r}: expected an image id or an (image_id, city) pair") from None
            image_id, city = str(image_id), str(city)
        if image_id in seen:
            raise PatchAtlasError(f"image id {image_id!r} appears twice; ids must be unique")
        seen.add(image_id)
        by_city.setdefault(city, []).append(image_id)
    return {city: sorted(ids) for city, ids in by_city.items()}


def _city_rng(seed: int, city: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(city.encode("utf-8"))]))


def _check_count(value, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise PatchAtlasError(f"{what}={value!r}: expected an integer >= {minimum}")
    return int(value)


def pick_per_city(by_city: dict[str, list[str]], cities: Sequence[str], per_city: int, seed: int,
                  role: str) -> list[str]:
    """``per_city`` ids drawn without replacement from each of ``cities`` (city order, then id order)."""
    picked: list[str] = []
    for city in cities:
        ids = by_city.get(city, [])
        if len(ids) < per_city:
            raise PatchAtlasError(f"{role} city {city!r} has {len(ids)} images, the protocol needs {per_city}; "
                                  f"add that city's images (Cityscapes leftImg8bit) or lower the per-city count")
        chosen = _city_rng(seed, city).choice(len(ids), size=per_city, replace=False)
        picked.extend(ids[i] for i in sorted(chosen))
    return picked


def cityscapes_72_30_split(
    records: Iterable[str | tuple[str, str]],
    seed: int = 0,
    train_per_city: int = CITYSCAPES_TRAIN_PER_CITY,
    val_per_city: int = CITYSCAPES_VAL_PER_CITY,
    train_cities: Sequence[str] = CITYSCAPES_TRAIN_CITIES,
    val_cities: Sequence[str] = CITYSCAPES_VAL_CITIES,
) -> tuple[list[str], list[str]]:
    """(train ids, val ids): ``train_per_city`` from each train city, ``val_per_city`` from each val city.

    With the defaults: 4 x 18 = 72 train and 10 x 3 = 30 val images. Records of other cities are
    ignored; a city with too few images is an error.
    """
    seed = _check_count(seed, "seed")
    train_per_city = _check_count(train_per_city, "train_per_city", 1)
    val_per_city = _check_count(val_per_city, "val_per_city", 1)
    overlap = sorted(set(train_cities) & set(val_cities))
    if overlap:
        raise PatchAtlasError(f"cities {overlap} are both train and val cities; the split must keep them apart")
    by_city = _records(records)
    train = pick_per_city(by_city, train_cities, train_per_city, seed, "train")
    val = pick_per_city(by_city, val_cities, val_per_city, seed, "val")
    return train, val


def ade20k_fewshot_split(ids: Iterable[str], n_train: int, n_val: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint (train, val) id lists of sizes ``n_train`` and ``n_val`` drawn with ``seed``.

    The draw is over the sorted ids, so the input order does not matter.
    """
    n_train = _check_count(n_train, "n_train", 1)
    n_val = _check_count(n_val, "n_val", 1)
    seed = _check_count(seed, "seed")
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise PatchAtlasError("ADE20K ids: some appear twice; ids must be unique")
    if n_train + n_val > len(ids):
        raise PatchAtlasError(f"n_train={n_train} + n_val={n_val} exceeds the {len(ids)} images available")
    order = np.random.default_rng(seed).permutation(len(ids))
    ordered = sorted(ids)
    return ([ordered[i] for i in order[:n_train]], [ordered[i] for i in order[n_train:n_train + n_val]])


def _unique_ids(ids: Iterable[str], pool: str) -> list[str]:
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise PatchAtlasError(f"ADE20K {pool} ids: some appear twice; ids must be unique")
    return sorted(ids)


def _draw(ids: list[str], count: int, seed: int, pool: str) -> list[str]:
    """``count`` of the sorted ``ids`` drawn with a stream of its own per pool, returned in id order.

    The draw takes the first ``count`` of one permutation, so a larger count keeps every id a
    smaller one picked, and the other pool's count never changes this pool's picks.
    """
    if count > len(ids):
        raise PatchAtlasError(f"n_{pool}={count}: the {pool} pool has only {len(ids)} images; "
                              f"lower n_{pool} or add images")
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(pool.encode("utf-8"))]))
    return [ids[i] for i in sorted(rng.permutation(len(ids))[:count])]


def ade20k_train_val_split(train_pool: Iterable[str], val_pool: Iterable[str], n_train: int, n_val: int,
                           seed: int = 0) -> tuple[list[str], list[str]]:
    """(train ids, val ids): ``n_train`` drawn from ``train_pool`` (the ADE20K training split) and
    ``n_val`` from ``val_pool`` (the validation split), each in id order.

    The draws are over the sorted ids, so the input order does not matter; an id in both pools
    is an error, since probes must never be evaluated on their own training images.
    """
    n_train = _check_count(n_train, "n_train", 1)
    n_val = _check_count(n_val, "n_val", 1)
    seed = _check_count(seed, "seed")
    train_ids, val_ids = _unique_ids(train_pool, "train"), _unique_ids(val_pool, "val")
    shared = sorted(set(train_ids) & set(val_ids))
    if shared:
        raise PatchAtlasError(f"ADE20K ids {shared[:5]} are in both the training and the validation pool; "
                              "the pools must be disjoint")
    return _draw(train_ids, n_train, seed, "train"), _draw(val_ids, n_val, seed, "val")


# ---------------------------------------------------------------------------------------------
# Tiling

@dataclass(frozen=True)
class Tiles:
    """Tiles of one image in row-major order.

    ``images`` [N, S, S, 3] uint8, ``masks`` [N, S, S] (or None), ``grid`` (rows, cols) of tiles,
    ``tile`` the side of a tile in the input before resizing.
    """

    images: np.ndarray
    masks: np.ndarray | None
    grid: tuple[int, int]
    tile: int

    @property
    def origins(self) -> list[tuple[int, int]]:
        """(top, left) pixel of each tile in the padded input."""
        rows, cols = self.grid
        return [(r * self.tile, c * self.tile) for r in range(rows) for c in range(cols)]


def pad_to_multiple(array: np.ndarray, multiple: int, fill) -> np.ndarray:
    """``array`` padded at the bottom and right with ``fill`` so height and width divide by ``multiple``."""
    h, w = array.shape[:2]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not pad_h and not pad_w:
        return array
    widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, mode="constant", constant_values=fill)


def tile_image(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    tile: int = TILE_SIDE,
    out_side: int = TILE_SIDE,
    ignore_index: int = 255,
) -> Tiles:
    """Zero-pad ``image`` to a multiple of ``tile``, cut ``tile`` x ``tile`` tiles, resize each to ``out_side``.

    Images are resized bicubically (PIL, as torchvision does on PIL images); masks by
    nearest-exact sampling, so no class id is invented. The mask's padding is ``ignore_index``
    rather than zero, because zero is a class id (road in Cityscapes).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise PatchAtlasError(f"image of shape {image.shape} and dtype {image.dtype}: expected uint8 [H, W, 3]")
    tile = _check_count(tile, "tile", 1)
    out_side = _check_count(out_side, "out_side", 1)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise PatchAtlasError(f"mask of shape {mask.shape} does not match image of shape {image.shape[:2]}")
    padded = pad_to_multiple(image, tile, 0)
    rows, cols = padded.shape[0] // tile, padded.shape[1] // tile
    padded_mask = pad_to_multiple(mask, tile, ignore_index) if mask is not None else None
    tiles, mask_tiles = [], []
    for r in range(rows):
        for c in range(cols):
            window = (slice(r * tile, (r + 1) * tile), slice(c * tile, (c + 1) * tile))
            crop = padded[window]
            if out_side != tile:
                crop = np.asarray(Image.fromarray(crop).resize((out_side, out_side), Image.Resampling.BICUBIC))
            tiles.append(crop)
            if padded_mask is not None:
                mask_tiles.append(resize_mask(padded_mask[window], (out_side, out_side)))
    return Tiles(np.stack(tiles), np.stack(mask_tiles) if mask is not None else None, (rows, cols), tile)


def tile_256(image: np.ndarray, mask: np.ndarray | None = None, ignore_index: int = 255) -> Tiles:
    """The Cityscapes few-shot tiling: 256 x 256 tiles (4 x 8 of a 1024 x 2048 frame), not resized.

    The 256-px tile mask is what the authors sample patch labels from; resizing it to 224 first
    would sample it twice and move about 1.6 % of the labels.
    """
    return tile_image(image, mask, TILE_SIDE, TILE_SIDE, ignore_index)
