"""Calibration controls: timm ViTs whose weights are set by hand, so their tokens have one known
property and every analysis has a model whose answer is known in advance.

Each construction takes a freshly created timm ``VisionTransformer`` (a two-block ViT-Ti/16 in the
registry: width 192, 224 px, patch 16, one CLS token) and overwrites *every* parameter, so the
result depends on nothing but this file (no timm initialisation, no training, no download).
The common skeleton (:func:`_identity_skeleton`):

- every block passes its input through unchanged: the attention and MLP output projections are
  zero, so ``x + attn(...) + mlp(...) = x`` and every layer's pre-norm tokens equal the
  embedding ``patch_embed(pixels) + pos_embed``; queries and keys are zero, so attention is
  uniform (the attention analysis sees its no-information baseline);
- every LayerNorm has weight 1 and bias 0.

Every vector a construction writes sums to zero over the feature axis. LayerNorm then only
rescales a token (``LN(x) = sqrt(D) · x / |x|``, up to its epsilon), so post-norm tokens are the
pre-norm tokens projected to a sphere and carry the same property.

The feature axis is split into blocks, one per planted signal, so the signals never overlap:

==========  ==========  ====================================================================
dims        block       written by
==========  ==========  ====================================================================
0–7         junk        ``junkdims``: the position-keyed high-variance noise
8–15        high-norm   ``highnorm``: the planted high-norm vector
16–23       border      ``border``: the border-ring vector
24–31       offset      content models: a constant vector of norm ``OFFSET_NORM``
32–(D−1)    code        ``position``: the sinusoidal (row, col) code; content models: the
                        content code
==========  ==========  ====================================================================

The content code (:func:`content_descriptor_weights`) is a fixed orthonormal embedding of the
patch's mean colour and the mean colours of its 2×2 and 4×4 cells (63 numbers of the normalised
pixels): a function of the patch pixels alone, the same at every grid position. With the
constant offset beside it, post-norm dot products rank neighbours as Euclidean distances of
the descriptors do (the offset dominates the norm, so normalisation keeps distances in order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch

from generator.errors import PatchAtlasError

# Bumped whenever a construction would give other weights.
CONTROLS_VERSION = "1"

JUNK = slice(0, 8)
HIGH_NORM = slice(8, 16)
BORDER = slice(16, 24)
OFFSET = slice(24, 32)
CODE_START = 32

OFFSET_NORM = 40.0
# On the border ring the offset is turned by this angle into the border dims: the ring's tokens
# move 2 · OFFSET_NORM · sin(angle / 2) = OFFSET_NORM away from the interior ones (several
# spreads of the content code: border score ≫ 1) while keeping their norm exactly, so the ring
# is no high-norm mode and LayerNorm scales it like every other token.
BORDER_ANGLE = np.pi / 3
# Grid positions (row, col) of the planted high-norm tokens on a 14×14 grid: four interior
# positions, off the border ring, so the border and high-norm signals stay apart.
HIGH_NORM_POSITIONS = ((3, 3), (3, 10), (10, 3), (10, 10))
# Every other token's norm lies in [OFFSET_NORM, ~OFFSET_NORM + 2]: the planted tokens are ~20×
# the median norm.
HIGH_NORM_NORM = 20.0 * OFFSET_NORM
# The junk dims: a unit vector per position (within the zero-sum subspace of the 8 junk dims)
# times JUNK_NORM, so their per-dimension variance is ~JUNK_NORM² / 8, far above that of any
# content dimension, and every token gets the same junk norm. Large enough to decide most
# dot-product neighbours; small beside the offset, because after LayerNorm the junk's share of
# the norm (JUNK_NORM² / (OFFSET_NORM² + JUNK_NORM²)) is what keeps post-norm dot products, once
# the junk dims are removed, from ranking neighbours as the content control does.
JUNK_NORM = 15.0
JUNK_SEED = 1
CONTENT_SEED = 0
# Cells per side whose mean colours form the content descriptor: 1 (the patch), 2×2 and 4×4.
DESCRIPTOR_CELLS = (1, 2, 4)


def _zero_sum_orthonormal(n_dims: int, n_vectors: int, rng: np.random.Generator) -> np.ndarray:
    """[n_dims, n_vectors] orthonormal columns, each summing to zero (a random basis of a subspace
    of the zero-sum hyperplane)."""
    if n_vectors > n_dims - 1:
        raise PatchAtlasError(f"cannot fit {n_vectors} zero-sum orthonormal vectors in {n_dims} dims")
    raw = rng.standard_normal((n_dims, n_vectors))
    raw -= raw.mean(axis=0, keepdims=True)
    q, _ = np.linalg.qr(raw)
    return q


def _balanced(n_dims: int, norm: float) -> np.ndarray:
    """A zero-sum vector of the given norm: +a on the first half of the dims, −a on the second."""
    half = n_dims // 2
    v = np.concatenate([np.ones(half), -np.ones(n_dims - half)])
    v -= v.mean()
    return v * (norm / np.linalg.norm(v))


def _check_model(model: torch.nn.Module) -> tuple[int, tuple[int, int], int]:
    """(width, grid, patch) of a plain timm ViT with one CLS token, or a clear error."""
    for attr in ("patch_embed", "pos_embed", "cls_token", "blocks"):
        if getattr(model, attr, None) is None:
            raise PatchAtlasError(f"control constructions need a timm VisionTransformer with a CLS token and a "
                                  f"learned position embedding; the model has no {attr!r}")
    if int(getattr(model, "num_prefix_tokens", 1)) != 1 or getattr(model, "no_embed_class", False):
        raise PatchAtlasError("control constructions need exactly one prefix token (CLS) sharing the position "
                              "embedding; build them on vit_tiny_patch16_224")
    width = int(model.embed_dim)
    if width < CODE_START + 64:
        raise PatchAtlasError(f"control constructions need a width of at least {CODE_START + 64}, got {width}")
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    patch = int(model.patch_embed.patch_size[0])
    if any(patch % cells for cells in DESCRIPTOR_CELLS):
        raise PatchAtlasError(f"patch size {patch} is not divisible into {DESCRIPTOR_CELLS} cells per side")
    return width, grid, patch


def _identity_skeleton(model: torch.nn.Module) -> None:
    """Every parameter and buffer zero, then LayerNorms to weight 1: blocks pass tokens through."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                module.weight.fill_(1.0)


