"""Streamed analyses equal their whole-array references, chunk sizes notwithstanding, and find
planted signals: high-variance junk dimensions, high-norm tokens, separable classes, clusters.
Fed chunk by chunk they read nothing back to the host, and refuse bad input when read."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from generator.analyses import clusters, streaming
from generator.analyses.clusters import chance_miou, hungarian_match, kmeans, match_from_confusion
from generator.analyses.probes import ProbeProtocol, knn_predict, segmentation_metrics
from generator.analyses.streaming import NormHistogram, RunningMoments, StreamingKMeans, StreamingKNN
from generator.analyses.variance import feature_variance, top_variance_dims
from generator.errors import PatchAtlasError
from generator.models.encoder import LayerTokens, TokenBatch
from generator.sources.synthetic import synthetic_scenes
from generator.stream import LayerwiseAccumulator


def _chunks(x: torch.Tensor, sizes: list[int]):
    start = 0
    for size in sizes:
        yield x[start:start + size]
        start += size
    assert start == len(x)


@pytest.mark.parametrize("sizes", [[1000], [1, 2, 997], [333, 333, 334], [10] * 100])
def test_running_moments_equal_the_whole_array_variance_and_find_planted_junk(sizes):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 64, generator=g) + 1000.0  # a large offset: no cancellation allowed
    junk = torch.tensor([5, 17, 40])
    x[:, junk] *= 30.0
    moments = RunningMoments(64)
    for chunk in _chunks(x, sizes):
        moments.update(chunk)
    torch.testing.assert_close(moments.result(), feature_variance(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(moments.mean, x.double().mean(0), rtol=1e-12, atol=1e-9)
    assert sorted(top_variance_dims(moments.result(), 3).tolist()) == junk.tolist()
    # Control: without planted dimensions, the three largest variances are not those.
    control = RunningMoments(64)
    control.update(torch.randn(1000, 64, generator=g))
    assert set(top_variance_dims(control.result(), 3).tolist()) != set(junk.tolist())


def test_norm_histogram_adds_up_over_chunks_and_flags_planted_high_norm_tokens():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 32, generator=g)
    x[::100] *= 50.0  # 1 % high-norm tokens
    whole, streamed = NormHistogram(), NormHistogram()
    whole.update(x)
    for chunk in _chunks(x, [7, 993, 1000]):
        streamed.update(chunk)
    assert streamed.result() == whole.result()
    norms = x.norm(dim=1).numpy()
    assert streamed.max == pytest.approx(norms.max(), rel=1e-6)
    assert streamed.count == 2000 and streamed.total == pytest.approx(norms.sum(), rel=1e-6)
    # Quantiles are exact to one bin: the median sits with the ordinary tokens, p99.5 with the planted ones.
    ratio = streamed.edges[1] / streamed.edges[0]
    assert np.median(norms) <= streamed.quantile(0.5) <= np.median(norms) * ratio
    assert streamed.quantile(0.995) > 10 * np.median(norms)
    control = NormHistogram()
    control.update(torch.randn(2000, 32, generator=g))
    assert control.quantile(0.995) < 3 * control.quantile(0.5)


def test_norm_histogram_bins_as_numpy_searchsorted_right_does_with_norms_on_the_edges():
    histogram = NormHistogram(low=1.0, high=4.0, bins=2)
    assert histogram.edges.tolist() == [1.0, 2.0, 4.0]
    norms = np.array([0.5, 1.0, 2.0, 3.0, 4.0, 5.0, np.inf])  # on an edge: the bin above it
    histogram.update(torch.from_numpy(norms).float().unsqueeze(1))
    reference = np.bincount(np.searchsorted(histogram.edges, norms, side="right"), minlength=4)
    np.testing.assert_array_equal(histogram.counts, reference)
    assert histogram.counts.tolist() == [1, 1, 2, 3]  # below 1, [1, 2), [2, 4), 4 and above
    assert histogram.max == np.inf and histogram.count == 7


@pytest.mark.parametrize("drop_unlabelled_first", [True, False])  # the CPU's way, an accelerator's way
@pytest.mark.parametrize("k, similarity", [(1, "dot"), (5, "cosine"), (3, "l2")])
def test_streaming_knn_equals_knn_on_all_rows_at_once(k, similarity, drop_unlabelled_first, monkeypatch):
    monkeypatch.setattr(streaming, "_drop_unlabelled_first", lambda device: drop_unlabelled_first)
    g = torch.Generator().manual_seed(2)
    n_classes, dim = 5, 16
    centres = torch.randn(n_classes, dim, generator=g) * 3
    def sample(n):
        y = torch.randint(0, n_classes, (n,), generator=g)
        x = centres[y] + torch.randn(n, dim, generator=g)
        y[torch.rand(n, generator=g) < 0.1] = 255  # unlabelled patches
        return x, y
    train_x, train_y = sample(300)
    eval_x, eval_y = sample(700)
    stream = StreamingKNN(n_classes, k=k, similarity=similarity)
    for x, y in zip(_chunks(train_x, [100, 200]), _chunks(train_y, [100, 200])):
        stream.update(x, y, train=True)
    for x, y in zip(_chunks(eval_x, [1, 99, 600]), _chunks(eval_y, [1, 99, 600])):
        stream.update(x, y)
    pred = knn_predict(train_x, train_y, eval_x, k=k, similarity=similarity, n_classes=n_classes)
    reference = segmentation_metrics(pred.numpy(), eval_y.numpy(), n_classes)
    got = stream.result()
    assert got["miou"] == reference["miou"] and got["pixel_accuracy"] == reference["pixel_accuracy"]
    np.testing.assert_array_equal(got["confusion"], reference["confusion"])
    assert got["miou"] > 0.9  # the planted classes are separable


@pytest.mark.parametrize("average", ["present", "cityscapes"])
def test_streaming_knn_averages_miou_by_the_protocol_rule(average):
    """Train classes 0-3, evaluation labels only 0-1: classes 2-3 are predicted but absent, which
    only the cityscapes rule scores (as 0)."""
    g = torch.Generator().manual_seed(4)
    train_x, train_y = torch.randn(200, 6, generator=g), torch.randint(0, 4, (200,), generator=g)
    eval_x, eval_y = torch.randn(300, 6, generator=g), torch.randint(0, 2, (300,), generator=g)
    stream = StreamingKNN(4, average=average)
    stream.update(train_x, train_y, train=True)
    stream.update(eval_x, eval_y)
    pred = knn_predict(train_x, train_y, eval_x, n_classes=4)
    assert set(pred.tolist()) >= {2, 3}
    reference = segmentation_metrics(pred.numpy(), eval_y.numpy(), 4, average=average)
    assert stream.result()["miou"] == reference["miou"]
    other = segmentation_metrics(pred.numpy(), eval_y.numpy(), 4,
                                 average="present" if average == "cityscapes" else "cityscapes")
    assert stream.result()["miou"] != other["miou"]


def test_streaming_knn_on_unrelated_features_scores_about_chance():
    g = torch.Generator().manual_seed(3)
    stream = StreamingKNN(4)
    stream.update(torch.randn(400, 8, generator=g), torch.randint(0, 4, (400,), generator=g), train=True)
    stream.update(torch.randn(800, 8, generator=g), torch.randint(0, 4, (800,), generator=g))
    assert stream.result()["miou"] < 0.25


def test_streaming_knn_refuses_train_rows_after_evaluation_and_evaluation_without_train():
    stream = StreamingKNN(2)
    with pytest.raises(PatchAtlasError, match="no labelled train rows"):
        stream.update(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    stream.update(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), train=True)
    stream.update(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(PatchAtlasError, match="train images come first"):
        stream.update(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), train=True)


def _feed(stream: StreamingKMeans, x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> dict:
    for x_chunk, y_chunk in zip(_chunks(x, sizes), _chunks(y, sizes)):
        stream.update(x_chunk, y_chunk)
    return stream.result()


def _planted_directions(n: int, n_classes: int, dim: int, noise: float, g: torch.Generator):
    """Balanced labels and tokens that are a class-specific random direction plus small noise."""
    y = (torch.arange(n) % n_classes)[torch.randperm(n, generator=g)]
    directions = torch.randn(n_classes, dim, generator=g)
    return directions[y] + noise * torch.randn(n, dim, generator=g), y


@pytest.mark.parametrize("fit_rows", [300, 1000])  # the fit fills mid-stream / happens at result()
def test_streaming_kmeans_equals_kmeans_then_nearest_centroid_then_hungarian_match(fit_rows):
    g = torch.Generator().manual_seed(4)
    n, dim, k, n_classes = 700, 16, 6, 5
    x = torch.randn(n, dim, generator=g) * 3.0
    y = torch.randint(0, n_classes, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = 255
    got = _feed(StreamingKMeans(k, n_classes, fit_rows=fit_rows, seed=1, n_init=2, max_iter=50), x, y,
                [7, 100, 33, 250, 310])
    # By hand: one k-means on the first fit_rows normalised rows, every row to its nearest centroid.
    n_fit = min(fit_rows, n)
    unit = clusters._l2_normalized_rows(x, 65536)
    fit = kmeans(unit[:n_fit], k, seed=1, n_init=2, max_iter=50)
    labels, _ = clusters._nearest_centroid(unit, clusters._row_squared_norms(unit, 65536), fit.centroids, 65536)
    reference = hungarian_match(labels.numpy(), y.numpy(), k, n_classes)
    assert got["miou"] == reference.miou and got["pixel_accuracy"] == reference.pixel_accuracy
    np.testing.assert_array_equal(got["per_class_iou"], reference.per_class_iou)
    assert got["cluster_to_class"] == reference.cluster_to_class.tolist()
    assert got["inertia"] == fit.inertia
    assert (got["k"], got["fit_rows"], got["rows"]) == (k, n_fit, n)
    # Chunk boundaries do not matter, one straddling the end of the fit rows included.
    again = _feed(StreamingKMeans(k, n_classes, fit_rows=fit_rows, seed=1, n_init=2, max_iter=50), x, y,
                  [450, 1, 249])
    assert again == got


def test_streaming_kmeans_recovers_planted_clusters_in_rows_after_the_fit():
    g = torch.Generator().manual_seed(5)
    x, y = _planted_directions(4000, 4, 32, 0.1, g)
    got = _feed(StreamingKMeans(4, 4, fit_rows=500), x, y, [300] * 13 + [100])
    assert got["miou"] > 0.95 and got["pixel_accuracy"] > 0.95
    assert got["fit_rows"] == 500 and got["rows"] == 4000
    assert sorted(got["cluster_to_class"]) == [0, 1, 2, 3]
    # Scored only on rows the fit never saw: the fit rows are left unlabelled.
    later_only = y.clone()
    later_only[:500] = 255
    assert _feed(StreamingKMeans(4, 4, fit_rows=500), x, later_only, [1000, 3000])["miou"] > 0.95


def test_streaming_kmeans_on_tokens_unrelated_to_the_labels_scores_about_chance():
    g = torch.Generator().manual_seed(6)
    _, y = _planted_directions(4000, 4, 32, 0.1, g)
    noise = torch.randn(4000, 32, generator=g)
    got = _feed(StreamingKMeans(4, 4, fit_rows=500), noise, y, [300] * 13 + [100])
    chance = chance_miou(y.numpy(), 4, 4, n_permutations=20)  # about 0.15 for four balanced classes
    assert got["miou"] < 0.25 and abs(got["miou"] - chance) < 0.05


def _held_tensors(stream: StreamingKMeans):
    for value in vars(stream).values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, torch.Tensor):
                yield item


def test_streaming_kmeans_holds_at_most_fit_rows_whatever_it_is_fed():
    g = torch.Generator().manual_seed(7)
    stream = StreamingKMeans(3, 4, fit_rows=200, n_init=1)
    # Before the fit, a chunk larger than the buffer leaves only copies of what it needs.
    big = torch.randn(150, 8, generator=g)
    stream.update(big, torch.randint(0, 4, (150,), generator=g))
    held = list(_held_tensors(stream))
    assert sum(len(t) for t in held if t.ndim == 2) == 150
    assert all(t.untyped_storage().data_ptr() != big.untyped_storage().data_ptr() for t in held)
    for _ in range(20):
        x = torch.randn(256, 8, generator=g)
        stream.update(x, torch.randint(0, 4, (256,), generator=g))
        for tensor in _held_tensors(stream):
            assert len(tensor) <= 200
            assert tensor.untyped_storage().nbytes() <= 200 * 8 * 8
    assert stream._buffer_x == [] and stream._buffer_y == []
    assert stream.confusion.shape == (3, 4) and stream.confusion.sum() == 150 + 20 * 256
    result = stream.result()
    assert result["fit_rows"] == 200 and result["rows"] == 150 + 20 * 256


def test_streaming_kmeans_rejects_bad_input():
    with pytest.raises(PatchAtlasError, match="k=5 exceeds fit_rows=4"):
        StreamingKMeans(5, 3, fit_rows=4)
    few = StreamingKMeans(4, 3)
    few.update(torch.randn(3, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(PatchAtlasError, match="k=4 exceeds the 3 rows"):
        few.result()
    # Labels outside the classes are counted as they come and refused when the result is read.
    mislabelled = StreamingKMeans(2, 3)
    mislabelled.update(torch.randn(4, 8), torch.tensor([0, 1, 3, 255]))
    with pytest.raises(PatchAtlasError, match=r"labels \[3\] outside \[0, 3\)"):
        mislabelled.result()
    mislabelled.update(torch.randn(2, 8), torch.tensor([-1, 0]))
    with pytest.raises(PatchAtlasError, match=r"labels \[-1, 3\] outside \[0, 3\)"):
        mislabelled.result()
    stream = StreamingKMeans(2, 3)
    with pytest.raises(PatchAtlasError, match="expected a tensor"):
        stream.update(torch.randn(8), torch.zeros(8, dtype=torch.long))
    with pytest.raises(PatchAtlasError, match="one per row"):
        stream.update(torch.randn(4, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(PatchAtlasError, match="one per row"):
        stream.update(torch.randn(4, 8), torch.zeros(4))
    stream.update(torch.randn(4, 8), torch.full((4,), 255))
    with pytest.raises(PatchAtlasError, match=r"expected a tensor \[rows, 8\]"):
        stream.update(torch.randn(4, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(PatchAtlasError, match="none of the 4 rows is labelled"):
        stream.result()
    with pytest.raises(PatchAtlasError, match="collides"):
        StreamingKMeans(2, 3, ignore_index=1)


def test_match_from_confusion_equals_hungarian_match():
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[1, 1, 0, 0], [1, 1, 2, 2]])
    confusion = np.array([[0, 2, 0], [4, 0, 0], [0, 1, 0]])  # cluster × class, the ignored pixel left out
    got = match_from_confusion(confusion)
    reference = hungarian_match(pred, target, n_clusters=3, n_classes=3)
    np.testing.assert_array_equal(reference.confusion, confusion)
    assert got.miou == reference.miou and got.pixel_accuracy == reference.pixel_accuracy
    np.testing.assert_array_equal(got.per_class_iou, reference.per_class_iou)
    np.testing.assert_array_equal(got.cluster_to_class, reference.cluster_to_class)
    assert got.cluster_to_class.tolist() == [1, 0, -1] and np.isnan(got.per_class_iou[2])
    with pytest.raises(PatchAtlasError, match="no labelled"):
        match_from_confusion(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(PatchAtlasError, match="2-D"):
        match_from_confusion(np.ones(3, dtype=np.int64))
    with pytest.raises(PatchAtlasError, match="negative"):
        match_from_confusion(np.array([[1, -1]]))


def test_unpublished_layers_get_streamed_curves_equal_to_the_analysis_of_published_ones(tiny_models, tiny_builds,
                                                                                      tmp_path):
    """`--layers last` publishes one layer; the other layer's k-NN and variance spectrum come from
    the streaming pass and equal what analysing that layer's published table gives."""
    import json

    from generator.store.parquet import patch_grid, read_patch_table
    from generator.stream import KMEANS_FIT_ROWS

    streamed_out, published_out = tiny_builds["streamed"], tiny_builds["published"]
    record = json.loads((streamed_out / "results/synthetic-scenes/tiny_random/layerwise.json").read_text())
    assert [row["layer"] for row in record["layers"]] == [1]  # tiny models have two blocks
    row = record["layers"][0]
    probes = json.loads((published_out / "results/synthetic-scenes/tiny_random/tiny_random-L01-postnorm"
                         / "probes.json").read_text())
    assert row["knn_miou"] == probes["knn_miou"] and row["n_train_images"] == probes["n_train_images"]
    # The variance spectrum of the train tokens, from the published table.
    table = read_patch_table(sorted((published_out / "datasets/synthetic-scenes/tiny_random/L01-postnorm")
                                    .glob("*.parquet")))
    _, tokens, _ = patch_grid(table)
    train = torch.from_numpy(tokens[:row["n_train_images"]]).reshape(-1, tokens.shape[-1])
    expected = torch.sort(feature_variance(train), descending=True).values
    np.testing.assert_allclose(row["variance_spectrum"], expected.numpy(), rtol=1e-6)
    # k-means with one cluster per class, as the accumulator computes it on the whole table at once.
    _, _, labels = patch_grid(table)
    whole = StreamingKMeans(row["kmeans"]["k"], 8, fit_rows=KMEANS_FIT_ROWS)
    whole.update(torch.from_numpy(tokens).reshape(-1, tokens.shape[-1]), torch.from_numpy(labels).reshape(-1).long())
    assert row["kmeans"] == {key: whole.result()[key] for key in ("k", "miou", "pixel_accuracy", "fit_rows")}
    assert row["kmeans"]["k"] == 8 and 0 < row["kmeans"]["miou"] <= 1
    # Nothing of layer 1 was stored, and the published build has no streamed record.
    assert not list((streamed_out / "datasets/synthetic-scenes/tiny_random").glob("L01-*"))
    assert not (published_out / "results/synthetic-scenes/tiny_random/layerwise.json").exists()
    page = (streamed_out / "docs/probe-metrics.md").read_text()
    assert "streamed (not published)" in page
    kmeans_row = next(line for line in page.splitlines() if line.startswith("| tiny\\_random") and " | 1 | " in line
                      and "(8)" in line)
    assert f"{100 * row['kmeans']['miou']:.1f}" in kmeans_row
    # The k-NN-by-layer chart has one point per layer: the streamed layer 1, the published layer 2.
    from generator.summarize import read_source_summary

    last = json.loads((streamed_out / "results/synthetic-scenes/tiny_random/tiny_random-L02-postnorm"
                       / "probes.json").read_text())
    context = read_source_summary(streamed_out, "synthetic-scenes")["probes"]
    assert [tuple(p) for p in context["knn_by_layer"]["tiny_random"]] == [(1, row["knn_miou"]), (2, last["knn_miou"])]


