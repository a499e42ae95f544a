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
    bootstrap_miou,
    knn_predict,
    majority_vote,
    nearest_neighbours,
    segmentation_metrics,
    standardisation,
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


def correlated_data(n=4000, dim=32, n_classes=6, seed=0, scale=0.05):
    """Classes whose means are buried under strong noise shared by all dimensions, at a small
    scale: the first gradient steps follow the class means, the optimum must cancel the noise."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (n_classes, dim))
    y = rng.integers(0, n_classes, n)
    mix = rng.normal(0, 1, (4, dim))
    x = means[y] + 0.8 * rng.normal(size=(n, dim)) + 3.0 * rng.normal(size=(n, 4)) @ mix
    return (scale * x).astype(np.float32), y


def test_linear_probe_converges_to_multinomial_logistic_regression():
    x, y = correlated_data()
    train, test = slice(0, 3000), slice(3000, None)
    weight_decay = 1e-4
    probe = LinearProbe(n_classes=6, weight_decay=weight_decay).fit(x[train], y[train])
    ours = segmentation_metrics(probe.predict(x[test]), y[test], 6)["miou"]
    # The same objective: scikit-learn's C multiplies the summed loss, ours is the mean loss.
    sk = LogisticRegression(C=1 / (weight_decay * 3000), tol=1e-8, max_iter=10_000).fit(x[train], y[train])
    reference = segmentation_metrics(sk.predict(x[test]), y[test], 6)["miou"]
    assert reference > 0.9  # the planted classes are linearly separable once the noise is cancelled
    assert abs(ours - reference) < 0.02
    assert probe.converged_ and 0 < probe.steps_ < probe.max_steps
    logits = x[train].astype(np.float64) @ sk.coef_.T + sk.intercept_
    log_norm = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    sk_loss = np.mean(log_norm - logits[np.arange(3000), y[train]]) + 0.5 * weight_decay * np.sum(sk.coef_ ** 2)
    assert probe.final_loss_ == pytest.approx(sk_loss, abs=1e-4)
    assert probe.settings() == {"solver": "lbfgs", "weight_decay": weight_decay, "batchnorm": False,
                                "max_steps": 500, "tolerance": 1e-5}


def test_adam_solver_with_few_epochs_stops_short_of_the_optimum():
    """The control: the paper's Adam for a few epochs is what ``converged`` must not claim."""
    x, y = correlated_data()
    adam = LinearProbe(n_classes=6, solver="adam", epochs=2, batch_size=1024).fit(x[:3000], y[:3000])
    lbfgs = LinearProbe(n_classes=6).fit(x[:3000], y[:3000])
    assert not adam.converged_ and adam.steps_ == 2 * 3
    assert adam.final_loss_ > lbfgs.final_loss_ + 0.1


def test_linear_probe_separable_and_tensors():
    x, y = separable_data()
    probe = LinearProbe().fit(x[:800], y[:800])
    pred = probe.predict(x[800:])
    assert isinstance(pred, np.ndarray)
    assert np.mean(pred == y[800:]) > 0.99
    assert isinstance(probe.predict(torch.tensor(x)), torch.Tensor)
    again = LinearProbe().fit(torch.tensor(x[:800]), torch.tensor(y[:800]))
    torch.testing.assert_close(again.predict_logits(x), probe.predict_logits(x))


def test_linear_probe_control_shuffled_labels_is_chance():
    x, y = separable_data(n_classes=4, seed=1)
    shuffled = np.random.default_rng(0).permutation(y[:800])
    probe = LinearProbe().fit(x[:800], shuffled)
    assert np.mean(probe.predict(x[800:]) == y[800:]) < 0.45


