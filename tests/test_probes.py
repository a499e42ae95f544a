"""Few-shot patch classification: metrics, k-NN and the linear probe against references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import jaccard_score
from sklearn.neighbors import KNeighborsClassifier

from generator.analyses.probes import (
    LinearProbe,
    knn_predict,
    majority_vote,
    nearest_neighbours,
    segmentation_metrics,
)
from generator.errors import PatchAtlasError

IGNORE = 255


# --------------------------------------------------------------------------------------------
# segmentation_metrics
# --------------------------------------------------------------------------------------------


def reference_iou(pred, target, n_classes, ignore_index=IGNORE):
    """Per-class IoU by explicit set counting, one class at a time."""
    pred, target = pred.ravel(), target.ravel()
    valid = target != ignore_index
    ious = []
    for c in range(n_classes):
        p = (pred == c) & valid
        t = (target == c) & valid
        union = np.sum(p | t)
        ious.append(np.sum(p & t) / union if union else np.nan)
    return np.array(ious)


def test_metrics_match_reference_and_sklearn():
    rng = np.random.default_rng(0)
    n_classes = 6
    target = rng.integers(0, n_classes - 1, size=(7, 40, 30))  # class 5 never in target
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, n_classes, target.shape))
    target[:, :3] = IGNORE
    m = segmentation_metrics(pred, target, n_classes)

    ref = reference_iou(pred, target, n_classes)
    np.testing.assert_allclose(m["per_class_iou"], ref, equal_nan=False)
    assert m["per_class_iou"][5] == 0.0  # predicted only: IoU 0, but not averaged

    valid = target != IGNORE
    present = np.unique(target[valid])
    sk = jaccard_score(target[valid], pred[valid], labels=present, average=None)
    np.testing.assert_allclose(m["per_class_iou"][present], sk)
    assert m["miou"] == pytest.approx(sk.mean())
    assert m["pixel_accuracy"] == pytest.approx(np.mean(pred[valid] == target[valid]))
    assert m["n_pixels"] == valid.sum()
    assert m["confusion"].sum() == valid.sum()


def test_metrics_absent_class_is_nan_and_eval_classes_subset():
    target = np.array([0, 0, 1, 1, 2, IGNORE])
    pred = np.array([0, 1, 1, 1, 0, 3])
    m = segmentation_metrics(pred, target, n_classes=5)
    assert np.isnan(m["per_class_iou"][4])  # in neither
    # The ignored pixel's prediction (3) does not count: class 3 is absent from both.
    assert np.isnan(m["per_class_iou"][3])
    assert m["per_class_iou"][0] == pytest.approx(1 / 3)  # TP 1, FN 1, FP 1
    assert m["per_class_iou"][1] == pytest.approx(2 / 3)
    assert m["per_class_iou"][2] == 0.0
    assert m["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    sub = segmentation_metrics(pred, target, n_classes=5, eval_classes=[1, 2])
    assert sub["miou"] == pytest.approx((2 / 3 + 0) / 2)
    assert sub["pixel_accuracy"] == pytest.approx(2 / 3)  # 2 of the 3 class-1/2 pixels


def test_metrics_perfect_and_out_of_range_prediction():
    target = np.array([[0, 1], [2, 2]])
    assert segmentation_metrics(target, target, 3)["miou"] == 1.0
    m = segmentation_metrics(np.array([[0, 1], [2, 99]]), target, 3)
    assert m["pixel_accuracy"] == 0.75
    assert m["per_class_iou"][2] == 0.5


def test_metrics_reject_bad_input():
    with pytest.raises(PatchAtlasError, match="same shape"):
        segmentation_metrics(np.zeros(3, int), np.zeros(4, int), 2)
    with pytest.raises(PatchAtlasError, match="outside"):
        segmentation_metrics(np.zeros(3, int), np.array([0, 1, 7]), 2)
    with pytest.raises(PatchAtlasError, match="integer"):
        segmentation_metrics(np.zeros(3), np.zeros(3, int), 2)
    with pytest.raises(PatchAtlasError, match="eval_classes"):
        segmentation_metrics(np.zeros(3, int), np.zeros(3, int), 2, eval_classes=[5])


# --------------------------------------------------------------------------------------------
# k-NN
# --------------------------------------------------------------------------------------------


def clustered_data(n_train=400, n_test=150, dim=12, n_classes=5, seed=0):
    """Gaussian classes with overlapping clouds: k-NN gets many rows right and many wrong."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 0.7, (n_classes, dim))
    train_y = rng.integers(0, n_classes, n_train)
    test_y = rng.integers(0, n_classes, n_test)
    # Varying norms make dot, cosine and l2 disagree, so each metric is really tested.
    train_x = (means[train_y] + rng.normal(0, 1.0, (n_train, dim))) * rng.uniform(0.5, 2, (n_train, 1))
    test_x = (means[test_y] + rng.normal(0, 1.0, (n_test, dim))) * rng.uniform(0.5, 2, (n_test, 1))
    return train_x, train_y, test_x, test_y


