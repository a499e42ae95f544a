"""High-norm artifact tokens (Darcet et al. 2024, "Vision Transformers Need Registers").

Large ViTs trained long enough repurpose a few patch tokens, mostly in redundant background,
as global scratch space; those tokens have an L2 norm far above the rest. Norms are read from
**pre-norm** tokens (raw block outputs): the final LayerNorm rescales every token to about the
same length, which hides the artifacts entirely in post-norm tokens.

Artifact tokens form a *separate mode* of the norm distribution, roughly an order of magnitude
above the rest (Darcet et al., Fig. 3: a bimodal histogram on a log axis). The default rule,
``"gap"``, looks for that mode and reports none when there is none:

- ``"gap"`` — in log(norm), the widest empty interval between two consecutive sorted norms
  whose upper end lies at least ``min_ratio`` × the median norm (3 by default). It is accepted
  as the valley between two modes only when the lowest norm above it is at least ``min_gap`` ×
  the highest norm below it (1.5 by default); the threshold is then the geometric middle of the
  gap. Otherwise no token is an outlier (share 0, threshold ``None``). Ordinary bright content
  makes a long continuous right tail, with no empty factor-1.5 interval, so it reads ≈ 0.
  Tokens between the two modes narrow the gap: the rule assumes the valley is empty, as it is
  in the registers paper's histograms.

Fences on a single distribution are kept for comparison; they flag the top of any heavy tail
(a model without artifacts reads several per cent), so they are not the default:

- ``"iqr"``  — Tukey's far-out fence, norm > Q3 + factor · (Q3 − Q1), factor 3 by default;
- ``"mad"``  — norm > median + factor · 1.4826 · MAD (MAD scaled to a normal's standard
  deviation), factor 5 by default;
- ``"threshold"`` — norm > factor, an absolute cut such as the 150 Darcet et al. use for
  DINOv2-g (there is no default: a sensible cut depends on the model).

A split between the two modes that always exists (Otsu-style) is deliberately not offered: a
model without artifacts would still report outliers.

Norms stay on the tokens' device as tensors; fences and histograms are computed on the CPU in
float64 from the flat norms (one number per token, cheap to move).
"""

from __future__ import annotations

import numpy as np
import torch

from generator.errors import PatchAtlasError

__all__ = [
    "OUTLIER_METHODS",
    "high_norm_outliers",
    "norm_histogram",
    "outlier_position_share",
    "token_norms",
]

OUTLIER_METHODS = ("gap", "iqr", "mad", "threshold")
_DEFAULT_FACTOR = {"iqr": 3.0, "mad": 5.0}
# Scales the median absolute deviation to the standard deviation of a normal distribution.
_MAD_TO_STD = 1.4826


