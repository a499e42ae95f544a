"""Joint k-means segmentation: planted clusters, structureless controls, scikit-learn and
brute-force references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from generator.analyses import clusters
from generator.analyses.clusters import (
    chance_miou,
    display_ids,
    hungarian_match,
    joint_kmeans_segmentation,
    kmeans,
)
from generator.errors import PatchAtlasError

IGNORE = 255


def _blobs(n_per: int, n_centers: int, dim: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 4.0, (n_centers, dim))
    points = np.concatenate([rng.normal(c, spread, (n_per, dim)) for c in centers])
    return rng.permutation(points).astype(np.float32)


def _structureless(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _planted_scene(n_img=6, grid=8, n_classes=5, dim=32, noise=0.05, seed=0):
    """Patch labels of several images (2x2-patch blocks of random classes, a few ignored
    patches) and tokens that are a class mean plus small noise."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, n_classes, (n_img, grid // 2, grid // 2))
    blocks[0].flat[:n_classes] = np.arange(n_classes)  # every class occurs
    labels = blocks.repeat(2, axis=1).repeat(2, axis=2)
    class_of_token = labels.copy()
    ignored = rng.random(labels.shape) < 0.05
    labels[ignored] = IGNORE
    means = rng.normal(0.0, 1.0, (n_classes, dim))
    tokens = means[class_of_token] + rng.normal(0.0, noise, (*labels.shape, dim))
    return torch.from_numpy(tokens.astype(np.float32)), labels.astype(np.int64)


# ------------------------------------------------------------------ the segmentation protocol


def test_planted_clusters_are_recovered_and_coloured_by_class():
    tokens, labels = _planted_scene()
    result = joint_kmeans_segmentation(tokens, labels, k=5, n_classes=5, seed=0)
    assert result.match.miou > 0.99
    assert result.match.pixel_accuracy > 0.99
    keep = labels != IGNORE
    # Matched clusters take their class's id, so the display maps are the ground truth.
    np.testing.assert_array_equal(result.display_maps[keep], labels[keep])
    assert result.cluster_maps.shape == labels.shape == result.display_maps.shape
    assert result.cluster_maps.dtype == np.int16 and result.display_maps.dtype == np.int16
    assert sorted(result.match.cluster_to_class.tolist()) == [0, 1, 2, 3, 4]
    assert result.l2_normalized and result.k == 5 and result.seed == 0


def test_extra_clusters_get_ids_beyond_the_classes():
    tokens, labels = _planted_scene(n_classes=3)
    result = joint_kmeans_segmentation(tokens, labels, k=5, n_classes=3, seed=1)
    shown = np.unique(result.display_maps)
    # Three clusters take class ids 0..2, the two unmatched ones are shown as 3 and 4.
    assert set(shown.tolist()) == {0, 1, 2, 3, 4}
    assert (result.match.cluster_to_class >= 0).sum() == 3


def test_structureless_tokens_score_at_chance():
    _, labels = _planted_scene()
    planted = joint_kmeans_segmentation(*_planted_scene(), k=5, n_classes=5, seed=0)
    noise = torch.from_numpy(np.random.default_rng(7).normal(size=(*labels.shape, 32)).astype(np.float32))
    control = joint_kmeans_segmentation(noise, labels, k=5, n_classes=5, seed=0)
    chance = chance_miou(labels, 5, 5, IGNORE, seed=0, n_permutations=20, pred=control.cluster_maps)
    assert abs(control.match.miou - chance) < 0.05
    assert planted.match.miou - control.match.miou > 0.6


def test_segmentation_without_l2_normalisation_is_recorded():
    tokens, labels = _planted_scene()
    result = joint_kmeans_segmentation(tokens, labels, k=5, n_classes=5, l2_normalize=False)
    assert result.l2_normalized is False
    assert result.match.miou > 0.99


def test_segmentation_rejects_mismatched_labels():
    tokens, labels = _planted_scene()
    with pytest.raises(PatchAtlasError, match="labels shape"):
        joint_kmeans_segmentation(tokens, labels[:, :-1], k=5, n_classes=5)


# ------------------------------------------------------------------ k-means


@pytest.mark.parametrize("k", [3, 6, 9])
def test_kmeans_inertia_matches_sklearn_on_blobs(k):
    x = _blobs(200, 6, 8, 0.5, seed=k)
    ours = kmeans(torch.from_numpy(x), k, n_init=5, seed=0)
    ref = KMeans(k, n_init=5, random_state=0).fit(x)
    assert ours.inertia <= ref.inertia_ * 1.01
    assert ours.inertia == pytest.approx(float(((x - ours.centroids.numpy()[ours.labels.numpy()]) ** 2).sum()), rel=1e-4)
    if k == 6:  # one cluster per blob: the partition itself must agree
        assert adjusted_rand_score(ref.labels_, ours.labels.numpy()) == pytest.approx(1.0)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_kmeans_inertia_matches_sklearn_on_structureless_data(k):
    x = _structureless(1500, 12, seed=k)
    ours = kmeans(torch.from_numpy(x), k, n_init=5, seed=0)
    ref = KMeans(k, n_init=5, random_state=0).fit(x)
    assert ours.inertia <= ref.inertia_ * 1.01


