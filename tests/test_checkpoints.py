"""Original checkpoints mapped into timm models give the original model's tokens exactly.

Each format is tested on a planted model: a small network whose weights are written under the
original code's key names (torchvision: its own VisionTransformer; iBOT, SimMIM, BEiT: a timm
model renamed by the inverse of the original naming), mapped back, loaded strictly, and run on
the same input. Every parameter is randomised so a swapped bias or a misplaced table changes
the output.
"""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from generator.errors import PatchAtlasError
from generator.models.checkpoints import (
    CHECKPOINT_FORMATS,
    beit_to_timm,
    create_model_from_checkpoint,
    ibot_to_timm,
    load_original_checkpoint,
    simmim_to_timm,
    torchvision_vit_to_timm,
)

SMALL_VIT = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                 num_classes=0)
# A 3×3 grid so the relative position table has distinct entries for every offset.
SMALL_BEIT = dict(img_size=48, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                  num_classes=0, **CHECKPOINT_FORMATS["simmim"].model_kwargs)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def _images(side: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _small_vit(seed: int) -> torch.nn.Module:
    return _randomise(timm.create_model("vit_base_patch16_224", pretrained=False, **SMALL_VIT), seed)


def _small_beit(seed: int) -> torch.nn.Module:
    return _randomise(timm.create_model("beit_base_patch16_224", pretrained=False, **SMALL_BEIT), seed)


@torch.no_grad()
def _tokens(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output, plus the final normed sequence."""
    blocks = model.forward_intermediates(x, norm=False, output_fmt="NLC", intermediates_only=True,
                                         return_prefix_tokens=True)
    return [torch.cat([prefix, patch], dim=1) for patch, prefix in blocks] + [model.forward_features(x)]


def _load(architecture: str, kwargs: dict, state: dict) -> torch.nn.Module:
    model = timm.create_model(architecture, pretrained=False, **kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _assert_identical(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# torchvision ----------------------------------------------------------------------------------

def _torchvision_vit() -> torchvision.models.VisionTransformer:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2,
                                                 num_heads=2, hidden_dim=32, mlp_dim=64)
    return _randomise(model, 1)


@torch.no_grad()
def _torchvision_tokens(model: torchvision.models.VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """torchvision's own encoder: each layer's output, then encoder.ln of the last."""
    seq = model._process_input(x)
    seq = torch.cat([model.class_token.expand(x.shape[0], -1, -1), seq], dim=1)
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
             for layer in model.encoder.layers]
    final = model.encoder(seq)
    for hook in hooks:
        hook.remove()
    return captured + [final]


def test_torchvision_vit_matches_torchvision_encoder(tmp_path):
    tv = _torchvision_vit()
    path = tmp_path / "vit_b_16.pth"
    torch.save(tv.state_dict(), path)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **SMALL_VIT)
    state = load_original_checkpoint(path, "torchvision_vit", model=model)
    model.load_state_dict(state, strict=True)
    x = _images(32)
    got, want = _tokens(model.eval(), x), _torchvision_tokens(tv, x)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        # Only the fused in_proj of nn.MultiheadAttention differs in arithmetic order: agreement
        # to float32 rounding (1e-6 relative to the tokens' scale, which reaches ~30 here).
        assert (g - w).abs().max().item() <= 1e-6 * max(1.0, w.abs().max().item())
    # The comparison can fail: a model with other weights is far away.
    other_weights = _randomise(_torchvision_vit(), 2).state_dict()
    other = _load("vit_base_patch16_224", SMALL_VIT, torchvision_vit_to_timm(other_weights))
    assert (_tokens(other, x)[-1] - want[-1]).abs().max().item() > 1e-2


def test_torchvision_old_mlp_names_are_accepted():
    state = _torchvision_vit().state_dict()
    renamed = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
               for k, v in state.items()}
    assert renamed.keys() != state.keys()
    new, old = torchvision_vit_to_timm(state), torchvision_vit_to_timm(renamed)
    assert new.keys() == old.keys()
    assert all(torch.equal(new[k], old[k]) for k in new)
    assert not any(k.startswith("head") for k in new)


# iBOT -----------------------------------------------------------------------------------------

def _ibot_head(dim: int, seed: int) -> dict[str, torch.Tensor]:
    """The projection head keys of iBOTHead (mlp, weight-normed last_layer / last_layer2)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "head.mlp.0.weight": torch.randn(16, dim, generator=g),
        "head.mlp.0.bias": torch.randn(16, generator=g),
        "head.last_layer.weight_g": torch.ones(8, 1),
        "head.last_layer.weight_v": torch.randn(8, 16, generator=g),
        "head.last_layer2.weight_g": torch.ones(8, 1),
        "head.last_layer2.weight_v": torch.randn(8, 16, generator=g),
    }


def _as_ibot(state: dict, prefix: str, student: bool) -> dict:
    """iBOT's VisionTransformer uses DINO's (= timm's) names under the wrapper's prefix."""
    out = {prefix + "backbone." + k: v for k, v in state.items()}
    out.update({prefix + k: v for k, v in _ibot_head(32, 3).items()})
    if student:  # the student is built with masked_im_modeling=True
        out[prefix + "backbone.masked_embed"] = torch.zeros(1, 32)
    return out


def test_ibot_training_checkpoint_loads_the_teacher(tmp_path):
    teacher, student = _small_vit(10), _small_vit(11)
    checkpoint = {
        "teacher": _as_ibot(teacher.state_dict(), "", student=False),
        "student": _as_ibot(student.state_dict(), "module.", student=True),
        "epoch": torch.tensor(800),
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    model = create_model_from_checkpoint(path, "ibot", "vit_base_patch16_224",
                                         **{k: v for k, v in SMALL_VIT.items() if k != "num_classes"})
    x = _images(32)
    _assert_identical(_tokens(model, x), _tokens(teacher, x))
    assert not torch.equal(_tokens(model, x)[-1], _tokens(student, x)[-1])


def test_ibot_student_and_released_backbone_formats():
    student = _small_vit(12)
    x = _images(32)
    mapped = ibot_to_timm(_as_ibot(student.state_dict(), "module.", student=True))
    _assert_identical(_tokens(_load("vit_base_patch16_224", SMALL_VIT, mapped), x), _tokens(student, x))
    # Released checkpoint_teacher.pth: backbone keys without prefix, under 'state_dict'.
    released = ibot_to_timm(dict(student.state_dict()))
    assert released.keys() == mapped.keys()


def test_ibot_layer_scale_maps_to_timm_layer_scale():
    kwargs = {**SMALL_VIT, "init_values": 0.1}
    reference = _randomise(timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs), 13)
    state = {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v
             for k, v in reference.state_dict().items()}
    assert "blocks.0.gamma_1" in state
    x = _images(32)
    _assert_identical(_tokens(_load("vit_base_patch16_224", kwargs, ibot_to_timm(state)), x),
                      _tokens(reference, x))


# SimMIM ---------------------------------------------------------------------------------------

def _unilm_relative_position_index(side: int) -> torch.Tensor:
    """BEiT / SimMIM's index, written from its definition: a (dy, dx) offset between patches
    picks row (dy + side-1)·(2·side-1) + (dx + side-1); the last three rows are
    CLS→patch, patch→CLS and CLS→CLS."""
    table = (2 * side - 1) ** 2
    cells = [(r, c) for r in range(side) for c in range(side)]
    n = len(cells) + 1
    index = torch.zeros(n, n, dtype=torch.long)
    for i, (ri, ci) in enumerate(cells, start=1):
        for j, (rj, cj) in enumerate(cells, start=1):
            index[i, j] = (ri - rj + side - 1) * (2 * side - 1) + (ci - cj + side - 1)
    index[0, :] = table
    index[:, 0] = table + 1
    index[0, 0] = table + 2
    return index


def _as_simmim(state: dict) -> dict:
    """SimMIM(encoder=VisionTransformerForSimMIM, decoder=Conv2d+PixelShuffle) state dict."""
    out = {"encoder." + k: v for k, v in state.items()}
    out["encoder.mask_token"] = torch.zeros(1, 1, 32)
    out["encoder.rel_pos_bias.relative_position_index"] = _unilm_relative_position_index(3)
    out["decoder.0.weight"] = torch.randn(16 * 16 * 3, 32, 1, 1)
    out["decoder.0.bias"] = torch.zeros(16 * 16 * 3)
    return out


def test_timm_beit_uses_the_unilm_relative_position_index():
    model = _small_beit(20)
    assert torch.equal(model.rel_pos_bias.relative_position_index, _unilm_relative_position_index(3))


def test_simmim_checkpoint_gives_identical_tokens(tmp_path):
    reference = _small_beit(21)
    path = tmp_path / "simmim_pretrain__vit_base__img224__800ep.pth"
    torch.save({"model": _as_simmim(reference.state_dict()), "epoch": torch.tensor(799)}, path)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, **SMALL_BEIT)
    state = load_original_checkpoint(path, "simmim", model=model)
    model.load_state_dict(state, strict=True)
    x = _images(48)
    _assert_identical(_tokens(model.eval(), x), _tokens(reference, x))
    # The shared table matters: zeroing it changes the tokens.
    state["rel_pos_bias.relative_position_bias_table"] = torch.zeros_like(
        state["rel_pos_bias.relative_position_bias_table"])
    model.load_state_dict(state, strict=True)
    assert not torch.equal(_tokens(model, x)[-1], _tokens(reference, x)[-1])


