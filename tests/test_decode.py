"""Decoding JPEGs on the model's device (``--decode device``) and batched preprocessing.

On a CPU, ``torchvision.io.decode_jpeg`` and PIL both run libjpeg-turbo with its defaults (the
exact integer inverse DCT, fancy chroma upsampling, integer YCbCr → RGB), so the two routes give
the same pixels; the tests hold them to one level of 255 at most (a rounding step of a
differently built libjpeg-turbo) and measure 0 here. What only PIL does right (CMYK, EXIF
rotation, files torchvision refuses) must take the PIL route, and what the host path raises the
device path must raise too. ``Encoder.preprocess``, which now resizes images of one size
together, must give the bits of the per-image algorithm it replaced.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from generator import batches as batches_module
from generator.batches import DECODE_MODES, device_decodable, labelled_batches
from generator.cli import cli
from generator.config_file import config_defaults
from generator.errors import PatchAtlasError
from generator.extract import ExtractOptions, run_extract
from generator.models import encoder as encoder_module
from generator.models.encoder import load_encoder
from generator.sources.local_folder import local_folder_source
from generator.store.parquet import patch_grid, read_patch_table

from conftest import TINY_RANDOM

# torchvision 0.29 marks its decoders deprecated (in favour of TorchCodec) on every call.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision")

# One level of 255: see the module docstring.
PIXEL_TOLERANCE = 1
CLASSES = [{"id": 0, "name": "sky", "super_name": "sky", "is_background": True},
           {"id": 1, "name": "disc", "super_name": "thing"},
           {"id": 2, "name": "bar", "super_name": "thing"}]


def _scene(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A photo-like RGB image (smooth colours, a disc, a bar, some noise) and its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 3))
    for c in range(3):
        image[..., c] = 60 + 40 * c + 50 * np.sin(xx / rng.uniform(5, 15) + c) * np.cos(yy / rng.uniform(5, 15))
    mask = np.zeros((height, width), np.uint8)
    disc = (yy - height * 0.4) ** 2 + (xx - width * 0.6) ** 2 < (min(height, width) * 0.25) ** 2
    bar = (np.abs(yy - height * 0.8) < height * 0.08) & (xx < width * 0.7)
    image[disc] = rng.uniform(150, 230, 3)
    image[bar] = rng.uniform(10, 60, 3)
    mask[disc], mask[bar] = 1, 2
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _rotated_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    return exif


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Images in every form a batch can meet, with masks: which route each must take is known."""
    root = tmp_path_factory.mktemp("mixed")
    cells, masks, ids, device_route = [], [], [], set()
    forms = [
        ("jpeg-420", (64, 80), lambda im: _encoded(im, "JPEG", quality=90), True),
        ("jpeg-444-progressive", (72, 56), lambda im: _encoded(im, "JPEG", quality=90, subsampling=0,
                                                             progressive=True), True),
        ("png", (64, 80), lambda im: _encoded(im, "PNG"), False),
        ("cmyk-jpeg", (48, 64), lambda im: _encoded(im.convert("CMYK"), "JPEG", quality=90), False),
        ("grey-jpeg", (64, 80), lambda im: _encoded(im.convert("L"), "JPEG", quality=90), True),
        ("exif-rotated-jpeg", (48, 80), lambda im: _encoded(im, "JPEG", quality=90, exif=_rotated_exif()), False),
        ("jpeg-by-path", (72, 56), None, True),
        ("jpeg-odd-size", (37, 93), lambda im: _encoded(im, "JPEG", quality=90), True),
    ]
    for seed, (name, (height, width), encode, on_device) in enumerate(forms):
        array, mask = _scene(height, width, seed)
        img = Image.fromarray(array)
        if encode is None:
            path = root / f"{name}.jpg"
            img.save(path, "JPEG", quality=90)
            cells.append({"path": str(path), "bytes": None})
        else:
            cells.append({"path": None, "bytes": encode(img)})
        if name == "exif-rotated-jpeg":
            mask = np.rot90(mask, -1)  # the mask of the image as it is shown, upright
        masks.append({"path": None, "bytes": _encoded(Image.fromarray(np.ascontiguousarray(mask)), "PNG")})
        ids.append(name)
        if on_device:
            device_route.add(name)
    features = datasets.Features({"image_id": datasets.Value("string"), "image": datasets.Image(),
                                  "mask": datasets.Image()})
    dataset = datasets.Dataset.from_dict({"image_id": ids, "image": cells, "mask": masks}, features=features)
    return dataset, device_route


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(TINY_RANDOM)


