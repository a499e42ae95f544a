"""Tokens of models loaded from files equal the original code's tokens on the same pixels.

- Position embeddings resized as the original repositories do (DINOv2 without registers:
  bicubic without antialiasing, scale factor (grid + 0.1) / native grid), checked against a
  re-implementation of ``interpolate_pos_encoding`` (facebookresearch/dinov2
  ``dinov2/models/vision_transformer.py``) at sizes other than the native one.
- No checkpoint entry is lost on the way into the model: DINOv3's q/v biases load into timm's
  ``_qkvb`` architecture, and a key a checkpoint filter would drop is refused by name.
- Checkpoints that pickle Python objects load only for the models named by
  ``--trust-checkpoint``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import save_file

from generator.errors import PatchAtlasError
from generator.models.encoder import load_encoder, use_pos_embed_rule
from generator.models.registry import MODELS, ModelEntry

TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def _tiny_row(name: str, input_size: int) -> ModelEntry:
    return dataclasses.replace(MODELS[name], name=f"tiny_{name}", model_kwargs=dict(TINY), input_size=input_size)


def _randomise(model: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model.eval()


def _pixels(rows: int, cols: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 3, rows, cols, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _block_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every block's raw output, prefix then patches, stacked: [blocks, B, N, D]."""
    blocks = model.forward_intermediates(x, norm=False, output_fmt="NLC", intermediates_only=True,
                                         return_prefix_tokens=True)
    return torch.stack([torch.cat([prefix, patch], dim=1) for patch, prefix in blocks])


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


# --- position embeddings ----------------------------------------------------------------------

def original_interpolate_pos_encoding(pos_embed: torch.Tensor, height: int, width: int, patch: int,
                                      offset: float, antialias: bool) -> torch.Tensor:
    """facebookresearch/dinov2 ``DinoVisionTransformer.interpolate_pos_encoding``, re-implemented.

    The original names the image's dimensions (w, h) for x.shape[-2:], i.e. (rows, columns);
    with an offset the scale factor, not the size, drives the interpolation.
    """
    n = pos_embed.shape[1] - 1
    rows, cols = height // patch, width // patch
    if rows * cols == n and height == width:
        return pos_embed
    m = int(math.sqrt(n))
    kwargs = ({"scale_factor": (float(rows + offset) / m, float(cols + offset) / m)} if offset
              else {"size": (rows, cols)})
    grid = F.interpolate(pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2), mode="bicubic",
                         antialias=antialias, **kwargs)
    assert tuple(grid.shape[-2:]) == (rows, cols)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


def _dinov2_file(tmp_path, entry: ModelEntry, seed: int) -> tuple:
    model = timm.create_model(entry.architecture, pretrained=False, **entry.create_kwargs())
    _randomise(model, seed)
    path = tmp_path / f"{entry.name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def _reference_tokens(entry: ModelEntry, weights: torch.nn.Module, x: torch.Tensor,
                      pos_embed: torch.Tensor) -> torch.Tensor:
    """A fixed-size timm ViT at the image's size whose position embedding is ``pos_embed``."""
    kwargs = {k: v for k, v in entry.create_kwargs().items() if k != "dynamic_img_size"}
    model = timm.create_model(entry.architecture, pretrained=False, img_size=tuple(x.shape[-2:]), **kwargs)
    state = dict(weights.state_dict(), pos_embed=pos_embed)
    model.load_state_dict(state, strict=True)
    return _block_tokens(model.eval(), x)


def test_reference_interpolation_is_timms_without_offset():
    """The re-implementation agrees with timm's resize where the two rules coincide."""
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    want = resample_abs_pos_embed(pos, new_size=[16, 12], num_prefix_tokens=1)
    assert torch.allclose(original_interpolate_pos_encoding(pos, 224, 168, 14, 0.0, True), want, atol=1e-6)
    assert torch.equal(original_interpolate_pos_encoding(pos, 518, 518, 14, 0.1, False), pos)


