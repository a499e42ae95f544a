"""`patchatlas build` end to end on tiny models and a few synthetic scenes.

One build is shared by the tests of this module (it is the expensive part); each test then
checks one promise: the dataset repo loads with `datasets`, the tokens are the model's, skipped
models are reported, the site is built, and a rerun recomputes nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from generator.cli import main
from generator.models.encoder import load_encoder
from generator.models.registry import MODELS
from generator.sources.registry import load_source

from conftest import TINY_REGISTERS, offline_tiny_zoo, save_untrained_weights

N_IMAGES = 4
SIDE = 64


def _tree_digest(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build: tiny_random runs, tiny_reg loads a local checkpoint, tiny_vit has no weights."""
    # Its own build, not conftest's shared tiny_builds: a checkpoint and a skipped model, galleries and HTML, and
    # tests that rerun and re-render it in place.
    mp = offline_tiny_zoo(tmp_path_factory)
    root = tmp_path_factory.mktemp("build")
    ckpt = root / "tiny_reg.safetensors"
    save_untrained_weights(TINY_REGISTERS, ckpt, seed=7)
    out = root / "out"
    args = ["build", "--out", str(out), "--models", "tiny_random,tiny_reg,tiny_vit", "--layers", "all",
            "--source-option", f"n_images={N_IMAGES}", "--source-option", f"size={SIDE}",
            "--weights", f"tiny_reg={ckpt}", "--k", "2,4", "--gallery-k", "4", "--batch-size", "3",
            "--device", "cpu", "--quiet", "--allow-skipped"]  # tiny_vit, named, is skipped: exit 0 asked for
    code = main(args)
    yield {"out": out, "args": args, "code": code, "ckpt": ckpt, "mp": mp}
    mp.undo()


def _card_configs(repo: Path) -> list[dict]:
    text = (repo / "README.md").read_text()
    front = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert front, "dataset card has no YAML front matter"
    return yaml.safe_load(front.group(1))["configs"]


def test_build_succeeds_and_records_every_model(built):
    assert built["code"] == 0
    manifest = json.loads((built["out"] / "manifest.json").read_text())
    units = manifest["entries"] if "entries" in manifest else manifest
    statuses = {k.rsplit("/", 1)[-1]: v["status"] for k, v in units.items() if k.startswith("extract/synthetic-scenes/")}
    assert statuses == {"images": "done", "tiny_random": "done", "tiny_reg": "done", "tiny_vit": "skipped"}
    reason = units["extract/synthetic-scenes/tiny_vit"]["reason"]
    assert "weights unavailable offline" in reason


def test_every_config_in_the_card_loads_with_datasets(built):
    import datasets

    repo = built["out"] / "datasets" / "synthetic-scenes"
    configs = {c["config_name"] for c in _card_configs(repo)}
    models = ("tiny_random", "tiny_reg")
    expected = {"images"} | {f"{m}-prefix" for m in models} | {f"{m}-attention" for m in models} | {
        f"{m}-L{layer:02d}-{norm}" for m in models for layer in (1, 2) for norm in ("prenorm", "postnorm")} | {
        f"{m}-L02-{view}" for m in models for view in ("queries", "keys", "values")}
    assert configs == expected
    grid = {"tiny_random": 4 * 4, "tiny_reg": 4 * 4}
    for name in sorted(configs):
        ds = datasets.load_dataset(str(repo), name, split="train")
        if name == "images":
            assert len(ds) == N_IMAGES
            assert ds[0]["image"].size == (SIDE, SIDE)
        elif name.endswith("-prefix"):
            model = name.removesuffix("-prefix")
            per_image = MODELS[model].num_prefix_tokens * 2 * 2  # tokens × layers × norms
            assert len(ds) == N_IMAGES * per_image
        elif name.endswith("-attention"):
            heads = {"tiny_random": 3, "tiny_reg": 2}[name.removesuffix("-attention")]
            assert len(ds) == N_IMAGES * heads * grid[name.removesuffix("-attention")]
            weights = np.asarray(ds["weight"]).reshape(N_IMAGES, heads, -1)
            # CLS attention over patches is part of a softmax that also covers the prefix tokens
            assert (weights > 0).all() and (weights.sum(-1) < 1 + 1e-5).all()
        else:
            model = name.split("-L")[0]
            assert len(ds) == N_IMAGES * grid[model]
            assert set(ds.column_names) >= {"image_id", "row", "col", "label", "embedding"}


