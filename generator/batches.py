"""Images in batches, with their patch labels, as every pass over a source reads them.

Extraction, the layer-wise streaming pass and the degraded variants all read a source the same
way: in dataset order, RGB uint8 images and their masks, each mask reduced to one label per
patch of the model's grid by the label rule.

Images are decoded in one of two places (``--decode``):

- ``host`` (the default): PIL on the CPU, through the ``datasets`` Image feature; every image
  becomes an [H, W, 3] uint8 array.
- ``device``: JPEGs are decoded by ``torchvision.io.decode_jpeg`` on the model's device (nvJPEG
  on CUDA, libjpeg-turbo on the CPU), a batch in one call, into [3, H, W] uint8 tensors there.
  A GPU takes thousands of JPEGs a second this way, more than the host's cores decode with PIL.
  Every other image (PNG, CMYK or EXIF-rotated JPEGs, anything torchvision refuses) is decoded
  as on the host, so which images take which route never changes what an image is. On the CPU
  both routes run libjpeg-turbo with the same settings and give the same pixels; nvJPEG's
  inverse DCT and chroma upsampling may differ from libjpeg's by a few levels.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from generator.concurrency import prefetched
from generator.errors import PatchAtlasError, WeightsUnavailable
from generator.models.encoder import Encoder, load_encoder
from generator.models.registry import ModelEntry
from generator.sources.geometry import check_resize
from generator.sources.images import to_rgb8
from generator.sources.labels import input_patch_labels

if TYPE_CHECKING:  # for annotations only: extract imports this module
    from generator.extract import ExtractOptions

DECODE_MODES = ("host", "device")
JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG colour modes whose RGB pixels libjpeg alone defines (PIL names them so); CMYK and YCCK
# JPEGs go through PIL's own conversion instead.
DEVICE_JPEG_MODES = ("RGB", "L")
EXIF_ORIENTATION = 0x0112

# An image as a batch holds it: an [H, W, 3] uint8 array, or a [3, H, W] uint8 tensor on the
# model's device when it was decoded there.
Pixels = np.ndarray | torch.Tensor
Batch = tuple[list[str], list[Pixels], list[np.ndarray]]


def check_decode(decode: str) -> None:
    if decode not in DECODE_MODES:
        raise PatchAtlasError(f"--decode {decode!r}: expected one of {', '.join(DECODE_MODES)} (host: PIL on the "
                              "CPU; device: JPEGs decoded on the model's device)")


def rgb8_array(img: Image.Image) -> np.ndarray:
    """A decoded image as the [H, W, 3] uint8 array every pass feeds the model."""
    return np.asarray(to_rgb8(img))


def iter_batches(dataset: datasets.Dataset, batch_size: int) -> Iterator[Batch]:
    """(image ids, RGB uint8 arrays, mask arrays) in order, ``batch_size`` at a time."""
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start:start + batch_size]
        images = [rgb8_array(img) for img in rows["image"]]
        masks = [np.asarray(m) for m in rows["mask"]]
        yield list(rows["image_id"]), images, masks


def _encoded_bytes(cell: dict) -> bytes | None:
    """The encoded file of a ``datasets.Image`` cell read with ``decode=False``; None for a
    file that is not local (``datasets`` knows how to open those)."""
    if cell.get("bytes"):
        return cell["bytes"]
    path = cell.get("path")
    if path and os.path.isfile(path):
        with open(path, "rb") as fh:
            return fh.read()
    return None


def device_decodable(data: bytes) -> bool:
    """Whether ``decode_jpeg`` gives the pixels the host path gives for ``data``: an 8-bit grey or
    colour JPEG without an EXIF rotation (``datasets`` rotates such images upright; torchvision
    on CUDA cannot). Only the header is read."""
    if not data.startswith(JPEG_MAGIC):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            return (img.format == "JPEG" and img.mode in DEVICE_JPEG_MODES
                    and img.getexif().get(EXIF_ORIENTATION) in (None, 1))
    except Exception:  # the host path decodes it, and raises what the host path raises
        return False


def decode_jpegs(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Encoded JPEGs (1-D uint8 CPU tensors) as [3, H, W] uint8 RGB tensors on ``device``, in one
    call; None for each one torchvision cannot decode."""
    if not jpegs:
        return []
    try:
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        # One image it refuses fails the whole call: decode one at a time to find which.
        decoded: list[torch.Tensor | None] = []
        for data in jpegs:
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