def descriptor_matrix(patch: int) -> np.ndarray:
    """[n_features, 3, patch, patch]: each row averages one channel over one cell, for the cells
    of ``DESCRIPTOR_CELLS`` per side (n_features = 3 · (1 + 4 + 16) = 63 at patch 16)."""
    rows = []
    for cells in DESCRIPTOR_CELLS:
        side = patch // cells
        for channel in range(3):
            for r in range(cells):
                for c in range(cells):
                    w = np.zeros((3, patch, patch))
                    w[channel, r * side:(r + 1) * side, c * side:(c + 1) * side] = 1.0 / (side * side)
                    rows.append(w)
    return np.stack(rows)


def content_descriptor_weights(width: int, patch: int) -> np.ndarray:
    """Patch-embedding weights [width, 3, patch, patch] of the content code: the descriptor
    (:func:`descriptor_matrix`) embedded isometrically in the code dims by a fixed orthonormal,
    zero-sum basis (seed ``CONTENT_SEED``)."""
    descriptor = descriptor_matrix(patch)
    basis = _zero_sum_orthonormal(width - CODE_START, descriptor.shape[0], np.random.default_rng(CONTENT_SEED))
    weights = np.zeros((width, 3, patch, patch))
    weights[CODE_START:] = np.tensordot(basis, descriptor, axes=(1, 0))
    return weights


