"""Attention: the last block's weights read from a timm ViT, CLS maps, 60 % mass masks and the
foreground Jaccard, on hand-built attention with a known answer and on uniform controls."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from generator.analyses.attention import (
    attention_mass_mask,
    cls_attention_maps,
    foreground_jaccard,
    jaccard,
)
from generator.errors import PatchAtlasError
from generator.models.attention import last_block_attention

# ------------------------------------------------------------------ model side


def _proj_input(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """What the last block's output projection receives in an ordinary forward pass."""
    seen = []
    handle = model.blocks[-1].attn.proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            out = model.forward_features(pixels)
    finally:
        handle.remove()
    return seen[0], out


def _check_model(model: torch.nn.Module, pixels: torch.Tensor, prefix: int, grid: tuple[int, int]):
    expected_proj_input, expected_out = _proj_input(model, pixels)
    result = last_block_attention(model, pixels)
    batch, heads = pixels.shape[0], model.blocks[-1].attn.num_heads
    n_tokens = prefix + grid[0] * grid[1]
    assert result.num_prefix_tokens == prefix and result.grid == grid
    assert result.attn.shape == (batch, heads, n_tokens, n_tokens)
    assert result.v.shape == (batch, heads, n_tokens, model.blocks[-1].attn.head_dim)
    assert (result.attn >= 0).all()
    torch.testing.assert_close(result.attn.sum(-1), torch.ones(batch, heads, n_tokens), atol=1e-5, rtol=0)
    # The weights times v rebuild what the block fed its projection in a normal forward pass.
    rebuilt = (result.attn @ result.v).transpose(1, 2).reshape(batch, n_tokens, -1)
    torch.testing.assert_close(rebuilt, expected_proj_input, atol=1e-5, rtol=1e-4)
    # And q, k give back the weights.
    scale = result.q.shape[-1] ** -0.5
    torch.testing.assert_close((result.q @ result.k.transpose(-2, -1) * scale).softmax(-1), result.attn,
                               atol=1e-6, rtol=1e-5)
    # The model is left as it was.
    assert "forward" not in model.blocks[-1].attn.__dict__
    _, again = _proj_input(model, pixels)
    torch.testing.assert_close(again, expected_out)
    return result


def test_last_block_attention_of_a_tiny_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    _check_model(model, pixels, prefix=1, grid=(4, 4))


def test_last_block_attention_without_fused_kernels_is_restored():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    model.blocks[-1].attn.fused_attn = False
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    _check_model(model, pixels, prefix=1, grid=(4, 4))
    assert model.blocks[-1].attn.fused_attn is False


def test_last_block_attention_with_registers_and_rotary_embedding():
    # DINOv3-style: CLS + 4 registers, rotary position embedding applied to q and k.
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch16_dinov3", pretrained=False, depth=2, img_size=64, embed_dim=64, num_heads=2,
    ).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    result = _check_model(model, pixels, prefix=5, grid=(4, 4))
    maps = cls_attention_maps(result.attn, result.num_prefix_tokens, result.grid)
    assert maps.shape == (2, 2, 4, 4)


def test_last_block_attention_rejects_non_vits_and_training_mode():
    with pytest.raises(PatchAtlasError, match="blocks"):
        last_block_attention(torch.nn.Linear(3, 3).eval(), torch.zeros(1, 3, 8, 8))
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32)
    with pytest.raises(PatchAtlasError, match="eval"):
        last_block_attention(model.train(), torch.zeros(1, 3, 32, 32))


# ------------------------------------------------------------------ analysis side

GH, GW, PREFIX = 6, 8, 2  # CLS + one register


def _foreground() -> torch.Tensor:
    fg = torch.zeros(GH, GW, dtype=torch.bool)
    fg[1:4, 2:6] = True  # 12 of 48 patches
    return fg