def test_simmim_key_outside_encoder_is_refused():
    state = _as_simmim(_small_beit(22).state_dict())
    state["projector.weight"] = torch.zeros(2, 2)
    with pytest.raises(PatchAtlasError, match="projector.weight"):
        simmim_to_timm(state)


# BEiT (transformers) --------------------------------------------------------------------------

def _as_hf_beit(state: dict) -> dict:
    """BeitForMaskedImageModeling names (transformers' modeling_beit): embeddings, encoder.layer.N
    with attention.attention.query/key/value (no key bias), attention.output.dense,
    intermediate.dense, output.dense, layernorm_before/after, lambda_1/2; the shared
    relative_position_bias under encoder; the final layernorm and lm_head outside ``beit``."""
    dim = 32
    out = {
        "beit.embeddings.cls_token": state["cls_token"],
        "beit.embeddings.mask_token": torch.zeros(1, 1, dim),
        "beit.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "beit.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "beit.encoder.relative_position_bias.relative_position_bias_table":
            state["rel_pos_bias.relative_position_bias_table"],
        "beit.encoder.relative_position_bias.relative_position_index": _unilm_relative_position_index(3),
        "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"],
        "lm_head.weight": torch.randn(8192, dim), "lm_head.bias": torch.zeros(8192),
    }
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(2):
        hf, tm = f"beit.encoder.layer.{i}.", f"blocks.{i}."
        for timm_name, hf_name in names.items():
            for p in ("weight", "bias"):
                out[f"{hf}{hf_name}.{p}"] = state[f"{tm}{timm_name}.{p}"]
        q, k, v = state[f"{tm}attn.qkv.weight"].chunk(3, dim=0)
        out[f"{hf}attention.attention.query.weight"] = q
        out[f"{hf}attention.attention.key.weight"] = k
        out[f"{hf}attention.attention.value.weight"] = v
        out[f"{hf}attention.attention.query.bias"] = state[f"{tm}attn.q_bias"]
        out[f"{hf}attention.attention.value.bias"] = state[f"{tm}attn.v_bias"]
        out[f"{hf}lambda_1"] = state[f"{tm}gamma_1"]
        out[f"{hf}lambda_2"] = state[f"{tm}gamma_2"]
    return {k: v.contiguous() for k, v in out.items()}


