"""High-variance features on planted tokens: junk dimensions that ruin k-NN and not a linear probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generator.analyses.probes import knn_predict, segmentation_metrics
from generator.analyses.variance import (
    REMOVAL_COUNTS,
    batchnorm_normalise,
    feature_variance,
    removal_counts_for,
    removal_curve,
    remove_dims,
    top_set_overlap,
    top_variance_dims,
    variance_spectrum,
)
from generator.errors import PatchAtlasError

N_CLASSES = 6
LINEAR = dict(weight_decay=1e-4)


def planted_tokens(n_junk=4, junk_std=30.0, sep=0.5, dim=64, n_train=1500, n_test=600, seed=0, junk=None):
    """Class-dependent means (small separation, unit noise) plus ``n_junk`` huge-variance dims
    that carry no class information at all, like MAE's high-variance features."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, sep, (N_CLASSES, dim))
    if junk is None:
        junk = np.sort(rng.choice(dim, n_junk, replace=False))
    means[:, junk] = 0.0

    def draw(n):
        y = rng.integers(0, N_CLASSES, n)
        x = means[y] + rng.normal(0, 1.0, (n, dim))
        x[:, junk] = rng.normal(0, junk_std, (n, len(junk)))
        return x.astype(np.float32), y

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return train_x, train_y, test_x, test_y, np.asarray(junk, dtype=np.int64)


def test_feature_variance_matches_numpy_and_uses_train_only():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(500, 9)) * np.arange(1, 10) + 1e4).astype(np.float32)  # large offset
    var = feature_variance(x)
    assert var.dtype == torch.float64 and var.shape == (9,)
    np.testing.assert_allclose(var.numpy(), np.var(x.astype(np.float64), axis=0), rtol=1e-10)
    values, order = variance_spectrum(var)
    assert (values[:-1] >= values[1:]).all()
    assert order.tolist() == list(range(8, -1, -1))
    assert top_variance_dims(var, 3).tolist() == [8, 7, 6]
    assert top_variance_dims(var, 0).numel() == 0


def test_remove_dims_numpy_and_tensor():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = remove_dims(x, [1, 3])
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, x[..., [0, 2]])
    out_t = remove_dims(torch.tensor(x), torch.tensor([0]))
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_array_equal(out_t.numpy(), x[..., 1:])
    np.testing.assert_array_equal(remove_dims(x, []), x)
    with pytest.raises(PatchAtlasError, match="no features"):
        remove_dims(x, [0, 1, 2, 3])
    with pytest.raises(PatchAtlasError, match="out of range"):
        remove_dims(x, [4])


def test_removal_counts_for_caps_at_dimension():
    assert removal_counts_for(768) == list(REMOVAL_COUNTS)
    assert removal_counts_for(64) == [0, 10, 20, 30, 40, 50]
    assert removal_counts_for(384) == [0, 10, 20, 30, 40, 50, 100, 200]
    with pytest.raises(PatchAtlasError):
        removal_counts_for(0)
    with pytest.raises(PatchAtlasError, match=r"n \(the number of dimensions\) 65: expected an integer in \[0, 64\]"):
        top_variance_dims(torch.ones(64), 65)


def test_top_variance_dims_find_exactly_the_planted_junk():
    train_x, _, _, _, junk = planted_tokens()
    var = feature_variance(train_x)
    assert sorted(top_variance_dims(var, len(junk)).tolist()) == junk.tolist()
    values, _ = variance_spectrum(var)
    # The spectrum shows the cliff: the junk dims sit two orders of magnitude above the rest.
    assert values[len(junk) - 1] > 100 * values[len(junk)]


@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_planted_junk_ruins_knn_and_removal_restores_it(similarity):
    train_x, train_y, test_x, test_y, junk = planted_tokens()
    rows = removal_curve(
        train_x, train_y, test_x, test_y, [0, len(junk)], n_classes=N_CLASSES,
        knn_kwargs=dict(similarity=similarity, k=1), linear_kwargs=LINEAR,
    )
    before, after = rows
    assert [r["n_removed"] for r in rows] == [0, len(junk)]
    assert before["knn_miou"] < 0.3  # chance is about 1/6 accuracy
    assert after["knn_miou"] > 0.7
    assert after["knn_miou"] - before["knn_miou"] > 0.4
    # The linear probe learns to ignore the junk: it hardly moves either way.
    assert before["linear_miou"] > 0.85
    assert abs(after["linear_miou"] - before["linear_miou"]) < 0.04


@pytest.mark.parametrize("similarity", ["dot", "l2"])
def test_control_without_junk_removal_does_not_help_knn(similarity):
    train_x, train_y, test_x, test_y, _ = planted_tokens(n_junk=0)
    rows = removal_curve(
        train_x, train_y, test_x, test_y, [0, 4, 10], n_classes=N_CLASSES,
        knn_kwargs=dict(similarity=similarity), linear_kwargs=None,
    )
    scores = [r["knn_miou"] for r in rows]
    assert scores[0] > 0.7
    # Every dimension is informative here: taking the top ones away can only cost.
    assert scores[1] <= scores[0] + 0.01
    assert scores[2] <= scores[0] + 0.01
    assert all(r["linear_miou"] is None for r in rows)


def test_batchnorm_normalise_is_the_alternative_remedy():
    train_x, train_y, test_x, test_y, junk = planted_tokens()
    tr, te = batchnorm_normalise(train_x, test_x)
    assert tr.dtype == torch.float32
    np.testing.assert_allclose(tr.double().mean(0).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(tr.double().std(0, unbiased=False).numpy(), 1.0, atol=1e-3)
    # Test tokens use the train statistics, not their own.
    raw_mean, raw_std = train_x.astype(np.float64).mean(0), train_x.astype(np.float64).std(0)
    np.testing.assert_allclose(te.numpy(), (test_x - raw_mean) / raw_std, rtol=1e-4, atol=1e-4)

    raw = knn_predict(train_x, train_y, test_x)
    fixed = knn_predict(tr.numpy(), train_y, te.numpy())
    raw_m = segmentation_metrics(raw, test_y, N_CLASSES)["miou"]
    fixed_m = segmentation_metrics(fixed, test_y, N_CLASSES)["miou"]
    assert fixed_m > raw_m + 0.3


def test_top_set_overlap_stable_across_datasets_and_control():
    first = planted_tokens(n_junk=8, seed=1)
    junk = first[4]
    second = planted_tokens(junk=junk, seed=2)  # another "dataset", same model's junk dims
    other = planted_tokens(junk=np.setdiff1d(np.arange(64), junk)[:8], seed=3)
    var_a, var_b, var_c = (feature_variance(d[0]) for d in (first, second, other))
    assert top_set_overlap(var_a, var_b, n=8) == 8
    assert top_set_overlap(var_a, var_c, n=8) == 0
    assert top_set_overlap(var_a, var_a, n=64) == 64
    with pytest.raises(PatchAtlasError, match="same model"):
        top_set_overlap(var_a, torch.ones(10), n=5)


def test_removal_curve_rejects_mismatched_inputs():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(PatchAtlasError, match="features"):
        removal_curve(x, np.zeros(10, int), np.zeros((5, 3), np.float32), np.zeros(5, int), n_classes=2)
    with pytest.raises(PatchAtlasError, match="labels"):
        removal_curve(x, np.zeros(10, int), x, np.zeros(3, int), n_classes=2)
    with pytest.raises(PatchAtlasError, match="2-D"):
        feature_variance(np.zeros(5, np.float32))