def affine_copies(x: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = rng.choice([-1.0, 1.0], x.shape[1]) * 10.0 ** rng.uniform(-2, 2, x.shape[1])
    return {"0.1 x + 100": 0.1 * x + 100.0, "per-dimension a x + b": scale * x + rng.uniform(-1e3, 1e3, x.shape[1])}


def test_batchnorm_probe_is_invariant_to_affine_maps_of_the_features():
    x, y = separable_data(seed=2, margin=0.6)
    x = x.astype(np.float64)  # so that the maps themselves lose no precision
    y_ign = y.copy()
    y_ign[::7] = IGNORE
    train, test = slice(0, 800), slice(800, None)
    base = LinearProbe(batchnorm=True, n_classes=4).fit(x[train], y_ign[train])
    pred = base.predict(x[test])
    miou = segmentation_metrics(pred, y[test], 4)["miou"]
    assert 0.6 < miou < 1.0  # not trivially perfect: borderline patches exist
    for name, mapped in affine_copies(x).items():
        probe = LinearProbe(batchnorm=True, n_classes=4).fit(mapped[train], y_ign[train])
        np.testing.assert_array_equal(probe.predict(mapped[test]), pred, err_msg=name)
        torch.testing.assert_close(probe.predict_logits(mapped[test]), base.predict_logits(x[test]),
                                   rtol=1e-6, atol=1e-6)
        assert segmentation_metrics(probe.predict(mapped[test]), y[test], 4)["miou"] == pytest.approx(miou, abs=1e-12)


def test_without_batchnorm_the_probe_sees_the_feature_scale():
    """The control: the L2 penalty is not scale-free, so without BatchNorm a rescaling shows."""
    x, y = separable_data(seed=2, margin=0.6)
    x = x.astype(np.float64)
    mapped = affine_copies(x)["per-dimension a x + b"]
    plain = LinearProbe(n_classes=4).fit(x[:800], y[:800]).predict_logits(x[800:])
    scaled = LinearProbe(n_classes=4).fit(mapped[:800], y[:800]).predict_logits(mapped[800:])
    assert not torch.allclose(plain, scaled, rtol=1e-3, atol=1e-3)


def test_standardisation_uses_exact_train_statistics_and_zeroes_constant_dims():
    rng = np.random.default_rng(0)
    x = rng.normal(5, 3, (500, 4))
    x[:, 2] = 7.0
    mean, scale = standardisation(torch.from_numpy(x))
    np.testing.assert_allclose(mean.numpy(), x.mean(0))
    np.testing.assert_allclose(scale.numpy()[[0, 1, 3]], 1 / x[:, [0, 1, 3]].std(0))
    assert scale[2] == 0


def test_linear_probe_rejects_bad_input():
    with pytest.raises(PatchAtlasError, match="fit"):
        LinearProbe().predict(np.zeros((2, 3), np.float32))
    with pytest.raises(PatchAtlasError, match="max_steps"):
        LinearProbe(max_steps=0)
    with pytest.raises(PatchAtlasError, match="solver"):
        LinearProbe(solver="sgd")
    with pytest.raises(PatchAtlasError, match="weight_decay"):
        LinearProbe(weight_decay=-1.0)
    probe = LinearProbe(max_steps=5).fit(np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1]))
    with pytest.raises(PatchAtlasError, match="fitted on 3"):
        probe.predict(np.zeros((2, 5), np.float32))


# --------------------------------------------------------------------------------------------
# mIoU averaging rules
# --------------------------------------------------------------------------------------------