def _attention_tensor(cls_rows: torch.Tensor) -> torch.Tensor:
    """A full [B, heads, N, N] tensor whose CLS row over patches is ``cls_rows`` [B, heads,
    gh, gw] (scaled into the row with some mass on the prefix tokens); other rows uniform."""
    batch, heads = cls_rows.shape[:2]
    n = PREFIX + GH * GW
    attn = torch.full((batch, heads, n, n), 1.0 / n)
    patch_part = cls_rows.reshape(batch, heads, -1)
    patch_part = patch_part / patch_part.sum(-1, keepdim=True) * 0.7
    attn[:, :, 0, :PREFIX] = 0.3 / PREFIX
    attn[:, :, 0, PREFIX:] = patch_part
    return attn


def _cls_rows_with_foreground_head(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head 0 noisy-uniform, head 1 on the foreground, head 2 on the background."""
    fg = _foreground()
    g = torch.Generator().manual_seed(0)
    n_fg, n_bg = int(fg.sum()), int((~fg).sum())
    on_fg = torch.where(fg, 0.61 / n_fg, 0.39 / n_bg)  # any strict subset of fg holds < 60 %
    on_bg = torch.where(fg, 0.05 / n_fg, 0.95 / n_bg)
    rows = []
    for _ in range(batch):
        uniform = 1.0 + 1e-3 * torch.rand(GH, GW, generator=g)
        rows.append(torch.stack([uniform, on_fg, on_bg]))
    return torch.stack(rows), fg


def test_cls_maps_read_the_cls_row_over_patches():
    rows, _ = _cls_rows_with_foreground_head(2)
    attn = _attention_tensor(rows)
    maps = cls_attention_maps(attn, PREFIX, (GH, GW))
    assert maps.shape == (2, 3, GH, GW)
    torch.testing.assert_close(maps, rows / rows.sum(dim=(-2, -1), keepdim=True) * 0.7)
    with pytest.raises(PatchAtlasError, match="grid"):
        cls_attention_maps(attn, PREFIX, (GH, GW + 1))


def _brute_force_mass_mask(values: np.ndarray, mass: float) -> np.ndarray:
    flat = values.ravel().astype(np.float64)
    order = sorted(range(flat.size), key=lambda i: -flat[i])
    keep = np.zeros(flat.size, dtype=bool)
    total, target = 0.0, mass * flat.sum()
    for i in order:
        if total >= target:
            break
        keep[i] = True
        total += flat[i]
    return keep.reshape(values.shape)


def test_mass_mask_matches_brute_force_and_is_minimal():
    g = torch.Generator().manual_seed(4)
    maps = torch.rand(3, 4, GH, GW, generator=g) ** 4  # peaked, like real attention
    masks = attention_mass_mask(maps, mass=0.6)
    for b in range(3):
        for h in range(4):
            values = maps[b, h].numpy()
            expected = _brute_force_mass_mask(values, 0.6)
            np.testing.assert_array_equal(masks[b, h].numpy(), expected)
            kept = values[expected]
            share = kept.sum() / values.sum()
            assert share >= 0.6
            assert (kept.sum() - kept.min()) / values.sum() < 0.6  # dropping one falls short
    assert attention_mass_mask(maps, mass=1.0).all()


def test_foreground_head_scores_one_and_uniform_attention_scores_about_chance():
    rows, fg = _cls_rows_with_foreground_head(5)
    maps = cls_attention_maps(_attention_tensor(rows), PREFIX, (GH, GW))
    # Labels: background class 0, two foreground classes, and an ignored patch in the background.
    labels = torch.zeros(5, GH, GW, dtype=torch.int64)
    labels[:, fg] = 3
    labels[:, 2, 2] = 7
    labels[:, 5, 7] = 255
    result = foreground_jaccard(maps, labels, background_ids=[0], ignore_index=255, mass=0.6)
    assert result["best_head"] == 1
    assert result["per_head"][1] == pytest.approx(1.0)
    assert result["best"] == pytest.approx(1.0)
    assert result["per_head"][2] == 0.0
    # A near-uniform head keeps a random 60 % of the patches: J ≈ 0.6 f / (0.4 f + 0.6) for a
    # foreground fraction f — low, and nowhere near the foreground head.
    f = fg.float().mean().item()
    chance = 0.6 * f / (0.4 * f + 0.6)
    assert result["per_head"][0] == pytest.approx(chance, abs=0.08)
    assert result["per_head"][0] < 0.5
    assert result["mean"] == pytest.approx(result["per_head"].mean())


def test_images_without_foreground_are_skipped():
    rows, fg = _cls_rows_with_foreground_head(2)
    maps = cls_attention_maps(_attention_tensor(rows), PREFIX, (GH, GW))
    labels = torch.zeros(2, GH, GW, dtype=torch.int64)
    labels[0, fg] = 1
    result = foreground_jaccard(maps, labels, background_ids=[0])
    assert np.isnan(result["per_image"][1]).all()
    assert result["per_head"][1] == pytest.approx(1.0)
    with pytest.raises(PatchAtlasError, match="no image has a foreground"):
        foreground_jaccard(maps, torch.zeros(2, GH, GW, dtype=torch.int64), background_ids=[0])


def test_jaccard_against_set_arithmetic():
    g = torch.Generator().manual_seed(5)
    a = torch.rand(4, GH, GW, generator=g) > 0.5
    b = torch.rand(4, GH, GW, generator=g) > 0.5
    per_mask, mean = jaccard(a, b)
    for i in range(4):
        sa = set(map(tuple, np.argwhere(a[i].numpy())))
        sb = set(map(tuple, np.argwhere(b[i].numpy())))
        assert per_mask[i] == pytest.approx(len(sa & sb) / len(sa | sb))
    assert mean == pytest.approx(per_mask.mean())
    assert jaccard(a, a)[1] == 1.0
    assert jaccard(a, ~a)[1] == 0.0
    empty = torch.zeros(2, GH, GW, dtype=torch.bool)
    per_mask, mean = jaccard(torch.stack([a[0], empty[0]]), torch.stack([a[0], empty[0]]))
    assert per_mask[0] == 1.0 and np.isnan(per_mask[1]) and mean == 1.0


@pytest.mark.parametrize("layers", [[1, 2], [1]])
@pytest.mark.parametrize("arch, kwargs", [
    ("vit_tiny_patch16_224", {"depth": 2, "img_size": 64}),
    ("vit_small_patch16_dinov3", {"depth": 2, "img_size": 64, "embed_dim": 64, "num_heads": 2}),
])
def test_one_pass_tokens_and_attention_equal_two_passes(arch, kwargs, layers):
    """Extraction reads layer tokens and last-block attention from one forward pass; it must
    give exactly what the separate token pass and attention pass give, even when the last
    layer's tokens are not asked for."""
    from generator.models.encoder import Encoder, WeightsInfo
    from generator.models.registry import ModelEntry

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).eval()
    prefix = int(model.num_prefix_tokens)
    entry = ModelEntry("one_pass", arch, "random", 16, 64, 64, prefix, pretrained=False,
                       num_registers=prefix - 1, model_kwargs=kwargs)
    encoder = Encoder(entry, model, WeightsInfo("random-init", "test", ""))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens, attention = encoder.tokens_and_attention(pixels, layers, ["prenorm", "postnorm"])
    separate_tokens = encoder.tokens(pixels, layers, ["prenorm", "postnorm"])
    separate_attention = encoder.attention(pixels)
    assert set(tokens.layers) == {(layer, norm) for layer in layers for norm in ("prenorm", "postnorm")}
    for key, toks in separate_tokens.layers.items():
        torch.testing.assert_close(tokens.layers[key].patch, toks.patch, rtol=0, atol=0)
        torch.testing.assert_close(tokens.layers[key].prefix, toks.prefix, rtol=0, atol=0)
    torch.testing.assert_close(attention.cls_maps, separate_attention.cls_maps, rtol=0, atol=0)
    for view in ("queries", "keys", "values"):
        torch.testing.assert_close(attention.views[view], separate_attention.views[view], rtol=0, atol=0)
    # The model is left as it was: a later plain pass records nothing and still works.
    assert "forward" not in vars(model.blocks[-1].attn)
