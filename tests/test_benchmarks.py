"""The pipeline benchmark runs end to end on a tiny model and reports every section.

Speed is not asserted (it depends on the machine); what is checked is that both paths did the
same work, that every number the report is built from was measured, and that the JSON written
is the report printed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest

from conftest import offline_tiny_zoo

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
N_IMAGES = 8
SIDE = 64


def load_benchmark(name: str):
    """A benchmark script as a module, loaded from its path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipeline():
    return load_benchmark("pipeline")


@pytest.fixture(scope="module")
def report(pipeline, tmp_path_factory):
    """One run shared by the tests: 8 images through the two-block tiny model, a small writer test."""
    mp = offline_tiny_zoo(tmp_path_factory)
    path = tmp_path_factory.mktemp("bench") / "pipeline.json"
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            printed = pipeline.main(["--device", "cpu", "--model", "tiny_random", "--images", str(N_IMAGES),
                                     "--side", str(SIDE), "--batch-size", "3", "--writer-rows", "800",
                                     "--writer-dim", "32", "--writer-repeats", "1", "--json", str(path)])
    finally:
        mp.undo()
    return {"printed": printed, "json": json.loads(path.read_text()), "stdout": stdout.getvalue(), "json_path": path}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_json_is_the_printed_report(report):
    assert report["json"] == json.loads(json.dumps(report["printed"]))
    assert set(report["json"]) == {"machine", "config", "model", "end_to_end", "writer"}
    machine = report["json"]["machine"]
    assert machine["cpu"] and machine["cpu_cores"] >= 1 and machine["torch"] and machine["date"]
    # The command as run, arguments and all: benchmarks/README.md heads each table with it.
    assert machine["command"].startswith("python benchmarks/pipeline.py --device cpu --model tiny_random ")
    assert machine["command"].endswith(f"--json {report['json_path']}")
    assert machine["gpu"] is None


def test_naive_and_tuned_write_the_same_patch_rows(report):
    e2e = report["json"]["end_to_end"]
    # tiny_random: 2 blocks, 64 px at patch 16 = 4×4 patches, pre- and post-norm tables.
    assert e2e["layers"] == [1, 2] and e2e["tables"] == 4
    expected = N_IMAGES * 4 * 4 * e2e["tables"]
    assert e2e["naive"]["patch_rows"] == e2e["tuned"]["patch_rows"] == expected
    assert e2e["same_patch_rows"] is True
    # One Parquet file per batch and table for the naive path (batches of 32 here: one batch).
    assert e2e["naive"]["files"] == e2e["tables"]
    assert e2e["naive"]["stored"] == "float32" and e2e["tuned"]["stored"] == "float16"


def test_every_measured_number_is_positive(report):
    data = report["json"]
    assert _positive(data["model"]["gflop_per_image"])
    assert data["model"]["roofline_img_s"] is None  # no peak FLOPS is claimed for a CPU
    for name in ("naive", "tuned"):
        path = data["end_to_end"][name]
        for key in ("seconds", "img_s", "writer_seconds", "writer_mb_s", "writer_share", "embedding_bytes",
                    "file_bytes", "rss_peak_mib"):
            assert _positive(path[key]), (name, key, path[key])
        assert path["roofline_pct"] is None and path["cuda_peak_mib"] is None
    assert _positive(data["end_to_end"]["speedup"])
    writer = data["writer"]
    assert writer["rows"] >= 800 and writer["dim"] == 32
    assert len(writer["encodings"]) >= 10
    for row in writer["encodings"]:
        for key in ("write_mb_s", "read_mb_s", "write_mrows_s", "file_mb", "file_to_raw"):
            assert _positive(row[key]), (row["encoding"], row["dtype"], key)
        assert row["read_back_exact"] is True
    for key in ("serial_mb_s", "parallel_mb_s", "speedup"):
        assert _positive(writer["parallel"][key])


def test_encodings_are_the_ones_asked_for(report):
    rows = {(r["encoding"], r["dtype"]): r for r in report["json"]["writer"]["encodings"]}
    assert {"float16", "float32"} == {dtype for _, dtype in rows}
    assert "BYTE_STREAM_SPLIT" in rows[("zstd-3 + byte-stream-split", "float16")]["parquet_encodings"]
    assert "BYTE_STREAM_SPLIT" not in rows[("zstd-3 (writer default)", "float16")]["parquet_encodings"]
    # float16 stores half the bytes of float32 (within the few bytes of other columns per row).
    half = rows[("uncompressed", "float16")]["file_mb"] / rows[("uncompressed", "float32")]["file_mb"]
    assert 0.5 < half < 0.7


def test_table_is_printed(report):
    out = report["stdout"]
    assert "naive" in out and "tuned" in out and "writer alone" in out and "% roofline" in out
    assert "n/a" in out  # the roofline column on a CPU


def test_writers_are_left_as_they_were(report):
    # The benchmark times and re-configures the project's writers only while it measures.
    from generator.store import parquet

    assert parquet._parquet_options.__name__ == "_parquet_options"
    for cls, name in ((parquet.PatchTableWriter, "write_batch"), (parquet.PrefixTableWriter, "write_batch"),
                      (parquet.TableWriter, "close")):
        assert not hasattr(cls.__dict__[name], "__wrapped__"), (cls, name)


# ---------------------------------------------------------------- k-NN and linear probe against scikit-learn

TINY_KNN = ["--device", "cpu", "--queries", "500", "--train", "300", "--dim", "16", "--classes", "4",
            "--sklearn-queries", "200", "--probe-epochs", "40", "--probe-batch-size", "100", "--probe-lr", "0.1"]


