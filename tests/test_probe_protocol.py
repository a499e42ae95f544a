"""One probe protocol for streamed layer-wise curves and analysed layers, recorded with every
result and printed on the probe page; BatchNorm only for the models the paper gives it."""

from __future__ import annotations

import json
import shutil

from generator.cli import main
from generator.models.registry import MODELS

from conftest import TINY_MAE, TINY_SIMMIM


def test_only_the_mae_rows_put_batchnorm_before_the_linear_probe():
    with_batchnorm = sorted(name for name, entry in MODELS.items() if entry.probe_batchnorm)
    assert with_batchnorm == ["mae_vitb16", "mae_vith14", "mae_vitl16"]
    # "We do not use BatchNorm for SimMIM": nor for the other MIM models.
    for name in ("simmim_vitb16", "beit_vitb16_pt22k", "eva02_vitb14_mim"):
        assert MODELS[name].family == "MIM" and not MODELS[name].probe_batchnorm


def _json(path):
    return json.loads(path.read_text())


def test_knn_k_reaches_streamed_and_analysed_layers_and_the_page(tiny_models, tiny_builds, tmp_path, monkeypatch):
    # The shared builds (k-NN k = 5); the streamed one is copied, as this test analyses it again.
    monkeypatch.setitem(MODELS, "tiny_mae", TINY_MAE)
    monkeypatch.setitem(MODELS, "tiny_simmim", TINY_SIMMIM)
    out, published_out = tmp_path / "streamed", tiny_builds["published"]
    shutil.copytree(tiny_builds["streamed"], out)
    results = out / "results/synthetic-scenes"
    for model, batchnorm in (("tiny_mae", True), ("tiny_simmim", False)):
        layerwise = _json(results / model / "layerwise.json")
        probes = _json(results / model / f"{model}-L02-postnorm" / "probes.json")
        assert layerwise["protocol"]["knn_k"] == probes["protocol"]["knn_k"] == 5
        assert layerwise["protocol"] == probes["protocol"]  # one record for both paths
        assert probes["protocol"]["batchnorm"] is batchnorm and probes["linear_fit"]["batchnorm"] is batchnorm
        assert probes["protocol"]["label_rule"] == "majority"
        assert probes["linear_fit"]["converged"] and probes["linear_fit"]["steps"] > 0
        for name in ("knn", "linear"):
            lo, hi = probes[f"{name}_miou_ci"]
            assert lo <= probes[f"{name}_miou"] <= hi
    # The streamed layer 1 equals the analysis of the same layer published, both with k = 5.
    streamed = _json(results / "tiny_mae/layerwise.json")["layers"][0]
    published = _json(published_out / "results/synthetic-scenes/tiny_mae/tiny_mae-L01-postnorm/probes.json")
    assert streamed["layer"] == 1 and streamed["knn_miou"] == published["knn_miou"]
    page = (out / "docs/probe-metrics.md").read_text()
    assert "k-NN with k = 5 on dot similarity" in page and "k = 1" not in page
    assert "Not joined" not in page

    # Analysing again with another k, for a model the registry no longer knows: its BatchNorm
    # flag comes from what extract recorded, and the page keeps the two protocols apart.
    monkeypatch.delitem(MODELS, "tiny_mae")
    assert main(["analyze", "--out", str(out), "--knn-k", "3", "--device", "cpu", "--quiet"]) == 0
    reanalysed = _json(results / "tiny_mae/tiny_mae-L02-postnorm/probes.json")
    assert reanalysed["protocol"]["knn_k"] == 3 and reanalysed["protocol"]["batchnorm"] is True
    monkeypatch.setitem(MODELS, "tiny_mae", TINY_MAE)
    assert main(["render", "--out", str(out), "--no-html", "--quiet"]) == 0
    page = (out / "docs/probe-metrics.md").read_text()
    assert "k-NN with k = 3" in page and "k-NN with k = 5" in page and "Not joined" in page
    from generator.summarize import read_source_summary

    context = read_source_summary(out, "synthetic-scenes")["probes"]
    assert [layer for layer, _ in context["knn_by_layer"]["tiny_mae"]] == [2]
    separate = [name for name in context["knn_by_layer"] if name.startswith("tiny_mae (streamed, k = 5")]
    assert len(separate) == 1 and [layer for layer, _ in context["knn_by_layer"][separate[0]]] == [1]