@pytest.mark.parametrize("size", [(224, 224), (224, 168)], ids=["224x224", "224x168"])
def test_dinov2_without_registers_resizes_position_embedding_as_the_original(tmp_path, size):
    entry = _tiny_row("dinov2_vits14", 224)
    path, weights = _dinov2_file(tmp_path, entry, seed=11)
    assert weights.pos_embed.shape[1] == 1 + 37 * 37  # native 518 px
    x = _pixels(*size)
    pos = original_interpolate_pos_encoding(weights.pos_embed.detach(), *size, 14, offset=0.1, antialias=False)
    want = _reference_tokens(entry, weights, x, pos)

    encoder = load_encoder(entry, checkpoint=path)
    batch = encoder.tokens(x, layers=[1, 2], norms=["prenorm"])
    got = torch.stack([torch.cat([batch.layers[(layer, "prenorm")].prefix,
                                  batch.layers[(layer, "prenorm")].patch.flatten(1, 2)], dim=1)
                       for layer in (1, 2)])
    # timm's own rule (antialiased, exact size) on the same weights: what the rule must fix.
    timm_default = _block_tokens(weights, x)
    print(f"{size}: timm rule vs original {_relative(timm_default, want):.4f}, "
          f"atlas vs original {_relative(got, want):.2e}")
    assert _relative(timm_default, want) > 1e-2
    assert _relative(got, want) < 1e-5


def test_dino_at_another_input_size_resizes_as_the_original(tmp_path):
    """``--input-size`` on a fixed-size DINO row: DINO's rule (``vision_transformer.py``
    ``interpolate_pos_encoding``: bicubic, scale (grid + 0.1) / native grid, no antialiasing),
    not the antialiased exact-size resize timm applies when a model is built at another size."""
    from generator.models.registry import with_input_size

    native = _tiny_row("dino_vits16", 224)
    model = timm.create_model(native.architecture, pretrained=False, num_classes=0, **native.create_kwargs())
    _randomise(model, seed=13)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    entry = with_input_size(native, 96)
    encoder = load_encoder(entry, checkpoint=path)
    x = _pixels(96, 96)
    batch = encoder.tokens(x, layers=[2], norms=["prenorm"])
    assert batch.grid == (6, 6)
    got = torch.cat([batch.layers[(2, "prenorm")].prefix, batch.layers[(2, "prenorm")].patch.flatten(1, 2)], dim=1)
    pos = original_interpolate_pos_encoding(model.pos_embed.detach(), 96, 96, 16, offset=0.1, antialias=False)
    reference = timm.create_model(native.architecture, pretrained=False, num_classes=0, img_size=96,
                                  **native.model_kwargs)
    reference.load_state_dict(dict(model.state_dict(), pos_embed=pos), strict=True)
    want = _block_tokens(reference.eval(), x)[1]
    assert _relative(got, want) < 1e-5


def test_dinov2_with_registers_keeps_the_antialiased_exact_size_rule(tmp_path):
    entry = _tiny_row("dinov2_vits14_reg", 224)
    path, weights = _dinov2_file(tmp_path, entry, seed=12)
    x = _pixels(224, 168)
    encoder = load_encoder(entry, checkpoint=path)
    batch = encoder.tokens(x, layers=[2], norms=["prenorm"])
    want = _block_tokens(weights, x)[1]
    got = torch.cat([batch.layers[(2, "prenorm")].prefix, batch.layers[(2, "prenorm")].patch.flatten(1, 2)], dim=1)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_row_declares_a_resize_rule_exactly_when_it_has_a_position_embedding(name):
    from generator.models.checkpoints import CHECKPOINT_FORMATS

    entry = MODELS[name]
    # One block shows whether the architecture has the embedding, at a fraction of the cost.
    fmt = CHECKPOINT_FORMATS[entry.checkpoint_format].model_kwargs if entry.checkpoint_format else {}
    with torch.device("meta"):
        model = timm.create_model(entry.architecture, pretrained=False, num_classes=0,
                                  **{**fmt, **entry.create_kwargs(), "depth": 1})
    has_pos_embed = getattr(model, "pos_embed", None) is not None
    assert (entry.pos_embed_resample is not None) == has_pos_embed
    # timm's own step stays wherever the row's rule is timm's or nothing is resized.
    use_pos_embed_rule(entry, model)
    replaced = "_pos_embed" in vars(model)
    assert replaced == ("dinov2" in entry.timm_id and not entry.num_registers)


def test_dinov2_rows_resize_their_position_embedding_by_their_own_rule():
    from generator.models.registry import DINO_POS_EMBED, TIMM_POS_EMBED

    dinov2 = [e for e in MODELS.values() if "dinov2" in e.timm_id]
    assert len(dinov2) == 8
    for entry in dinov2:
        assert entry.pos_embed_resample == (TIMM_POS_EMBED if entry.num_registers else DINO_POS_EMBED), entry.name


