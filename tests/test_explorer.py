"""The explorer's assets: what `render` writes decodes to the stored tokens' reduction, and the
pages state the error measured on them."""

from __future__ import annotations

import re

import numpy as np
import pytest

from generator.analyses.reduction import (
    dequantize_int8,
    fit_reduction,
    reduce_tokens,
    reduction_error,
    similarity_coordinates,
)
from generator.cli import main
from generator.errors import PatchAtlasError
from generator.explorer import _gallery_tokens, load_explorer_index, reduce_config
from generator.store.manifest import Manifest
from generator.store.parquet import patch_grid, read_patch_table

from conftest import TINY_REGISTERS, offline_tiny_zoo, save_untrained_weights

DATASET = "synthetic-scenes"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two tiny models (192- and 64-dim tokens, one from a local checkpoint), all layers, 4 images."""
    mp = offline_tiny_zoo(tmp_path_factory)
    root = tmp_path_factory.mktemp("explorer")
    ckpt = root / "tiny_reg.safetensors"
    save_untrained_weights(TINY_REGISTERS, ckpt, seed=3)
    code = main(["build", "--out", str(root / "out"), "--source", DATASET, "--models", "tiny_random,tiny_reg",
                 "--weights", f"tiny_reg={ckpt}", "--layers", "all", "--source-option", "n_images=4",
                 "--source-option", "size=64", "--k", "2", "--linear-max-steps", "20", "--device", "cpu", "--quiet"])
    mp.undo()
    assert code == 0
    return root / "out"


def _config(out, model, layer, norm):
    unit = Manifest.load(out / "manifest.json").get(f"extract/{DATASET}/{model}")
    return next(c for c in unit["configs"] if c["layer"] == layer and c["norm"] == norm)


def test_assets_decode_to_the_reduction_of_the_stored_tokens(built):
    folder = built / "docs" / "assets" / "explorer" / DATASET
    index = load_explorer_index(folder / "index.json")
    ids = [img["id"] for img in index["images"]]
    assert len(ids) == 4 and {m["name"] for m in index["models"]} == {"tiny_random", "tiny_reg"}
    for model in index["models"]:
        assert [entry["layer"] for entry in model["layers"]] == [1, 2]
        for entry in model["layers"]:
            assert entry["config"] == f"{model['name']}-L{entry['layer']:02d}-postnorm"
            data = (folder / entry["file"]).read_bytes()
            assert len(data) == entry["bytes"]
            cfg = _config(built, model["name"], entry["layer"], "postnorm")
            fit_rows, gallery = _gallery_tokens(built / "datasets" / DATASET, cfg, ids)
            q, decode = reduce_config(fit_rows, gallery)
            assert data[:q.nbytes] == q.tobytes()  # the same bytes from the same tokens
            assert decode["error"] == entry["error"] and decode["scale"] == entry["scale"]
            n, r = q.shape
            assert r == entry["components"] == min(32, model["dim"]) and n == 4 * model["grid"][0] * model["grid"][1]
            # The stored error is that of the tokens the browser decodes, against the full ones.
            fit = fit_reduction(fit_rows, r)
            decoded = dequantize_int8(np.frombuffer(data[:n * r], np.int8).reshape(n, r), np.array(entry["scale"]))
            full = gallery.reshape(n, -1)
            assert np.allclose(fit.offset, entry["offset"], rtol=1e-6, atol=1e-6)
            assert entry["residual"] == pytest.approx(fit.residual, rel=1e-6)
            fit.offset, fit.residual = np.array(entry["offset"]), entry["residual"]  # as stored: 7 digits
            assert reduction_error(full, similarity_coordinates(decoded, fit))["mean"] == pytest.approx(entry["error"]["mean"])
            # Pre-norm norms follow, as uint16 of the config's top norm.
            prenorm_cfg = _config(built, model["name"], entry["layer"], "prenorm")
            prenorm = _gallery_tokens(built / "datasets" / DATASET, prenorm_cfg, ids)[1]
            codes = np.frombuffer(data[entry["norms_offset"]:], "<u2")
            norms = np.linalg.norm(prenorm.reshape(n, -1), axis=1)
            assert entry["norm_config"] == f"{model['name']}-L{entry['layer']:02d}-prenorm"
            assert np.abs(codes * entry["norm_top"] / 65535 - norms).max() <= entry["norm_top"] / 65535


def test_the_tiny_models_reduction_keeps_cosines_close_and_noise_would_not(built):
    """64-dim tokens kept in 32 components: the error is small next to that of the same
    reduction applied to shuffled (structure-free) tokens of the same config."""
    cfg = _config(built, "tiny_reg", 2, "postnorm")
    _, tokens, _ = patch_grid(read_patch_table(built / "datasets" / DATASET / cfg["paths"][0]))
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    fit = fit_reduction(flat, 32)
    real = reduction_error(flat, similarity_coordinates(reduce_tokens(flat, fit), fit))
    shuffled = np.random.default_rng(0).permuted(flat - flat.mean(0), axis=0)
    noise_fit = fit_reduction(shuffled, 32)
    noise = reduction_error(shuffled, similarity_coordinates(reduce_tokens(shuffled, noise_fit), noise_fit))
    assert real["mean"] < noise["mean"] / 2


def test_pages_state_the_measured_error_and_weight_and_link_the_configs(built):
    page = (built / "site" / "explorer" / DATASET / "index.html").read_text()
    index = load_explorer_index(built / "docs" / "assets" / "explorer" / DATASET / "index.json")
    means = [entry["error"]["mean"] for m in index["models"] for entry in m["layers"]]
    assert f"{np.mean(means):.3f}" in page
    assert 'class="pa-explorer" data-index="../../assets/explorer/synthetic-scenes/index.json"' in page
    assert re.search(r"all layers of\s+all 2 models together [\d,]+ B", page)
    assert index["repo_id"] == f"YOUR_ORG/{DATASET}" and not index["published"]
    model_page = (built / "site" / "models" / "tiny_reg" / "index.html").read_text()
    assert 'data-models="tiny_reg" data-compact' in model_page
    assert "javascripts/explorer.js" in model_page
    # The navigation of every page leads to the explorer.
    assert 'href="explorer/synthetic-scenes/"' in (built / "site" / "index.html").read_text()


def test_a_gallery_image_missing_from_the_tokens_is_named(built):
    cfg = _config(built, "tiny_reg", 2, "postnorm")
    with pytest.raises(PatchAtlasError, match=r"gallery image 'no-such-image' is in no shard of "
                                              r"tiny_reg-L02-postnorm"):
        _gallery_tokens(built / "datasets" / DATASET, cfg, ["no-such-image"])