def sinusoidal_position_code(grid: tuple[int, int], n_dims: int) -> np.ndarray:
    """[gh·gw, n_dims] code of (row, col): half the dims for the row, half for the column, each
    half ``sin, cos, −sin, −cos`` of the coordinate at n_dims / 8 frequencies from one cycle per
    four grids to several per grid. Every token has the same norm and sums to zero, and the
    frequencies outnumber the rows and columns, so any function of the row (or column), the
    coordinate itself included, is an exact linear function of the code."""
    gh, gw = grid
    n_freq = n_dims // 8
    if n_freq < max(gh, gw):
        raise PatchAtlasError(f"a {n_dims}-dim code has {n_freq} frequencies, fewer than the {max(gh, gw)} "
                              "rows or columns it must separate")

    def axis_code(size: int) -> np.ndarray:
        coord = np.arange(size, dtype=np.float64)[:, None]
        omega = np.pi * np.arange(1, n_freq + 1, dtype=np.float64)[None, :] / (2.0 * size)
        s, c = np.sin(omega * coord), np.cos(omega * coord)
        return np.concatenate([s, c, -s, -c], axis=1)  # [size, 4 · n_freq]

    rows, cols = axis_code(gh), axis_code(gw)
    code = np.zeros((gh * gw, n_dims))
    half = 4 * n_freq
    code[:, :half] = np.repeat(rows, gw, axis=0)
    code[:, half:2 * half] = np.tile(cols, (gh, 1))
    return code


def _grid_index(grid: tuple[int, int], row: int, col: int) -> int:
    gh, gw = grid
    # The planted positions are written for a 14×14 grid; other grids get them at the same
    # relative place.
    return int(round(row * (gh - 1) / 13)) * gw + int(round(col * (gw - 1) / 13))


def high_norm_indices(grid: tuple[int, int]) -> list[int]:
    """Flat grid indices (row-major) of the planted high-norm tokens."""
    return sorted({_grid_index(grid, r, c) for r, c in HIGH_NORM_POSITIONS})


def border_ring(grid: tuple[int, int]) -> np.ndarray:
    """bool [gh·gw]: the outermost ring of patches."""
    gh, gw = grid
    r, c = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    return ((r == 0) | (c == 0) | (r == gh - 1) | (c == gw - 1)).reshape(-1)


def junk_vectors(grid: tuple[int, int]) -> np.ndarray:
    """[gh·gw, 8] per-position junk: a pseudo-random unit vector in the zero-sum subspace of the
    junk dims (seed ``JUNK_SEED``), times ``JUNK_NORM``. It depends on the position only, never
    on the image, and carries no class information."""
    n = JUNK.stop - JUNK.start
    rng = np.random.default_rng(JUNK_SEED)
    raw = rng.standard_normal((grid[0] * grid[1], n))
    raw -= raw.mean(axis=1, keepdims=True)
    return JUNK_NORM * raw / np.linalg.norm(raw, axis=1, keepdims=True)


def _write(model: torch.nn.Module, patch_weight: np.ndarray | None, bias: np.ndarray | None,
           pos: np.ndarray | None) -> None:
    """Set the patch embedding (weight, bias) and the patch part of the position embedding
    [gh·gw, D]; the CLS token gets the bias, so it looks like a patch of zero pixels."""
    with torch.no_grad():
        if patch_weight is not None:
            model.patch_embed.proj.weight.copy_(torch.from_numpy(patch_weight))
        if bias is not None:
            model.patch_embed.proj.bias.copy_(torch.from_numpy(bias))
            model.cls_token[0, 0].copy_(torch.from_numpy(bias))
        if pos is not None:
            model.pos_embed[0, 1:].copy_(torch.from_numpy(pos))


