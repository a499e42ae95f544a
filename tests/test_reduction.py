"""The explorer's reduction: planted low-rank tokens survive it, full-rank noise does not."""

from __future__ import annotations

import numpy as np
import pytest

from generator.analyses.reduction import (
    cosine_to,
    dequantize_int8,
    fit_reduction,
    pair_cosines,
    quantize_int8,
    reduce_tokens,
    reduction_error,
    sample_pairs,
    similarity_coordinates,
)
from generator.errors import PatchAtlasError


def planted_low_rank(n=600, dim=64, rank=5, seed=0):
    """Tokens = a mean far from zero + a rank-``rank`` signal, with spreads from 8 down to 1."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0].T
    spreads = np.geomspace(8.0, 1.0, rank)
    mean = rng.normal(size=dim) * 3.0
    return mean + (rng.normal(size=(n, rank)) * spreads) @ basis


def test_planted_low_rank_tokens_are_reconstructed_with_no_cosine_error():
    tokens = planted_low_rank()
    fit = fit_reduction(tokens, 5)
    z = reduce_tokens(tokens, fit)
    coords = similarity_coordinates(z.astype(np.float64), fit)
    assert np.allclose(fit.mean + z.astype(np.float64) @ fit.components, tokens, atol=1e-4)
    assert fit.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-9)
    error = reduction_error(tokens, coords, n_pairs=5000)
    assert error["max"] < 1e-5 and error["pairs"] == 5000
    # int8 codes cost a little, far below what the explorer could show.
    q, scale = quantize_int8(z)
    quantized = reduction_error(tokens, similarity_coordinates(dequantize_int8(q, scale), fit), n_pairs=5000)
    assert 1e-6 < quantized["mean"] < 5e-3 and quantized["p95"] < 1e-2


def test_full_rank_noise_shows_a_large_error():
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(600, 64))
    fit = fit_reduction(noise, 5)
    error = reduction_error(noise, similarity_coordinates(reduce_tokens(noise, fit), fit), n_pairs=5000)
    # Five of 64 equal directions keep ~8 % of the variance: reduced cosines are mostly noise.
    assert error["mean"] > 0.1 and error["p95"] > 0.3
    assert fit.explained_variance_ratio.sum() < 0.2


def test_similarity_coordinates_keep_inner_products_of_the_reconstructions():
    tokens = planted_low_rank(rank=5) + np.random.default_rng(2).normal(size=(600, 64)) * 0.3
    fit = fit_reduction(tokens, 3)
    z = reduce_tokens(tokens, fit).astype(np.float64)
    reconstruction = fit.mean + z @ fit.components
    coords = similarity_coordinates(z, fit)
    assert coords.shape == (600, 4) and fit.residual > 0
    assert np.allclose(coords @ coords[:10].T, reconstruction @ reconstruction[:10].T, rtol=1e-9, atol=1e-6)
    # Cosines from the coordinates are the cosines of the reconstructions.
    unit = reconstruction / np.linalg.norm(reconstruction, axis=1, keepdims=True)
    assert np.allclose(cosine_to(coords, 7), unit @ unit[7], atol=1e-9)


def test_components_are_sorted_orthonormal_and_sign_fixed():
    tokens = planted_low_rank()
    fit = fit_reduction(tokens, 4)
    assert np.allclose(fit.components @ fit.components.T, np.eye(4), atol=1e-9)
    assert (np.diff(fit.explained_variance_ratio) <= 0).all()
    largest = np.abs(fit.components).argmax(axis=1)
    assert (fit.components[np.arange(4), largest] > 0).all()
    assert fit_reduction(tokens, 500).n_components == 64  # clipped to D: a rotation


def test_quantize_int8_per_column_scale_and_zero_column():
    values = np.array([[1.0, -100.0, 0.0], [-0.5, 50.0, 0.0], [0.25, 25.0, 0.0]], dtype=np.float32)
    q, scale = quantize_int8(values)
    assert q.dtype == np.int8 and scale.tolist() == pytest.approx([1 / 127, 100 / 127, 1.0])
    assert q[:, 0].tolist() == [127, -64, 32] and q[0, 1] == -127 and (q[:, 2] == 0).all()
    back = dequantize_int8(q, scale)
    assert (np.abs(back - values) <= scale * 0.5001).all()  # at most half a step


def test_pairs_never_pair_a_row_with_itself_and_are_reproducible():
    pairs = sample_pairs(5, 2000, seed=3)
    assert (pairs[:, 0] != pairs[:, 1]).all() and pairs.min() == 0 and pairs.max() == 4
    assert (sample_pairs(5, 2000, seed=3) == pairs).all()
    vectors = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert pair_cosines(vectors, np.array([[0, 1], [0, 2]])).tolist() == pytest.approx([0.0, -1.0])


@pytest.mark.parametrize("call, message", [
    (lambda: fit_reduction(np.zeros((1, 4)), 2), "at least 2 tokens"),
    (lambda: fit_reduction(np.zeros((5, 4)), 0), "n_components"),
    (lambda: fit_reduction(np.full((5, 4), np.nan), 2), "NaN"),
    (lambda: fit_reduction(np.zeros(4), 2), r"\[N, D\]"),
    (lambda: reduce_tokens(np.zeros((3, 5)), fit_reduction(np.eye(4), 2)), "5 features"),
    (lambda: reduction_error(np.eye(4), np.eye(3)), "same tokens"),
    (lambda: dequantize_int8(np.zeros((2, 3), np.int16), np.ones(3)), "int8"),
])
def test_bad_input_names_the_problem(call, message):
    with pytest.raises(PatchAtlasError, match=message):
        call()