def test_beit_transformers_safetensors_gives_identical_tokens(tmp_path):
    reference = _small_beit(30)
    path = tmp_path / "model.safetensors"
    save_file(_as_hf_beit(reference.state_dict()), str(path))
    model = timm.create_model("beit_base_patch16_224", pretrained=False,
                              **{**SMALL_BEIT, **CHECKPOINT_FORMATS["beit_hf"].model_kwargs})
    model.load_state_dict(load_original_checkpoint(path, "beit_hf", model=model), strict=True)
    x = _images(48)
    _assert_identical(_tokens(model.eval(), x), _tokens(reference, x))


def test_beit_q_and_v_biases_are_not_interchangeable():
    reference = _small_beit(31)
    hf = _as_hf_beit(reference.state_dict())
    q, v = (f"beit.encoder.layer.0.attention.attention.{name}.bias" for name in ("query", "value"))
    hf[q], hf[v] = hf[v], hf[q]
    model = _load("beit_base_patch16_224", SMALL_BEIT, beit_to_timm(hf))
    x = _images(48)
    assert not torch.equal(_tokens(model, x)[-1], _tokens(reference, x)[-1])


def test_beit_key_bias_is_unexpected():
    hf = _as_hf_beit(_small_beit(32).state_dict())
    hf["beit.encoder.layer.1.attention.attention.key.bias"] = torch.zeros(32)
    with pytest.raises(PatchAtlasError, match=r"layer\.1\.attention\.attention\.key\.bias"):
        beit_to_timm(hf)


# Errors ---------------------------------------------------------------------------------------