def sklearn_knn(train_x, train_y, test_x, k, similarity):
    if similarity == "l2":
        clf = KNeighborsClassifier(n_neighbors=k, metric="euclidean", algorithm="brute")
        return clf.fit(train_x, train_y).predict(test_x)
    if similarity == "cosine":
        clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
        return clf.fit(train_x, train_y).predict(test_x)
    # Dot product as a precomputed distance: a constant minus the similarity keeps the order.
    dot_train = train_x @ train_x.T
    clf = KNeighborsClassifier(n_neighbors=k, metric="precomputed").fit(dot_train.max() - dot_train, train_y)
    dot_test = test_x @ train_x.T
    return clf.predict(dot_test.max() - dot_test)


def brute_force_knn(train_x, train_y, test_x, k, similarity):
    """Numpy reference with the documented tie rule (nearest neighbour's class wins a tie)."""
    if similarity == "cosine":
        train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
        test_x = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    if similarity == "l2":
        sim = -((test_x[:, None, :] - train_x[None, :, :]) ** 2).sum(-1)
    else:
        sim = test_x @ train_x.T
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    out = []
    for row in train_y[order]:
        labels, counts = np.unique(row, return_counts=True)
        tied = set(labels[counts == counts.max()])
        out.append(next(lbl for lbl in row if lbl in tied))
    return np.array(out), train_y[order]


@pytest.mark.parametrize("similarity", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("k", [1, 5])
def test_knn_matches_sklearn_and_brute_force(similarity, k):
    train_x, train_y, test_x, test_y = clustered_data()
    ours = knn_predict(train_x, train_y, test_x, k=k, similarity=similarity, chunk_size=37, key_chunk_size=53)
    ref, neighbour_labels = brute_force_knn(train_x, train_y, test_x, k, similarity)
    np.testing.assert_array_equal(ours, ref)

    sk = sklearn_knn(train_x, train_y, test_x, k, similarity)
    counts = np.stack([(neighbour_labels == c).sum(1) for c in range(5)], axis=1)
    clear_majority = (counts == counts.max(1, keepdims=True)).sum(1) == 1
    assert clear_majority.mean() > 0.7
    # sklearn breaks vote ties by the smallest label, we by the nearest neighbour: compare
    # where the vote is clear, and everywhere for k = 1.
    np.testing.assert_array_equal(ours[clear_majority], sk[clear_majority])
    if k == 1:
        np.testing.assert_array_equal(ours, sk)
    # The data must not be trivial: k-NN is neither always right nor always wrong.
    assert 0.4 < np.mean(ours == test_y) < 0.95


def test_knn_two_classes_odd_k_equals_sklearn_exactly():
    train_x, train_y, test_x, _ = clustered_data(n_classes=2, seed=3)
    for similarity in ("l2", "cosine", "dot"):
        ours = knn_predict(train_x, train_y, test_x, k=5, similarity=similarity, chunk_size=16)
        np.testing.assert_array_equal(ours, sklearn_knn(train_x, train_y, test_x, 5, similarity))


def test_knn_similarities_differ_and_excludes_ignored_rows():
    train_x, train_y, test_x, test_y = clustered_data()
    preds = {s: knn_predict(train_x, train_y, test_x, similarity=s) for s in ("dot", "cosine", "l2")}
    assert (preds["dot"] != preds["l2"]).any()
    # A test row identical to an ignored train row must not take its (ignore) label.
    y = train_y.copy()
    y[:50] = IGNORE
    pred = knn_predict(train_x, y, train_x[:50], similarity="l2", n_classes=5)
    assert (pred != IGNORE).all()
    assert (pred < 5).all()
    clean = knn_predict(train_x[50:], train_y[50:], train_x[:50], similarity="l2")
    np.testing.assert_array_equal(pred, clean)


def test_knn_tensor_in_tensor_out_and_accuracy_on_planted_classes():
    train_x, train_y, test_x, test_y = clustered_data()
    pred_t = knn_predict(torch.tensor(train_x), torch.tensor(train_y), torch.tensor(test_x), similarity="l2")
    assert isinstance(pred_t, torch.Tensor) and pred_t.dtype == torch.int64
    np.testing.assert_array_equal(pred_t.numpy(), knn_predict(train_x, train_y, test_x, similarity="l2"))
    # Well above chance (0.2) on planted classes; shuffled train labels give about chance.
    acc = np.mean(knn_predict(train_x, train_y, test_x, k=5, similarity="l2") == test_y)
    shuffled = np.random.default_rng(1).permutation(train_y)
    acc_control = np.mean(knn_predict(train_x, shuffled, test_x, k=5, similarity="l2") == test_y)
    assert acc > 0.55
    assert acc_control < 0.35


def test_nearest_neighbours_groups_and_chunking():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(90, 8))
    queries = keys[:30] + 1e-3 * rng.normal(size=(30, 8))
    sim, idx = nearest_neighbours(queries, keys, k=3, similarity="l2", chunk_size=7, key_chunk_size=11)
    assert (idx[:, 0].numpy() == np.arange(30)).all()
    assert (sim[:, :-1] >= sim[:, 1:]).all()
    full = -((queries[:, None] - keys[None]) ** 2).sum(-1)
    np.testing.assert_allclose(sim.numpy(), np.sort(full, axis=1)[:, ::-1][:, :3], rtol=1e-5, atol=1e-4)
    groups = np.arange(90) // 10
    _, idx_ex = nearest_neighbours(
        queries, keys, k=3, similarity="l2", query_groups=groups[:30], key_groups=groups, key_chunk_size=11
    )
    assert (groups[idx_ex.numpy()] != groups[:30, None]).all()
    # Too few eligible keys: the missing neighbours are flagged, not invented.
    sim_few, idx_few = nearest_neighbours(
        queries[:2], keys[:12], k=5, query_groups=[0, 0], key_groups=groups[:12]
    )
    assert (idx_few[:, 2:] == -1).all() and torch.isneginf(sim_few[:, 2:]).all()


