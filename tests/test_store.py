"""The store: Parquet tables, dataset cards, the manifest and atomic writes."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from generator.errors import PatchAtlasError
from generator.store.manifest import Manifest, file_sha256, params_hash
from generator.store.parquet import (
    PatchTableWriter,
    PrefixTableWriter,
    patch_grid,
    read_patch_table,
    write_images_table,
)
from generator.store.repo import ConfigCardInfo, config_data_dir, config_name, shard_name, write_dataset_card

GRID = (3, 4)
DIM = 8


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _tiny_repo(root, rng):
    """Two images, two patch configs, a prefix config and the images table."""
    ids = ["img-a", "img-b"]
    tokens = {name: rng.standard_normal((2, *GRID, DIM)).astype(np.float32) for name in ("L01-prenorm", "L02-postnorm")}
    labels = rng.integers(0, 3, (2, *GRID)).astype(np.int16)
    cards = []
    for cfg, toks in tokens.items():
        layer, norm = int(cfg[1:3]), cfg.split("-")[1]
        rel = f"{config_data_dir('m', layer, norm)}/{shard_name()}"
        with PatchTableWriter(root / rel, DIM) as writer:
            writer.write_batch(ids[:1], toks[:1], labels[:1])
            writer.write_batch(ids[1:], toks[1:], labels[1:])
        cards.append(ConfigCardInfo(config_name("m", layer, norm), f"m/{cfg}/*.parquet", "m", "timm/m.tag", "abc",
                                    layer, norm, 64, 16, "majority", DIM, 24, (root / rel).stat().st_size, "mit"))
    prefix = rng.standard_normal((2, 2, DIM)).astype(np.float32)
    with PrefixTableWriter(root / "m/prefix" / shard_name(), DIM) as writer:
        writer.write_batch(ids, 2, "postnorm", prefix, ["cls", "register"])
    images = [rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for _ in ids]
    masks = [rng.integers(0, 3, (12, 16), dtype=np.uint8) for _ in ids]
    write_images_table(root / "images" / shard_name(), (
        {"image_id": i, "image_png": _png(im), "mask_png": _png(m), "width": 16, "height": 12}
        for i, im, m in zip(ids, images, masks)))
    info = {"name": "tiny | <b>set</b>", "description": "A *tiny* set", "license": "CC0-1.0", "revision": "r1",
            "repo_id": str(root), "classes": [{"id": 0, "name": "a", "super_name": "s"}], "ignore_index": 255,
            "extra_configs": [{"name": "m-prefix", "model": "timm/m.tag", "kind": "CLS and register tokens",
                               "data_files": "m/prefix/*.parquet"}]}
    write_dataset_card(root, info, cards)
    return ids, tokens, labels, prefix, images, masks


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match
    return yaml.safe_load(match.group(1))


def test_every_card_config_loads_bit_exactly_with_datasets(tmp_path):
    import datasets

    ids, tokens, labels, prefix, images, masks = _tiny_repo(tmp_path, np.random.default_rng(0))
    configs = [c["config_name"] for c in _front_matter((tmp_path / "README.md").read_text())["configs"]]
    assert configs == ["images", "m-L01-prenorm", "m-L02-postnorm", "m-prefix"]
    for name in configs:
        ds = datasets.load_dataset(str(tmp_path), name, split="train")
        if name == "images":
            assert ds.features["image"] == datasets.Image()
            for row, im, m in zip(ds, images, masks):
                np.testing.assert_array_equal(np.asarray(row["image"]), im)
                np.testing.assert_array_equal(np.asarray(row["mask"]), m)
        elif name == "m-prefix":
            got = np.asarray(ds.with_format("numpy")["embedding"]).reshape(2, 2, DIM)
            np.testing.assert_array_equal(got, prefix)
            assert ds["kind"] == ["cls", "register"] * 2
        else:
            cfg = name.removeprefix("m-")
            table = ds.with_format("numpy")
            got = np.asarray(table["embedding"]).reshape(2, *GRID, DIM)
            np.testing.assert_array_equal(got, tokens[cfg])
            np.testing.assert_array_equal(np.asarray(table["label"]).reshape(2, *GRID), labels)
            assert list(table["row"][:5]) == [0, 0, 0, 0, 1] and list(table["col"][:5]) == [0, 1, 2, 3, 0]


def test_card_example_runs_and_hostile_names_stay_inert(tmp_path):
    _tiny_repo(tmp_path, np.random.default_rng(1))
    text = (tmp_path / "README.md").read_text()
    assert _front_matter(text)["pretty_name"].endswith("tiny | <b>set</b>")  # YAML keeps the name as data
    body = text.split("\n---\n", 1)[1]
    assert "<b>" not in body and "&lt;b&gt;" in body
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={"HF_DATASETS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
                                 "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "num_rows: 24" in result.stdout


def test_parquet_schema_carries_datasets_features(tmp_path):
    _tiny_repo(tmp_path, np.random.default_rng(2))
    path = tmp_path / "m/L01-prenorm" / shard_name()
    schema = pq.read_schema(path)
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["embedding"]["length"] == DIM
    embedding_type = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(embedding_type) and embedding_type.list_size == DIM
    assert embedding_type.value_type == pa.float32()
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"


def test_writer_error_leaves_neither_final_nor_temporary_file(tmp_path):
    path = tmp_path / "t" / "x.parquet"
    with pytest.raises(RuntimeError):
        with PatchTableWriter(path, DIM) as writer:
            writer.write_batch(["a"], np.zeros((1, *GRID, DIM), np.float32), np.zeros((1, *GRID), np.int16))
            raise RuntimeError("interrupted")
    assert list((tmp_path / "t").iterdir()) == []


def test_writer_rejects_mismatched_batches(tmp_path):
    with pytest.raises(PatchAtlasError, match="does not fit"):
        with PatchTableWriter(tmp_path / "x.parquet", DIM) as writer:
            writer.write_batch(["a"], np.zeros((1, *GRID, DIM + 1), np.float32), np.zeros((1, *GRID), np.int16))


def test_patch_grid_round_trip_and_missing_patch(tmp_path):
    rng = np.random.default_rng(3)
    tokens = rng.standard_normal((3, *GRID, DIM)).astype(np.float32)
    labels = rng.integers(0, 5, (3, *GRID)).astype(np.int16)
    ids = ["z", "a", "m"]  # stored order, not sorted order, must come back
    with PatchTableWriter(tmp_path / "ok.parquet", DIM) as writer:
        writer.write_batch(ids, tokens, labels)
    got_ids, got_tokens, got_labels = patch_grid(read_patch_table(tmp_path / "ok.parquet"))
    assert got_ids == ids
    np.testing.assert_array_equal(got_tokens, tokens)
    np.testing.assert_array_equal(got_labels, labels)
    table = pq.read_table(tmp_path / "ok.parquet")
    pq.write_table(table.slice(0, table.num_rows - 1), tmp_path / "holey.parquet")
    with pytest.raises(PatchAtlasError, match="holey.parquet"):
        patch_grid(read_patch_table(tmp_path / "holey.parquet"))


def test_manifest_reuse_requires_same_params_and_intact_files(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"payload")
    manifest = Manifest.load(tmp_path / "manifest.json")
    params = {"k": [4, 8], "model": "m"}
    manifest.set("unit", {"status": "done", "params": params, "params_hash": params_hash(params),
                          "files": {"f.bin": file_sha256(tmp_path / "f.bin")}})
    manifest.save()
    reloaded = Manifest.load(tmp_path / "manifest.json")
    assert reloaded.is_done("unit", params, tmp_path)
    assert not reloaded.is_done("unit", {**params, "k": [4]}, tmp_path)
    assert not reloaded.is_done("other", params, tmp_path)
    (tmp_path / "f.bin").write_bytes(b"changed")
    assert not reloaded.is_done("unit", params, tmp_path)
    (tmp_path / "f.bin").unlink()
    assert not reloaded.is_done("unit", params, tmp_path)


def test_corrupt_manifest_names_the_file(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(PatchAtlasError, match="manifest.json"):
        Manifest.load(tmp_path / "manifest.json")


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    manifest = Manifest.load(tmp_path / "manifest.json")
    for i in range(3):
        manifest.set(f"u{i}", {"status": "done"})
        manifest.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
