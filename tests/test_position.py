"""Positional bias vs locality bias: planted signals are found, controls stay near zero."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from generator.analyses.position import (
    border_map,
    border_score,
    locality_curve,
    position_cluster_histogram,
    position_decodability,
    position_mode_map,
    positional_consistency,
)
from generator.errors import PatchAtlasError
from generator.sources.content_free import CONTENT_FREE_KINDS, content_free_images, content_free_source

N_IMG, GH, GW, DIM = 40, 10, 12, 32


def _noise(seed: int, shape=(N_IMG, GH, GW, DIM)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _shuffle_within_images(tokens: torch.Tensor, seed: int) -> torch.Tensor:
    """Every image's tokens permuted over positions independently: content kept, place lost."""
    n, gh, gw, d = tokens.shape
    g = torch.Generator().manual_seed(seed)
    flat = tokens.reshape(n, gh * gw, d)
    out = torch.stack([flat[i, torch.randperm(gh * gw, generator=g)] for i in range(n)])
    return out.reshape(n, gh, gw, d)


# ------------------------------------------------------------------ positional consistency


def test_histogram_matches_a_loop_and_rows_sum_to_one():
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 5, size=(7, 3, 4))
    hist = position_cluster_histogram(maps, 5)
    expected = np.zeros((3, 4, 5))
    for img, r, c in itertools.product(range(7), range(3), range(4)):
        expected[r, c, maps[img, r, c]] += 1 / 7
    np.testing.assert_allclose(hist, expected)
    np.testing.assert_allclose(hist.sum(axis=-1), 1.0)


def test_positional_clustering_scores_one_and_random_clustering_near_zero():
    k = 6
    rows, cols = np.meshgrid(np.arange(GH), np.arange(GW), indexing="ij")
    # Planted: stripes and a border ring, the same in every image.
    stripes = (rows * GW + cols) % k
    positional = np.broadcast_to(stripes, (200, GH, GW)).copy()
    ring = ((rows == 0) | (rows == GH - 1) | (cols == 0) | (cols == GW - 1)).astype(np.int64)
    ring_maps = np.broadcast_to(ring, (200, GH, GW)).copy()
    random_maps = np.random.default_rng(1).integers(0, k, size=(200, GH, GW))

    assert positional_consistency(position_cluster_histogram(positional, k)) == pytest.approx(1.0)
    assert positional_consistency(position_cluster_histogram(ring_maps, 2)) == pytest.approx(1.0)
    control = positional_consistency(position_cluster_histogram(random_maps, k))
    assert 0.0 <= control < 0.05

    # Half positional, half random: in between, clearly away from both ends.
    mixed = np.where(np.random.default_rng(2).random((200, GH, GW)) < 0.5, positional, random_maps)
    assert 0.15 < positional_consistency(position_cluster_histogram(mixed, k)) < 0.85

    mode, share = position_mode_map(position_cluster_histogram(positional, k))
    np.testing.assert_array_equal(mode, stripes)
    np.testing.assert_allclose(share, 1.0)


def test_histogram_rejects_ids_outside_k():
    with pytest.raises(PatchAtlasError, match="outside"):
        position_cluster_histogram(np.full((2, 3, 3), 4), 4)


# ------------------------------------------------------------------ position decoding