def test_kmeans_labels_are_nearest_centroids():
    x = torch.from_numpy(_structureless(600, 5, seed=3))
    fit = kmeans(x, 7, seed=0)
    nearest = torch.cdist(x, fit.centroids).argmin(dim=1)
    assert torch.equal(nearest, fit.labels)
    assert fit.labels.dtype == torch.int64 and fit.centroids.shape == (7, 5)
    assert 1 <= fit.n_iter <= 100


@pytest.mark.parametrize("data", ["blobs", "structureless"])
def test_chunked_and_unchunked_give_identical_labels(data):
    x = _blobs(150, 5, 6, 0.5, seed=1) if data == "blobs" else _structureless(900, 6, seed=1)
    whole = kmeans(torch.from_numpy(x), 5, seed=2, chunk_size=1 << 20)
    chunked = kmeans(torch.from_numpy(x), 5, seed=2, chunk_size=37)
    assert torch.equal(whole.labels, chunked.labels)
    assert whole.inertia == pytest.approx(chunked.inertia, rel=1e-6)


def test_kmeans_is_deterministic_for_a_seed():
    x = torch.from_numpy(_structureless(800, 8, seed=0))
    a = kmeans(x, 8, n_init=1, seed=11)
    b = kmeans(x, 8, n_init=1, seed=11)
    c = kmeans(x, 8, n_init=1, seed=12)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia
    assert not torch.equal(a.centroids, c.centroids)


def test_kmeans_half_precision_input_is_computed_in_float32():
    x = _blobs(100, 4, 8, 0.3, seed=5)
    fit16 = kmeans(torch.from_numpy(x).to(torch.bfloat16), 4, seed=0)
    fit32 = kmeans(torch.from_numpy(x).to(torch.bfloat16).float(), 4, seed=0)
    assert fit16.centroids.dtype == torch.float32
    assert torch.equal(fit16.labels, fit32.labels)


def test_empty_cluster_is_reseeded_at_the_farthest_point():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 10.0], [10.1, 10.0]])
    x_sq = (x * x).sum(1)
    # The third centroid is far from everything, so it is empty after the first assignment.
    init = torch.tensor([[0.0, 0.0], [0.05, 0.05], [-100.0, -100.0]])
    centroids, labels, inertia, _ = clusters._lloyd(x, x_sq, init, max_iter=50, shift_tol=0.0, chunk_size=2)
    assert torch.bincount(labels, minlength=3).min() >= 1
    assert set(labels[3:].tolist()).isdisjoint(labels[:3].tolist())
    assert inertia < 0.1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_kmeans_rejects_non_finite_values(bad):
    x = torch.from_numpy(_structureless(50, 3, seed=0))
    x[7, 1] = bad
    with pytest.raises(PatchAtlasError, match="NaN|infinite"):
        kmeans(x, 3)


def test_kmeans_rejects_bad_k():
    x = torch.from_numpy(_structureless(10, 3, seed=0))
    with pytest.raises(PatchAtlasError, match="exceeds"):
        kmeans(x, 11)
    with pytest.raises(PatchAtlasError, match="positive"):
        kmeans(x, 0)
    with pytest.raises(PatchAtlasError, match="2-D"):
        kmeans(x[None], 2)


# ------------------------------------------------------------------ Hungarian matching


def _brute_force(pred, target, k, n_classes):
    """Best total matched count over every one-to-one pairing, and the mIoU of every pairing
    reaching it, scored pixel by pixel."""
    keep = target != IGNORE
    p, t = pred[keep], target[keep]
    present = np.unique(t)
    results = []
    if k <= n_classes:
        pairings = [dict(zip(range(k), perm)) for perm in itertools.permutations(range(n_classes), k)]
    else:
        pairings = [{j: c for c, j in enumerate(perm)} for perm in itertools.permutations(range(k), n_classes)]
    for pairing in pairings:
        mapped = np.array([pairing.get(j, -1) for j in range(k)])[p]
        total = int((mapped == t).sum())
        ious = [((mapped == c) & (t == c)).sum() / ((mapped == c) | (t == c)).sum() for c in present]
        results.append((total, float(np.mean(ious))))
    best = max(r[0] for r in results)
    return best, [m for total, m in results if total == best], keep.sum()


