"""High-norm artifact tokens: planted outliers are found exactly, clean tokens give none."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generator.analyses.artifacts import (
    high_norm_outliers,
    norm_histogram,
    outlier_position_share,
    token_norms,
)
from generator.errors import PatchAtlasError

N_IMG, GH, GW, DIM = 30, 8, 9, 48


def _tokens(seed: int) -> torch.Tensor:
    return torch.randn(N_IMG, GH, GW, DIM, generator=torch.Generator().manual_seed(seed))


def _planted(seed: int):
    """Clean tokens plus artifacts: a few tokens per image replaced by long ones, at known
    positions (mostly one corner, as artifacts favour redundant places, plus random ones)."""
    tokens = _tokens(seed)
    rng = np.random.default_rng(seed)
    mask = np.zeros((N_IMG, GH, GW), dtype=bool)
    mask[:, 0, GW - 1] = True
    for img in range(N_IMG):
        mask[img, rng.integers(GH), rng.integers(GW)] = True
    direction = torch.randn(DIM, generator=torch.Generator().manual_seed(seed + 1))
    long_token = direction / direction.norm() * 10 * DIM**0.5  # ten times the typical norm
    planted = tokens.clone()
    planted[torch.from_numpy(mask)] = long_token + 0.1 * tokens[torch.from_numpy(mask)]
    return planted, mask


def test_token_norms_match_numpy():
    tokens = _tokens(0)
    norms = token_norms(tokens)
    assert norms.shape == (N_IMG, GH, GW)
    np.testing.assert_allclose(norms.numpy(), np.linalg.norm(tokens.numpy(), axis=-1), rtol=1e-6)
    prefix = tokens[:, 0, :5]  # [B, P, D] prefix tokens work the same way
    assert token_norms(prefix).shape == (N_IMG, 5)


@pytest.mark.parametrize("method", ["iqr", "mad"])
def test_planted_outliers_found_exactly(method):
    planted, mask = _planted(2)
    result = high_norm_outliers(token_norms(planted), method=method)
    found = result["mask"].numpy()
    np.testing.assert_array_equal(found, mask)
    assert result["share"] == pytest.approx(mask.mean())
    share = outlier_position_share(result["mask"])
    assert share[0, GW - 1] == 1.0
    np.testing.assert_allclose(share, mask.mean(axis=0))


@pytest.mark.parametrize("method", ["iqr", "mad"])
def test_clean_tokens_have_no_outliers(method):
    result = high_norm_outliers(token_norms(_tokens(3)), method=method)
    assert result["share"] < 1e-3
    assert result["threshold"] > float(np.median(token_norms(_tokens(3)).numpy()))


def test_absolute_threshold_and_numpy_input():
    planted, mask = _planted(4)
    norms = token_norms(planted).numpy()
    # Clean norms are about sqrt(48) ≈ 7, artifacts about 70: 30 separates them.
    result = high_norm_outliers(norms, method="threshold", factor=30.0)
    assert isinstance(result["mask"], np.ndarray)
    np.testing.assert_array_equal(result["mask"], mask)
    assert result["threshold"] == 30.0
    with pytest.raises(PatchAtlasError, match="factor"):
        high_norm_outliers(norms, method="threshold")
    with pytest.raises(PatchAtlasError, match="unknown"):
        high_norm_outliers(norms, method="otsu")


def test_iqr_fence_matches_its_definition():
    norms = token_norms(_tokens(5)).numpy()
    q1, q3 = np.percentile(norms, [25, 75])
    assert high_norm_outliers(norms, method="iqr", factor=1.5)["threshold"] == pytest.approx(q3 + 1.5 * (q3 - q1))


def test_norm_histogram_counts_every_token_and_shows_two_modes():
    planted, mask = _planted(6)
    norms = token_norms(planted)
    counts, edges = norm_histogram(norms, bins=40, log_spaced=True)
    assert counts.sum() == norms.numel()
    assert edges.shape == (41,) and np.all(np.diff(np.log(edges)) > 0)
    np.testing.assert_allclose(np.diff(np.log(edges)), np.diff(np.log(edges))[0])
    # The artifact mode: every token above the gap lands in the upper bins, and only those.
    gap = np.searchsorted(edges, 30.0)
    assert counts[gap:].sum() == mask.sum()
    ref_counts, ref_edges = np.histogram(norms.numpy(), bins=edges)
    np.testing.assert_array_equal(counts, ref_counts)

    fixed, fixed_edges = norm_histogram(norms, bins=np.array([0.0, 30.0, 1000.0]))
    np.testing.assert_array_equal(fixed, [mask.size - mask.sum(), mask.sum()])
    with pytest.raises(PatchAtlasError, match="increasing"):
        norm_histogram(norms, bins=np.array([3.0, 1.0]))
