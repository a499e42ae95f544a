"""PCA maps: the first principal components of patch tokens shown as RGB (as in DINOv2).

The PCA is fitted *jointly* on the tokens of all images, and every channel is scaled with one
pair of robust percentiles over all images, so a colour means the same direction of feature
space in every image of a gallery. Signs are fixed (the largest-magnitude loading of each
component is positive, scikit-learn's convention), so the same tokens always give the same
colours.

The fit is exact: the covariance is accumulated in float64 on the tokens' device, chunk by
chunk, and diagonalised with ``torch.linalg.eigh`` (D × D, at most a few thousand). Maps come
back as numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from generator.errors import PatchAtlasError

__all__ = ["PCAFit", "pca_fit", "pca_project", "pca_rgb"]

# Rows per chunk when accumulating the covariance: bounds the float64 temporary.
_CHUNK_ROWS = 1 << 16


@dataclass
class PCAFit:
    """A PCA of D-dimensional tokens: ``mean`` [D], ``components`` [n_components, D] (unit rows,
    largest-|loading| entry positive), ``explained_variance`` [n_components] (sample variance,
    divisor N − 1) and ``explained_variance_ratio`` [n_components]; float64 tensors on the
    tokens' device except the ratio, a numpy array."""

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: np.ndarray


def _rows(tokens: torch.Tensor, fit_mask) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim < 2:
        raise PatchAtlasError(f"tokens must be a torch.Tensor [..., D], got {getattr(tokens, 'shape', type(tokens))}")
    flat = tokens.reshape(-1, tokens.shape[-1])
    if fit_mask is not None:
        mask = torch.as_tensor(fit_mask, device=tokens.device)
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(tokens.shape[:-1]):
            raise PatchAtlasError(
                f"fit_mask must be bool with the token grid's shape {tuple(tokens.shape[:-1])}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        flat = flat[mask.reshape(-1)]
    return flat


def pca_fit(tokens: torch.Tensor, n_components: int = 3, fit_mask=None) -> PCAFit:
    """Fit a PCA on all tokens [..., D] together (those where ``fit_mask`` is True, if given)."""
    flat = _rows(tokens, fit_mask)
    n, dim = flat.shape
    if isinstance(n_components, bool) or not isinstance(n_components, int) or not 1 <= n_components <= dim:
        raise PatchAtlasError(f"n_components must be an integer in [1, {dim}], got {n_components!r}")
    if n < 2:
        raise PatchAtlasError(f"PCA needs at least 2 tokens, got {n}; check fit_mask")

    device = flat.device
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    for start in range(0, n, _CHUNK_ROWS):
        total += flat[start : start + _CHUNK_ROWS].to(torch.float64).sum(dim=0)
    mean = total / n
    scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    for start in range(0, n, _CHUNK_ROWS):
        centred = flat[start : start + _CHUNK_ROWS].to(torch.float64) - mean
        scatter += centred.T @ centred
    covariance = scatter / (n - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    top = torch.flip(torch.arange(dim - n_components, dim, device=device), dims=(0,))
    variance = eigenvalues[top].clamp_min(0.0)
    components = eigenvectors[:, top].T.contiguous()
    largest = components.abs().argmax(dim=1)
    signs = torch.sign(components.gather(1, largest.unsqueeze(1)))
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    trace = float(torch.diagonal(covariance).sum())
    ratio = (variance / trace).cpu().numpy() if trace > 0 else np.zeros(n_components)
    return PCAFit(mean=mean, components=components, explained_variance=variance, explained_variance_ratio=ratio)


def pca_project(tokens: torch.Tensor, fit: PCAFit) -> torch.Tensor:
    """Coordinates of tokens [..., D] on the fitted components: [..., n_components], float64."""
    if tokens.shape[-1] != fit.mean.shape[0]:
        raise PatchAtlasError(f"tokens have {tokens.shape[-1]} features, the PCA was fitted on {fit.mean.shape[0]}")
    flat = tokens.reshape(-1, tokens.shape[-1])
    out = torch.empty(flat.shape[0], fit.components.shape[0], dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[0], _CHUNK_ROWS):
        out[start : start + _CHUNK_ROWS] = (flat[start : start + _CHUNK_ROWS].to(torch.float64) - fit.mean) @ fit.components.T
    return out.reshape(*tokens.shape[:-1], fit.components.shape[0])


def pca_rgb(
    tokens: torch.Tensor,
    n_components: int = 3,
    fit_mask=None,
    *,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> tuple[np.ndarray, np.ndarray]:
    """First principal components of patch tokens [n_img, gh, gw, D] as colours.

    The PCA is fitted on all images together (only on tokens where ``fit_mask`` [n_img, gh, gw]
    is True, e.g. foreground patches, as DINOv2 does after removing the background; all tokens
    are still projected). Each component is mapped to 0..255 linearly between its ``percentiles``
    over the fitted tokens of all images and clipped outside, so a few extreme tokens do not
    wash out the rest and colours compare across images. A component with no spread maps to 0.

    Returns (rgb uint8 [n_img, gh, gw, n_components], explained_variance_ratio [n_components]).
    """
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 4:
        raise PatchAtlasError(f"tokens must be a torch.Tensor [n_img, gh, gw, D], got {getattr(tokens, 'shape', type(tokens))}")
    low_pct, high_pct = percentiles
    if not 0.0 <= low_pct < high_pct <= 100.0:
        raise PatchAtlasError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")
    fit = pca_fit(tokens, n_components, fit_mask)
    coords = pca_project(tokens, fit).cpu().numpy()
    fitted = coords.reshape(-1, n_components)
    if fit_mask is not None:
        fitted = fitted[np.asarray(torch.as_tensor(fit_mask).cpu()).reshape(-1)]
    low, high = np.percentile(fitted, [low_pct, high_pct], axis=0)
    span = high - low
    scaled = np.where(span > 0, (coords - low) / np.where(span > 0, span, 1.0), 0.0)
    rgb = np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    return rgb, fit.explained_variance_ratio