def test_majority_vote_tie_goes_to_nearest():
    labels = torch.tensor([[2, 1, 1, 2, 0], [0, 1, 1, 1, 0], [3, 4, 0, 1, 2]])
    assert majority_vote(labels, 5).tolist() == [2, 1, 3]


def test_knn_rejects_bad_input():
    x = np.zeros((4, 3))
    with pytest.raises(PatchAtlasError, match="similarity"):
        knn_predict(x, np.zeros(4, int), x, similarity="manhattan")
    with pytest.raises(PatchAtlasError, match="features"):
        knn_predict(x, np.zeros(4, int), np.zeros((2, 5)))
    with pytest.raises(PatchAtlasError, match="only 4 keys"):
        knn_predict(x, np.zeros(4, int), x, k=9)
    with pytest.raises(PatchAtlasError, match="ignore label"):
        knn_predict(x, np.full(4, IGNORE), x)
    with pytest.raises(PatchAtlasError, match="one label per row"):
        knn_predict(x, np.zeros(3, int), x)


# --------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------


def separable_data(n=1200, dim=16, n_classes=4, seed=0, margin=4.0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (n_classes, dim))
    means *= margin / np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, n_classes, n)
    x = means[y] + 0.3 * rng.normal(size=(n, dim))
    return x.astype(np.float32), y


def test_linear_probe_separable_and_agrees_with_logistic_regression():
    x, y = separable_data()
    probe = LinearProbe(epochs=30, batch_size=128, lr=1e-2, seed=0).fit(x[:800], y[:800])
    pred = probe.predict(x[800:])
    assert isinstance(pred, np.ndarray)
    assert np.mean(pred == y[800:]) > 0.99
    sk = LogisticRegression(max_iter=2000).fit(x[:800], y[:800]).predict(x[800:])
    assert np.mean(pred == sk) > 0.98
    assert probe.loss_history_[-1] < probe.loss_history_[0]


def test_linear_probe_control_shuffled_labels_is_chance():
    x, y = separable_data(n_classes=4, seed=1)
    shuffled = np.random.default_rng(0).permutation(y[:800])
    probe = LinearProbe(epochs=10, batch_size=128, lr=1e-2).fit(x[:800], shuffled)
    assert np.mean(probe.predict(x[800:]) == y[800:]) < 0.45


def test_linear_probe_deterministic_batchnorm_ignore_and_tensors():
    x, y = separable_data(seed=2)
    y_ign = y.copy()
    y_ign[::7] = IGNORE
    a = LinearProbe(epochs=3, batch_size=100, seed=5, batchnorm=True).fit(x, y_ign)
    b = LinearProbe(epochs=3, batch_size=100, seed=5, batchnorm=True).fit(torch.tensor(x), torch.tensor(y_ign))
    logits_a, logits_b = a.predict_logits(x), b.predict_logits(torch.tensor(x))
    assert torch.equal(logits_a, logits_b)
    c = LinearProbe(epochs=3, batch_size=100, seed=6, batchnorm=True).fit(x, y_ign)
    assert not torch.equal(logits_a, c.predict_logits(x))
    assert a.n_classes_ == 4 and logits_a.shape == (len(x), 4)
    assert isinstance(b.predict(torch.tensor(x)), torch.Tensor)
    # BatchNorm makes the probe blind to a feature's scale: a huge-scale copy trains alike.
    big = x * np.float32(1000.0)
    d = LinearProbe(epochs=3, batch_size=100, seed=5, batchnorm=True).fit(big, y_ign)
    assert np.mean(d.predict(big) == a.predict(x)) > 0.99


def test_linear_probe_rejects_bad_input():
    with pytest.raises(PatchAtlasError, match="fit"):
        LinearProbe().predict(np.zeros((2, 3), np.float32))
    with pytest.raises(PatchAtlasError, match="epochs"):
        LinearProbe(epochs=0)
    probe = LinearProbe(epochs=1).fit(np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1]))
    with pytest.raises(PatchAtlasError, match="fitted on 3"):
        probe.predict(np.zeros((2, 5), np.float32))
