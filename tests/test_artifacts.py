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


# ------------------------------------------------------------------ separate high-norm mode

MODE_SHAPE = (40, 14, 14)


def _ordinary_norms(seed: int) -> np.ndarray:
    """Norms of ordinary content: a tight bulk plus 10 % brighter content at about twice the
    median (sky, specular regions) — a heavy right shoulder, but one continuous distribution."""
    rng = np.random.default_rng(seed)
    norms = np.exp(rng.normal(0.0, 0.15, size=MODE_SHAPE))
    bright = rng.random(MODE_SHAPE) < 0.10
    norms[bright] = np.exp(rng.normal(0.6, 0.1, size=int(bright.sum())))
    return 10.0 * norms


def _with_artifacts(norms: np.ndarray, ratio: float, share: float, seed: int):
    """``share`` of the tokens replaced by artifacts at ``ratio`` × the median norm (±3 %)."""
    rng = np.random.default_rng(seed)
    planted = norms.copy()
    index = rng.choice(norms.size, int(round(share * norms.size)), replace=False)
    planted.flat[index] = ratio * np.median(norms) * np.exp(rng.normal(0.0, 0.03, index.size))
    mask = np.zeros(norms.shape, dtype=bool)
    mask.flat[index] = True
    return planted, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("content", ["bright", "lognormal", "gamma"])
def test_ordinary_content_has_no_high_norm_mode(content, seed):
    rng = np.random.default_rng(seed)
    norms = {"bright": _ordinary_norms(seed),
             "lognormal": 10.0 * np.exp(rng.normal(0.0, 0.6, size=MODE_SHAPE)),
             "gamma": rng.gamma(3.0, 3.0, size=MODE_SHAPE)}[content]
    result = high_norm_outliers(norms)
    assert result["share"] < 0.005
    assert result["method"] == "gap" and result["params"] == {"min_ratio": 3.0, "min_gap": 1.5}


def test_fences_flag_ordinary_bright_content_and_the_gap_rule_does_not():
    # Why the fences are not the default: the top of a heavy tail is not an artifact.
    norms = _ordinary_norms(0)
    assert high_norm_outliers(norms, method="iqr")["share"] > 0.02
    assert high_norm_outliers(norms)["share"] == 0.0 and high_norm_outliers(norms)["threshold"] is None


@pytest.mark.parametrize("ratio", [5.0, 10.0, 20.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_high_norm_mode_is_found_exactly(ratio, seed):
    norms, mask = _with_artifacts(_ordinary_norms(seed), ratio, 0.026, seed + 10)
    result = high_norm_outliers(norms)
    assert abs(result["share"] - 0.026) <= 0.003
    np.testing.assert_array_equal(result["mask"], mask)
    # The threshold sits in the valley: above every ordinary token, below every artifact.
    assert norms[~mask].max() < result["threshold"] < norms[mask].min()
    tensor_result = high_norm_outliers(torch.from_numpy(norms))
    np.testing.assert_array_equal(tensor_result["mask"].numpy(), mask)


def test_gap_rule_parameters_decide_what_counts_as_a_separate_mode():
    norms, mask = _with_artifacts(_ordinary_norms(3), 5.0, 0.026, 4)
    assert high_norm_outliers(norms, min_ratio=6.0)["share"] == 0.0  # a mode at 5× is below 6×
    assert high_norm_outliers(norms, min_gap=3.0)["share"] == 0.0  # its gap is under a factor 3
    np.testing.assert_array_equal(high_norm_outliers(norms, min_ratio=4.0, min_gap=1.2)["mask"], mask)
    with pytest.raises(PatchAtlasError, match="min_gap"):
        high_norm_outliers(norms, min_gap=0.5)
    with_zeros = np.concatenate([np.zeros(5), norms.ravel()])
    np.testing.assert_array_equal(high_norm_outliers(with_zeros)["mask"][5:], mask.ravel())


@pytest.mark.parametrize("seed", [0, 1])
def test_untrained_vit_tokens_have_no_high_norm_mode(seed):
    import timm

    from generator.sources.synthetic import render_scene

    images = np.stack([render_scene(i, size=64)[0] for i in range(24)])
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    with torch.no_grad():
        blocks = model.forward_intermediates(pixels, indices=[0, 1], norm=False, output_fmt="NLC",
                                             intermediates_only=True)  # patch tokens only
    for block in blocks:
        assert high_norm_outliers(token_norms(block))["share"] < 0.005