def test_declared_rule_that_fixed_size_loading_cannot_apply_is_refused():
    entry = dataclasses.replace(MODELS["dino_vits16"], name="dino_at_160", input_size=160,
                                model_kwargs=dict(TINY), pretrained=False)
    with pytest.raises(PatchAtlasError, match="dynamic input policy"):
        load_encoder(entry)


# --- DINOv3: q/v biases -----------------------------------------------------------------------

def _as_original_dinov3(model: torch.nn.Module, k_bias_seed: int = 5) -> dict:
    """A timm ``_qkvb`` DINOv3 state dict under the original repository's key names.

    The original fuses q, k, v biases in ``qkv.bias`` and multiplies them by ``qkv.bias_mask``
    (1 for q and v, 0 for k): the k third is random here, as it may be in a real file.
    """
    generator = torch.Generator().manual_seed(k_bias_seed)
    out = {"mask_token": torch.randn(1, model.embed_dim, generator=generator),
           "rope_embed.periods": model.rope.periods.clone().to(torch.bfloat16).float()}
    for key, value in model.state_dict().items():
        if key.endswith("attn.q_bias"):
            prefix = key[: -len("q_bias")]
            v = model.state_dict()[prefix + "v_bias"]
            k = torch.randn(v.shape, generator=generator)
            out[prefix + "qkv.bias"] = torch.cat([value, k, v])
            out[prefix + "qkv.bias_mask"] = torch.cat([torch.ones_like(v), torch.zeros_like(v), torch.ones_like(v)])
        elif key.endswith("attn.v_bias"):
            continue
        else:
            key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma")
            out[key.replace("gamma_2", "ls2.gamma")] = value.clone()
    return out


def _dinov3_reference(seed: int) -> tuple[ModelEntry, torch.nn.Module]:
    entry = _tiny_row("dinov3_vits16", 64)
    reference = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, **entry.create_kwargs())
    return entry, _randomise(reference, seed, scale=0.2)


def test_dinov3_original_checkpoint_keeps_its_q_and_v_biases(tmp_path):
    entry, reference = _dinov3_reference(seed=21)
    assert reference.blocks[0].attn.q_bias.abs().min() > 0
    path = tmp_path / "dinov3_original.pth"
    torch.save(_as_original_dinov3(reference), path)
    encoder = load_encoder(entry, checkpoint=path)
    x = _pixels(64, 64)
    batch = encoder.tokens(x, layers=[1, 2], norms=["prenorm"])
    got = torch.stack([torch.cat([batch.layers[(layer, "prenorm")].prefix,
                                  batch.layers[(layer, "prenorm")].patch.flatten(1, 2)], dim=1)
                       for layer in (1, 2)])
    want = _block_tokens(reference, x)
    print(f"DINOv3 with q/v biases: atlas vs original {_relative(got, want):.2e}")
    assert _relative(got, want) < 1e-5
    assert encoder.weights.architecture == "vit_small_patch16_dinov3_qkvb"


def test_dinov3_biases_under_another_mask_are_refused(tmp_path):
    entry, reference = _dinov3_reference(seed=22)
    state = _as_original_dinov3(reference)
    state["blocks.0.attn.qkv.bias_mask"] = torch.ones_like(state["blocks.0.attn.qkv.bias_mask"])
    path = tmp_path / "dinov3_mask.pth"
    torch.save(state, path)
    with pytest.raises(PatchAtlasError, match=r"dinov3_mask\.pth.*blocks\.0\.attn\.qkv\.bias_mask"):
        load_encoder(entry, checkpoint=path)


def test_dinov3_k_bias_without_its_mask_must_be_zero(tmp_path):
    """Without qkv.bias_mask nothing zeroes the k third that timm drops."""
    entry, reference = _dinov3_reference(seed=24)
    state = {k: v for k, v in _as_original_dinov3(reference).items() if not k.endswith("bias_mask")}
    torch.save(state, tmp_path / "random_k.pth")
    with pytest.raises(PatchAtlasError, match=r"blocks\.0\.attn\.qkv\.bias \(its non-zero k third\)"):
        load_encoder(entry, checkpoint=tmp_path / "random_k.pth")
    for key, value in state.items():
        if key.endswith("qkv.bias"):
            third = value.shape[0] // 3
            value[third:2 * third] = 0
    torch.save(state, tmp_path / "zero_k.pth")
    x = _pixels(64, 64)
    got = load_encoder(entry, checkpoint=tmp_path / "zero_k.pth").model.forward_features(x)
    assert torch.allclose(got, reference.forward_features(x), atol=1e-5, rtol=1e-5)