def test_missing_key_is_named_with_the_file(tmp_path):
    state = _torchvision_vit().state_dict()
    del state["encoder.layers.encoder_layer_1.ln_2.weight"]
    path = tmp_path / "truncated.pth"
    torch.save(state, path)
    with pytest.raises(PatchAtlasError, match=r"truncated\.pth.*missing keys: blocks\.1\.norm2\.weight"):
        load_original_checkpoint(path, "torchvision_vit")
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **SMALL_VIT)
    with pytest.raises(PatchAtlasError, match=r"blocks\.1\.norm2\.weight"):
        load_original_checkpoint(path, "torchvision_vit", model=model)


def test_missing_final_norm_is_caught_against_the_model(tmp_path):
    state = _torchvision_vit().state_dict()
    del state["encoder.ln.bias"]
    path = tmp_path / "no_norm.pth"
    torch.save(state, path)
    load_original_checkpoint(path, "torchvision_vit")  # the structure alone cannot know
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **SMALL_VIT)
    with pytest.raises(PatchAtlasError, match=r"no_norm\.pth.*missing keys: norm\.bias"):
        load_original_checkpoint(path, "torchvision_vit", model=model)


def test_unexpected_key_is_named(tmp_path):
    state = _torchvision_vit().state_dict()
    state["encoder.layers.encoder_layer_0.adapter.weight"] = torch.zeros(4, 4)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(PatchAtlasError, match=r"extra\.pth.*unexpected keys: .*adapter\.weight"):
        load_original_checkpoint(path, "torchvision_vit")


def test_wrong_architecture_is_refused_by_shape(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(_torchvision_vit().state_dict(), path)
    wider = timm.create_model("vit_base_patch16_224", pretrained=False, **{**SMALL_VIT, "embed_dim": 64})
    with pytest.raises(PatchAtlasError, match="shape mismatches"):
        load_original_checkpoint(path, "torchvision_vit", model=wider)


def test_layer_scale_checkpoint_into_model_without_it_is_unexpected(tmp_path):
    kwargs = {**SMALL_VIT, "init_values": 0.1}
    reference = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)
    state = {"state_dict": {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v
                            for k, v in reference.state_dict().items()}}
    path = tmp_path / "ibot_ls.pth"
    torch.save(state, path)
    plain = timm.create_model("vit_base_patch16_224", pretrained=False, **SMALL_VIT)
    with pytest.raises(PatchAtlasError, match=r"unexpected keys: .*blocks\.0\.ls1\.gamma"):
        load_original_checkpoint(path, "ibot", model=plain)


def test_pickled_objects_are_refused_unless_trusted(tmp_path):
    teacher = _small_vit(40)
    path = tmp_path / "with_args.pth"
    torch.save({"state_dict": dict(teacher.state_dict()), "args": argparse.Namespace(arch="vit_small")}, path)
    with pytest.raises(PatchAtlasError, match="pickled Python objects"):
        load_original_checkpoint(path, "ibot")
    state = load_original_checkpoint(path, "ibot", trust_pickle=True)
    assert torch.equal(state["pos_embed"], teacher.state_dict()["pos_embed"])


def test_unknown_format_and_absent_file(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(PatchAtlasError, match="unknown checkpoint format 'dino3'"):
        load_original_checkpoint(path, "dino3")
    with pytest.raises(PatchAtlasError, match="not found"):
        load_original_checkpoint(tmp_path / "absent.pth", "ibot")


def test_other_input_size_resamples_position_embedding(tmp_path):
    teacher = _small_vit(50)
    path = tmp_path / "checkpoint_teacher.pth"
    torch.save({"state_dict": dict(teacher.state_dict())}, path)
    kwargs = {k: v for k, v in SMALL_VIT.items() if k not in ("num_classes", "img_size")}
    model = create_model_from_checkpoint(path, "ibot", "vit_base_patch16_224", img_size=64, **kwargs)
    assert model.pos_embed.shape == (1, 1 + 16, 32)
    # Weights other than the position embedding are carried over untouched.
    assert torch.equal(model.blocks[1].attn.qkv.weight, teacher.blocks[1].attn.qkv.weight)
    with torch.no_grad():
        assert torch.isfinite(model.forward_features(_images(64))).all()


def test_every_format_names_a_timm_architecture():
    for fmt in CHECKPOINT_FORMATS.values():
        assert fmt.architecture in timm.list_models(fmt.architecture)
        assert callable(fmt.convert) and fmt.description