def token_norms(tokens: torch.Tensor) -> torch.Tensor:
    """L2 norm of every token over its last (feature) axis: [..., D] → [...], float32 (float64
    stays float64), on the tokens' device. Pass pre-norm tokens; see the module docstring."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim < 1:
        raise PatchAtlasError(f"tokens must be a torch.Tensor [..., D], got {type(tokens).__name__}")
    dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(tokens.to(dtype), dim=-1)


def _flat_numpy(norms) -> np.ndarray:
    if isinstance(norms, torch.Tensor):
        return norms.detach().to("cpu", torch.float64).numpy().ravel()
    return np.asarray(norms, dtype=np.float64).ravel()


def _widest_log_gap(flat: np.ndarray, min_ratio: float, min_gap: float) -> float | None:
    """Threshold of the ``"gap"`` rule (see the module docstring), or None without a mode."""
    # A zero token has no log-norm; it is never an outlier, and the median still counts it.
    logs = np.sort(np.log(flat[flat > 0]))
    if logs.size < 2:
        return None
    spans = np.diff(logs)  # spans[i] is the empty interval between logs[i] and logs[i + 1]
    allowed = logs[1:] >= np.log(np.median(flat)) + np.log(min_ratio)
    if not allowed.any():
        return None
    widest = int(np.argmax(np.where(allowed, spans, -np.inf)))
    if spans[widest] < np.log(min_gap):
        return None
    return float(np.exp(0.5 * (logs[widest] + logs[widest + 1])))


def high_norm_outliers(norms, *, method: str = "gap", factor: float | None = None, min_ratio: float = 3.0,
                       min_gap: float = 1.5) -> dict:
    """Flag tokens whose norm is an outlier among all the given norms (e.g. [n_img, gh, gw]).

    The threshold is computed jointly over every token, so one threshold holds for the whole
    set of images (see the module docstring for the methods). ``min_ratio`` and ``min_gap``
    belong to ``"gap"``, ``factor`` to the fences. Returns ``mask`` (bool, the input's shape, a
    tensor on the input's device for tensor input, else numpy), ``threshold`` (a token is an
    outlier when its norm is strictly above it; ``None`` when ``"gap"`` finds no separate mode),
    ``share`` (fraction of tokens flagged), ``method`` and ``params`` (the method's parameters,
    to record with the share); the fences also return ``factor``.
    """
    if method not in OUTLIER_METHODS:
        raise PatchAtlasError(f"outlier method {method!r} is unknown; choose from {', '.join(OUTLIER_METHODS)}")
    if method == "gap":
        for name, value in (("min_ratio", min_ratio), ("min_gap", min_gap)):
            if not (np.isfinite(value) and value >= 1.0):
                raise PatchAtlasError(f"{name} must be a finite factor >= 1, got {value!r}")
        params = {"min_ratio": float(min_ratio), "min_gap": float(min_gap)}
    else:
        if factor is None:
            if method == "threshold":
                raise PatchAtlasError("method='threshold' needs factor= the absolute norm above which a token is an outlier")
            factor = _DEFAULT_FACTOR[method]
        if not np.isfinite(factor) or (method != "threshold" and factor <= 0):
            raise PatchAtlasError(f"factor must be a positive finite number, got {factor!r}")
        params = {"factor": float(factor)}
    flat = _flat_numpy(norms)
    if flat.size == 0:
        raise PatchAtlasError("norms are empty; nothing to look for outliers in")
    if not np.isfinite(flat).all():
        raise PatchAtlasError("norms contain NaN or infinite values; check the tokens")

    if method == "gap":
        threshold = _widest_log_gap(flat, min_ratio, min_gap)
    elif method == "iqr":
        q1, q3 = np.quantile(flat, [0.25, 0.75])
        threshold = float(q3 + factor * (q3 - q1))
    elif method == "mad":
        median = np.median(flat)
        threshold = float(median + factor * _MAD_TO_STD * np.median(np.abs(flat - median)))
    else:
        threshold = float(factor)

    cut = np.inf if threshold is None else threshold
    if isinstance(norms, torch.Tensor):
        mask = norms > cut
        share = float(mask.double().mean())
    else:
        mask = np.asarray(norms) > cut
        share = float(mask.mean())
    return {"mask": mask, "threshold": threshold, "share": share, "method": method, "params": params, **params}


def outlier_position_share(mask) -> np.ndarray:
    """Share of images in which each grid position holds an outlier: mask [n_img, gh, gw] →
    float64 [gh, gw]. Shows whether artifacts prefer positions (corners, borders) or follow
    content."""
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if arr.ndim != 3 or arr.dtype != np.bool_:
        raise PatchAtlasError(f"mask must be bool [n_img, gh, gw], got {arr.dtype} {arr.shape}")
    return arr.mean(axis=0, dtype=np.float64)


def norm_histogram(norms, bins: int | np.ndarray = 64, *, log_spaced: bool = False,
                   value_range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of token norms: (counts int64 [b], edges float64 [b + 1]).

    ``bins`` is a count or explicit edges. With ``log_spaced`` the edges are spaced evenly in
    log(norm) — artifact norms are often ten times the typical norm, and a log axis shows both
    modes. ``value_range`` fixes the span (use one span to compare models on shared axes);
    by default it is the data's min and max.
    """
    flat = _flat_numpy(norms)
    if flat.size == 0:
        raise PatchAtlasError("norms are empty; nothing to histogram")
    if isinstance(bins, (int, np.integer)) and not isinstance(bins, bool):
        if bins < 1:
            raise PatchAtlasError(f"bins must be a positive count, got {bins}")
        low, high = value_range if value_range is not None else (float(flat.min()), float(flat.max()))
        if not low < high:
            high = low + 1.0  # a single value still gets one non-empty bin
        if log_spaced:
            if low <= 0:
                raise PatchAtlasError(
                    f"log-spaced bins need a positive lower edge, got {low}; pass value_range or log_spaced=False"
                )
            edges = np.geomspace(low, high, int(bins) + 1)
        else:
            edges = np.linspace(low, high, int(bins) + 1)
    else:
        edges = np.asarray(bins, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2 or not (np.diff(edges) > 0).all():
            raise PatchAtlasError("bins given as edges must be a strictly increasing 1-D array of >= 2 values")
    counts, edges = np.histogram(flat, bins=edges)
    return counts.astype(np.int64), edges
