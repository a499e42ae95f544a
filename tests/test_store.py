"""The store: Parquet tables, dataset cards, the manifest and atomic writes.

The central check writes a tiny repository the way the extract stage does, renders its card,
and loads every config the card lists with ``datasets.load_dataset``, comparing bit for bit.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from generator.errors import PatchAtlasError
from generator.store import repo as repo_module
from generator.store.manifest import Manifest, file_sha256, params_hash
from generator.store.parquet import (
    AttentionTableWriter,
    PatchTableWriter,
    PrefixTableWriter,
    patch_grid,
    read_attention_table,
    read_images_table,
    read_patch_table,
    write_images_shards,
)
from generator.store.repo import (
    ConfigCardInfo,
    attention_config_name,
    attention_data_dir,
    config_data_dir,
    config_name,
    data_files_glob,
    prefix_config_name,
    prefix_data_dir,
    render_dataset_card,
    shard_name,
    write_dataset_card,
)
from generator.store.schema import (
    features_from_schema,
    image_features,
    patch_features,
    patch_schema,
    prefix_features,
)

GRID = (3, 4)
DIM = 8
IDS = ["img-a", "img-b"]
VIEWS = [(1, "prenorm"), (2, "postnorm")]
KINDS = ["cls", "register"]


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    """Keep everything datasets caches inside the test's temporary folder."""
    cache = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # datasets reads the variable once at import, so its resolved setting is patched as well.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write_tiny_repo(root: Path, rng: np.random.Generator, source_info: dict | None = None,
                     dtype: str = "float16") -> dict:
    """Two images of a 3×4 grid, two patch configs, a prefix and an attention config, the images.

    The planted tokens are given as float32 and recorded as the ``dtype`` values the tables hold.
    """
    model = "tiny_vit"
    planted = {"tokens": {}, "labels": rng.integers(0, 3, (2, *GRID)).astype(np.int16)}
    cards = []
    for layer, norm in VIEWS:
        tokens = rng.standard_normal((2, *GRID, DIM)).astype(np.float32)
        planted["tokens"][config_name(model, layer, norm)] = tokens.astype(dtype).astype(np.float32)
        rel = f"{config_data_dir(model, layer, norm)}/{shard_name()}"
        # Two batches of one image each, as a streaming extraction writes them.
        with PatchTableWriter(root / rel, DIM, dtype=dtype) as writer:
            writer.write_batch(IDS[:1], tokens[:1], planted["labels"][:1])
            writer.write_batch(IDS[1:], tokens[1:], planted["labels"][1:])
        cards.append(ConfigCardInfo(
            name=config_name(model, layer, norm), data_files=data_files_glob(config_data_dir(model, layer, norm)),
            model=model, model_id="timm/tiny_vit.test", revision="0123abc", layer=layer, norm=norm,
            input_size=64, patch_size=16, label_rule="majority", dim=DIM, num_rows=2 * GRID[0] * GRID[1],
            num_bytes=(root / rel).stat().st_size, license="apache-2.0", dtype=dtype))
    prefix = {view: rng.standard_normal((2, len(KINDS), DIM)).astype(np.float32) for view in VIEWS}
    with PrefixTableWriter(root / prefix_data_dir(model) / shard_name(), DIM, dtype=dtype) as writer:
        for (layer, norm), toks in prefix.items():
            writer.write_batch(IDS, layer, norm, toks, KINDS)
    planted["prefix"] = {view: toks.astype(dtype).astype(np.float32) for view, toks in prefix.items()}
    planted["dtype"] = dtype
    attention = rng.random((2, 3, *GRID)).astype(np.float32)
    with AttentionTableWriter(root / attention_data_dir(model) / shard_name()) as writer:
        writer.write_batch(IDS, attention)
    planted["attention"] = attention
    planted["images"] = [rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for _ in IDS]
    planted["masks"] = [rng.integers(0, 3, (12, 16), dtype=np.uint8) for _ in IDS]
    write_images_shards(root / "images", (
        {"image_id": i, "image_png": _png(im), "mask_png": _png(m), "width": 16, "height": 12}
        for i, im, m in zip(IDS, planted["images"], planted["masks"])), shard_bytes=500_000_000)
    info = {"name": "tiny scenes", "description": "A *tiny* set of scenes.", "license": "CC0-1.0",
            "revision": "r1", "classes": [{"id": 0, "name": "sky", "super_name": "background"}],
            "ignore_index": 255,
            "extra_configs": [
                {"name": prefix_config_name(model), "model": "timm/tiny_vit.test", "kind": "CLS and register tokens",
                 "data_files": data_files_glob(prefix_data_dir(model))},
                {"name": attention_config_name(model), "model": "timm/tiny_vit.test",
                 "kind": "last-block CLS attention", "data_files": data_files_glob(attention_data_dir(model))}]}
    info.update(source_info or {})
    planted["card"] = write_dataset_card(root, info, cards)
    planted["cards"] = cards
    planted["info"] = info
    return planted


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "the card must open with YAML front matter"
    return yaml.safe_load(match.group(1))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_config_in_the_card_loads_bit_exactly_with_datasets(tmp_path, _private_datasets_cache, dtype):
    repo = tmp_path / "tiny"
    planted = _write_tiny_repo(repo, np.random.default_rng(0), dtype=dtype)
    front = _front_matter(planted["card"].read_text(encoding="utf-8"))
    assert front["task_categories"] == ["image-segmentation", "image-feature-extraction"]
    # CC0 images, apache-2.0 model: the tokens are under both, so no single licence is claimed.
    assert front["license"] == "other" and front["license_name"] == "apache-2.0-and-cc0-1.0"
    assert front["config_licenses"]["images"] == ["CC0-1.0"]
    assert front["config_licenses"]["tiny_vit-L01-prenorm"] == ["CC0-1.0", "apache-2.0"]
    configs = {c["config_name"]: c["data_files"] for c in front["configs"]}
    assert list(configs) == ["images", "tiny_vit-L01-prenorm", "tiny_vit-L02-postnorm",
                             "tiny_vit-prefix", "tiny_vit-attention"]
    assert configs["tiny_vit-L01-prenorm"] == [{"split": "train", "path": "tiny_vit/L01-prenorm/*.parquet"}]

    for name in configs:
        ds = datasets.load_dataset(str(repo), name, split="train", cache_dir=str(_private_datasets_cache))
        if name == "images":
            assert ds.features == image_features()
            assert ds["image_id"] == IDS and ds["width"] == [16, 16] and ds["height"] == [12, 12]
            for row, image, mask in zip(ds, planted["images"], planted["masks"]):
                np.testing.assert_array_equal(np.asarray(row["image"]), image)
                np.testing.assert_array_equal(np.asarray(row["mask"]), mask)
        elif name.endswith("-prefix"):
            assert ds.features == prefix_features(DIM, dtype)
            table = ds.with_format("numpy")[:]
            for i, ((layer, norm), toks) in enumerate(planted["prefix"].items()):
                block = slice(i * 4, (i + 1) * 4)  # 2 images × 2 prefix tokens per view
                np.testing.assert_array_equal(table["embedding"][block].reshape(2, 2, DIM), toks)
                assert set(table["layer"][block].tolist()) == {layer}
                assert set(table["norm"][block].tolist()) == {norm}
            assert ds["kind"] == KINDS * 4 and ds["token_index"] == [0, 1] * 4
        elif name.endswith("-attention"):
            weights = ds.with_format("numpy")[:]["weight"].reshape(planted["attention"].shape)
            np.testing.assert_array_equal(weights, planted["attention"])
        else:
            assert ds.features == patch_features(DIM, dtype)
            table = ds.with_format("numpy")[:]
            np.testing.assert_array_equal(table["embedding"].reshape(2, *GRID, DIM), planted["tokens"][name])
            np.testing.assert_array_equal(table["label"].reshape(2, *GRID), planted["labels"])
            rows, cols = np.divmod(np.arange(GRID[0] * GRID[1]), GRID[1])
            np.testing.assert_array_equal(table["row"], np.tile(rows, 2))
            np.testing.assert_array_equal(table["col"], np.tile(cols, 2))
            assert ds["image_id"] == [IDS[0]] * 12 + [IDS[1]] * 12
    # Nothing went to the user's cache: the private cache holds what was prepared.
    assert any(_private_datasets_cache.iterdir())