def _content_parts(model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """(patch weights, offset bias, zero position embedding, grid) of the content models."""
    width, grid, patch = _check_model(model)
    bias = np.zeros(width)
    bias[OFFSET] = _balanced(OFFSET.stop - OFFSET.start, OFFSET_NORM)
    return content_descriptor_weights(width, patch), bias, np.zeros((grid[0] * grid[1], width)), grid


def construct_position(model: torch.nn.Module) -> torch.nn.Module:
    """Tokens carry position only.

    Patch embedding zero, position embedding the sinusoidal (row, col) code
    (:func:`sinusoidal_position_code`) in the code dims: every image gives the same tokens.
    Expected readings: position decodability R² ≈ 1 (rows and columns), positional consistency
    1 (each position always lands in one cluster), k-NN / k-means mIoU at the level of a
    per-position prior (no content), locality curve falling with distance (smooth code), border
    score of a smooth code (no planted ring), high-norm share 0 (every token has one norm).
    """
    width, grid, _ = _check_model(model)
    _identity_skeleton(model)
    pos = np.zeros((grid[0] * grid[1], width))
    pos[:, CODE_START:] = sinusoidal_position_code(grid, width - CODE_START)
    _write(model, None, None, pos)
    return model


def construct_content(model: torch.nn.Module) -> torch.nn.Module:
    """Tokens are a fixed function of the patch pixels, with no position.

    Patch embedding the content code plus the constant offset, position embedding zero: the
    same patch pixels give the same token at any grid position. Expected readings: position
    decodability ≈ 0 on inputs without a spatial layout (content-free noise; on the synthetic
    scenes only what the layout gives, e.g. sky above ground), border score ≈ 0, k-NN / k-means
    mIoU high on the synthetic scenes (their classes differ in colour and texture), high-norm
    share 0, no high-variance dims.
    """
    weights, bias, pos, _ = _content_parts(model)
    _identity_skeleton(model)
    _write(model, weights, bias, pos)
    return model


def construct_border(model: torch.nn.Module) -> torch.nn.Module:
    """The content control plus a border ring.

    The position embedding adds one constant vector on the outermost ring of patches and nothing
    elsewhere: the one that turns the offset by ``BORDER_ANGLE`` into the border dims, a vector
    of norm OFFSET_NORM (:data:`BORDER_ANGLE`). Expected readings: border score ≈ OFFSET_NORM /
    (the content tokens' interior spread), far above every other control; the border map lights
    up the ring; k-means puts the ring in clusters of its own (positional consistency up);
    high-norm share 0 (the ring's tokens keep their norm exactly).
    """
    weights, bias, pos, grid = _content_parts(model)
    _identity_skeleton(model)
    ring = border_ring(grid)
    pos[ring, OFFSET] = (np.cos(BORDER_ANGLE) - 1.0) * bias[OFFSET]
    pos[ring, BORDER] = np.sin(BORDER_ANGLE) * _balanced(BORDER.stop - BORDER.start, OFFSET_NORM)
    _write(model, weights, bias, pos)
    return model


def construct_highnorm(model: torch.nn.Module) -> torch.nn.Module:
    """The content control plus planted high-norm tokens.

    The position embedding adds a vector of norm ``HIGH_NORM_NORM`` (20 × the offset, so ≈ 20 ×
    the median token norm) in the high-norm dims at the ``HIGH_NORM_POSITIONS`` and nothing
    elsewhere. Expected readings on pre-norm tokens: exactly those tokens exceed 10 × the median
    norm, so the high-norm outlier share is 4 / 196 = 2.04 % on a 14×14 grid; every other
    control reads 0.
    """
    weights, bias, pos, grid = _content_parts(model)
    _identity_skeleton(model)
    pos[high_norm_indices(grid), HIGH_NORM] = _balanced(HIGH_NORM.stop - HIGH_NORM.start, HIGH_NORM_NORM)
    _write(model, weights, bias, pos)
    return model


def construct_junkdims(model: torch.nn.Module) -> torch.nn.Module:
    """The content control plus 8 junk dimensions of huge variance.

    The position embedding adds :func:`junk_vectors` in dims 0–7: pseudo-noise keyed by grid
    position, independent of the image and of its classes, with a variance per dimension about
    ten times that of any content dimension. Expected readings: dims 0–7 are the top of
    the variance spectrum; k-NN mIoU (dot product) falls far below the content control's, since
    the junk decides most dot products (toward a per-position prior), and recovers to the content control's level
    once the top N ≥ 8 variance dims are removed; a linear probe, which can ignore dims, is
    barely affected.
    """
    weights, bias, pos, grid = _content_parts(model)
    _identity_skeleton(model)
    pos[:, JUNK] = junk_vectors(grid)
    _write(model, weights, bias, pos)
    return model


CONSTRUCTIONS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "position": construct_position,
    "content": construct_content,
    "border": construct_border,
    "highnorm": construct_highnorm,
    "junkdims": construct_junkdims,
}


def construct(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """Apply the construction ``name`` to ``model`` in place (float32) and return it."""
    if name not in CONSTRUCTIONS:
        raise PatchAtlasError(f"unknown control construction {name!r}; choose from {', '.join(CONSTRUCTIONS)}")
    return CONSTRUCTIONS[name](model.float())


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's state (names, dtypes, shapes and bytes, in name order): the
    revision recorded for a constructed model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.numpy().tobytes() if data.dtype != torch.bfloat16 else data.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()