def test_stored_tokens_are_bit_exact_model_outputs(built):
    import datasets

    repo = built["out"] / "datasets" / "synthetic-scenes"
    source = load_source("synthetic-scenes", n_images=N_IMAGES, size=SIDE)
    encoder = load_encoder(MODELS["tiny_reg"], checkpoint=built["ckpt"])
    images = [np.asarray(img.convert("RGB")) for img in source.dataset["image"]]
    batch = encoder.tokens(encoder.preprocess(images), [2], ["prenorm"])
    # [n, gh, gw, D], as the published float16 column holds them
    expected = batch.layers[(2, "prenorm")].patch.numpy().astype(np.float16).astype(np.float32)
    ds = datasets.load_dataset(str(repo), "tiny_reg-L02-prenorm", split="train").with_format("numpy")
    order = {image_id: i for i, image_id in enumerate(source.dataset["image_id"])}
    got = np.zeros_like(expected)
    for image_id, row, col, emb in zip(ds["image_id"], ds["row"], ds["col"], ds["embedding"]):
        got[order[str(image_id)], row, col] = emb
    np.testing.assert_array_equal(got, expected)


def test_site_is_built_with_gallery_and_skip_notice(built):
    site = built["out"] / "site"
    index = (site / "index.html").read_text()
    assert "tiny_vit" in index and "weights unavailable offline" in index
    gallery = (site / "datasets" / "synthetic-scenes" / "index.html").read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', gallery)
    cluster_maps = {src for src in images if "/clusters-k4/" in src}
    # every gallery image x every layer x every extracted model, shown by layer and by model
    assert len(cluster_maps) == N_IMAGES * 2 * 2
    for src in images:
        assert (site / "datasets" / "synthetic-scenes" / src).resolve().is_file(), src


def test_rerun_recomputes_nothing_and_changes_nothing(built):
    out = built["out"]
    before = _tree_digest(out / "datasets") | {"results/" + k: v for k, v in _tree_digest(out / "results").items()}
    manifest_before = json.loads((out / "manifest.json").read_text())
    assert main(built["args"]) == 0
    after = _tree_digest(out / "datasets") | {"results/" + k: v for k, v in _tree_digest(out / "results").items()}
    assert after == before
    manifest_after = json.loads((out / "manifest.json").read_text())
    for key in manifest_before.get("entries", manifest_before):
        if key.startswith(("extract/", "analyze/")):
            a = manifest_before.get("entries", manifest_before)[key]
            b = manifest_after.get("entries", manifest_after)[key]
            assert a.get("files") == b.get("files"), key


def test_render_alone_rebuilds_the_site_from_the_results(built):
    out = built["out"]
    index = (out / "site" / "index.html").read_bytes()
    assert main(["render", "--out", str(out), "--gallery-k", "4"]) == 0
    assert (out / "site" / "index.html").read_bytes() == index
    assert not list(out.glob(".render-*")), "staging folder left behind"