def iter_device_batches(dataset: datasets.Dataset, batch_size: int, device: torch.device) -> Iterator[Batch]:
    """As ``iter_batches``, with the JPEGs of each batch decoded on ``device`` in one call into
    [3, H, W] uint8 tensors there; every other image is an array decoded as ``iter_batches`` does."""
    feature = dataset.features["image"]
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    for start in range(0, len(raw), batch_size):
        rows = raw[start:start + batch_size]
        cells = rows["image"]
        images: list[Pixels | None] = [None] * len(cells)
        jpeg_at, jpegs = [], []
        for i, cell in enumerate(cells):
            data = _encoded_bytes(cell)
            if data is not None and device_decodable(data):
                jpeg_at.append(i)
                # bytearray: torch wants a writable buffer; the copy is the size of the file.
                jpegs.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            else:
                images[i] = rgb8_array(feature.decode_example(cell))
        for i, image in zip(jpeg_at, decode_jpegs(jpegs, device)):
            images[i] = image if image is not None else rgb8_array(feature.decode_example(cells[i]))
        masks = [np.asarray(m) for m in rows["mask"]]
        yield list(rows["image_id"]), images, masks


def grid_labels(masks: Sequence[np.ndarray], encoder: Encoder, rule: str, ignore_index: int) -> np.ndarray:
    """Per-patch labels [B, gh, gw], each read from the mask at its own resolution through the
    geometry its image follows into the model input (the encoder's input size and resize policy)."""
    side = encoder.entry.input_size
    return np.stack([
        input_patch_labels(mask, side, encoder.grid, rule, ignore_index, encoder.resize)
        for mask in masks
    ]).astype(np.int16)


def labelled_batches(dataset: datasets.Dataset, batch_size: int, encoder: Encoder, rule: str,
                     ignore_index: int, decode: str = "host") -> Iterator[tuple[list[str], list[Pixels], np.ndarray]]:
    """(image ids, RGB uint8 images, patch labels) in order, decoded and labelled on a prefetch
    thread, so that reading the next batch overlaps the model's work on this one.

    With ``decode="device"`` the JPEGs are decoded on the encoder's device from that thread too:
    torchvision serialises its nvJPEG decoder and makes the thread's current CUDA stream, the
    default stream the model also runs on, wait for the decoded images. Images are what
    ``Encoder.preprocess`` takes: arrays, or tensors on the device.
    """
    check_decode(decode)
    batches = iter_batches(dataset, batch_size) if decode == "host" else \
        iter_device_batches(dataset, batch_size, encoder.device)

    def labelled():
        for image_ids, images, masks in batches:
            yield image_ids, images, grid_labels(masks, encoder, rule, ignore_index)

    return prefetched(labelled(), depth=2)


def load_encoder_for(entry: ModelEntry, options: ExtractOptions) -> Encoder:
    """The model's encoder with ``options``' checkpoint, device, cache, resize policy and compilation; raises
    ``WeightsUnavailable`` when its weights cannot be had."""
    encoder = load_encoder(entry, checkpoint=options.weights.get(entry.name), device=options.device,
                           cache_dir=options.cache_dir,
                           trust_pickle=entry.name in options.trust_checkpoints)
    encoder.resize = check_resize(options.resize)
    if options.compile_blocks:
        encoder.compile_blocks()
    return encoder


def encoder_if_available(entry: ModelEntry, options: ExtractOptions) -> Encoder | None:
    """The model's encoder (as ``load_encoder_for`` gives it) for a pass that follows
    extraction, or None when its weights cannot be had: the extract unit has already recorded why."""
    try:
        return load_encoder_for(entry, options)
    except WeightsUnavailable:
        return None