def test_card_example_runs_with_only_the_placeholder_replaced(tmp_path, monkeypatch, _private_datasets_cache):
    # No repo_id yet: the example names the placeholder repository, never the folder it was
    # written to, and the card says so; with the placeholder replaced it runs as written.
    monkeypatch.chdir(tmp_path)
    planted = _write_tiny_repo(Path("tiny"), np.random.default_rng(1))
    text = planted["card"].read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert 'load_dataset("YOUR_ORG/tiny-scenes", "tiny_vit-L01-prenorm", split="train")' in code
    assert "not yet published" in text
    code = code.replace('"YOUR_ORG/tiny-scenes"', '"tiny"')
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_DATASETS_CACHE": str(_private_datasets_cache),
           "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "num_rows: 24" in result.stdout and "embedding" in result.stdout


def test_card_states_provenance_and_licences(tmp_path):
    planted = _write_tiny_repo(tmp_path, np.random.default_rng(2))
    body = planted["card"].read_text(encoding="utf-8").split("\n---\n", 1)[1]
    row = next(line for line in body.splitlines() if line.startswith("| tiny\\_vit-L02-postnorm |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["tiny\\_vit-L02-postnorm", "timm/tiny\\_vit.test", "0123abc", "2", "postnorm",
                     "64 px, squash", "16 px", "majority", "float16[8]", "24", str(planted["cards"][1].num_bytes),
                     "CC0-1.0 \\+ apache-2.0"]
    assert "- tiny\\_vit (timm/tiny\\_vit.test): apache-2.0" in body
    assert "under CC0-1.0" in body


def test_rendering_twice_leaves_the_card_untouched(tmp_path):
    planted = _write_tiny_repo(tmp_path, np.random.default_rng(3))
    before = planted["card"].stat().st_mtime_ns
    os.utime(planted["card"], ns=(before - 10**9, before - 10**9))
    write_dataset_card(tmp_path, planted["info"], planted["cards"])
    assert planted["card"].stat().st_mtime_ns == before - 10**9


HOSTILE = 'x": y\n- z: {{ 1 }} <script>alert(1)</script> | `tick` *b* [l](u) # \u2028\x85\x7f 🧪 \\n'


def test_hostile_names_stay_data_in_yaml_python_and_markdown(tmp_path):
    info = {"name": HOSTILE, "license": "CC0-1.0", "repo_id": HOSTILE, "description": HOSTILE,
            "classes": [{"id": 0, "name": HOSTILE, "super_name": HOSTILE}]}
    card = ConfigCardInfo(name="m-L01-prenorm", data_files="m/L01-prenorm/*.parquet", model="m",
                          model_id=HOSTILE, revision=HOSTILE, layer=1, norm="prenorm", input_size=8,
                          patch_size=4, label_rule=HOSTILE, dim=8, num_rows=1, num_bytes=1, license=HOSTILE)
    text = render_dataset_card(info, [card])
    front = _front_matter(text)
    assert front["pretty_name"] == "PatchAtlas patch embeddings: " + HOSTILE
    assert [c["config_name"] for c in front["configs"]] == ["images", "m-L01-prenorm"]
    call = re.search(r"^ds = (load_dataset\(.*\))$", text, re.M).group(1)
    args = ast.parse(call, mode="eval").body.args
    assert ast.literal_eval(args[0]) == HOSTILE
    # Inside the code block the name is a Python literal; everywhere else it must be inert text.
    body = re.sub(r"```.*?```", "", text.split("\n---\n", 1)[1], flags=re.S)
    assert "<script>" not in body and "&lt;script&gt;" in body
    table = [line for line in body.splitlines() if line.startswith("| m-L01-prenorm |")]
    assert len(table) == 1 and table[0].count(" | ") == 11  # the hostile "|" did not add columns


def test_template_strings_must_be_filtered():
    env = repo_module._environment()
    with pytest.raises(PatchAtlasError, match="without yaml_str or md"):
        env.from_string("name: {{ name }}").render(name="a: b")
    assert env.from_string("name: {{ name | yaml_str }}").render(name="a: b") == 'name: "a: b"'


def test_card_rejects_duplicate_configs_and_escaping_paths():
    card = ConfigCardInfo("m-L01-prenorm", "m/L01-prenorm/*.parquet", "m", "id", "", 1, "prenorm", 8, 4,
                          "nearest", 8, 1, 1, "mit")
    with pytest.raises(PatchAtlasError, match="listed twice"):
        render_dataset_card({"name": "s", "license": "mit"}, [card, card])
    outside = ConfigCardInfo(**{**card.__dict__, "data_files": "../elsewhere/*.parquet"})
    with pytest.raises(PatchAtlasError, match="inside the repository"):
        render_dataset_card({"name": "s", "license": "mit"}, [outside])
    with pytest.raises(PatchAtlasError, match="license"):
        render_dataset_card({"name": "s"}, [card])


def test_layout_names():
    assert config_name("dino_vits16", 12, "postnorm") == "dino_vits16-L12-postnorm"
    assert config_data_dir("dino_vits16", 3, "prenorm") == "dino_vits16/L03-prenorm"
    assert shard_name() == "train-00000-of-00001.parquet" and shard_name(2, 10) == "train-00002-of-00010.parquet"
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(PatchAtlasError):
            config_name(bad, 1, "prenorm")
    with pytest.raises(PatchAtlasError):
        shard_name(1, 1)


def test_parquet_schema_carries_the_datasets_features(tmp_path):
    planted = _write_tiny_repo(tmp_path, np.random.default_rng(4))
    path = tmp_path / config_data_dir("tiny_vit", 1, "prenorm") / shard_name()
    schema = pq.read_schema(path)
    assert features_from_schema(schema) == patch_features(DIM)
    assert schema.remove_metadata().equals(patch_schema(DIM).remove_metadata())
    embedding = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(embedding) and embedding.list_size == DIM
    assert embedding.value_type == pa.float16()
    assert features_from_schema(pq.read_schema(tmp_path / "images" / shard_name())) == image_features()
    assert features_from_schema(pq.read_schema(tmp_path / prefix_data_dir("tiny_vit") / shard_name())) \
        == prefix_features(DIM)
    columns = pq.ParquetFile(path).metadata.row_group(0)
    by_name = {columns.column(i).path_in_schema: columns.column(i) for i in range(columns.num_columns)}
    assert all(c.compression == "ZSTD" and c.has_offset_index for c in by_name.values())
    assert [n for n, c in by_name.items() if c.has_dictionary_page] == ["image_id"]
    assert read_images_table(tmp_path / "images" / shard_name())[1]["image_png"] == _png(planted["images"][1])
    ids, maps = read_attention_table(tmp_path / attention_data_dir("tiny_vit") / shard_name())
    assert ids == IDS
    np.testing.assert_array_equal(maps, planted["attention"])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_row_groups_span_batches_and_the_writer_copies_what_it_keeps(tmp_path, dtype):
    rng = np.random.default_rng(5)
    ids = [f"i{n}" for n in range(5)]
    tokens = rng.standard_normal((5, *GRID, DIM)).astype(np.float32)
    labels = rng.integers(-1, 300, (5, *GRID))  # int64 labels beyond uint8 still fit int16
    path = tmp_path / "t.parquet"
    with PatchTableWriter(path, DIM, row_group_rows=10, dtype=dtype) as writer:
        for i in range(5):
            batch = tokens[i:i + 1].copy()
            writer.write_batch(ids[i:i + 1], batch, labels[i:i + 1])
            batch[:] = np.nan  # the caller reuses its buffer; the table must not change
    metadata = pq.ParquetFile(path).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [10] * 6
    got_ids, got_tokens, got_labels = patch_grid(read_patch_table(path))
    assert got_ids == ids
    assert got_tokens.dtype == np.float32  # analyses always get float32, whatever is stored
    np.testing.assert_array_equal(got_tokens, tokens.astype(dtype).astype(np.float32))
    np.testing.assert_array_equal(got_labels, labels)


def test_writer_error_leaves_previous_file_and_no_temporary(tmp_path):
    folder = tmp_path / "t"
    path = folder / "x.parquet"
    with pytest.raises(RuntimeError, match="interrupted"):
        with PatchTableWriter(path, DIM, row_group_rows=4) as writer:
            writer.write_batch(["a"], np.zeros((1, *GRID, DIM), np.float32), np.zeros((1, *GRID), np.int16))
            raise RuntimeError("interrupted")
    assert list(folder.iterdir()) == []
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with PatchTableWriter(path, DIM) as writer:
            writer.write_batch(["a"], np.zeros((1, *GRID, DIM), np.float32), np.zeros((1, *GRID), np.int16))
            raise RuntimeError("interrupted")
    assert [p.name for p in folder.iterdir()] == ["x.parquet"] and path.read_bytes() == b"previous"


@pytest.mark.parametrize("tokens, labels, match", [
    (np.zeros((1, 3, 4, DIM + 1), np.float32), np.zeros((1, 3, 4), np.int16), "dimension"),
    (np.zeros((1, 3, 4, DIM), np.float32), np.zeros((1, 4, 3), np.int16), "labels of shape"),
    (np.zeros((1, 3, 4, DIM), np.float32), np.full((1, 3, 4), 40000), "int16"),
    (np.zeros((1, 3, 4, DIM), np.int32), np.zeros((1, 3, 4), np.int16), "dtype"),
])
def test_patch_writer_rejects_batches_that_do_not_fit(tmp_path, tokens, labels, match):
    with pytest.raises(PatchAtlasError, match=match):
        with PatchTableWriter(tmp_path / "x.parquet", DIM) as writer:
            writer.write_batch(["a"], tokens, labels)
    assert list(tmp_path.iterdir()) == []


def test_prefix_writer_rejects_unknown_kinds(tmp_path):
    with pytest.raises(PatchAtlasError, match="kinds"):
        with PrefixTableWriter(tmp_path / "p.parquet", DIM) as writer:
            writer.write_batch(["a"], 1, "prenorm", np.zeros((1, 2, DIM), np.float32), ["cls", "patch"])


def test_patch_grid_finds_holes_and_duplicates(tmp_path):
    rng = np.random.default_rng(6)
    tokens = rng.standard_normal((3, *GRID, DIM)).astype(np.float32)
    labels = rng.integers(0, 5, (3, *GRID)).astype(np.int16)
    ids = ["z", "a", "m"]  # stored order, not sorted order, must come back
    with PatchTableWriter(tmp_path / "ok.parquet", DIM, dtype="float32") as writer:
        writer.write_batch(ids, tokens, labels)
    table = pq.read_table(tmp_path / "ok.parquet")
    got_ids, got_tokens, got_labels = patch_grid(read_patch_table(tmp_path / "ok.parquet"))
    assert got_ids == ids
    np.testing.assert_array_equal(got_tokens, tokens)
    # Rows shuffled on disk still land on their grid cells.
    pq.write_table(table.take(rng.permutation(table.num_rows)), tmp_path / "shuffled.parquet")
    _, shuffled_tokens, shuffled_labels = patch_grid(read_patch_table(tmp_path / "shuffled.parquet"))
    np.testing.assert_array_equal(np.sort(shuffled_tokens.reshape(-1)), np.sort(tokens.reshape(-1)))
    assert {tuple(t.reshape(-1)) for t in shuffled_tokens} == {tuple(t.reshape(-1)) for t in tokens}
    # Patch (1, 2) of image "a" missing: rows 12 + 1*4 + 2.
    holey = table.filter(pa.array(np.arange(table.num_rows) != 12 + 6))
    pq.write_table(holey, tmp_path / "holey.parquet")
    with pytest.raises(PatchAtlasError, match=r"holey\.parquet.*row 1, col 2.*'a' is missing"):
        patch_grid(read_patch_table(tmp_path / "holey.parquet"))
    # Same row count, but one patch twice and another never.
    duplicated = pa.concat_tables([holey, table.slice(0, 1)])
    pq.write_table(duplicated, tmp_path / "dup.parquet")
    with pytest.raises(PatchAtlasError, match="dup.parquet"):
        patch_grid(read_patch_table(tmp_path / "dup.parquet"))


def test_reading_a_table_of_another_kind_names_the_file(tmp_path):
    pq.write_table(pa.table({"image_id": ["a"], "weight": [1.0]}), tmp_path / "other.parquet")
    with pytest.raises(PatchAtlasError, match="other.parquet.*not a patch table"):
        read_patch_table(tmp_path / "other.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(PatchAtlasError, match="junk.parquet"):
        read_patch_table(tmp_path / "junk.parquet")


def _done_unit(root: Path, params: dict) -> Manifest:
    manifest = Manifest.load(root / "manifest.json")
    manifest.set("extract/s/m", {"status": "done", "params": params,
                                 "files": {"a/f.bin": file_sha256(root / "a/f.bin")}})
    manifest.save()
    return Manifest.load(root / "manifest.json")


def test_manifest_reuse_needs_same_params_and_intact_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a/f.bin").write_bytes(b"payload")
    params = {"k": [4, 8], "model": "m"}
    manifest = _done_unit(tmp_path, params)
    assert manifest.is_done("extract/s/m", {"model": "m", "k": [4, 8]}, tmp_path)  # key order is irrelevant
    assert manifest.get("extract/s/m")["params_hash"] == params_hash(params)
    assert not manifest.is_done("extract/s/m", {**params, "k": [4]}, tmp_path)
    assert not manifest.is_done("extract/s/other", params, tmp_path)
    (tmp_path / "a/f.bin").write_bytes(b"changed")
    assert not manifest.is_done("extract/s/m", params, tmp_path)
    (tmp_path / "a/f.bin").unlink()
    assert not manifest.is_done("extract/s/m", params, tmp_path)


def test_skipped_units_are_never_done_and_need_a_reason(tmp_path):
    manifest = Manifest.load(tmp_path / "manifest.json")
    manifest.set("extract/s/m", {"status": "skipped", "reason": "offline", "params": {}, "files": {}})
    assert not manifest.is_done("extract/s/m", {}, tmp_path)
    with pytest.raises(PatchAtlasError, match="reason"):
        manifest.set("extract/s/m", {"status": "skipped", "params": {}})
    with pytest.raises(PatchAtlasError, match="status"):
        manifest.set("extract/s/m", {"status": "finished"})
    with pytest.raises(PatchAtlasError, match="params_hash"):
        manifest.set("extract/s/m", {"status": "done", "params": {"a": 1}, "params_hash": params_hash({"a": 2})})


def test_manifest_entries_are_reproducible_and_plain_json(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a/f.bin").write_bytes(b"payload")
    params = {"k": np.int64(4), "path": Path("x/y"), "sizes": (1, 2), "mean": np.float32(0.5)}
    first = _done_unit(tmp_path / "", params)
    entries_first = json.loads((tmp_path / "manifest.json").read_text())["entries"]
    (tmp_path / "manifest.json").unlink()
    second = _done_unit(tmp_path, params)
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["entries"] == entries_first  # no timestamps inside entries
    assert set(saved["updated_at"]) == {"extract/s/m"} and second.updated_at("extract/s/m")
    assert saved["entries"]["extract/s/m"]["params"] == {"k": 4, "path": "x/y", "sizes": [1, 2], "mean": 0.5}
    assert params_hash(params) == params_hash({"k": 4, "path": "x/y", "sizes": [1, 2], "mean": 0.5})
    assert first.is_done("extract/s/m", params, tmp_path)
    with pytest.raises(PatchAtlasError, match="object"):
        first.set("u", {"status": "done", "params": {"f": object()}})


def test_corrupt_manifest_names_the_file(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(PatchAtlasError, match=r"manifest\.json.*Delete it"):
        Manifest.load(path)
    path.write_text('{"entries": [1, 2]}')
    with pytest.raises(PatchAtlasError, match=r"manifest\.json"):
        Manifest.load(path)
    assert Manifest.load(tmp_path / "absent.json").get("anything") is None


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    manifest = Manifest.load(tmp_path / "manifest.json")
    for i in range(3):
        manifest.set(f"u{i}", {"status": "done", "params": {"i": i}})
        manifest.save()
    with PatchTableWriter(tmp_path / "p.parquet", DIM) as writer:
        writer.write_batch(["a"], np.ones((1, *GRID, DIM), np.float32), np.ones((1, *GRID), np.int16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "p.parquet"]


def test_written_files_get_the_mode_of_any_new_file_not_a_private_one(tmp_path):
    from generator.store.atomic import _UMASK, atomic_write_text

    atomic_write_text(tmp_path / "card.md", "hello")
    with PatchTableWriter(tmp_path / "p.parquet", DIM) as writer:
        writer.write_batch(["a"], np.ones((1, *GRID, DIM), np.float32), np.ones((1, *GRID), np.int16))
    for name in ("card.md", "p.parquet"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~_UMASK


def test_images_are_sharded_by_bytes_in_order_and_old_shards_go(tmp_path):
    from generator.store.parquet import read_first_images, read_images_table

    rng = np.random.default_rng(9)
    images = [rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for _ in range(7)]
    rows = [{"image_id": f"im{i}", "image_png": _png(im), "mask_png": _png(im[..., 0]), "width": 16, "height": 12}
            for i, im in enumerate(images)]
    size = len(rows[0]["image_png"]) + len(rows[0]["mask_png"])
    folder = tmp_path / "images"
    (folder).mkdir()
    (folder / "train-00000-of-00009.parquet").write_bytes(b"an older run's shard")
    (folder / ".part-00007.parquet").write_bytes(b"a killed run's part")
    paths = write_images_shards(folder, iter(rows), shard_bytes=int(size * 2.5))
    assert [p.name for p in paths] == [f"train-0000{i}-of-00004.parquet" for i in range(4)]
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in paths]  # no stale, no .part files
    stored = [row for path in paths for row in read_images_table(path)]
    assert [r["image_id"] for r in stored] == [r["image_id"] for r in rows]
    assert [len(read_images_table(p)) for p in paths] == [2, 2, 2, 1]
    assert [r["image_id"] for r in read_first_images(folder, 3)] == ["im0", "im1", "im2"]
    assert read_images_table(paths)[6]["image_png"] == rows[6]["image_png"]


def test_float16_tables_refuse_tokens_beyond_float16_range_and_keep_the_old_file(tmp_path):
    import torch

    from generator.extract import to_host

    path = tmp_path / "p.parquet"
    ok = np.ones((1, *GRID, DIM), np.float32)
    with PatchTableWriter(path, DIM) as writer:
        writer.write_batch(["a"], ok, np.ones((1, *GRID), np.int16))
    before = file_sha256(path)
    huge = ok.copy()
    huge[0, 1, 2, 3] = 70000.0  # float16's largest finite value is 65504
    with pytest.raises(PatchAtlasError, match=r"p\.parquet: tokens reach \|7e\+04\|.*--embedding-dtype float32"):
        with PatchTableWriter(path, DIM) as writer:
            writer.write_batch(["a"], huge, np.ones((1, *GRID), np.int16))
    assert file_sha256(path) == before
    with PatchTableWriter(path, DIM, dtype="float32") as writer:  # float32 holds it
        writer.write_batch(["a"], huge, np.ones((1, *GRID), np.int16))
    # The extraction path checks on the device, before the cast would turn it into inf.
    with pytest.raises(PatchAtlasError, match="model x: tokens reach"):
        to_host(torch.from_numpy(huge), "float16", "model x")
    assert to_host(torch.from_numpy(huge), "float32", "model x").dtype == np.float32
    with pytest.raises(PatchAtlasError, match="NaN/inf"):
        to_host(torch.tensor([[1.0, float("nan")]]), "float32", "model x")
    assert to_host(torch.from_numpy(ok), "float16", "model x").dtype == np.float16


def test_a_recorded_file_changed_by_hand_is_named_and_not_reused(tmp_path, caplog):
    from generator.store.manifest import Manifest, file_sha256

    result = tmp_path / "results/s/m/scores.json"
    result.parent.mkdir(parents=True)
    result.write_text('{"miou": 0.5}')
    manifest = Manifest(tmp_path / "manifest.json")
    manifest.set("analyze/s/m", {"status": "done", "params": {"k": 2},
                                 "files": {"results/s/m/scores.json": file_sha256(result)}})
    assert manifest.is_done("analyze/s/m", {"k": 2}, tmp_path) and not caplog.text
    result.write_text('{"miou": 0.9}')
    assert not manifest.is_done("analyze/s/m", {"k": 2}, tmp_path)
    assert f"{result}: changed since it was written" in caplog.text and "analyze/s/m is recomputed" in caplog.text
    result.unlink()
    assert not manifest.is_done("analyze/s/m", {"k": 2}, tmp_path)
    assert f"{result}: recorded in manifest.json but missing" in caplog.text