# ---------------------------------------------------------------------------------------------
# Nothing read back while streaming

# Tensor methods that hand a value to the host, and operators whose result is sized by the
# values (an accelerator makes the host wait for both; CUDA's bincount reads its input's range).
_READ_BACKS = {"cpu", "numpy", "tolist", "item", "__bool__", "__float__", "__int__", "__index__", "__array__"}
_SIZED_BY_VALUES = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "_unique2", "unique_dim",
                    "unique_consecutive"}


class _WatchMethods(TorchFunctionMode):
    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _READ_BACKS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


class _WatchOperators(TorchDispatchMode):
    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SIZED_BY_VALUES:
            self.seen.append(name)
        elif name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.seen.append("boolean mask")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _read_backs():
    """The read-backs to the host made inside the block, by name."""
    seen: list[str] = []
    with _WatchMethods(seen), _WatchOperators(seen):
        yield seen


def test_the_read_back_watch_sees_read_backs():
    x = torch.arange(6.0)
    with _read_backs() as seen:
        bool(x[0] > 0), float(x[1]), x.tolist(), x[x > 2], torch.bincount(x.long())
    assert {"__bool__", "__float__", "_local_scalar_dense", "tolist", "boolean mask", "bincount"} <= set(seen)
    with _read_backs() as seen:  # the control: work that stays on the device
        torch.where(x > 2, x, 0.0).sum(), torch.zeros(3).index_add_(0, x.long() % 3, x), x[1:4]
    assert seen == []


