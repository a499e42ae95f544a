"""Compact tokens for the browser explorer: a PCA reduction, int8 quantisation, reduced cosines.

The explorer compares patch tokens by cosine similarity in the browser, so it needs the tokens
small. A token x [D] is stored as its coordinates z = V (x − μ) on the top r principal
components V [r, D] of the dataset's tokens (mean μ), quantised to int8 with one scale per
component (components differ in spread by orders of magnitude; one scale for all would spend
the 8 bits on the first).

Cosine similarity is taken between the *reconstructions* x̂ = μ + Vᵀz, not between the centred
coordinates, so it approximates the cosine of the tokens themselves (the mean direction carries
much of it in ViTs). In the orthonormal basis [V; μ⊥/|μ⊥|], where μ⊥ is the part of μ outside
the components' span, x̂ has the coordinates ŷ = [z + Vμ, |μ⊥|]: r + 1 numbers whose inner
products are exactly those of the reconstructions. The browser builds ŷ from z, ``offset`` = Vμ
and ``residual`` = |μ⊥|, and takes plain cosines of ŷ.

How faithful that is gets measured on the tokens themselves: |cos(ŷ_i, ŷ_j) − cos(x_i, x_j)|
over sampled patch pairs (:func:`reduction_error`). Pure numpy: arrays in, arrays and numbers out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from generator.errors import PatchAtlasError

__all__ = ["Reduction", "fit_reduction", "reduce_tokens", "quantize_int8", "dequantize_int8",
           "similarity_coordinates", "cosine_to", "sample_pairs", "pair_cosines", "reduction_error"]

_INT8_MAX = 127


@dataclass
class Reduction:
    """A fitted reduction of D-dimensional tokens to r components.

    ``mean`` [D] and ``components`` [r, D] (orthonormal rows, by decreasing variance, largest-
    |loading| entry positive) define z = V (x − μ); ``offset`` [r] = Vμ and ``residual`` = |μ⊥|
    turn z into similarity coordinates; ``explained_variance_ratio`` [r] is each component's
    share of the total variance of the fitted tokens.
    """

    mean: np.ndarray
    components: np.ndarray
    offset: np.ndarray
    residual: float
    explained_variance_ratio: np.ndarray

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])


def _as_rows(tokens, what: str = "tokens") -> np.ndarray:
    array = np.asarray(tokens)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise PatchAtlasError(f"{what} must be a non-empty [N, D] array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise PatchAtlasError(f"{what} must be floating point, got {array.dtype}")
    return array


def fit_reduction(tokens, n_components: int) -> Reduction:
    """Fit the reduction on tokens [N, D] (float64 covariance, exact eigendecomposition).

    ``n_components`` above D is clipped to D (the reduction is then a rotation: lossless).
    """
    x = _as_rows(tokens).astype(np.float64)
    n, dim = x.shape
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
        raise PatchAtlasError(f"n_components must be a positive integer, got {n_components!r}")
    if n < 2:
        raise PatchAtlasError(f"the reduction needs at least 2 tokens, got {n}")
    if not np.isfinite(x).all():
        raise PatchAtlasError("tokens hold NaN or infinite values; rerun extract for this config")
    r = min(int(n_components), dim)
    mean = x.mean(axis=0)
    centred = x - mean
    covariance = centred.T @ centred / (n - 1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    order = np.argsort(eigenvalues)[::-1][:r]
    components = eigenvectors[:, order].T
    largest = np.abs(components).argmax(axis=1)
    signs = np.sign(components[np.arange(r), largest])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    offset = components @ mean
    residual = float(np.linalg.norm(mean - components.T @ offset))
    trace = float(np.trace(covariance))
    ratio = np.clip(eigenvalues[order], 0.0, None) / trace if trace > 0 else np.zeros(r)
    return Reduction(mean=mean, components=components, offset=offset, residual=residual,
                     explained_variance_ratio=ratio)


def reduce_tokens(tokens, fit: Reduction) -> np.ndarray:
    """Coordinates z [N, r] (float32) of tokens [N, D] on the fitted components."""
    x = _as_rows(tokens)
    if x.shape[1] != fit.mean.shape[0]:
        raise PatchAtlasError(f"tokens have {x.shape[1]} features, the reduction was fitted on {fit.mean.shape[0]}")
    return ((x.astype(np.float64) - fit.mean) @ fit.components.T).astype(np.float32)


def quantize_int8(values) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [N, r], float32 scale [r]): values ≈ q × scale, one scale per column (its max |value| ↦ 127).

    A column of zeros gets scale 1 (it stays zeros).
    """
    z = _as_rows(values, "values").astype(np.float64)
    peak = np.abs(z).max(axis=0)
    scale = np.where(peak > 0, peak / _INT8_MAX, 1.0)
    q = np.clip(np.rint(z / scale), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize_int8(q, scale) -> np.ndarray:
    """float32 [N, r] from int8 codes and their per-column scales (what the browser computes)."""
    q, scale = np.asarray(q), np.asarray(scale, dtype=np.float32)
    if q.dtype != np.int8 or q.ndim != 2 or scale.shape != (q.shape[1],):
        raise PatchAtlasError(f"expected int8 [N, r] codes and [r] scales, got {q.dtype} {q.shape} and {scale.shape}")
    return q.astype(np.float32) * scale


def similarity_coordinates(z, fit: Reduction) -> np.ndarray:
    """ŷ [N, r + 1] = [z + Vμ, |μ⊥|]: inner products of these are those of the reconstructions μ + Vᵀz."""
    z = _as_rows(z, "z")
    if z.shape[1] != fit.n_components:
        raise PatchAtlasError(f"z has {z.shape[1]} components, the reduction has {fit.n_components}")
    column = np.full((z.shape[0], 1), fit.residual, dtype=np.float64)
    return np.concatenate([z.astype(np.float64) + fit.offset, column], axis=1)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def cosine_to(vectors, index: int) -> np.ndarray:
    """Cosine of every row of ``vectors`` [N, d] with row ``index`` ([N], float64; a zero row gives 0)."""
    unit = _unit_rows(_as_rows(vectors, "vectors").astype(np.float64))
    if not 0 <= index < unit.shape[0]:
        raise PatchAtlasError(f"index {index} is outside the {unit.shape[0]} rows")
    return unit @ unit[index]


def sample_pairs(n: int, n_pairs: int, seed: int = 0) -> np.ndarray:
    """[n_pairs, 2] distinct-row index pairs drawn uniformly (with replacement) from n rows."""
    if n < 2 or n_pairs < 1:
        raise PatchAtlasError(f"need at least 2 rows and 1 pair, got {n} rows and {n_pairs} pairs")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n, n_pairs)
    second = (first + rng.integers(1, n, n_pairs)) % n  # never the row itself
    return np.stack([first, second], axis=1)