def test_unknown_model_is_rejected_before_any_work(tmp_path, capsys):
    assert main(["extract", "--out", str(tmp_path / "o"), "--models", "dino_vits61", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "dino_vits16" in err and "patchatlas models" in err
    assert not (tmp_path / "o" / "datasets").exists()


@pytest.mark.parametrize("command", [[], ["build"], ["extract"], ["analyze"], ["render"], ["models"], ["datasets"],
                                     ["doctor"], ["push"]])
def test_every_command_has_help(command, capsys):
    assert main(command + ["--help"]) == 0
    assert "Usage:" in capsys.readouterr().out


def test_analyses_and_their_pages_are_written(built):
    out = built["out"]
    results = out / "results" / "synthetic-scenes" / "tiny_reg"
    maps = json.loads((results / "tiny_reg-L02-prenorm" / "maps.json").read_text())
    assert set(maps) >= {"border_score", "position", "locality", "norms", "pca_explained_variance_ratio"}
    assert 0 <= maps["norms"]["outlier_share"] <= 1
    kmeans = json.loads((results / "tiny_reg-L02-postnorm" / "kmeans.json").read_text())
    assert [r["k"] for r in kmeans["kmeans"]] == [2, 4]
    attention = json.loads((results / "attention.json").read_text())
    assert attention["heads"] == 2 and len(attention["per_head"]) == 2
    assert all(0 <= j <= 1 for j in attention["per_head"])
    site = out / "site"
    artifacts = (site / "positional-artifacts" / "index.html").read_text()
    for model in ("tiny_random", "tiny_reg"):
        assert f'href="../models/{model}/"' in artifacts
        assert (site / "models" / model / "index.html").is_file()
    assert "content-free" in artifacts and "synthetic-scenes" in artifacts
    model_page = (site / "models" / "tiny_reg" / "index.html").read_text()
    for src in re.findall(r'<img[^>]+src="([^"]+)"', model_page):
        assert (site / "models" / "tiny_reg" / src).resolve().is_file(), src


def test_probes_variance_robustness_and_retrieval_are_analysed(built):
    out = built["out"]
    unit = out / "results" / "synthetic-scenes" / "tiny_reg" / "tiny_reg-L02-postnorm"
    probes = json.loads((unit / "probes.json").read_text())
    assert probes["n_train_images"] == 2 and probes["n_val_images"] == 2
    assert 0 <= probes["knn_miou"] <= 1 and 0 <= probes["linear_miou"] <= 1
    assert probes["knn_k"] == 1 and probes["knn_similarity"] == "dot"
    assert [r["n_removed"] for r in probes["variance"]["removal"]] == [0, 10, 20, 30, 40, 50]  # capped below D=64
    assert sorted(probes["variance"]["spectrum"], reverse=True) == probes["variance"]["spectrum"]
    assert {r["degradation"] for r in probes["robustness"]} == {"blur", "noise", "frequency_band"}
    assert len(probes["robustness"]) == 12
    transforms = {r["transform"] for r in probes["retrieval"]}
    assert transforms == {"shift", "rotate", "scale", "blur", "noise"}
    # Every layer and view gets the probes; only the last post-norm layer gets the variants.
    assert (out / "results" / "synthetic-scenes" / "tiny_reg" / "tiny_reg-L01-prenorm" / "probes.json").is_file()
    assert "variance" not in json.loads(
        (out / "results" / "synthetic-scenes" / "tiny_reg" / "tiny_reg-L01-postnorm" / "probes.json").read_text())
    # Content-free inputs have no few-shot split: no probes, no variants.
    assert not list((out / "results" / "content-free").glob("*/*/probes.json"))
    assert not (out / "variants" / "content-free").exists()
    page = (out / "site" / "probe-metrics" / "index.html").read_text()
    assert "tiny_reg" in page and "Retrieval outcomes" in page
    for src in re.findall(r'<img[^>]+src="([^"]+)"', page):
        assert (out / "site" / "probe-metrics" / src).resolve().is_file(), src


def test_position_r2_is_printed_beside_its_chance_level(built):
    out = built["out"]
    maps = json.loads((out / "results" / "synthetic-scenes" / "tiny_reg" / "tiny_reg-L02-postnorm" / "maps.json")
                      .read_text())
    position = maps["position"]
    assert {"row_chance_r2", "col_chance_r2", "alpha", "cv_folds", "ridge_grid"} <= set(position)
    page = (out / "site" / "positional-artifacts" / "index.html").read_text()
    assert "chance level" in page and "worse than the mean" in page
    cell = f"{position['row_r2']:.2f} ({position['row_chance_r2']:.2f})"
    assert cell in page
    norms = json.loads((out / "results" / "synthetic-scenes" / "tiny_reg" / "tiny_reg-L02-prenorm" / "maps.json")
                       .read_text())["norms"]
    assert norms["outlier_method"] == "gap" and norms["outlier_params"] == {"min_ratio": 3.0, "min_gap": 1.5}