def test_accumulators_keep_their_state_on_the_rows_device_and_read_nothing_back_as_they_are_fed(monkeypatch):
    g = torch.Generator().manual_seed(8)
    x, y = _planted_directions(1200, 4, 16, 0.1, g)
    y[::7] = 255
    monkeypatch.setattr(streaming, "_drop_unlabelled_first", lambda device: False)  # an accelerator's way
    knn, moments, norms = StreamingKNN(4), RunningMoments(16), NormHistogram()
    fitted, buffering = StreamingKMeans(4, 4, fit_rows=300, n_init=1), StreamingKMeans(4, 4, fit_rows=2000, n_init=1)
    # Once per run, read-backs are allowed: building the k-NN train bank, fitting the k-means.
    knn.update(x[:300], y[:300], train=True)
    knn.update(x[300:400], y[300:400])
    fitted.update(x[:300], y[:300])
    with _read_backs() as seen:
        for start in range(400, 1200, 200):
            chunk, labels = x[start:start + 200], y[start:start + 200]
            knn.update(chunk, labels)
            moments.update(chunk)
            norms.update(chunk)
            fitted.update(chunk, labels)
            buffering.update(chunk, labels)
    assert seen == []
    state = [knn._counts, knn._bad_labels, moments.mean, norms._counts, norms._total, norms._max,
             fitted._confusion, fitted._problems, fitted._bad_labels, fitted._centroids, buffering._confusion,
             *buffering._buffer_x, *buffering._buffer_y]
    assert all(tensor.device == x.device for tensor in state)
    # What they counted is right: the planted classes are found, every row is there.
    assert knn.result()["miou"] > 0.9 and knn.counts.sum() == (y[300:] != 255).sum()
    torch.testing.assert_close(moments.result(), feature_variance(x[400:]), rtol=1e-9, atol=1e-9)
    assert norms.count == 800 and norms.result()["count"] == 800
    assert fitted.result()["miou"] > 0.9 and fitted.result()["rows"] == 1100
    assert buffering.result()["fit_rows"] == 800


