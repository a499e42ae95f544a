"""The stages' contracts: typed manifest records, recorded model facts, and a rerun that reads
nothing it already knows.

One tiny build is shared by the tests of this module; tests that change an output folder
work on a copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import generator.store.manifest as manifest_module
from generator.cli import main
from generator.errors import PatchAtlasError
from generator.models.registry import MODELS
from generator.store.layout import dataset_repo_dir, extract_key, manifest_path, source_key, variants_key
from generator.store.manifest import Manifest, file_sha256
from generator.store.records import ExtractRecord, ModelFacts, SourceRecord, VariantsRecord, extract_records

from conftest import TINY_RANDOM, TINY_REGISTERS, offline_tiny_zoo, save_untrained_weights

SOURCE = "synthetic-scenes"
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    mp = offline_tiny_zoo(tmp_path_factory)
    root = tmp_path_factory.mktemp("layout-build")
    ckpt = root / "tiny_reg.safetensors"
    save_untrained_weights(TINY_REGISTERS, ckpt, seed=3)
    out = root / "out"
    args = ["build", "--out", str(out), "--source", SOURCE, "--models", "tiny_random,tiny_reg",
            "--layers", "all", "--source-option", "n_images=4", "--source-option", "size=64",
            "--weights", f"tiny_reg={ckpt}", "--k", "2", "--gallery-k", "2", "--batch-size", "4",
            "--device", "cpu", "--quiet", "--no-html"]
    assert main(args) == 0
    yield {"out": out, "args": args, "mp": mp}
    mp.undo()


def _copy(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return copy


def test_records_read_and_write_the_stored_entries_unchanged(built):
    manifest = Manifest.load(manifest_path(built["out"]))
    source = manifest.get(source_key(SOURCE))
    assert SourceRecord.from_entry(source).to_entry() == source
    for model in ("tiny_random", "tiny_reg"):
        entry = manifest.get(extract_key(SOURCE, model))
        record = ExtractRecord.from_entry(entry, "test")
        assert record.to_entry() == entry
        assert record.model_facts == ModelFacts.from_model(MODELS[model])
        # The facts an older extract (recorded before them) yields from its token parameters.
        older = {k: v for k, v in entry.items() if k != "model_facts"}
        assert ExtractRecord.from_entry(older, "test").model_facts == record.model_facts
        assert ExtractRecord.from_entry(older, "test").to_entry() == entry
        variants = manifest.get(variants_key(SOURCE, model))
        if variants is not None:
            assert VariantsRecord.from_entry(variants, "test").to_entry() == variants
    facts = ExtractRecord.from_entry(manifest.get(extract_key(SOURCE, "tiny_random")), "test").model_facts
    assert (facts.family, facts.weights_label, facts.published_id, facts.pretrained) == (
        TINY_RANDOM.family, "untrained", "random", False)


def test_a_missing_field_names_the_manifest_file_and_key(built, tmp_path, capsys):
    out = _copy(built["out"], tmp_path)
    data = json.loads(manifest_path(out).read_text())
    del data["entries"][extract_key(SOURCE, "tiny_reg")]["configs"]
    manifest_path(out).write_text(json.dumps(data))
    with pytest.raises(PatchAtlasError) as err:
        list(extract_records(Manifest.load(manifest_path(out)), SOURCE))
    message = str(err.value)
    assert str(manifest_path(out)) in message and extract_key(SOURCE, "tiny_reg") in message and "configs" in message
    assert main(["analyze", "--out", str(out), "--quiet"]) == 2
    assert "missing configs" in capsys.readouterr().err


def test_a_noop_rerun_reads_no_token_table_and_hashes_no_file(built, monkeypatch):
    out = built["out"]
    tables = sorted(str(p) for p in dataset_repo_dir(out, SOURCE).rglob("*.parquet"))
    before = {p: os.stat(p).st_mtime_ns for p in tables}
    read = []
    real_read_table = pq.read_table

    def recording_read_table(source, *args, **kwargs):
        read.append(str(source))
        return real_read_table(source, *args, **kwargs)

    def no_hashing(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(pq, "read_table", recording_read_table)
    monkeypatch.setattr(manifest_module, "file_sha256", no_hashing)
    monkeypatch.setattr("generator.extract.engine.file_sha256", no_hashing)
    assert main(built["args"]) == 0
    images = str(dataset_repo_dir(out, SOURCE) / "images")
    # Only the render reads: the gallery's first images, from the images config.
    assert read and all(path.startswith(images) for path in read), read
    assert {p: os.stat(p).st_mtime_ns for p in tables} == before


def test_a_changed_table_is_found_and_rebuilt(built, tmp_path):
    """Correctness first: a table rewritten in place (same size) is hashed again and redone."""
    out = _copy(built["out"], tmp_path)
    args = [a if a != str(built["out"]) else str(out) for a in built["args"]]
    table = next(dataset_repo_dir(out, SOURCE).glob("tiny_random/L01-postnorm/*.parquet"))
    original = table.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    table.write_bytes(bytes(damaged))
    assert main(args) == 0
    assert table.read_bytes() == original  # extraction is deterministic: the same bytes again


def test_the_hash_cache_rehashes_a_file_only_when_it_changed(tmp_path, monkeypatch):
    manifest = Manifest(tmp_path / "manifest.json")
    path = tmp_path / "data.bin"
    path.write_bytes(b"a" * 100)
    calls = []
    monkeypatch.setattr(manifest_module, "file_sha256", lambda p: calls.append(p) or file_sha256(p))
    first = manifest.sha256(path)
    manifest.save()
    reloaded = Manifest.load(tmp_path / "manifest.json")
    assert reloaded.sha256(path) == first and len(calls) == 1  # from the saved cache
    path.write_bytes(b"b" * 100)  # same size, new content
    assert reloaded.sha256(path) == file_sha256(path) != first and len(calls) == 2


def test_a_model_unknown_to_the_code_renders_from_its_recorded_facts(built, tmp_path, monkeypatch):
    out = _copy(built["out"], tmp_path)
    data = json.loads(manifest_path(out).read_text())
    facts = data["entries"][extract_key(SOURCE, "tiny_random")]["model_facts"]
    facts.update(family="custom-family", license="my-custom-licence", description="a ViT of our own")
    manifest_path(out).write_text(json.dumps(data))
    monkeypatch.delitem(MODELS, "tiny_random")
    assert main(["render", "--out", str(out), "--gallery-k", "2", "--no-html", "--quiet"]) == 0
    page = (out / "docs" / "models" / "tiny_random.md").read_text()
    assert "custom-family" in page and "my-custom-licence" in page and "a ViT of our own" in page


def test_render_needs_no_torch(built, tmp_path):
    out = _copy(built["out"], tmp_path)
    script = (
        "import sys\n"
        "for name in ('torch', 'timm', 'torchvision'):\n"
        "    sys.modules[name] = None  # importing any of them now fails\n"
        "from pathlib import Path\n"
        "from generator.site import RenderOptions, run_render\n"
        f"run_render(Path({str(out)!r}), RenderOptions(gallery_k=2, build_html=False, progress=False))\n"
        "assert not any(m.startswith(('generator.models', 'generator.extract', 'generator.analyze')) for m in sys.modules)\n"
    )
    shutil.rmtree(out / "docs")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "docs" / "models" / "tiny_random.md").is_file()
    assert (out / "docs" / "datasets" / f"{SOURCE}.md").is_file()