class DecodeSpy:
    """``decode_jpeg`` as the batches module calls it, recording how many images each call takes."""

    def __init__(self, monkeypatch, refuse: set[int] = frozenset()):
        self.calls: list[int] = []
        self.refuse = refuse  # sizes (in bytes) of encoded images to refuse, as nvJPEG may
        real = batches_module.decode_jpeg

        def spy(data, **kwargs):
            items = data if isinstance(data, list) else [data]
            self.calls.append(len(items))
            if any(item.numel() in self.refuse for item in items):
                raise RuntimeError("unsupported JPEG")
            return real(data, **kwargs)

        monkeypatch.setattr(batches_module, "decode_jpeg", spy)


def _all_batches(dataset, encoder, decode: str, batch_size: int = 3):
    return list(labelled_batches(dataset, batch_size, encoder, "majority", 255, decode=decode))


def _hwc(image) -> np.ndarray:
    return image.permute(1, 2, 0).cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)


def test_device_route_gives_the_host_pixels_labels_and_order(mixed, encoder, monkeypatch):
    dataset, device_route = mixed
    host = _all_batches(dataset, encoder, "host")
    spy = DecodeSpy(monkeypatch)
    device = _all_batches(dataset, encoder, "device")
    assert [b[0] for b in device] == [b[0] for b in host] == [list(dataset["image_id"][i:i + 3]) for i in (0, 3, 6)]
    worst = 0
    for (ids, host_images, host_labels), (_, device_images, device_labels) in zip(host, device):
        np.testing.assert_array_equal(device_labels, host_labels)
        assert host_labels.shape == (len(ids), *encoder.grid)
        for image_id, want, got in zip(ids, host_images, device_images):
            # Each image took the route its form calls for ...
            assert isinstance(got, torch.Tensor) == (image_id in device_route), image_id
            if isinstance(got, torch.Tensor):
                assert got.dtype == torch.uint8 and got.device == encoder.device and got.shape[0] == 3
            # ... and came out as the host path's pixels.
            assert _hwc(got).shape == want.shape, image_id
            worst = max(worst, int(np.abs(_hwc(got).astype(int) - want.astype(int)).max()))
    assert worst <= PIXEL_TOLERANCE
    # One decode_jpeg call per batch, holding that batch's device-route JPEGs.
    per_batch = [sum(i in device_route for i in dataset["image_id"][s:s + 3]) for s in (0, 3, 6)]
    assert spy.calls == [n for n in per_batch if n]


def test_the_planted_labels_come_through_either_route(mixed, encoder):
    dataset, _ = mixed
    for decode in DECODE_MODES:
        labels = np.concatenate([b[2] for b in _all_batches(dataset, encoder, decode)])
        # Every scene has sky, a disc and a bar, each covering whole patches somewhere.
        for per_image in labels:
            assert set(np.unique(per_image)) == {0, 1, 2}


def test_forms_torchvision_would_get_wrong_take_the_pil_route(mixed):
    dataset, _ = mixed
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    cells = dict(zip(raw["image_id"], raw["image"]))
    assert device_decodable(cells["jpeg-420"]["bytes"]) and device_decodable(cells["grey-jpeg"]["bytes"])
    assert not device_decodable(cells["png"]["bytes"]) and not device_decodable(cells["cmyk-jpeg"]["bytes"])
    rotated = cells["exif-rotated-jpeg"]["bytes"]
    assert not device_decodable(rotated)
    # The control: torchvision's own decode of the rotated file is not the image datasets shows
    # (on CUDA it cannot apply the rotation at all).
    shown = np.asarray(datasets.Image().decode_example(cells["exif-rotated-jpeg"]))
    raw = batches_module.decode_jpeg(torch.frombuffer(bytearray(rotated), dtype=torch.uint8))
    assert tuple(raw.shape[1:]) == shown.shape[1::-1] != shown.shape[:2]
    assert not device_decodable(b"\xff\xd8\xff\xe0 not a JPEG header") and not device_decodable(b"")


