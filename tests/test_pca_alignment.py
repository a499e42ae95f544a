"""PCA maps recover planted directions and match scikit-learn; cluster alignment undoes
permutations; the adjusted Rand index equals scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from generator.analyses.alignment import (
    adjusted_rand_index,
    align_to_reference,
    alignment_lut,
    cluster_stability,
)
from generator.analyses.pca import pca_fit, pca_project, pca_rgb
from generator.errors import PatchAtlasError

N_IMG, GH, GW, DIM = 12, 7, 9, 24

# ------------------------------------------------------------------ PCA


def _planted_pca_tokens(seed: int):
    """Tokens = three planted coordinates along orthonormal directions with standard deviations
    5, 3, 2, plus isotropic noise of 0.1 and an offset: the top three principal directions are
    the planted ones, in that order."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    directions = basis[:, :3].T  # [3, D]
    # Coordinates made exactly centred and uncorrelated over the sample, so that the planted
    # directions are the sample's principal directions and not merely the population's.
    raw = torch.randn(N_IMG * GH * GW, 3, generator=g, dtype=torch.float64)
    white, _ = torch.linalg.qr(raw - raw.mean(dim=0))
    scales = torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64)
    coords = (white * (N_IMG * GH * GW) ** 0.5 * scales).reshape(N_IMG, GH, GW, 3)
    noise = 0.1 * torch.randn(N_IMG, GH, GW, DIM, generator=g, dtype=torch.float64)
    offset = torch.randn(DIM, generator=g, dtype=torch.float64)
    tokens = (coords @ directions + noise + offset).float()
    return tokens, coords.numpy(), directions


def test_pca_channels_follow_the_planted_coordinates():
    tokens, coords, directions = _planted_pca_tokens(0)
    rgb, ratio = pca_rgb(tokens)
    assert rgb.shape == (N_IMG, GH, GW, 3) and rgb.dtype == np.uint8
    for c in range(3):
        r = np.corrcoef(rgb[..., c].ravel().astype(float), coords[..., c].ravel())[0, 1]
        # Even with the 1st/99th-percentile clipping of the colour scale.
        assert abs(r) > 0.99, (c, r)
        unclipped = pca_project(tokens, pca_fit(tokens))[..., c].numpy().ravel()
        assert abs(np.corrcoef(unclipped, coords[..., c].ravel())[0, 1]) > 0.99
    fitted = pca_fit(tokens).components.double()
    np.testing.assert_allclose((fitted @ directions.T).abs().diagonal().numpy(), 1.0, atol=1e-3)
    assert ratio[0] > ratio[1] > ratio[2]
    expected = np.array([25.0, 9.0, 4.0]) / (25 + 9 + 4 + DIM * 0.01)
    np.testing.assert_allclose(ratio, expected, rtol=0.02)
    # Robust scaling: the full range is used, each extreme by about 1 % of the tokens.
    for c in range(3):
        assert rgb[..., c].min() == 0 and rgb[..., c].max() == 255
        assert 0.005 < (rgb[..., c] == 255).mean() < 0.03


