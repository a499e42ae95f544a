"""Shards, float16 embeddings, distributed workers and crash safety of `patchatlas extract`.

- every config is cut into shards of at most ``--shard-mb`` of embeddings, at image boundaries
  that depend only on the model and the options;
- the float16 tables read back exactly with ``datasets``, DuckDB and polars;
- two workers (RANK/WORLD_SIZE, as torchrun sets them) plus a merging run write exactly the
  files and manifest entries of one process;
- a build killed with SIGKILL after N shards, then rerun with the same command, ends with the
  bytes of an uninterrupted build and does not rewrite the shards finished before the kill.

Runs that must be separate processes go through ``tests/tiny_cli.py`` single-threaded, so CPU
results are the same in every process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from generator.extract import ROW_OVERHEAD_BYTES, images_per_shard, plan_shards
from generator.store.manifest import file_sha256
from generator.store.parquet import ROW_GROUP_BYTES, default_row_group_rows, read_patch_table

from conftest import TINY_REGISTERS, save_untrained_weights

TESTS = Path(__file__).resolve().parent
N_IMAGES = 6
# tiny_random: 4×4 patches of 192 float16 values plus row overhead → 2 images per shard
SHARD_MB = 2 * 16 * (192 * 2 + ROW_OVERHEAD_BYTES) / 1e6


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    return env


def _args(out: Path, ckpt: Path, shard_mb: float = SHARD_MB, command: str = "extract") -> list[str]:
    return [command, "--out", str(out), "--models", "tiny_random,tiny_reg", "--source", "synthetic-scenes",
            "--source-option", f"n_images={N_IMAGES}", "--source-option", "size=64", "--layers", "all",
            "--weights", f"tiny_reg={ckpt}", "--batch-size", "2", "--shard-mb", repr(shard_mb),
            "--device", "cpu", "--quiet"]


def _run(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(TESTS / "tiny_cli.py"), *args], env=env or _env(),
                            capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _published(out: Path) -> dict[str, str]:
    """sha256 of every file a build leaves (datasets, variants, results), lock files aside.

    Dataset cards name their own folder in the load example; that is the one difference two
    output folders may have, so it is masked.
    """
    digests = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file() or path.name == "manifest.json" or path.name.startswith(".patchatlas.lock"):
            continue
        if path.name == "README.md":
            text = path.read_text(encoding="utf-8").replace(str(out), "<out>")
            digests[str(path.relative_to(out))] = hashlib.sha256(text.encode()).hexdigest()
        else:
            digests[str(path.relative_to(out))] = file_sha256(path)
    return digests


def _entries(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["entries"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny_reg.safetensors"
    save_untrained_weights(TINY_REGISTERS, path, seed=3)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ckpt) -> Path:
    """One uninterrupted single-process extract with three shards per config."""
    out = tmp_path_factory.mktemp("reference") / "out"
    _run(_args(out, ckpt))
    return out


def test_shard_plan_bounds_the_bytes_and_depends_only_on_the_model():
    # ViT-B/16 at 224 in float16: 196 rows of 768 halves (+ overhead) per image.
    per_shard = images_per_shard((14, 14), 768, "float16", 500_000_000)
    row = 768 * 2 + ROW_OVERHEAD_BYTES
    assert per_shard * 196 * row <= 500_000_000 < (per_shard + 1) * 196 * row
    assert images_per_shard((14, 14), 768, "float32", 500_000_000) < per_shard
    shards = plan_shards(2000, per_shard)
    assert [s.index for s in shards] == [0, 1] and shards[0].total == 2
    assert shards[0].start == 0 and shards[0].stop == shards[1].start and shards[1].stop == 2000
    assert [s.file_name for s in shards] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    # A row group stays far below the Hub viewer's 100 MB, up to ViT-g widths in float32.
    for dim in (192, 384, 768, 1024, 1536):
        for dtype, size in (("float16", 2), ("float32", 4)):
            assert default_row_group_rows(dim, dtype) * dim * size <= max(ROW_GROUP_BYTES, 1024 * dim * size)
            assert default_row_group_rows(dim, dtype) * dim * size < 100_000_000


def test_configs_are_sharded_within_the_bound_and_cover_every_image_once(reference):
    entries = _entries(reference)
    unit = entries["extract/synthetic-scenes/tiny_random"]
    assert unit["shards"] == 3
    bound = SHARD_MB * 1e6
    for cfg in unit["configs"]:
        assert [Path(p).name for p in cfg["paths"]] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
        for rel in cfg["paths"]:
            meta = pq.ParquetFile(reference / "datasets/synthetic-scenes" / rel).metadata
            payload = sum(meta.row_group(g).column(c).total_uncompressed_size
                          for g in range(meta.num_row_groups) for c in range(meta.num_columns)
                          if "embedding" in meta.row_group(g).column(c).path_in_schema)
            assert 0 < payload <= bound
        table = read_patch_table([reference / "datasets/synthetic-scenes" / rel for rel in cfg["paths"]])
        assert len(set(table.image_ids)) == N_IMAGES and len(table.image_ids) == N_IMAGES * 16
    # The manifest lists exactly the Parquet files under the model's folder.
    listed = {rel for rel in unit["files"]}
    on_disk = {str(p.relative_to(reference / "datasets/synthetic-scenes"))
               for p in (reference / "datasets/synthetic-scenes/tiny_random").rglob("*.parquet")}
    assert listed == on_disk


def test_float16_tables_read_back_exactly_with_datasets_duckdb_and_polars(reference):
    import datasets
    import duckdb
    import polars as pl

    repo = reference / "datasets/synthetic-scenes"
    cfg = next(c for c in _entries(reference)["extract/synthetic-scenes/tiny_reg"]["configs"]
               if c["name"] == "tiny_reg-L02-prenorm")
    assert cfg["dtype"] == "float16"
    files = [repo / rel for rel in cfg["paths"]]
    arrow = np.concatenate([pq.read_table(f).column("embedding").combine_chunks().flatten()
                            .to_numpy().reshape(-1, cfg["dim"]) for f in files])
    assert arrow.dtype == np.float16 and np.isfinite(arrow).all() and np.unique(arrow).size > 100

    ds = datasets.load_dataset(str(repo), cfg["name"], split="train").with_format("numpy")
    np.testing.assert_array_equal(np.asarray(ds[:]["embedding"], dtype=np.float32), arrow.astype(np.float32))

    listed = ", ".join(f"'{f}'" for f in files)  # in shard order; DuckDB keeps the row order
    rows = duckdb.sql(f"SELECT embedding FROM read_parquet([{listed}])").fetchnumpy()["embedding"]
    duck = np.stack([np.asarray(r, dtype=np.float32) for r in rows])
    np.testing.assert_array_equal(duck, arrow.astype(np.float32))

    frame = pl.read_parquet(files)
    polar = frame["embedding"].to_numpy().astype(np.float32)
    np.testing.assert_array_equal(polar, arrow.astype(np.float32))

    ours = read_patch_table(files).embeddings
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, arrow.astype(np.float32))


def test_a_larger_shard_size_replaces_the_shards(reference, ckpt, tmp_path):
    out = tmp_path / "out"
    _run(_args(out, ckpt))
    _run(_args(out, ckpt, shard_mb=500))
    unit = _entries(out)["extract/synthetic-scenes/tiny_random"]
    assert unit["shards"] == 1
    left = sorted(p.name for p in (out / "datasets/synthetic-scenes/tiny_random/L01-prenorm").iterdir())
    assert left == ["train-00000-of-00001.parquet"]
    # Same rows as the three shards of the reference, in the same order.
    one = read_patch_table(out / "datasets/synthetic-scenes" / unit["configs"][0]["paths"][0])
    three = read_patch_table([reference / "datasets/synthetic-scenes" / rel
                              for rel in _entries(reference)["extract/synthetic-scenes/tiny_random"]["configs"][0]["paths"]])
    assert list(one.image_ids) == list(three.image_ids)
    np.testing.assert_array_equal(one.embeddings, three.embeddings)


def test_two_workers_and_a_merge_equal_one_process(reference, ckpt, tmp_path):
    out = tmp_path / "out"
    workers = []
    for rank in range(2):
        env = _env() | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        workers.append(subprocess.Popen([sys.executable, str(TESTS / "tiny_cli.py"), *_args(out, ckpt)], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (stdout, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
        assert "to merge" in stdout
    # Each worker did a part: neither manifest holds every shard, together they do.
    shard_sets = [{k for k in json.loads(p.read_text())["entries"] if k.startswith("shards/")}
                  for p in sorted((out / "manifest.d").glob("*.json"))]
    assert len(shard_sets) == 2 and all(shard_sets) and not shard_sets[0] & shard_sets[1]
    assert not (out / "manifest.json").exists() or "extract/synthetic-scenes/tiny_random" not in _entries(out)

    merged = _run(_args(out, ckpt))
    assert not list((out / "manifest.d").glob("*.json"))
    assert _published(out) == _published(reference)
    assert _entries(out) == _entries(reference)
    assert "error" not in merged.stderr.lower()


def _shard_files(out: Path) -> list[Path]:
    root = out / "datasets/synthetic-scenes"
    return [p for p in root.glob("tiny_*/L01-prenorm/train-*.parquet")] if root.exists() else []


@pytest.mark.parametrize("kill_after", [1, 4])
def test_a_build_killed_after_n_shards_resumes_to_the_same_bytes(reference, ckpt, tmp_path, kill_after):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(TESTS / "tiny_cli.py"), *_args(out, ckpt)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len(_shard_files(out)) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the build ended before it could be killed; the test needs more shards"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # What the manifest says is done before the resume must not be redone by it.
    entries = json.loads((out / "manifest.json").read_text())["entries"] if (out / "manifest.json").exists() else {}
    finished = {rel: (out / "datasets/synthetic-scenes" / rel).stat()
                for key, entry in entries.items() if key.startswith("shards/") for rel in entry["files"]}
    assert len(_shard_files(out)) >= kill_after

    _run(_args(out, ckpt))
    assert _published(out) == _published(reference)
    assert _entries(out) == _entries(reference)
    assert not list(out.rglob("*.tmp")), "temporary files of the killed run were left behind"
    for rel, before in finished.items():
        after = (out / "datasets/synthetic-scenes" / rel).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), f"{rel} was rewritten"


def test_a_build_killed_while_analysing_resumes_to_the_same_results(ckpt, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "out"
    args = lambda o: _args(o, ckpt, command="build") + ["--no-html", "--k", "2,4"]  # noqa: E731
    _run(args(reference))
    proc = subprocess.Popen([sys.executable, str(TESTS / "tiny_cli.py"), *args(out)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not any(
            (out / "results").rglob("*.json") if (out / "results").exists() else ()):
        time.sleep(0.002)
    assert proc.poll() is None, "the build ended before it could be killed while analysing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)

    _run(args(out))
    published = {k: v for k, v in _published(out).items() if not k.startswith("docs/")}
    expected = {k: v for k, v in _published(reference).items() if not k.startswith("docs/")}
    assert published == expected
    assert _entries(out) == _entries(reference)


def test_adding_and_dropping_layers_keeps_the_tables_already_written(tiny_models, ckpt, tmp_path):
    """The unit of reuse is one table: another --layers computes only the new layers' tables,
    and leaves the bytes (and the files) of the others alone, analyses included."""
    from generator.cli import main

    out = tmp_path / "out"
    repo = out / "datasets/synthetic-scenes"

    def build(layers: str) -> None:
        args = _args(out, ckpt, command="build") + ["--no-html", "--k", "2"]
        args[args.index("--layers") + 1] = layers
        assert main(args) == 0

    def stats(pattern: str) -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob(pattern)}

    build("last")
    last_tables = stats("datasets/synthetic-scenes/tiny_*/L02-*/*.parquet") | stats(
        "datasets/synthetic-scenes/tiny_reg/prefix/L02-*.parquet")
    last_results = stats("results/synthetic-scenes/tiny_*/*-L02-*/*")
    assert last_tables and last_results and not list(repo.glob("tiny_*/L01-*"))

    build("all")
    assert stats("datasets/synthetic-scenes/tiny_*/L02-*/*.parquet") | stats(
        "datasets/synthetic-scenes/tiny_reg/prefix/L02-*.parquet") == last_tables
    assert stats("results/synthetic-scenes/tiny_*/*-L02-*/*") == last_results
    assert len(list(repo.glob("tiny_random/L01-prenorm/*.parquet"))) == 3
    reg_shards = _entries(out)["extract/synthetic-scenes/tiny_reg"]["shards"]
    assert len(list(repo.glob("tiny_reg/prefix/L01-*.parquet"))) == 2 * reg_shards  # prenorm, postnorm
    configs = {c["name"] for c in _entries(out)["extract/synthetic-scenes/tiny_random"]["configs"]}
    assert {"tiny_random-L01-prenorm", "tiny_random-L02-postnorm"} <= configs

    build("last")
    assert not list(repo.glob("tiny_*/L01-*/*.parquet")) and not list(repo.glob("tiny_reg/prefix/L01-*"))
    assert stats("datasets/synthetic-scenes/tiny_*/L02-*/*.parquet") | stats(
        "datasets/synthetic-scenes/tiny_reg/prefix/L02-*.parquet") == last_tables
    shard_files = {rel for key, entry in _entries(out).items() if key.startswith("shards/")
                   for rel in entry["files"]}
    on_disk = {str(p.relative_to(repo)) for p in repo.glob("tiny_*/**/*.parquet")}
    assert shard_files == on_disk


def test_layerwise_curves_ride_on_the_extraction_pass_and_equal_a_pass_of_their_own(tiny_models, tmp_path,
                                                                                    monkeypatch):
    """A fresh extraction feeds the unpublished layers' accumulators from its own forward pass (no
    second pass runs); when the shards are already written, a pass of its own gives the same curves."""
    import generator.stream
    from generator.cli import main

    def extract(out, curve_layers):
        assert main(["extract", "--out", str(out), "--models", "tiny_random", "--source", "synthetic-scenes",
                     "--source-option", f"n_images={N_IMAGES}", "--source-option", "size=64", "--layers", "last",
                     "--curve-layers", curve_layers, "--batch-size", "3", "--shard-mb", repr(SHARD_MB),
                     "--device", "cpu", "--quiet"]) == 0
        path = out / "results/synthetic-scenes/tiny_random/layerwise.json"
        return path.read_bytes() if path.exists() else None

    separate_passes = []
    real_pass = generator.stream.layerwise_results
    monkeypatch.setattr(generator.stream, "layerwise_results",
                        lambda *a, **kw: separate_passes.append(a[2]) or real_pass(*a, **kw))

    # Shards of 2 images and batches of 3: the extraction cuts its batches within each shard.
    fused_bytes = extract(tmp_path / "fused", "all")
    assert separate_passes == []  # three shards, every image seen once by the extraction pass
    fused = json.loads(fused_bytes)
    assert [row["layer"] for row in fused["layers"]] == [1]

    # Shards written first without curves; asking for them later needs a pass of its own, which
    # cuts its batches as the extraction did: the same bytes, not merely close floats.
    assert extract(tmp_path / "separate", "last") is None
    separate_bytes = extract(tmp_path / "separate", "all")
    assert separate_passes == [[1]]
    assert separate_bytes == fused_bytes
    separate = json.loads(separate_bytes)
    a, b = fused["layers"][0], separate["layers"][0]
    assert a["knn_miou"] == b["knn_miou"] and a["per_class_iou"] == b["per_class_iou"]
    assert a["n_train_images"] == b["n_train_images"] > 0 and a["n_val_images"] == b["n_val_images"] > 0
    assert a["prenorm_norms"]["counts"] == b["prenorm_norms"]["counts"]
    assert a["kmeans"] == b["kmeans"] and a["kmeans"]["k"] == 8
    assert a["variance_spectrum"] == b["variance_spectrum"]
    # Same published tables either way: the extra layer is counted, never written.
    for rel in ("datasets/synthetic-scenes/tiny_random",):
        fused_files = sorted(p.relative_to(tmp_path / "fused") for p in (tmp_path / "fused" / rel).rglob("*.parquet"))
        separate_files = sorted(p.relative_to(tmp_path / "separate") for p in (tmp_path / "separate" / rel).rglob("*.parquet"))
        assert fused_files == separate_files and not any("L01" in str(p) for p in fused_files)
        for path in fused_files:
            assert file_sha256(tmp_path / "fused" / path) == file_sha256(tmp_path / "separate" / path)
