"""Image/mask geometry: resize policies, input sizes, and patch labels read through them."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from generator.batches import grid_labels
from generator.errors import PatchAtlasError
from generator.extract import ExtractOptions, token_params
from generator.models.encoder import Encoder, load_encoder
from generator.models.registry import MODELS, with_input_size
from generator.sources.geometry import input_geometry
from generator.sources.labels import patch_labels, patch_labels_nearest, resize_mask
from generator.store.manifest import params_hash

from conftest import TINY_RANDOM, TINY_SUPERVISED, save_untrained_weights


def opencv4_nearest_exact(mask: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """OpenCV 4's ``resize(..., INTER_NEAREST_EXACT)`` (``resizeNN_bitexact`` in
    imgproc/src/resize.cpp), one output pixel at a time: the reference for the ``nearest`` rule."""
    def source_index(n_in: int, n_out: int, i: int) -> int:
        step = ((n_in << 16) + n_out // 2) // n_out  # 16.16 fixed point
        return min((step * i + step // 2 - n_in % 2) >> 16, n_in - 1)

    gh, gw = grid_hw
    out = np.empty((gh, gw), dtype=mask.dtype)
    for r in range(gh):
        for c in range(gw):
            out[r, c] = mask[source_index(mask.shape[0], gh, r), source_index(mask.shape[1], gw, c)]
    return out


def realistic_mask(shape=(256, 256), n_classes: int = 19, seed: int = 0) -> np.ndarray:
    """Regions with curved boundaries, thin poles and an ignore band, like a street-scene tile."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros(shape, np.uint8)
    mask[yy > h * 0.55 + 10 * np.sin(xx / 23)] = 1  # road under a wavy horizon
    for _ in range(40):
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, h / 5), rng.uniform(2, w / 5)
        mask[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = rng.integers(2, n_classes)
    for x in rng.integers(0, w - 3, 6):
        mask[: int(h * 0.7), x:x + rng.integers(1, 4)] = 5  # poles a few pixels wide
    mask[np.abs(yy - h * 0.3 - 8 * np.cos(xx / 17)) < 1.5] = 255
    return mask


def _cv2():
    cv2 = pytest.importorskip("cv2")
    if int(cv2.__version__.split(".")[0]) >= 5:
        pytest.skip("OpenCV 5 rounds INTER_NEAREST_EXACT differently at exact ties; the authors' code ran on 4")
    return cv2


# ---------------------------------------------------------------------------------------------
# nearest labels = the authors' cv2.resize of the source-resolution mask

def _labeller(side: int, patch: int, resize: str = "squash"):
    """What grid_labels reads of an encoder: its input size, grid and resize policy."""
    entry = dataclasses.replace(TINY_RANDOM, input_size=side, patch_size=patch)
    return SimpleNamespace(entry=entry, grid=entry.grid_size(), resize=resize)


@pytest.mark.parametrize("side,patch", [(224, 16), (224, 14)])
def test_tile_labels_equal_opencv_on_the_256px_mask(side, patch):
    cv2 = _cv2()
    masks = [realistic_mask(seed=s) for s in range(4)]
    grid = (side // patch, side // patch)
    got = grid_labels(masks, _labeller(side, patch), "nearest", 255)
    expected = np.stack([cv2.resize(m, grid[::-1], interpolation=cv2.INTER_NEAREST_EXACT) for m in masks])
    np.testing.assert_array_equal(got, expected)
    if patch == 16:
        # Resizing the mask to 224 first samples it twice and moves labels (centres 0.57 px off).
        twice = np.stack([patch_labels(resize_mask(m, (side, side)), grid, "nearest") for m in masks])
        assert (twice != expected).mean() > 0.005


def test_nearest_rule_equals_opencv_at_every_small_size():
    cv2 = _cv2()
    rng = np.random.default_rng(1)
    for n_in in (1, 2, 3, 5, 7, 37, 100, 255, 256, 257, 518, 1024):
        for n_out in (1, 2, 5, 7, 13, 14, 16, 32, 37, 41, 64):
            mask = rng.integers(0, 250, (n_in, max(1, n_in // 2 + 1))).astype(np.uint8)
            grid = (n_out, max(1, n_out // 3 + 1))
            expected = cv2.resize(mask, grid[::-1], interpolation=cv2.INTER_NEAREST_EXACT)
            np.testing.assert_array_equal(patch_labels_nearest(mask, grid), expected)


def test_nearest_rule_equals_the_pure_opencv_rule():
    rng = np.random.default_rng(2)
    for shape, grid in [((256, 256), (14, 14)), ((2, 2), (41, 41)), ((2, 2), (5, 7)), ((1024, 2048), (64, 128)),
                        ((57, 91), (13, 9))]:
        mask = rng.integers(0, 250, shape).astype(np.uint8)
        np.testing.assert_array_equal(patch_labels_nearest(mask, grid), opencv4_nearest_exact(mask, grid))
    # A hand-checked tie: patch 3 of 14 centred on the edge between pixels 63 and 64 of 256.
    line = np.arange(256, dtype=np.uint8)[None, :].repeat(2, 0)
    assert patch_labels_nearest(line, (1, 14))[0].tolist() == [9, 27, 45, 64, 82, 100, 118, 137, 155, 173, 192,
                                                                 210, 228, 246]


# ---------------------------------------------------------------------------------------------
# short-side-crop: pixels as timm's eval transform, masks through the same crop

def _pixel_encoder(resize: str, side: int = 64) -> Encoder:
    entry = dataclasses.replace(TINY_RANDOM, input_size=side, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    model = timm.create_model(entry.architecture, pretrained=False, num_classes=0, **entry.create_kwargs())
    return Encoder(entry, model, None, resize=resize)


@pytest.mark.parametrize("shape", [(90, 141), (141, 90), (300, 200), (64, 77), (50, 70)])
def test_short_side_crop_pixels_match_timm_eval_transform(shape):
    from torchvision import transforms

    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)  # noise: the hardest case for a resampler
    ours = _pixel_encoder("short-side-crop").preprocess([image])[0]
    timm_eval = timm.data.create_transform(input_size=(3, 64, 64), interpolation="bicubic", crop_pct=1.0,
                                           mean=(0, 0, 0), std=(1, 1, 1), is_training=False)
    reference = timm_eval(Image.fromarray(image))
    torchvision_eval = transforms.Compose([transforms.Resize(64, transforms.InterpolationMode.BICUBIC),
                                           transforms.CenterCrop(64), transforms.ToTensor()])
    assert ours.shape == reference.shape == (3, 64, 64)
    assert float((ours - reference).abs().max()) <= 1 / 255 + 1e-6
    assert float((ours - torchvision_eval(Image.fromarray(image))).abs().max()) <= 1 / 255 + 1e-6
    # Squash, the default, stretches instead: a different picture for a non-square image.
    if shape[0] != shape[1]:
        assert float((_pixel_encoder("squash").preprocess([image])[0] - reference).abs().mean()) > 0.05


def _planted(height=96, width=160):
    """An object planted so that, in the short-side-crop input (64 px, patch 16), it fills patch
    (2, 0) exactly; a second one at the far right that the crop cuts away."""
    image = np.zeros((height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    # 96×160 → 64×106 (short side 64), crop left = round(42 / 2) = 21. Input cols 0..16 are
    # resized cols 21..37, source cols 21·160/106 = 31.7 .. 55.8; input rows 32..48 are source 48..72.
    mask[48:72, 33:55] = 3
    image[48:72, 33:55] = 255
    mask[:, 136:] = 7  # source cols ≥ 136 are resized cols ≥ 90.1, input col ≥ 69: outside
    return image, mask


@pytest.mark.parametrize("rule", ["nearest", "majority"])
def test_planted_object_lands_on_its_patch_under_short_side_crop(rule):
    image, mask = _planted()
    labels = grid_labels([mask], _labeller(64, 16, "short-side-crop"), rule, 255)[0]
    expected = np.zeros((4, 4), np.int16)
    expected[2, 0] = 3
    np.testing.assert_array_equal(labels, expected)
    # The pixels went to the same place: the bright object's input pixels are in patch (2, 0).
    pixels = _pixel_encoder("short-side-crop").preprocess([image])[0].mean(0)
    bright = (pixels > 0.5).numpy()
    assert bright[32:48, 0:16].mean() > 0.8 and not bright[:, 18:].any() and not bright[:30].any()
    # Squashed, the object straddles patches (2, 0) and (2, 1) without filling or centring either,
    # and the strip the crop cut away is kept.
    squashed = grid_labels([mask], _labeller(64, 16, "squash"), rule, 255)[0]
    assert (squashed[:, 3] == 7).all() and not (squashed == 3).any()


def test_short_side_crop_geometry_follows_torchvision():
    g = input_geometry((96, 160), 64, "short-side-crop")
    assert g.resized_hw == (64, 106) and g.crop_tl == (0, 21)
    g = input_geometry((375, 500), 224, "short-side-crop")  # a VOC-sized photo
    assert g.resized_hw == (224, 298) and g.crop_tl == (0, 37)
    assert input_geometry((375, 500), 224, "squash").resized_hw == (224, 224)
    with pytest.raises(PatchAtlasError, match="--resize 'crop'"):
        input_geometry((10, 10), 8, "crop")


# ---------------------------------------------------------------------------------------------
# input size: a token parameter, through the real loading path

def test_input_size_changes_the_grid_through_load_encoder(tmp_path):
    # TINY_SUPERVISED has a fixed-size position embedding (input_policy "fixed", like DINO).
    path = tmp_path / "tiny.safetensors"
    saved = save_untrained_weights(TINY_SUPERVISED, path, seed=3)
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    for side in (64, 96):
        entry = with_input_size(TINY_SUPERVISED, side)
        encoder = load_encoder(entry, checkpoint=path)
        tokens = encoder.tokens(encoder.preprocess([image]), [2], ["prenorm"])
        grid = (side // 16, side // 16)
        assert tokens.grid == encoder.grid == entry.grid_size() == grid
        assert tokens.layers[(2, "prenorm")].patch.shape[1:3] == grid
        # The weights loaded, with the position embedding resampled to the new grid by timm.
        expected = timm.layers.resample_abs_pos_embed(saved["pos_embed"], new_size=list(grid), num_prefix_tokens=1)
        torch.testing.assert_close(encoder.model.pos_embed.detach(), expected)
        torch.testing.assert_close(encoder.model.blocks[1].mlp.fc1.weight.detach(), saved["blocks.1.mlp.fc1.weight"])


def test_input_size_and_resize_are_token_parameters(monkeypatch):
    monkeypatch.setitem(MODELS, TINY_SUPERVISED.name, TINY_SUPERVISED)
    source = SimpleNamespace(name="s", revision="r")
    default = ExtractOptions()
    params = token_params(default.entry_for(TINY_SUPERVISED), source, default)
    assert "resize" not in params and params["model"]["input_size"] == 64  # old tables stay reusable
    hashes = {params_hash(params)}
    for options in (ExtractOptions(input_size=96), ExtractOptions(input_size={"tiny_vit": 96}),
                    ExtractOptions(resize="short-side-crop")):
        options.validate()
        changed = token_params(options.entry_for(TINY_SUPERVISED), source, options)
        hashes.add(params_hash(changed))
    assert len(hashes) == 3  # one size or the other, squash or crop: three tables
    assert ExtractOptions(input_size={"other": 96}).entry_for(TINY_SUPERVISED) is TINY_SUPERVISED


def test_bad_input_size_names_the_model_and_the_size():
    with pytest.raises(PatchAtlasError, match=r"input size 450 for dino_vits16: .*patch size 16"):
        with_input_size(MODELS["dino_vits16"], 450)
    with pytest.raises(PatchAtlasError, match="input size 0"):
        ExtractOptions(input_size=0).validate()
    with pytest.raises(PatchAtlasError, match="unknown model 'dino_vit16'"):
        ExtractOptions(input_size={"dino_vit16": 448}).validate()
    from generator.cli import _parse_input_size

    assert _parse_input_size("448") == 448
    assert _parse_input_size("dinov2_vits14_reg=518, dino_vits16=448") == {"dinov2_vits14_reg": 518,
                                                                           "dino_vits16": 448}
    with pytest.raises(PatchAtlasError, match="--input-size"):
        _parse_input_size("big")


def test_a_changed_input_size_or_policy_extracts_new_tables(tiny_models, tmp_path):
    from generator.extract import run_extract
    from generator.sources.registry import load_source
    from generator.store.parquet import patch_grid, read_patch_table

    source = load_source("synthetic-scenes", n_images=2, size=80)
    out = tmp_path / "out"
    weights = tmp_path / "tiny.safetensors"
    save_untrained_weights(TINY_SUPERVISED, weights, seed=4)  # saved at 64 px, loaded at 96 too
    seen = {}
    for size, resize, status in [(None, "squash", "done"), (96, "squash", "done"), (96, "squash", "reused"),
                                 (96, "short-side-crop", "done")]:
        options = ExtractOptions(layers="last", norms=["postnorm"], device="cpu", progress=False, variants=False,
                                 last_block_attention=False, curve_layers="last", input_size=size, resize=resize,
                                 embedding_dtype="float32", weights={"tiny_vit": str(weights)})
        [outcome] = run_extract(out, [source], ["tiny_vit"], options)["synthetic-scenes"]
        assert outcome.status == status, (size, resize)
        unit = json.loads((out / "manifest.json").read_text())["entries"]["extract/synthetic-scenes/tiny_vit"]
        side = size or 64
        assert unit["grid"] == [side // 16, side // 16] and unit["params"]["model"]["input_size"] == side
        assert unit["params"].get("resize", "squash") == resize
        _, tokens, labels = patch_grid(read_patch_table(sorted((out / "datasets" / "synthetic-scenes" / "tiny_vit")
                                                               .glob("L*-postnorm/*.parquet"))))
        assert tokens.shape[1:3] == labels.shape[1:] == (side // 16, side // 16)
        seen[(side, resize)] = tokens
    card = (out / "datasets" / "synthetic-scenes" / "README.md").read_text()
    assert "96 px, short-side-crop" in card
    # The synthetic scenes are square: the crop changes nothing but the resampler's rounding.
    assert np.abs(seen[(96, "short-side-crop")] - seen[(96, "squash")]).max() < 0.5


def test_config_file_sets_resize_and_input_size(tmp_path):
    import click

    from generator.cli import cli

    config = tmp_path / "atlas.toml"
    config.write_text('resize = "short-side-crop"\ninput-size = "dino_vits16=448"\n[build]\ninput-size = 448\n')
    parent = click.Context(cli, info_name="patchatlas")
    params = cli.commands["extract"].make_context("extract", ["--config", str(config)], parent=parent).params
    assert params["resize"] == "short-side-crop" and params["input_size"] == "dino_vits16=448"
    params = cli.commands["build"].make_context("build", ["--config", str(config)], parent=parent).params
    assert params["input_size"] == "448"
    config.write_text('resize = "crop"\n')
    with pytest.raises(PatchAtlasError, match="resize"):
        cli.commands["extract"].make_context("extract", ["--config", str(config)], parent=parent)


def test_patch_correspondence_follows_the_crop():
    from generator.sources.degradations import AffineMap, patch_correspondence

    geometry = input_geometry((96, 160), 64, "short-side-crop")  # 4 × 4 patches of 16 input px
    same = patch_correspondence(AffineMap.identity(), (96, 160), (4, 4), geometry)
    rows, cols = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    np.testing.assert_array_equal(same, np.stack([rows, cols], axis=-1))
    # A patch is 16 · 160/106 ≈ 24.2 source columns wide under the crop, 40 when squashed:
    # content 13 columns to the right in the original is one patch over under the crop only.
    shift = AffineMap(((1.0, 0.0), (0.0, 1.0)), (0.0, 13.0))
    np.testing.assert_array_equal(patch_correspondence(shift, (96, 160), (4, 4), geometry)[..., 1],
                                  np.where(cols < 3, cols + 1, -1))
    np.testing.assert_array_equal(patch_correspondence(shift, (96, 160), (4, 4))[..., 1], cols)