def test_joint_fit_equals_sklearn_up_to_sign():
    tokens, _, _ = _planted_pca_tokens(1)
    flat = tokens.reshape(-1, DIM).double().numpy()
    ours = pca_fit(tokens, n_components=5)
    ref = PCA(n_components=5, svd_solver="full").fit(flat)
    components = ours.components.numpy()
    for c in range(5):
        dot = float(components[c] @ ref.components_[c])
        assert abs(abs(dot) - 1.0) < 1e-8, (c, dot)
    np.testing.assert_allclose(ours.explained_variance.numpy(), ref.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(ours.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-8)
    np.testing.assert_allclose(ours.mean.numpy(), ref.mean_, atol=1e-10)
    projected = pca_project(tokens, ours).reshape(-1, 5).numpy()
    signs = np.sign(np.sum(components * ref.components_, axis=1))
    np.testing.assert_allclose(projected, ref.transform(flat) * signs, atol=1e-6)


def test_sign_convention_makes_colours_deterministic():
    tokens, _, _ = _planted_pca_tokens(2)
    fit = pca_fit(tokens)
    for row in fit.components.numpy():
        assert row[np.argmax(np.abs(row))] > 0
    # Reordering tokens changes neither the fit nor the colours of a given token.
    rgb, _ = pca_rgb(tokens)
    flipped_rgb, _ = pca_rgb(tokens.flip(0))
    np.testing.assert_array_equal(flipped_rgb, rgb[::-1])


def test_fit_mask_fits_on_the_masked_tokens_only():
    tokens, _, _ = _planted_pca_tokens(3)
    g = torch.Generator().manual_seed(4)
    # Half the images dominated by a huge extra direction; masking them out must remove it.
    extra = torch.zeros(N_IMG, GH, GW, DIM)
    extra[N_IMG // 2 :] = 50 * torch.randn(N_IMG // 2, GH, GW, 1, generator=g) * torch.eye(DIM)[0]
    mask = torch.zeros(N_IMG, GH, GW, dtype=torch.bool)
    mask[: N_IMG // 2] = True
    masked_fit = pca_fit(tokens + extra, fit_mask=mask)
    clean_fit = pca_fit(tokens[: N_IMG // 2])
    np.testing.assert_allclose(masked_fit.components.numpy(), clean_fit.components.numpy(), atol=1e-8)
    rgb, _ = pca_rgb(tokens + extra, fit_mask=mask)
    assert rgb.shape == (N_IMG, GH, GW, 3)
    with pytest.raises(PatchAtlasError, match="fit_mask"):
        pca_fit(tokens, fit_mask=mask[0])


# ------------------------------------------------------------------ alignment


def test_permuted_labels_are_aligned_back_exactly():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 6, size=(N_IMG, GH, GW))
    permutation = rng.permutation(6)
    relabelled = permutation[reference]
    np.testing.assert_array_equal(align_to_reference(relabelled, reference, 6, 6), reference)
    lut = alignment_lut(relabelled, reference, 6, 6)
    np.testing.assert_array_equal(lut[permutation], np.arange(6))


def test_alignment_matches_by_overlap_and_unmatched_clusters_get_new_ids():
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 3, size=2000)
    # A finer clustering: every reference cluster split in two, the larger half carrying most.
    halves = (rng.random(2000) < 0.25).astype(np.int64)
    finer = 2 * reference + halves  # 6 clusters
    aligned = align_to_reference(finer, reference, 6, 3)
    for ref_id in range(3):
        # The larger half of each reference cluster takes its colour...
        np.testing.assert_array_equal(aligned[(reference == ref_id) & (halves == 0)], ref_id)
    # ... and the three smaller halves get ids 3, 4, 5 in order of their own cluster id.
    for ref_id in range(3):
        np.testing.assert_array_equal(aligned[(reference == ref_id) & (halves == 1)], 3 + ref_id)

    # Noisy agreement: 90 % of the patches keep a permuted reference label.
    noisy = rng.permutation(3)[reference]
    flip = rng.random(2000) < 0.1
    noisy[flip] = rng.integers(0, 3, size=int(flip.sum()))
    assert (align_to_reference(noisy, reference, 3, 3) == reference).mean() > 0.9

    with pytest.raises(PatchAtlasError, match="shape"):
        align_to_reference(finer[:10], reference, 6, 3)


def test_ari_equals_sklearn():
    rng = np.random.default_rng(2)
    cases = [
        (rng.integers(0, 5, 3000), rng.integers(0, 7, 3000)),  # independent
        (np.arange(400) % 4, (np.arange(400) % 4 + (rng.random(400) < 0.2)) % 4),  # close
        (np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])),  # negative
        (np.zeros(50, dtype=int), np.zeros(50, dtype=int)),  # one cluster each
        (np.zeros(50, dtype=int), np.arange(50)),  # all together vs all apart
        (rng.integers(0, 9, size=(N_IMG, GH, GW)), rng.integers(0, 9, size=(N_IMG, GH, GW))),
    ]
    for a, b in cases:
        expected = adjusted_rand_score(a.ravel(), b.ravel())
        assert np.isclose(adjusted_rand_index(a, b), expected, rtol=1e-12, atol=0.0), (a[:5], b[:5])
    # Large enough that n² pair counts overflow 32 bits.
    a = rng.integers(0, 20, 200_000)
    b = np.where(rng.random(200_000) < 0.7, a, rng.integers(0, 20, 200_000))
    assert np.isclose(adjusted_rand_index(a, b), adjusted_rand_score(a, b), rtol=1e-12, atol=0.0)
    # Invariant to renaming clusters.
    assert adjusted_rand_index(a, rng.permutation(20)[b]) == adjusted_rand_index(a, b)


def test_cluster_stability():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 5, size=(N_IMG, GH, GW))
    same_up_to_names = [rng.permutation(5)[base] for _ in range(3)]
    stable = cluster_stability(same_up_to_names)
    assert stable["mean_ari"] == 1.0 and stable["min_ari"] == 1.0
    np.testing.assert_array_equal(stable["pairwise"], np.ones((3, 3)))

    unrelated = [rng.integers(0, 5, size=(N_IMG, GH, GW)) for _ in range(4)]
    noise = cluster_stability(unrelated)
    assert abs(noise["mean_ari"]) < 0.02
    pairwise = noise["pairwise"]
    assert pairwise.shape == (4, 4) and np.allclose(pairwise, pairwise.T) and np.all(np.diag(pairwise) == 1)
    assert pairwise[0, 1] == pytest.approx(adjusted_rand_score(unrelated[0].ravel(), unrelated[1].ravel()), rel=1e-12)
    assert noise["min_ari"] == pytest.approx(pairwise[np.triu_indices(4, 1)].min())

    with pytest.raises(PatchAtlasError, match="at least two"):
        cluster_stability([base])