def test_bad_labels_and_nan_tokens_counted_while_streaming_are_refused_when_results_are_read():
    g = torch.Generator().manual_seed(9)
    x, y = _planted_directions(600, 3, 8, 0.1, g)
    bad_y = y.clone()
    bad_y[[310, 420, 421]] = torch.tensor([7, -2, 7])
    nan_x = x.clone()
    nan_x[450, 3] = float("nan")
    # k-NN: an evaluation label outside the classes, counted into nothing, refused by metrics().
    knn, control = StreamingKNN(3), StreamingKNN(3)
    for stream, labels in ((knn, bad_y), (control, y)):
        stream.update(x[:300], labels[:300], train=True)
        for start in range(300, 600, 100):
            stream.update(x[start:start + 100], labels[start:start + 100])
    with pytest.raises(PatchAtlasError, match=r"StreamingKNN: labels outside \[0, 3\) that are not the ignore label"):
        knn.result()
    assert control.result()["miou"] > 0.9
    assert knn.counts.sum() == control.counts.sum() - 3  # the bad rows were not counted
    # k-means: labels and NaN after the fit are refused by result(); a NaN in the fit rows by the fit.
    for tokens, labels, message in ((x, bad_y, r"labels \[-2, 7\] outside \[0, 3\)"),
                                    (nan_x, y, "the tokens hold NaN or infinite values")):
        stream = StreamingKMeans(3, 3, fit_rows=300, n_init=1)
        for start in range(0, 600, 150):
            stream.update(tokens[start:start + 150], labels[start:start + 150])
        with pytest.raises(PatchAtlasError, match=message):
            stream.result()
    late_fit = StreamingKMeans(3, 3, fit_rows=500, n_init=1)
    late_fit.update(nan_x[:400], y[:400])
    with pytest.raises(PatchAtlasError, match="NaN or infinite"):
        late_fit.update(nan_x[400:], y[400:])  # fills the fit rows
    clean = StreamingKMeans(3, 3, fit_rows=300, n_init=1)
    assert _feed(clean, x, y, [150] * 4)["miou"] > 0.9


