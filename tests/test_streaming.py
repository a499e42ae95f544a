"""Streamed analyses equal their whole-array references, chunk sizes notwithstanding, and find
planted signals: high-variance junk dimensions, high-norm tokens, separable classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generator.analyses.probes import knn_predict, segmentation_metrics
from generator.analyses.streaming import NormHistogram, RunningMoments, StreamingKNN
from generator.analyses.variance import feature_variance, top_variance_dims
from generator.errors import PatchAtlasError


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
    torch.testing.assert_close(moments.variance(), feature_variance(x), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(moments.mean, x.double().mean(0), rtol=1e-12, atol=1e-9)
    assert sorted(top_variance_dims(moments.variance(), 3).tolist()) == junk.tolist()
    # Control: without planted dimensions, the three largest variances are not those.
    control = RunningMoments(64)
    control.update(torch.randn(1000, 64, generator=g))
    assert set(top_variance_dims(control.variance(), 3).tolist()) != set(junk.tolist())


def test_norm_histogram_adds_up_over_chunks_and_flags_planted_high_norm_tokens():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 32, generator=g)
    x[::100] *= 50.0  # 1 % high-norm tokens
    whole, streamed = NormHistogram(), NormHistogram()
    whole.update(x)
    for chunk in _chunks(x, [7, 993, 1000]):
        streamed.update(chunk)
    assert streamed.summary() == whole.summary()
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


@pytest.mark.parametrize("k, similarity", [(1, "dot"), (5, "cosine"), (3, "l2")])
def test_streaming_knn_equals_knn_on_all_rows_at_once(k, similarity):
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
        stream.add_train(x, y)
    for x, y in zip(_chunks(eval_x, [1, 99, 600]), _chunks(eval_y, [1, 99, 600])):
        stream.add_eval(x, y)
    pred = knn_predict(train_x, train_y, eval_x, k=k, similarity=similarity, n_classes=n_classes)
    reference = segmentation_metrics(pred.numpy(), eval_y.numpy(), n_classes)
    got = stream.metrics()
    assert got["miou"] == reference["miou"] and got["pixel_accuracy"] == reference["pixel_accuracy"]
    np.testing.assert_array_equal(got["confusion"], reference["confusion"])
    assert got["miou"] > 0.9  # the planted classes are separable


def test_streaming_knn_on_unrelated_features_scores_about_chance():
    g = torch.Generator().manual_seed(3)
    stream = StreamingKNN(4)
    stream.add_train(torch.randn(400, 8, generator=g), torch.randint(0, 4, (400,), generator=g))
    stream.add_eval(torch.randn(800, 8, generator=g), torch.randint(0, 4, (800,), generator=g))
    assert stream.metrics()["miou"] < 0.25


def test_streaming_knn_refuses_train_rows_after_evaluation_and_evaluation_without_train():
    stream = StreamingKNN(2)
    with pytest.raises(PatchAtlasError, match="no labelled train rows"):
        stream.add_eval(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    stream.add_train(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    stream.add_eval(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(PatchAtlasError, match="train images come first"):
        stream.add_train(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))


def test_unpublished_layers_get_streamed_curves_equal_to_the_analysis_of_published_ones(tiny_models, tmp_path):
    """`--layers last` publishes one layer; the other layer's k-NN and variance spectrum come from
    the streaming pass and equal what analysing that layer's published table gives."""
    import json

    from generator.cli import main
    from generator.store.parquet import patch_grid, read_patch_table

    def build(out, layers):
        assert main(["build", "--out", str(out), "--models", "tiny_random", "--source", "synthetic-scenes",
                     "--source-option", "n_images=6", "--source-option", "size=64", "--layers", layers,
                     "--embedding-dtype", "float32", "--k", "2", "--no-html", "--device", "cpu",
                     "--quiet"]) == 0

    streamed_out, published_out = tmp_path / "streamed", tmp_path / "published"
    build(streamed_out, "last")
    build(published_out, "all")
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
    # Nothing of layer 1 was stored, and the published build has no streamed record.
    assert not list((streamed_out / "datasets/synthetic-scenes/tiny_random").glob("L01-*"))
    assert not (published_out / "results/synthetic-scenes/tiny_random/layerwise.json").exists()
    page = (streamed_out / "docs/probe-metrics.md").read_text()
    assert "streamed (not published)" in page
    # The k-NN-by-layer chart has one point per layer: the streamed layer 1, the published layer 2.
    from generator.site import _probe_context

    last = json.loads((streamed_out / "results/synthetic-scenes/tiny_random/tiny_random-L02-postnorm"
                       / "probes.json").read_text())
    context = _probe_context(streamed_out, tmp_path / "docs", {"name": "synthetic-scenes"}, {})
    assert context["knn_by_layer"]["tiny_random"] == [(1, row["knn_miou"]), (2, last["knn_miou"])]