def pair_cosines(vectors, pairs) -> np.ndarray:
    """Cosine of each pair of rows ([P], float64)."""
    unit = _unit_rows(_as_rows(vectors, "vectors").astype(np.float64))
    pairs = np.asarray(pairs)
    return np.einsum("pd,pd->p", unit[pairs[:, 0]], unit[pairs[:, 1]])


def reduction_error(full, reduced, n_pairs: int = 20_000, seed: int = 0) -> dict:
    """How far reduced cosines are from full ones: |cos(reduced_i, reduced_j) − cos(full_i, full_j)|
    over sampled pairs of rows. ``full`` [N, D] and ``reduced`` [N, d] hold the same tokens in
    the same order. Returns ``mean``, ``p95``, ``max`` and the number of ``pairs``."""
    full, reduced = _as_rows(full, "full"), _as_rows(reduced, "reduced")
    if full.shape[0] != reduced.shape[0]:
        raise PatchAtlasError(f"full has {full.shape[0]} rows, reduced {reduced.shape[0]}: they must be the same tokens")
    pairs = sample_pairs(full.shape[0], n_pairs, seed)
    error = np.abs(pair_cosines(reduced, pairs) - pair_cosines(full, pairs))
    return {"mean": float(error.mean()), "p95": float(np.percentile(error, 95)), "max": float(error.max()),
            "pairs": int(len(pairs))}