def test_layerwise_accumulator_reads_back_once_per_batch_and_names_the_first_broken_layer(monkeypatch):
    monkeypatch.setattr(streaming, "_drop_unlabelled_first", lambda device: False)  # an accelerator's way
    source = synthetic_scenes(8, 16)  # four train images, four evaluation images
    encoder = SimpleNamespace(embed_dim=8, device=torch.device("cpu"), grid=(2, 2),
                              entry=SimpleNamespace(name="tiny_x", probe_batchnorm=False))
    accumulator = LayerwiseAccumulator(source, [1, 2, 3], encoder, SimpleNamespace(probe=ProbeProtocol(), label_rule="majority"))
    g = torch.Generator().manual_seed(10)

    def batch(broken: dict | None = None) -> TokenBatch:
        layers = {}
        for layer in (1, 2, 3):
            for norm in ("prenorm", "postnorm"):
                patch = torch.randn(2, 2, 2, 8, generator=g)
                patch[0, 0, 0, 0] = (broken or {}).get((layer, norm), patch[0, 0, 0, 0])
                layers[(layer, norm)] = LayerTokens(patch=patch, prefix=torch.zeros(2, 1, 8))
        return TokenBatch(grid=(2, 2), layers=layers)

    labels = np.random.default_rng(0).integers(0, 8, (2, 2, 2))
    for first in (0, 2, 4):  # train images, then the bank is built on the first evaluation rows
        accumulator.update(first, labels, batch())
    with pytest.raises(PatchAtlasError, match=r"^tiny_x on images 6\.\.7, layer 2: NaN/inf tokens; the weights "):
        accumulator.update(6, labels, batch({(3, "prenorm"): float("nan"), (2, "postnorm"): float("inf")}))
    assert accumulator.seen == 6  # nothing of the broken batch was counted
    with _read_backs() as seen:
        accumulator.update(6, labels, batch())
    assert seen == ["tolist"]  # the one check of all layers
    assert accumulator.complete and [row["layer"] for row in accumulator.result()] == [1, 2, 3]