def _pixel_miou(pred, target, cluster_to_class):
    keep = target != IGNORE
    mapped, t = cluster_to_class[pred[keep]], target[keep]
    return float(np.mean([((mapped == c) & (t == c)).sum() / ((mapped == c) | (t == c)).sum() for c in np.unique(t)]))


@pytest.mark.parametrize("k,n_classes", [(3, 3), (2, 4), (4, 2), (3, 5), (5, 3), (4, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hungarian_match_equals_brute_force(k, n_classes, seed):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, n_classes, (12, 15))
    # Correlate clusters with classes a little so the optimum is not a coin toss.
    pred = np.where(rng.random(target.shape) < 0.4, target % k, rng.integers(0, k, target.shape))
    target[rng.random(target.shape) < 0.1] = IGNORE
    match = hungarian_match(pred, target, k, n_classes, ignore_index=IGNORE)
    best_total, best_mious, n_kept = _brute_force(pred, target, k, n_classes)
    assert match.pixel_accuracy == pytest.approx(best_total / n_kept)
    assert any(match.miou == pytest.approx(m) for m in best_mious)
    assert match.miou == pytest.approx(_pixel_miou(pred, target, match.cluster_to_class))
    assert match.confusion.shape == (k, n_classes)
    assert match.confusion.sum() == n_kept
    matched = match.cluster_to_class[match.cluster_to_class >= 0]
    assert len(set(matched.tolist())) == len(matched) == min(k, n_classes)


def test_hungarian_match_absent_class_is_nan_and_left_out():
    target = np.array([[0, 0, 1, 1], [0, 0, 1, IGNORE]])
    pred = np.array([[1, 1, 0, 0], [1, 1, 2, 2]])
    match = hungarian_match(pred, target, n_clusters=3, n_classes=3)
    assert np.isnan(match.per_class_iou[2])
    assert match.cluster_to_class.tolist() == [1, 0, -1]
    assert match.per_class_iou[0] == pytest.approx(1.0)
    # Class 1: TP 2 (cluster 0); its third pixel sits in unmatched cluster 2 -> a false negative.
    assert match.per_class_iou[1] == pytest.approx(2 / 3)
    assert match.miou == pytest.approx((1.0 + 2 / 3) / 2)
    assert match.pixel_accuracy == pytest.approx(6 / 7)


def test_hungarian_match_rejects_bad_input():
    target = np.zeros((2, 2), dtype=np.int64)
    with pytest.raises(PatchAtlasError, match="shape"):
        hungarian_match(np.zeros((2, 3), dtype=np.int64), target, 2, 2)
    with pytest.raises(PatchAtlasError, match="outside"):
        hungarian_match(np.full((2, 2), 5), target, 2, 2)
    with pytest.raises(PatchAtlasError, match="no labelled"):
        hungarian_match(target, np.full((2, 2), IGNORE), 2, 2)


def test_chance_miou_is_low_and_deterministic():
    target = np.random.default_rng(0).integers(0, 4, (20, 20))
    a = chance_miou(target, 4, 4, seed=3)
    assert a == chance_miou(target, 4, 4, seed=3)
    # Four balanced, independent labellings: IoU about 1/7, a little more after matching.
    assert 0.1 < a < 0.25
    perfect = hungarian_match(target, target, 4, 4).miou
    assert perfect == 1.0


# ------------------------------------------------------------------ display ids


def test_display_ids_follow_the_matching():
    labels = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    shown = display_ids(labels, np.array([2, -1, 0, -1]), n_classes=3)
    np.testing.assert_array_equal(shown, [[2, 3, 0, 4], [4, 0, 3, 2]])


def test_display_ids_reject_a_many_to_one_matching():
    with pytest.raises(PatchAtlasError, match="one-to-one"):
        display_ids(np.array([0, 1]), np.array([1, 1]), n_classes=3)
    with pytest.raises(PatchAtlasError, match="outside"):
        display_ids(np.array([0, 4]), np.array([1, 0]), n_classes=3)


def test_l2_normalisation_makes_the_fit_blind_to_token_norms():
    tokens, labels = _planted_scene(seed=3)
    scales = torch.from_numpy(np.random.default_rng(4).uniform(0.2, 5.0, (*labels.shape, 1)).astype(np.float32))
    plain = joint_kmeans_segmentation(tokens, labels, k=5, n_classes=5, seed=0)
    scaled = joint_kmeans_segmentation(tokens * scales, labels, k=5, n_classes=5, seed=0)
    np.testing.assert_array_equal(plain.cluster_maps, scaled.cluster_maps)
    assert scaled.match.miou > 0.99
