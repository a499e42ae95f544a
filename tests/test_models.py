"""The model registry and the encoder contract, on tiny ViTs with locally saved weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from generator.errors import PatchAtlasError, UnknownName, WeightsUnavailable
from generator.models.checkpoints import CHECKPOINT_FORMATS
from generator.models.encoder import load_encoder, resolve_layers
from generator.models.registry import DEFAULT_MODELS, FAMILIES, MODELS, ModelEntry, get_model_entry

from conftest import TINY_RANDOM, TINY_REGISTERS, TINY_SUPERVISED, save_untrained_weights


def _save_random_weights(entry, path: Path, seed: int = 1) -> dict:
    return save_untrained_weights(entry, path, seed)


def _images(n=2, side=80, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8))


# --- registry -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_row_agrees_with_its_timm_pretrained_config(name):
    entry = MODELS[name]
    assert entry.family in FAMILIES
    if not entry.pretrained or entry.checkpoint_format:  # mapped checkpoints have no timm tag
        return
    cfg = timm.models.get_pretrained_cfg(entry.timm_id)
    assert cfg is not None, f"{entry.timm_id} is not a timm pretrained tag"
    assert tuple(cfg.mean) == pytest.approx(entry.mean)
    assert tuple(cfg.std) == pytest.approx(entry.std)
    assert cfg.interpolation == entry.interpolation
    assert cfg.input_size[-1] == entry.native_size
    assert cfg.license == entry.license


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_prefix_tokens_and_patch_size_match_the_architecture(name):
    entry = MODELS[name]
    fmt = CHECKPOINT_FORMATS[entry.checkpoint_format].model_kwargs if entry.checkpoint_format else {}
    # One block on the meta device: the token layout without the cost of building every block.
    with torch.device("meta"):
        model = timm.create_model(entry.architecture, pretrained=False, num_classes=0,
                                  **{**fmt, **entry.create_kwargs(), "depth": 1})
    assert model.num_prefix_tokens == entry.num_prefix_tokens
    assert model.patch_embed.patch_size[0] == entry.patch_size


def test_default_models_are_in_the_zoo_and_the_baseline_is_labelled_random():
    assert set(DEFAULT_MODELS) <= set(MODELS)
    random_rows = [e for e in MODELS.values() if not e.pretrained and not e.construction]
    assert [e.name for e in random_rows] == ["random"]
    assert random_rows[0].family == "random"
    # Untrained or constructed, only rows that need weights can be missing them.
    assert all(not e.needs_weights for e in MODELS.values() if not e.pretrained)


def test_unknown_model_suggests_near_matches():
    with pytest.raises(UnknownName, match="dino_vits16"):
        get_model_entry("dino_vit16")


@pytest.mark.parametrize("spec,expected", [
    ("all", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]), ("last", [12]), ("quartiles", [3, 6, 9, 12]),
    ("4,8,-1", [4, 8, 12]), ([1, 1, 2], [1, 2]),
])
def test_resolve_layers(spec, expected):
    assert resolve_layers(spec, 12) == expected


@pytest.mark.parametrize("spec", ["0", "13", "four", ""])
def test_resolve_layers_rejects_bad_specs(spec):
    with pytest.raises(PatchAtlasError):
        resolve_layers(spec, 12)


# --- loading paths --------------------------------------------------------------------------

def test_random_baseline_is_seeded_and_needs_no_weights():
    a = load_encoder(TINY_RANDOM)
    b = load_encoder(TINY_RANDOM)
    assert a.weights.source == "random-init"
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_checkpoint_file_loads_through_timm_and_gives_its_weights(tmp_path):
    path = tmp_path / "tiny.safetensors"
    state = _save_random_weights(TINY_SUPERVISED, path, seed=3)
    encoder = load_encoder(TINY_SUPERVISED, checkpoint=path)
    assert encoder.weights.source == "checkpoint"
    assert encoder.weights.revision == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = encoder.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_hub_cache_is_read_offline(tmp_path):
    """A model present in the local Hub cache loads with HF_HUB_OFFLINE=1, as after one download."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "models--timm--vit_tiny_patch16_224.augreg_in21k"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    state = _save_random_weights(TINY_SUPERVISED, snapshot / "model.safetensors", seed=4)
    encoder = load_encoder(TINY_SUPERVISED, cache_dir=tmp_path)
    assert encoder.weights.source == "hub"
    assert encoder.weights.location == "timm/vit_tiny_patch16_224.augreg_in21k"
    loaded = encoder.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_missing_weights_are_reported_never_replaced_by_random(tmp_path):
    with pytest.raises(WeightsUnavailable, match="weights unavailable offline"):
        load_encoder(TINY_SUPERVISED, cache_dir=tmp_path)
    with pytest.raises(WeightsUnavailable, match="not found"):
        load_encoder(TINY_SUPERVISED, checkpoint=tmp_path / "nope.pth")