def cityscapes_scripts_miou(pred, target, eval_labels, ignore_label=IGNORE):
    """cityscapesScripts' evalPixelLevelSemanticLabeling.py rule, re-implemented from its source:
    a confusion matrix over the labels (rows ground truth), IoU = TP / (TP + FP + FN) where FP
    counts only pixels whose ground truth is an evaluated label, nan when TP + FP + FN = 0, and
    the average over the evaluated labels whose IoU is not nan (getScoreAverage)."""
    keep = target != ignore_label
    n = max(eval_labels) + 1
    conf = np.zeros((n + 1, n + 1), dtype=np.int64)  # last row/column: anything else
    np.add.at(conf, (np.clip(target[keep], 0, n), np.where(pred[keep] < n, pred[keep], n)), 1)
    scores = []
    for label in eval_labels:
        tp = conf[label, label]
        fn = conf[label, :].sum() - tp
        others = [other for other in eval_labels if other != label]
        fp = conf[others, label].sum()
        denom = tp + fp + fn
        scores.append(float("nan") if denom == 0 else tp / denom)
    valid = [v for v in scores if not np.isnan(v)]
    return float(np.mean(valid)), np.array(scores)


def test_cityscapes_average_scores_a_predicted_absent_class_zero_like_cityscapes_scripts():
    rng = np.random.default_rng(3)
    n_classes = 8
    target = rng.integers(0, 5, size=(6, 14, 14))  # classes 5-7 never in the target
    pred = np.where(rng.random(target.shape) < 0.55, target, rng.integers(0, 7, target.shape))  # 7 never predicted
    target[:, :2] = IGNORE
    reference, ref_iou = cityscapes_scripts_miou(pred.ravel(), target.ravel(), list(range(n_classes)))
    city = segmentation_metrics(pred, target, n_classes, average="cityscapes")
    present = segmentation_metrics(pred, target, n_classes, average="present")
    assert city["miou"] == pytest.approx(reference)
    np.testing.assert_allclose(city["per_class_iou"], ref_iou, equal_nan=True)
    assert np.isnan(city["per_class_iou"][7]) and city["per_class_iou"][5] == 0
    assert city["miou"] < present["miou"] - 0.1  # the predicted-only classes 5 and 6 count as 0
    # scikit-learn's jaccard_score(average=None) gives 0 (not nan) to a label in neither array,
    # so it matches each rule only with the labels that rule averages.
    valid = target != IGNORE
    seen = np.union1d(np.unique(target[valid]), np.unique(pred[valid]))
    sk = jaccard_score(target[valid], pred[valid], labels=seen, average=None)
    assert city["miou"] == pytest.approx(sk.mean())
    assert present["miou"] == pytest.approx(
        jaccard_score(target[valid], pred[valid], labels=np.unique(target[valid]), average=None).mean())
    with pytest.raises(PatchAtlasError, match="mIoU average"):
        segmentation_metrics(pred, target, n_classes, average="mean")


# --------------------------------------------------------------------------------------------
# Bootstrap over images
# --------------------------------------------------------------------------------------------


def noisy_predictions(n_images, seed=0, n_classes=5):
    """Per-image accuracy drawn between 40 % and 95 %: images differ, as real ones do."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, n_classes, (n_images, 14, 14))
    accuracy = rng.uniform(0.4, 0.95, (n_images, 1, 1))
    pred = np.where(rng.random(target.shape) < accuracy, target, rng.integers(0, n_classes, target.shape))
    return pred, target


def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_more_images():
    widths = []
    for n_images in (8, 32, 128):
        pred, target = noisy_predictions(n_images)
        point = segmentation_metrics(pred, target, 5)["miou"]
        lo, hi = bootstrap_miou(pred, target, 5, resamples=200, seed=0)
        assert lo < point < hi
        widths.append(hi - lo)
    assert widths[0] > 1.5 * widths[1] > 2.25 * widths[2]
    assert bootstrap_miou(pred, target, 5, seed=1) == bootstrap_miou(pred, target, 5, seed=1)


def test_bootstrap_of_perfect_predictions_is_a_point_and_rejects_bad_input():
    _, target = noisy_predictions(10)
    assert bootstrap_miou(target, target, 5) == [1.0, 1.0]
    with pytest.raises(PatchAtlasError, match="same shape"):
        bootstrap_miou(target[:3], target, 5)
    with pytest.raises(PatchAtlasError, match="level"):
        bootstrap_miou(target, target, 5, level=1.5)