def test_dinov3_periods_other_than_the_architectures_are_refused(tmp_path):
    entry, reference = _dinov3_reference(seed=23)
    state = _as_original_dinov3(reference)
    state["rope_embed.periods"] = state["rope_embed.periods"] * 2
    path = tmp_path / "dinov3_periods.pth"
    torch.save(state, path)
    with pytest.raises(PatchAtlasError, match=r"rope_embed\.periods"):
        load_encoder(entry, checkpoint=path)


# --- keys a load would not use ----------------------------------------------------------------

def test_key_a_timm_filter_drops_is_refused_by_name(tmp_path):
    """timm's ViT filter skips any 'pre_logits' key; the load must not."""
    from conftest import TINY_SUPERVISED, save_untrained_weights

    state = save_untrained_weights(TINY_SUPERVISED, tmp_path / "good.safetensors", seed=4)
    state["pre_logits.fc.weight"] = torch.ones(4, 4)
    save_file(state, str(tmp_path / "pre_logits.safetensors"))
    with pytest.raises(PatchAtlasError, match=r"pre_logits\.safetensors.*pre_logits\.fc\.weight"):
        load_encoder(TINY_SUPERVISED, checkpoint=tmp_path / "pre_logits.safetensors")


def test_dinov2_original_checkpoint_loads_without_its_pretraining_mask_token(tmp_path):
    """The original DINOv2 file has mask_token (masked pretraining only) and register_tokens."""
    entry = _tiny_row("dinov2_vits14_reg", 224)
    path, weights = _dinov2_file(tmp_path, entry, seed=13)
    state = {k: v for k, v in weights.state_dict().items() if k not in ("reg_token", "cls_token", "pos_embed")}
    # timm folds the CLS position into cls_token for its no_embed_class models; the original keeps it apart.
    pos_cls = torch.randn(1, 1, weights.embed_dim)
    state.update(register_tokens=weights.reg_token.detach().clone(), mask_token=torch.randn(1, weights.embed_dim),
                 cls_token=weights.cls_token.detach() - pos_cls,
                 pos_embed=torch.cat([pos_cls, weights.pos_embed.detach()], dim=1))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "original.safetensors"))
    encoder = load_encoder(entry, checkpoint=tmp_path / "original.safetensors")
    assert torch.allclose(encoder.model.cls_token, weights.cls_token, atol=1e-6)
    state["blocks.0.attn.extra"] = torch.ones(3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(PatchAtlasError, match=r"blocks\.0\.attn\.extra"):
        load_encoder(entry, checkpoint=tmp_path / "extra.safetensors")


def test_mapped_formats_refuse_an_unknown_key_by_name():
    from generator.models.checkpoints import CHECKPOINT_FORMATS

    originals = {"ibot": {"backbone.cls_token": torch.zeros(1)},
                 "simmim": {"encoder.cls_token": torch.zeros(1)},
                 "beit_hf": {"beit.embeddings.cls_token": torch.zeros(1)},
                 "torchvision_vit": {"class_token": torch.zeros(1)}}
    # Named as the format's own wrapper prefixes leave them (iBOT's backbone., SimMIM's encoder.).
    unknown = {"ibot": "backbone.blocks.0.attn.extra", "simmim": "encoder.blocks.0.attn.extra",
               "beit_hf": "beit.encoder.layer.0.extra", "torchvision_vit": "encoder.extra"}
    assert set(originals) == set(CHECKPOINT_FORMATS)
    for name, fmt in CHECKPOINT_FORMATS.items():
        with pytest.raises(PatchAtlasError, match=re.escape(unknown[name].split(".", 1)[1])):
            fmt.convert({**originals[name], unknown[name]: torch.zeros(1)})


def test_two_keys_landing_on_one_name_are_refused():
    """``module.backbone.x`` and ``backbone.x`` both become ``x``: one would be lost."""
    from generator.models.checkpoints import ibot_to_timm, torchvision_vit_to_timm

    with pytest.raises(PatchAtlasError, match="cls_token"):
        ibot_to_timm({"backbone.cls_token": torch.zeros(1), "module.backbone.cls_token": torch.ones(1)})
    layer = "encoder.layers.encoder_layer_0."
    with pytest.raises(PatchAtlasError, match="mlp"):
        torchvision_vit_to_timm({layer + "mlp.0.weight": torch.zeros(1), layer + "mlp.linear_1.weight": torch.ones(1)})


# --- --trust-checkpoint -----------------------------------------------------------------------

class StandInConfig:
    """A stand-in for SimMIM's yacs CfgNode: an arbitrary pickled object beside the tensors."""

    def __init__(self):
        self.MODEL = {"TYPE": "vit"}


def _ibot_row() -> ModelEntry:
    return dataclasses.replace(MODELS["ibot_vits16"], name="tiny_ibot", input_size=32, native_size=32,
                               model_kwargs={"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2})


def _simmim_row() -> ModelEntry:
    return dataclasses.replace(MODELS["simmim_vitb16"], name="tiny_simmim", input_size=48, native_size=48,
                               model_kwargs={"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2})


def _pickled_checkpoints(tmp_path) -> dict[str, tuple[ModelEntry, object, dict]]:
    from generator.models.checkpoints import CHECKPOINT_FORMATS

    ibot = _ibot_row()
    teacher = _randomise(timm.create_model(ibot.architecture, pretrained=False, num_classes=0,
                                           **ibot.create_kwargs()), 30)
    ibot_path = tmp_path / "ibot_training.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                "args": argparse.Namespace(arch="vit_small", patch_size=16), "epoch": 800}, ibot_path)
    simmim = _simmim_row()
    beit = _randomise(timm.create_model(simmim.architecture, pretrained=False, num_classes=0,
                                        **CHECKPOINT_FORMATS["simmim"].model_kwargs, **simmim.create_kwargs()), 31)
    simmim_path = tmp_path / "simmim_pretrain.pth"
    torch.save({"model": {f"encoder.{k}": v for k, v in beit.state_dict().items()
                          if not k.endswith("relative_position_index")},
                "config": StandInConfig()}, simmim_path)
    return {"ibot": (ibot, ibot_path, teacher.state_dict()), "simmim": (simmim, simmim_path, beit.state_dict())}


@pytest.mark.parametrize("fmt", ["ibot", "simmim"])
def test_pickled_checkpoint_loads_only_when_trusted(tmp_path, fmt):
    from generator.batches import load_encoder_for
    from generator.extract import ExtractOptions

    entry, path, state = _pickled_checkpoints(tmp_path)[fmt]
    with pytest.raises(PatchAtlasError, match=f"--trust-checkpoint {entry.name}"):
        load_encoder(entry, checkpoint=path)
    untrusted = ExtractOptions(weights={entry.name: str(path)}, trust_checkpoints=("another_model",))
    with pytest.raises(PatchAtlasError, match="pickled Python objects"):
        load_encoder_for(entry, untrusted)
    encoder = load_encoder_for(entry, ExtractOptions(weights={entry.name: str(path)},
                                                     trust_checkpoints=(entry.name,)))
    loaded = encoder.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)


@pytest.mark.parametrize("command", ["extract", "build"])
def test_trust_checkpoint_option_reaches_the_extract_options(monkeypatch, tmp_path, command):
    import generator.extract as extract
    from generator.cli import cli

    seen = {}

    def fake_run_extract(out, sources, models, options):
        seen["options"] = options
        raise PatchAtlasError("stop here")

    monkeypatch.setattr(extract, "run_extract", fake_run_extract)
    result = CliRunner().invoke(cli, [command, "--out", str(tmp_path / "out"), "--source", "content-free",
                                      "--models", "ibot_vits16,simmim_vitb16", "--trust-checkpoint", "ibot_vits16",
                                      "--trust-checkpoint", "simmim_vitb16"])
    assert "stop here" in result.output or "stop here" in str(result.exception)
    assert tuple(seen["options"].trust_checkpoints) == ("ibot_vits16", "simmim_vitb16")


def test_trust_checkpoint_for_an_unknown_model_is_refused(tmp_path):
    from generator.extract import ExtractOptions, run_extract

    with pytest.raises(PatchAtlasError, match="unknown model 'ibot_vits61'"):
        run_extract(tmp_path, [], ["random"], ExtractOptions(trust_checkpoints=("ibot_vits61",)))