@pytest.mark.parametrize("entry", [TINY_SUPERVISED, TINY_REGISTERS], ids=lambda e: e.name)
def test_checkpoint_with_missing_or_extra_keys_is_rejected_with_its_path(tmp_path, entry):
    state = _save_random_weights(entry, tmp_path / "good.safetensors")
    missing = dict(state)
    missing.pop("blocks.1.mlp.fc2.weight")
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(PatchAtlasError, match="missing.safetensors"):
        load_encoder(entry, checkpoint=tmp_path / "missing.safetensors")
    extra = dict(state, **{"blocks.9.attn.qkv.weight": torch.zeros(3, 3)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(PatchAtlasError, match="extra.safetensors"):
        load_encoder(entry, checkpoint=tmp_path / "extra.safetensors")


# --- token contract -------------------------------------------------------------------------

def test_last_layer_postnorm_tokens_equal_timm_forward_features():
    encoder = load_encoder(TINY_RANDOM)
    pixels = encoder.preprocess(_images())
    batch = encoder.tokens(pixels, [2])
    with torch.inference_mode():
        reference = encoder.model.forward_features(pixels)
    post = batch.layers[(2, "postnorm")]
    assert batch.grid == (4, 4)
    torch.testing.assert_close(post.patch.reshape(2, 16, -1), reference[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(post.prefix, reference[:, :1], rtol=0, atol=0)


def test_prenorm_tokens_are_the_raw_block_outputs_and_registers_stay_apart(tmp_path):
    path = tmp_path / "reg.safetensors"
    _save_random_weights(TINY_REGISTERS, path)
    encoder = load_encoder(TINY_REGISTERS, checkpoint=path)
    pixels = encoder.preprocess(_images(side=56))
    batch = encoder.tokens(pixels, [1, 2])
    model = encoder.model
    with torch.inference_mode():
        x = model.patch_embed(pixels)
        x = model._pos_embed(x)
        x = model.norm_pre(x)
        outputs = []
        for block in model.blocks:
            x = block(x)
            outputs.append(x)
    for layer, raw in zip([1, 2], outputs):
        pre = batch.layers[(layer, "prenorm")]
        assert pre.prefix.shape == (2, 5, 64)  # CLS + 4 registers
        torch.testing.assert_close(pre.prefix, raw[:, :5])
        torch.testing.assert_close(pre.patch.reshape(2, 16, 64), raw[:, 5:])
        post = batch.layers[(layer, "postnorm")]
        with torch.inference_mode():
            torch.testing.assert_close(post.patch.reshape(2, 16, 64), model.norm(raw[:, 5:]))


def test_preprocess_resizes_and_normalises_with_the_model_statistics():
    encoder = load_encoder(TINY_RANDOM)
    white = [np.full((100, 90, 3), 255, dtype=np.uint8)]
    pixels = encoder.preprocess(white)
    assert pixels.shape == (1, 3, 64, 64)
    expected = (1.0 - torch.tensor(TINY_RANDOM.mean)) / torch.tensor(TINY_RANDOM.std)
    torch.testing.assert_close(pixels[0, :, 10, 10], expected)


@pytest.mark.parametrize("name", ["ibot_vits16", "simmim_vitb16", "torchvision_vitb16"])
def test_mapped_models_without_a_checkpoint_are_reported_not_randomised(name):
    with pytest.raises(WeightsUnavailable, match=f"--weights {name}=PATH"):
        load_encoder(MODELS[name])


def test_beit_checkpoint_is_looked_up_in_the_hub_cache(tmp_path):
    with pytest.raises(WeightsUnavailable, match="microsoft/beit-base-patch16-224-pt22k"):
        load_encoder(MODELS["beit_vitb16_pt22k"], cache_dir=tmp_path)


def test_original_torchvision_checkpoint_loads_through_load_encoder(tmp_path):
    """A registry row with a checkpoint format: torchvision weights → timm ViT, same tokens."""
    import torchvision

    entry = ModelEntry("tiny_torchvision", "vit_tiny_patch16_224", "supervised", 16, 64, 64, 1,
                       checkpoint_format="torchvision_vit", model_kwargs={"depth": 2})
    torch.manual_seed(0)
    original = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=3,
                                                    hidden_dim=192, mlp_dim=768).eval()
    torch.save(original.state_dict(), tmp_path / "vit.pth")
    encoder = load_encoder(entry, checkpoint=tmp_path / "vit.pth")
    pixels = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        x = original._process_input(pixels)
        x = torch.cat([original.class_token.expand(2, -1, -1), x], dim=1)
        expected = original.encoder(x)  # final LayerNorm applied, as post-norm tokens
    got = encoder.tokens(pixels, [2], ["postnorm"]).layers[(2, "postnorm")]
    torch.testing.assert_close(got.patch.reshape(2, 16, 192), expected[:, 1:], rtol=0, atol=1e-4)
    assert encoder.weights.source == "checkpoint"