@pytest.fixture(scope="module")
def knn_scale():
    return load_benchmark("knn_scale")


@pytest.fixture(scope="module")
def knn_report(knn_scale, tmp_path_factory):
    """500 queries × 300 train × 16 dims, 4 classes: every step of the benchmark, in seconds."""
    path = tmp_path_factory.mktemp("knn") / "probes.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        printed = knn_scale.main([*TINY_KNN, "--json", str(path)])
    return {"printed": printed, "json": json.loads(path.read_text()), "stdout": stdout.getvalue(), "json_path": path}


def test_knn_json_is_the_printed_report(knn_report):
    data = knn_report["json"]
    assert data == json.loads(json.dumps(knn_report["printed"]))
    assert set(data) == {"machine", "config", "data", "knn", "probe"}
    assert data["machine"]["cpu"] and data["machine"]["cpu_cores"] >= 1 and data["machine"]["gpu"] is None
    assert data["machine"]["sklearn"] and data["machine"]["load_average_end"]
    config = data["config"]
    assert (config["queries"], config["train"], config["dim"], config["classes"]) == (500, 300, 16, 4)
    assert config["sklearn_queries"] == 200 and config["probe_train"] == 300


def test_knn_every_measured_number_is_there(knn_report):
    knn, probe = knn_report["json"]["knn"], knn_report["json"]["probe"]
    steps = [knn["ours"], knn["sklearn"]["fit"], knn["sklearn"]["predict_timed"]]
    steps += [probe[side][step] for side in ("ours", "sklearn") for step in ("fit", "predict")]
    for step in steps:
        assert _positive(step["seconds"]) and _positive(step["rss_peak_mib"]), step
        assert step["cuda_peak_mib"] is None and step["rss_increase_mib"] >= 0
    for value in (knn["ours"]["rows_s"], knn["sklearn"]["rows_s"], knn["speedup"], probe["fit_speedup"],
                  probe["predict_speedup"], probe["ours"]["fit"]["rows_s"], probe["sklearn"]["fit"]["rows_s"]):
        assert _positive(value)
    assert knn["ours"]["rows"] == knn["sklearn"]["rows"] == 500
    # scikit-learn predicted 200 queries: its time is its fit plus 500/200 of that.
    sk = knn["sklearn"]
    assert sk["rows_timed"] == knn["agreement_rows"] == 200 and sk["extrapolated"] is True
    assert sk["seconds"] == pytest.approx(sk["fit"]["seconds"] + sk["predict_timed"]["seconds"] * 500 / 200)
    assert knn["speedup"] == pytest.approx(sk["seconds"] / knn["ours"]["seconds"])
    assert probe["sklearn"]["fit"]["epochs"] == probe["ours"]["fit"]["epochs"] == 40


def test_knn_and_probe_agree_with_sklearn(knn_report):
    knn, probe = knn_report["json"]["knn"], knn_report["json"]["probe"]
    # Continuous random rows have no ties: dot on unit rows and scikit-learn's cosine pick the same neighbours.
    assert knn["sklearn_metric"] == "cosine"
    assert knn["agreement_with_sklearn"] == 1.0 and knn["agreement_with_brute_force"] == 1.0
    # The same model trained the same way from other initial weights: nearly the same predictions,
    # and both found the planted teacher (chance is 1/4).
    assert probe["agreement_with_sklearn"] >= 0.95
    assert probe["ours"]["accuracy"] > 0.8 and probe["sklearn"]["accuracy"] > 0.8
    out = knn_report["stdout"]
    assert "KNeighborsClassifier" in out and "MLPClassifier" in out and "extrapolated" in out


def test_knn_agreement_sees_a_different_ranking(knn_scale):
    # Control: train rows of unequal length make the dot product rank differently from the
    # cosine, so the measured agreement must drop; asking for cosine restores it.
    import torch

    data = knn_scale.make_data(300, 400, 16, 4, dtype=torch.float32, device=torch.device("cpu"), seed=1)
    gen = torch.Generator().manual_seed(2)
    data["train"] = data["train"] * torch.empty(300, 1).uniform_(0.2, 3.0, generator=gen)
    with contextlib.redirect_stdout(io.StringIO()):
        dot = knn_scale.knn_side_by_side(data, k=1, similarity="dot", n_classes=4, sklearn_queries=400)
        cosine = knn_scale.knn_side_by_side(data, k=1, similarity="cosine", n_classes=4, sklearn_queries=400)
    assert dot["agreement_with_sklearn"] < 0.8
    assert dot["agreement_with_brute_force"] == 1.0  # ours still finds the largest dot products
    assert cosine["agreement_with_sklearn"] == 1.0


def test_layerwise_benchmark_runs_the_three_ways_and_the_curves_agree(tmp_path_factory):
    module = load_benchmark("layerwise_stream")
    mp = offline_tiny_zoo(tmp_path_factory)
    path = tmp_path_factory.mktemp("bench") / "layerwise.json"
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            printed = module.main(["--device", "cpu", "--model", "tiny_random", "--images", "6", "--size", "64",
                                   "--batch-size", "2", "--json", str(path)])
    finally:
        mp.undo()
    assert json.loads(path.read_text()) == json.loads(json.dumps(printed))
    assert printed["streamed_layers"] == [1]  # tiny_random has two blocks; the last is published
    assert printed["curves_agree"] is True
    assert set(printed["seconds"]) == {"publish only", "fused", "separate"}
    assert all(_positive(s) for s in printed["seconds"].values()) and _positive(printed["separate_second_run_s"])
    assert "| fused |" in stdout.getvalue() and "curves agree: True" in stdout.getvalue()
