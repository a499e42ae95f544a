"""Self-attention of the last block of a timm ViT: softmax weights and the q, k, v they come from.

timm computes attention with ``F.scaled_dot_product_attention`` (fused kernels), which never
materialises the weights. Rather than re-implementing each attention module (plain ViT, EVA /
DINOv3 with rotary embeddings, q/k normalisation, separate q/k/v biases), the last block's
attention is run as the model runs it, with its fused path forced on, while a torch function
mode intercepts the one ``scaled_dot_product_attention`` call: the q, k, v it receives are
exactly what the module uses (after q/k normalisation and rotary embedding), the weights are
recomputed from them as softmax(q kᵀ · scale + mask), and the original kernel still produces
the block's output, so the forward pass itself is unchanged.

Pure model side, no I/O: a module and pixels in, tensors out.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from generator.errors import PatchAtlasError

__all__ = ["AttentionOutput", "attention_output", "capture_last_block_attention", "last_block_attention"]


@dataclass
class AttentionOutput:
    """Last-block attention of a batch, float32 on the model's device.

    ``attn`` [B, heads, N, N]: softmax weights, rows are queries and sum to 1, over all N tokens
    (prefix tokens first: CLS, then registers, then patches in raster order).
    ``q``, ``k``, ``v`` [B, heads, N, head_dim]: as the attention used them (q and k after any
    q/k normalisation and rotary position embedding).
    """

    attn: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    num_prefix_tokens: int
    grid: tuple[int, int]


def _softmax_weights(q: torch.Tensor, k: torch.Tensor, attn_mask, is_causal: bool,
                     scale: float | None) -> torch.Tensor:
    """The weights scaled_dot_product_attention applies, in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q.float() @ k.float().transpose(-2, -1)) * scale
    if is_causal:
        n_q, n_k = logits.shape[-2:]
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    return logits.softmax(dim=-1)


class _CaptureAttention(TorchFunctionMode):
    """Records q, k, v and the softmax weights of every scaled_dot_product_attention call made
    while it is active (the mode steps aside while its own handler runs)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
            bound = dict(zip(names, args))
            bound.update(kwargs)
            q, k, v = bound["query"], bound["key"], bound["value"]
            if k.shape[1] != q.shape[1] or bound.get("enable_gqa", False):
                raise PatchAtlasError(
                    "attention with grouped key/value heads is not supported by last_block_attention"
                )
            weights = _softmax_weights(q, k, bound.get("attn_mask"), bool(bound.get("is_causal", False)),
                                       bound.get("scale"))
            self.calls.append((weights, q.float(), k.float(), v.float()))
        return func(*args, **kwargs)


def _grid(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[int, int]:
    patch_embed = getattr(model, "patch_embed", None)
    height, width = pixels.shape[-2:]
    if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
        gh, gw = patch_embed.dynamic_feat_size((height, width))
        return int(gh), int(gw)
    patch = getattr(patch_embed, "patch_size", None)
    if patch is None:
        raise PatchAtlasError(f"{type(model).__name__} has no patch_embed; expected a timm ViT")
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return height // ph, width // pw


def _check_model(model: torch.nn.Module) -> torch.nn.Module:
    """The last block's attention module, after checking the model is a timm ViT in eval mode."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0 or not hasattr(blocks[-1], "attn"):
        raise PatchAtlasError(
            f"{type(model).__name__} has no transformer blocks with an 'attn' module; expected a timm ViT"
        )
    if model.training:
        raise PatchAtlasError(
            f"{type(model).__name__} is in training mode, where attention dropout would make the "
            "weights random; call model.eval() first"
        )
    attn_module = blocks[-1].attn
    if not hasattr(attn_module, "fused_attn"):
        raise PatchAtlasError(
            f"{type(attn_module).__name__} is not a timm attention module with a fused path; "
            "last_block_attention cannot read its weights"
        )
    return attn_module


@contextlib.contextmanager
def capture_last_block_attention(model: torch.nn.Module) -> Iterator[_CaptureAttention]:
    """While active, any forward pass through the model records its last block's attention.

    The caller runs the forward it needs anyway (e.g. ``forward_intermediates`` for the layer
    tokens), so the attention costs no second pass; :func:`attention_output` reads the record.
    """
    attn_module = _check_model(model)
    capture = _CaptureAttention()
    original_forward = attn_module.forward
    original_fused = attn_module.fused_attn

    def forward_with_capture(*args, **kwargs):
        with capture:
            return original_forward(*args, **kwargs)

    attn_module.fused_attn = True  # the unfused path computes the weights but never calls sdpa
    attn_module.forward = forward_with_capture
    try:
        yield capture
    finally:
        del attn_module.forward  # the class's forward shows through again
        attn_module.fused_attn = original_fused


def attention_output(model: torch.nn.Module, pixels: torch.Tensor, capture: _CaptureAttention) -> AttentionOutput:
    """What one forward pass of ``pixels`` under :func:`capture_last_block_attention` recorded."""
    if len(capture.calls) != 1:
        raise PatchAtlasError(
            f"the last block of {type(model).__name__} made {len(capture.calls)} attention calls, "
            "expected exactly 1"
        )
    weights, q, k, v = capture.calls[0]
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    grid = _grid(model, pixels)
    n_tokens = weights.shape[-1]
    if n_tokens != num_prefix + grid[0] * grid[1]:
        raise PatchAtlasError(
            f"last block attends over {n_tokens} tokens, but {num_prefix} prefix tokens and a "
            f"{grid[0]}×{grid[1]} patch grid make {num_prefix + grid[0] * grid[1]}"
        )
    return AttentionOutput(attn=weights, q=q, k=k, v=v, num_prefix_tokens=num_prefix, grid=grid)


@torch.no_grad()
def last_block_attention(model: torch.nn.Module, pixels: torch.Tensor) -> AttentionOutput:
    """Attention weights and q, k, v of the last transformer block of a timm ViT.

    ``pixels`` [B, 3, H, W] are already preprocessed for the model, which must be in eval
    mode. The whole ``forward_features`` pass runs (under whatever autocast the caller has
    set); only the last block's attention call is intercepted, and the model's settings are
    restored afterwards.
    Works for timm's VisionTransformer and Eva (DINOv3, EVA-02) attention modules.
    """
    _check_model(model)
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4:
        raise PatchAtlasError(f"pixels must be a tensor [B, 3, H, W], got {getattr(pixels, 'shape', type(pixels))}")
    with capture_last_block_attention(model) as capture:
        model.forward_features(pixels)
    return attention_output(model, pixels, capture)