def _positional_code(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w_row, w_col = torch.randn(2, DIM, generator=g)
    rows = torch.arange(GH, dtype=torch.float32).view(1, GH, 1, 1)
    cols = torch.arange(GW, dtype=torch.float32).view(1, 1, GW, 1)
    return rows * w_row + cols * w_col


def test_planted_position_code_is_decoded_on_held_out_images():
    content = 0.3 * _noise(3)
    tokens = content + _positional_code(4)
    result = position_decodability(tokens, train_fraction=0.5, seed=0)
    assert result["n_train_images"] == N_IMG // 2 and result["n_test_images"] == N_IMG // 2
    assert result["row_r2"] > 0.9 and result["col_r2"] > 0.9
    assert result["row_acc"] > 0.9 and result["col_acc"] > 0.9


def test_shuffled_positions_are_not_decodable():
    tokens = _shuffle_within_images(0.3 * _noise(3) + _positional_code(4), seed=5)
    result = position_decodability(tokens, seed=0)
    assert abs(result["row_r2"]) < 0.1 and abs(result["col_r2"]) < 0.1
    # Chance accuracy for a 10-row / 12-column grid is well below one half.
    assert result["row_acc"] < 0.4 and result["col_acc"] < 0.4


def test_decoding_content_alone_is_not_position():
    # Pure noise tokens: nothing to decode.
    result = position_decodability(_noise(6), seed=1)
    assert result["row_r2"] < 0.1 and result["col_r2"] < 0.1


@pytest.mark.parametrize("shape", [(6, 6, 7, 128), (4, 6, 7, 96), (N_IMG, GH, GW, DIM)])
def test_content_only_tokens_score_chance_never_far_below_zero(shape):
    # More dimensions than training patches: an unregularised probe memorises the training
    # images and predicts held-out ones far worse than the mean position.
    result = position_decodability(_noise(7, shape), seed=1)
    for axis in ("row", "col"):
        assert result[f"{axis}_r2"] > -0.05
        assert abs(result[f"{axis}_chance_r2"]) < 0.05
        assert abs(result[f"{axis}_r2"] - result[f"{axis}_chance_r2"]) < 0.05


def test_planted_position_scores_far_above_its_chance_level():
    # Few images, many dimensions: the position lives in 16 of them, noise fills the rest.
    n_img, gh, gw, dim = 8, 6, 7, 128
    w_row, w_col = torch.randn(2, 16, generator=torch.Generator().manual_seed(9))
    tokens = _noise(8, (n_img, gh, gw, dim))
    tokens[..., :16] += (torch.arange(gh, dtype=torch.float32).view(1, gh, 1, 1) * w_row
                         + torch.arange(gw, dtype=torch.float32).view(1, 1, gw, 1) * w_col)
    result = position_decodability(tokens, seed=2)
    assert result["row_r2"] > 0.9 and result["col_r2"] > 0.9
    assert abs(result["row_chance_r2"]) < 0.05 and abs(result["col_chance_r2"]) < 0.05
    assert result["row_chance_acc"] < 0.4 and result["col_chance_acc"] < 0.4


def test_ridge_strength_and_held_out_r2_match_scikit_learn():
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    n_img = 12
    tokens = _noise(10, (n_img, GH, GW, DIM)) + 0.05 * _positional_code(11)
    grid = (1e-4, 1e-2, 1e-1, 1.0, 10.0, 1e3)
    result = position_decodability(tokens, seed=3, ridge_grid=grid, cv_folds=3)
    x = tokens.double().numpy().reshape(n_img, GH * GW, DIM)
    y = np.stack(np.meshgrid(np.arange(GH), np.arange(GW), indexing="ij"), axis=-1).reshape(-1, 2).astype(float)
    train = result["train_images"]
    test = sorted(set(range(n_img)) - set(train))
    assert result["cv_folds"] == 3 and len(test) == result["n_test_images"]

    def scale(images):  # trace of the centred Gram matrix / D
        flat = x[images].reshape(-1, DIM)
        return float(((flat - flat.mean(axis=0)) ** 2).sum()) / DIM

    # Cross-validation by whole images, the i-th training image in fold i mod 3.
    errors = []
    for a in grid:
        total = 0.0
        for fold in range(3):
            held = [img for i, img in enumerate(train) if i % 3 == fold]
            fit = [img for i, img in enumerate(train) if i % 3 != fold]
            model = Ridge(alpha=a * scale(fit)).fit(x[fit].reshape(-1, DIM), np.tile(y, (len(fit), 1)))
            total += float(((model.predict(x[held].reshape(-1, DIM)) - np.tile(y, (len(held), 1))) ** 2).sum())
        errors.append(total)
    best = grid[int(np.argmin(errors))]
    assert 0 < int(np.argmin(errors)) < len(grid) - 1, "the planted signal should pick an inner strength"
    assert result["relative_alpha"] == best
    assert result["alpha"] == pytest.approx(best * scale(train), rel=1e-9)

    model = Ridge(alpha=result["alpha"]).fit(x[train].reshape(-1, DIM), np.tile(y, (len(train), 1)))
    pred = model.predict(x[test].reshape(-1, DIM))
    truth = np.tile(y, (len(test), 1))
    assert result["row_r2"] == pytest.approx(r2_score(truth[:, 0], pred[:, 0]), abs=1e-8)
    assert result["col_r2"] == pytest.approx(r2_score(truth[:, 1], pred[:, 1]), abs=1e-8)


def test_a_single_training_image_takes_the_strongest_ridge():
    result = position_decodability(_noise(12, (2, GH, GW, 256)), seed=0)
    assert result["n_train_images"] == 1 and result["cv_folds"] == 0
    assert result["relative_alpha"] == max(result["ridge_grid"])
    assert abs(result["row_r2"]) < 0.05 and abs(result["col_r2"]) < 0.05


def test_decodability_rejects_bad_ridge_settings():
    with pytest.raises(PatchAtlasError, match="ridge_grid"):
        position_decodability(_noise(0), ridge_grid=())
    with pytest.raises(PatchAtlasError, match="cv_folds"):
        position_decodability(_noise(0), cv_folds=1)


def test_decodability_needs_two_images():
    with pytest.raises(PatchAtlasError, match="at least 2 images"):
        position_decodability(_noise(0, (1, GH, GW, DIM)))


# ------------------------------------------------------------------ locality


def _brute_force_locality(tokens: np.ndarray, max_distance: int):
    n, gh, gw, _ = tokens.shape
    unit = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    sums = np.zeros(max_distance + 1)
    counts = np.zeros(max_distance + 1)
    positions = list(itertools.product(range(gh), range(gw)))
    for img in range(n):
        for (r1, c1), (r2, c2) in itertools.product(positions, positions):
            d = max(abs(r1 - r2), abs(c1 - c2))
            if 1 <= d <= max_distance:
                sums[d] += unit[img, r1, c1] @ unit[img, r2, c2]
                counts[d] += 1
    between = [
        unit[a, r1, c1] @ unit[b, r2, c2]
        for a, b in itertools.permutations(range(n), 2)
        for (r1, c1), (r2, c2) in itertools.product(positions, positions)
    ]
    return sums[1:] / counts[1:], float(np.mean(between))


def test_locality_curve_matches_brute_force():
    tokens = _noise(7, (3, 4, 5, 6)) + 0.5
    distances, curve, baseline = locality_curve(tokens, max_distance=3)
    expected_curve, expected_baseline = _brute_force_locality(tokens.double().numpy(), 3)
    np.testing.assert_array_equal(distances, [1, 2, 3])
    np.testing.assert_allclose(curve, expected_curve, rtol=1e-5, atol=1e-6)
    assert baseline == pytest.approx(expected_baseline, rel=1e-9, abs=1e-9)


def test_smooth_tokens_show_locality_and_iid_tokens_are_flat():
    raw = _noise(8, (20, 14, 14, 16)).numpy()
    smooth = torch.from_numpy(gaussian_filter(raw, sigma=(0, 1.5, 1.5, 0), mode="reflect").astype(np.float32))
    _, curve, baseline = locality_curve(smooth)
    assert curve[0] > baseline + 0.3
    assert np.all(np.diff(curve[:5]) < 0)  # decays with distance over the smoothing range

    iid = torch.from_numpy(raw) + 1.0  # a shared offset: baseline well above zero
    _, flat, flat_baseline = locality_curve(iid)
    assert flat_baseline > 0.3
    assert np.max(np.abs(flat - flat_baseline)) < 0.05


# ------------------------------------------------------------------ border artifacts


def test_planted_border_component_scores_high_and_control_near_zero():
    tokens = _noise(9)
    rows = torch.arange(GH).view(GH, 1)
    cols = torch.arange(GW).view(1, GW)
    ring = (rows == 0) | (rows == GH - 1) | (cols == 0) | (cols == GW - 1)
    direction = torch.randn(DIM, generator=torch.Generator().manual_seed(10))
    border_vector = direction / direction.norm() * DIM**0.5  # as long as the content spread
    planted = tokens + ring.unsqueeze(-1).float() * border_vector

    high = border_score(planted)
    low = border_score(tokens)
    assert high > 0.8
    assert low < 0.1
    assert high > 10 * low

    bmap = border_map(planted)
    assert bmap.shape == (GH, GW)
    # The global mean includes the shifted ring, so interior positions deviate a little too
    # (by the ring's share of the shift); the ring still stands clearly apart.
    on_ring, inside = bmap[ring.numpy()], bmap[~ring.numpy()]
    assert on_ring.min() > inside.max()
    assert on_ring.mean() > 1.5 * inside.mean()
    control_map = border_map(tokens)
    assert control_map.max() < 0.5 * bmap[ring.numpy()].min()

    # The planted ring is one token wide: a two-wide ring dilutes the border mean.
    assert border_score(planted, ring=2) < high


def test_border_score_ignores_per_image_offsets():
    tokens = _noise(11)
    offsets = 5.0 * _noise(12, (N_IMG, 1, 1, DIM))
    assert border_score(tokens + offsets) < 0.1


def test_border_score_needs_an_interior():
    with pytest.raises(PatchAtlasError, match="no interior"):
        border_score(_noise(0, (2, 2, 2, 4)))


# ------------------------------------------------------------------ content-free inputs


def test_content_free_images():
    images = content_free_images(32, seed=3)
    assert tuple(images) == CONTENT_FREE_KINDS
    for kind, image in images.items():
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8, kind
    assert (images["black"] == 0).all() and (images["white"] == 255).all()
    assert (images["gray"] == 128).all()
    np.testing.assert_array_equal(images["red"][0, 0], [255, 0, 0])
    assert (images["red"] == images["red"][0, 0]).all()
    assert len(np.unique(images["noise"])) > 200
    np.testing.assert_array_equal(images["noise"], content_free_images(32, ("noise",), seed=3)["noise"])
    assert not np.array_equal(images["noise"], content_free_images(32, ("noise",), seed=4)["noise"])
    with pytest.raises(PatchAtlasError, match="unknown"):
        content_free_images(8, ("checkerboard",))


def test_content_free_source_labels_each_image_by_its_kind():
    source = content_free_source(size=32, noise_images=2)
    assert source.dataset["image_id"] == ["black", "gray", "white", "red", "green", "blue", "noise-0", "noise-1"]
    for row in source.dataset:
        kind = row["image_id"].split("-")[0]
        mask = np.asarray(row["mask"])
        assert (mask == CONTENT_FREE_KINDS.index(kind)).all()
    noise = [np.asarray(r["image"]) for r in source.dataset if r["image_id"].startswith("noise")]
    assert not np.array_equal(noise[0], noise[1])