def test_a_jpeg_torchvision_refuses_is_decoded_by_pil(mixed, encoder, monkeypatch):
    dataset, device_route = mixed
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    refused = raw[0]["image"]["bytes"]  # jpeg-420, in the first batch with jpeg-444-progressive
    spy = DecodeSpy(monkeypatch, refuse={len(refused)})
    host = _all_batches(dataset, encoder, "host")
    device = _all_batches(dataset, encoder, "device")
    first_ids, first_images = device[0][0], device[0][1]
    assert isinstance(first_images[0], np.ndarray)  # refused: PIL's pixels
    assert isinstance(first_images[1], torch.Tensor)  # its neighbour still decoded on the device
    # The batch call failed, then each image was tried alone.
    assert spy.calls[:3] == [2, 1, 1]
    for (_, want_images, want_labels), (_, got_images, got_labels) in zip(host, device):
        np.testing.assert_array_equal(got_labels, want_labels)
        for want, got in zip(want_images, got_images):
            assert np.abs(_hwc(got).astype(int) - want.astype(int)).max() <= PIXEL_TOLERANCE
    assert first_ids[0] == "jpeg-420"


def test_a_truncated_jpeg_fails_the_same_way_on_both_routes(encoder, monkeypatch):
    good, mask = _scene(96, 96, 0)  # large enough that half the file is image data, not header
    data = _encoded(Image.fromarray(good), "JPEG", quality=90)
    features = datasets.Features({"image_id": datasets.Value("string"), "image": datasets.Image(),
                                  "mask": datasets.Image()})
    dataset = datasets.Dataset.from_dict({
        "image_id": ["cut"], "image": [{"path": None, "bytes": data[:len(data) // 2]}],
        "mask": [{"path": None, "bytes": _encoded(Image.fromarray(mask), "PNG")}]}, features=features)
    spy = DecodeSpy(monkeypatch)
    errors = {}
    for decode in DECODE_MODES:
        with pytest.raises(OSError) as caught:
            _all_batches(dataset, encoder, decode)
        errors[decode] = str(caught.value)
    # Its header is whole, so torchvision was asked first; it refused, and PIL said why.
    assert spy.calls == [1, 1]
    assert errors["device"] == errors["host"] and "truncated" in errors["host"].lower()


# ---------------------------------------------------------------------------------------------
# Encoder.preprocess

def _per_image_preprocess(encoder, images) -> torch.Tensor:
    """The algorithm ``Encoder.preprocess`` had before it resized by size groups, kept verbatim."""
    size = (encoder.entry.input_size, encoder.entry.input_size)
    mode = "bicubic" if encoder.entry.interpolation == "bicubic" else "bilinear"
    resized = []
    for image in images:
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(encoder.device)
        x = x.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False).clamp_(0, 1)
        resized.append(x)
    return (torch.cat(resized) - encoder._mean) / encoder._std


def _mixed_sizes(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Interleaved sizes, one already at the input side (64), one smaller than it, one not square.
    sizes = [(80, 96), (64, 64), (50, 70), (80, 96), (50, 70), (64, 64), (33, 120), (80, 96)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_grouped_preprocess_is_bit_identical_to_the_per_image_path(interpolation, monkeypatch):
    enc = load_encoder(dataclasses.replace(TINY_RANDOM, interpolation=interpolation))
    images = _mixed_sizes()
    want = _per_image_preprocess(enc, images)
    assert torch.equal(enc.preprocess(images), want)
    assert torch.equal(enc.preprocess(np.stack(images[:1] + images[3:4])), want[[0, 3]])  # one [B, H, W, 3] array
    # Images decoded on the device ([3, H, W] tensors), alone or mixed with arrays.
    tensors = [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in images]
    assert torch.equal(enc.preprocess(tensors), want)
    mixed = [t if i % 2 else a for i, (a, t) in enumerate(zip(images, tensors))]
    assert torch.equal(enc.preprocess(mixed), want)
    # Large images are resized in slices; a slice of one image gives the same bits.
    monkeypatch.setattr(encoder_module, "RESIZE_SLICE_BYTES", 1)
    assert torch.equal(enc.preprocess(images), want)


def test_preprocess_keeps_the_order_of_its_inputs(encoder):
    images = _mixed_sizes(seed=1)
    order = [6, 2, 0, 5, 1, 7, 3, 4]
    whole = encoder.preprocess(images)
    assert torch.equal(encoder.preprocess([images[i] for i in order]), whole[order])
    # The control: the rows are distinct images, so a wrong order could not go unseen.
    flat = whole.reshape(len(images), -1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(len(images)) for j in range(i))


def test_preprocess_refuses_what_is_not_an_rgb8_image(encoder):
    with pytest.raises(PatchAtlasError, match=r"image 1 has shape \(8, 8\).*\[H, W, 3\] uint8 array"):
        encoder.preprocess([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)])
    with pytest.raises(PatchAtlasError, match=r"image 0 has shape \(3, 8, 8\).*\[3, H, W\] uint8 tensor"):
        encoder.preprocess([torch.zeros(3, 8, 8)])
    with pytest.raises(PatchAtlasError, match="no images"):
        encoder.preprocess([])


# ---------------------------------------------------------------------------------------------
# End to end

def _jpeg_folder(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.json").write_text(json.dumps(CLASSES))
    for i, (height, width) in enumerate([(64, 80), (72, 56), (64, 80), (96, 96), (72, 56)]):
        image, mask = _scene(height, width, 10 + i)
        Image.fromarray(image).save(root / "images" / f"img{i}.jpg", quality=90)
        Image.fromarray(mask).save(root / "masks" / f"img{i}.png")
    image, mask = _scene(64, 64, 20)  # one PNG among the JPEGs
    Image.fromarray(image).save(root / "images" / "img5.png")
    Image.fromarray(mask).save(root / "masks" / "img5.png")
    return root


def test_extract_with_device_decoding_writes_the_host_tokens(tiny_models, tmp_path, monkeypatch):
    source = local_folder_source(str(_jpeg_folder(tmp_path / "folder")), name="jpegs")
    tables = {}
    for decode in DECODE_MODES:
        spy = DecodeSpy(monkeypatch)
        options = ExtractOptions(layers="all", device="cpu", batch_size=2, progress=False, variants=False,
                                 embedding_dtype="float32", decode=decode)
        outcomes = run_extract(tmp_path / decode, [source], ["tiny_random"], options)
        assert [o.status for o in outcomes["jpegs"]] == ["done"]
        # The five JPEGs, kept by path by the source, were decoded by torchvision only on this route.
        assert sum(spy.calls) == (5 if decode == "device" else 0)
        repo = tmp_path / decode / "datasets" / "jpegs" / "tiny_random"
        tables[decode] = {p.parent.name: patch_grid(read_patch_table(p))
                          for p in sorted(repo.glob("L*-*/*.parquet"))}
    assert sorted(tables["device"]) == sorted(tables["host"])
    assert {"L01-prenorm", "L01-postnorm", "L02-prenorm", "L02-postnorm", "L02-queries"} <= set(tables["host"])
    for name, (ids, tokens, labels) in tables["host"].items():
        got_ids, got_tokens, got_labels = tables["device"][name]
        assert got_ids == ids == [f"img{i}" for i in range(6)]
        np.testing.assert_array_equal(got_labels, labels)
        # Equal pixels give equal tokens; the bound leaves room for one-level pixel differences.
        # The control: two different images differ by far more than the bound.
        bound = 1e-3 * float(np.abs(tokens).max())
        assert float(np.abs(got_tokens - tokens).max()) <= bound
        assert float(np.abs(tokens[0] - tokens[1]).max()) > 100 * bound


# ---------------------------------------------------------------------------------------------
# The option

def test_an_unknown_decode_value_names_the_option_and_its_values(encoder, mixed):
    for decode in DECODE_MODES:  # the options accept exactly the modes the batches know
        ExtractOptions(decode=decode).validate()
    with pytest.raises(PatchAtlasError, match=r"--decode 'gpu': expected one of host, device"):
        ExtractOptions(decode="gpu").validate()
    with pytest.raises(PatchAtlasError, match=r"--decode 'GPU': expected one of host, device"):
        labelled_batches(mixed[0], 2, encoder, "majority", 255, decode="GPU")


def test_decode_is_an_option_of_extract_and_build_and_of_config_files(tmp_path):
    result = CliRunner().invoke(cli, ["extract", "--decode", "gpu"])
    assert result.exit_code == 2 and "--decode" in result.output and "'host', 'device'" in result.output
    config = tmp_path / "patchatlas.toml"
    config.write_text('decode = "device"\n')
    for command in ("extract", "build"):
        assert config_defaults(config, command, {command: cli.commands[command]})["decode"] == "device"
    config.write_text('[extract]\ndecode = "gpu"\n')
    with pytest.raises(PatchAtlasError, match=r"decode = 'gpu': expected .*'host', 'device'"):
        config_defaults(config, "extract", {"extract": cli.commands["extract"]})
