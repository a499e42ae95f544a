"""Calibration controls: constructed ViTs whose tokens have one known property each.

The unit tests check each construction's property on its tokens, through the same loading and
preprocessing path as every model (``load_encoder``, ``Encoder.preprocess``/``tokens``). The end
to end test runs one ``patchatlas build`` over the five controls and checks that each analysis
reads its planted property from the control built for it, and not from the others.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch

from generator.analyses.position import border_score, position_decodability
from generator.analyses.variance import feature_variance
from generator.cli import main
from generator.doctor import weights_available
from generator.errors import PatchAtlasError
from generator.models import controls
from generator.models.encoder import load_encoder
from generator.models.registry import DEFAULT_MODELS, FAMILIES, MODELS, get_model_entry
from generator.sources.synthetic import render_scene

from conftest import offline_tiny_zoo

CONTROLS = ("control-position", "control-content", "control-border", "control-highnorm", "control-junkdims")
GRID = (14, 14)
PLANTED_SHARE = len(controls.HIGH_NORM_POSITIONS) / (GRID[0] * GRID[1])


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(i, 224)[0] for i in range(6)]


@pytest.fixture(scope="module")
def encoders():
    return {name: load_encoder(get_model_entry(name)) for name in CONTROLS}


def _tokens(encoder, images, layer=2, norm="prenorm") -> torch.Tensor:
    batch = encoder.tokens(encoder.preprocess(images), [layer], [norm])
    return batch.layers[(layer, norm)].patch  # [B, gh, gw, D]


# --- registry and loading ---------------------------------------------------------------------

def test_controls_are_registry_rows_that_need_no_weights(tmp_path):
    assert "control" in FAMILIES
    for name in CONTROLS:
        entry = MODELS[name]
        assert entry.family == "control" and entry.construction in controls.CONSTRUCTIONS
        assert not entry.needs_weights and weights_available(entry, {})
        assert entry.grid_size() == GRID and entry.num_prefix_tokens == 1
        assert entry.description.startswith("Calibration control")
        assert name in DEFAULT_MODELS
    # Real models still need weights; the untrained baseline is no control.
    assert MODELS["dino_vits16"].needs_weights and not MODELS["random"].construction


def test_construction_is_deterministic_and_its_hash_is_recorded(encoders):
    for name, encoder in encoders.items():
        entry = get_model_entry(name)
        # A differently seeded timm initialisation underneath gives the same bytes: the
        # construction writes every parameter.
        torch.manual_seed(123)
        again = controls.construct(entry.construction, timm.create_model(
            entry.architecture, pretrained=False, num_classes=0, **entry.create_kwargs()))
        first, second = encoder.model.state_dict(), again.state_dict()
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k].cpu(), second[k]) for k in first), name
        assert encoder.weights.source == "constructed" and encoder.weights.location == name
        assert encoder.weights.revision == controls.state_sha256(again)
        assert len(encoder.weights.revision) == 64
    assert len({e.weights.revision for e in encoders.values()}) == len(CONTROLS)


def test_controls_refuse_a_checkpoint_and_odd_models(tmp_path):
    with pytest.raises(PatchAtlasError, match="constructed weights; it takes no checkpoint"):
        load_encoder(get_model_entry("control-content"), checkpoint=tmp_path / "w.safetensors")
    with pytest.raises(PatchAtlasError, match="unknown control construction 'stripes'"):
        controls.construct("stripes", timm.create_model("vit_tiny_patch16_224", depth=1))
    registers = timm.create_model("vit_small_patch14_reg4_dinov2", depth=1, embed_dim=192, num_heads=3,
                                  img_size=56)
    with pytest.raises(PatchAtlasError, match="exactly one prefix token"):
        controls.construct("content", registers)


# --- each construction's property -------------------------------------------------------------

def test_position_control_ignores_the_image_and_decodes_position_exactly(encoders, scenes):
    encoder = encoders["control-position"]
    for norm in ("prenorm", "postnorm"):
        tokens = _tokens(encoder, scenes, norm=norm)
        assert torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[0], tokens[-1])
        flat = tokens[0].reshape(-1, tokens.shape[-1])
        assert torch.cdist(flat, flat).fill_diagonal_(1.0).min() > 0.1  # every position its own token
        decoded = position_decodability(tokens)
        assert decoded["row_r2"] > 0.99 and decoded["col_r2"] > 0.99
        assert decoded["row_acc"] == 1.0 and decoded["col_acc"] == 1.0
    # Blocks pass tokens through: layer 1 and layer 2 agree.
    assert torch.equal(_tokens(encoder, scenes[:1], layer=1), _tokens(encoder, scenes[:1], layer=2))


def test_content_control_gives_the_same_token_for_the_same_patch_anywhere(encoders, scenes):
    image = scenes[0].copy()
    # The patch at grid (2, 3) copied to grid (11, 9), on patch boundaries (no resize at 224).
    image[11 * 16:12 * 16, 9 * 16:10 * 16] = image[2 * 16:3 * 16, 3 * 16:4 * 16]
    for name in ("control-content", "control-highnorm"):
        for norm in ("prenorm", "postnorm"):
            tokens = _tokens(encoders[name], [image], norm=norm)[0]
            torch.testing.assert_close(tokens[11, 9], tokens[2, 3], rtol=0, atol=1e-5)
            assert not torch.allclose(tokens[11, 9], tokens[5, 5], atol=1e-2)
    # Position-free: a constant image gives one token everywhere.
    flat = np.full((224, 224, 3), 90, dtype=np.uint8)
    tokens = _tokens(encoders["control-content"], [flat])[0].reshape(-1, 192)
    torch.testing.assert_close(tokens, tokens[:1].expand_as(tokens), rtol=0, atol=1e-5)
    # The content code holds the descriptor isometrically: distances between tokens are the
    # distances between the patches' cell-mean colours.
    pixels = encoders["control-content"].preprocess([scenes[1]])[0]
    patches = pixels.unfold(1, 16, 16).unfold(2, 16, 16).permute(1, 2, 0, 3, 4).reshape(196, 3, 16, 16)
    descriptor = torch.from_numpy(controls.descriptor_matrix(16)).float()
    g = torch.einsum("fchw,pchw->pf", descriptor, patches)
    tokens = _tokens(encoders["control-content"], [scenes[1]])[0].reshape(196, -1)
    exact = {"compute_mode": "donot_use_mm_for_euclid_dist"}  # no cancellation beside the offset
    torch.testing.assert_close(torch.cdist(tokens, tokens, **exact), torch.cdist(g, g, **exact), rtol=1e-4,
                               atol=1e-4)


def test_border_control_moves_exactly_the_ring_by_a_constant_vector(encoders, scenes):
    content = _tokens(encoders["control-content"], scenes)
    border = _tokens(encoders["control-border"], scenes)
    ring = torch.from_numpy(controls.border_ring(GRID).reshape(GRID))
    shift = border - content
    assert shift[:, ~ring].abs().max() < 1e-4
    ring_shift = shift[:, ring].reshape(-1, 192)
    torch.testing.assert_close(ring_shift, ring_shift[:1].expand_as(ring_shift), rtol=0, atol=1e-4)
    assert abs(float(ring_shift[0].norm()) - controls.OFFSET_NORM) < 1e-3
    # The ring keeps its norm: no high-norm mode.
    torch.testing.assert_close(border.norm(dim=-1), content.norm(dim=-1), rtol=1e-5, atol=1e-4)
    # The border score reads the shift over the interior spread, as the construction predicts.
    interior = content[:, ~ring].reshape(-1, 192)
    spread = float((interior - interior.mean(0)).pow(2).sum(1).mean().sqrt())
    assert border_score(border) == pytest.approx(controls.OFFSET_NORM / spread, rel=0.1)
    assert border_score(border) > 3 and border_score(content) < 0.3


def test_highnorm_control_plants_exactly_its_tokens(encoders, scenes):
    planted = np.zeros(GRID[0] * GRID[1], dtype=bool)
    planted[controls.high_norm_indices(GRID)] = True
    assert planted.sum() == 4
    for name in CONTROLS:
        norms = _tokens(encoders[name], scenes).norm(dim=-1).reshape(len(scenes), -1)
        high = (norms > 10 * norms.median()).numpy()
        if name == "control-highnorm":
            assert (high == planted).all()  # in every image, exactly the planted positions
            assert high.mean() == pytest.approx(PLANTED_SHARE)
            assert float(norms[:, planted].min() / norms.median()) > 15
        else:
            assert not high.any(), name


def test_junkdims_control_puts_its_noise_at_the_top_of_the_variance_spectrum(encoders, scenes):
    for norm in ("prenorm", "postnorm"):
        junk = _tokens(encoders["control-junkdims"], scenes, norm=norm).reshape(-1, 192)
        variance = feature_variance(junk)
        top = set(torch.argsort(variance, descending=True)[:8].tolist())
        assert top == set(range(controls.JUNK.start, controls.JUNK.stop))
        rest = variance[controls.JUNK.stop:]
        assert float(variance[:8].min()) > 5 * float(rest.max())
    # The junk is the same in every image: it is keyed by position, not by content.
    junk = _tokens(encoders["control-junkdims"], scenes)
    assert torch.equal(junk[0, ..., :8], junk[3, ..., :8])
    content = _tokens(encoders["control-content"], scenes)
    torch.testing.assert_close(junk[..., 8:], content[..., 8:], rtol=0, atol=1e-4)


# --- one build, every analysis reading its planted property ------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    # Its own build, not conftest's shared tiny_builds: the five constructed controls at their own input size.
    mp = offline_tiny_zoo(tmp_path_factory)
    out = tmp_path_factory.mktemp("controls") / "out"
    code = main(["build", "--out", str(out), "--models", ",".join(CONTROLS),
                 "--source", "synthetic-scenes,content-free", "--source-option", "n_images=8",
                 "--source-option", "noise_images=1",
                 "--layers", "last", "--curve-layers", "last", "--k", "4", "--linear-max-steps", "50",
                 "--no-html", "--device", "cpu", "--quiet"])
    yield {"out": out, "code": code}
    mp.undo()


def _result(built, source: str, model: str, norm: str, name: str) -> dict:
    folder = built["out"] / "results" / source / model / f"{model}-L02-{norm}"
    return json.loads((folder / name).read_text())


def _maps_npz(built, source: str, model: str, norm: str):
    return np.load(built["out"] / "results" / source / model / f"{model}-L02-{norm}" / "maps.npz")


def test_build_runs_every_control(built):
    assert built["code"] == 0
    manifest = json.loads((built["out"] / "manifest.json").read_text())
    for source in ("synthetic-scenes", "content-free"):
        for model in CONTROLS:
            unit = manifest["entries"][f"extract/{source}/{model}"]
            assert unit["status"] == "done"
            assert unit["weights"]["source"] == "constructed" and len(unit["weights"]["revision"]) == 64
            # The published tables name the control, never "random".
            shard = next((built["out"] / "datasets" / source / model / "L02-postnorm").glob("*.parquet"))
            geometry = json.loads(pq.read_schema(shard).metadata[b"patchatlas"])
            assert geometry["model"] == model and geometry["model_id"] == model


@pytest.mark.parametrize("source", ["synthetic-scenes", "content-free"])
def test_border_score_is_high_only_for_the_border_control(built, source):
    for norm in ("prenorm", "postnorm"):
        scores = {m: _result(built, source, m, norm, "maps.json")["border_score"] for m in CONTROLS}
        others = max(v for m, v in scores.items() if m != "control-border")
        assert scores["control-border"] > 2.0 and scores["control-border"] > 4 * others, scores
        assert scores["control-content"] < 0.2, scores


def test_position_decodes_from_the_position_control_only(built):
    for source in ("synthetic-scenes", "content-free"):
        for norm in ("prenorm", "postnorm"):
            position = _result(built, source, "control-position", norm, "maps.json")["position"]
            assert position["row_r2"] > 0.9 and position["col_r2"] > 0.9
            content = _result(built, source, "control-content", norm, "maps.json")["position"]
            # Left and right look alike in every scene; rows differ (sky above ground), so only
            # inputs without a layout (content-free) must give no row either.
            assert content["col_r2"] < 0.1
            if source == "content-free":
                assert content["row_r2"] < 0.1


def test_position_decodability_of_content_is_near_zero_not_below(built):
    for norm in ("prenorm", "postnorm"):
        content = _result(built, "content-free", "control-content", norm, "maps.json")["position"]
        assert abs(content["row_r2"]) < 0.1 and abs(content["col_r2"]) < 0.1, content


def test_positional_consistency_is_high_only_where_position_decides(built):
    def consistency(source, model):
        kmeans = _result(built, source, model, "postnorm", "kmeans.json")["kmeans"]
        return next(k["positional_consistency"] for k in kmeans if k["k"] == 4)

    for source in ("synthetic-scenes", "content-free"):
        assert consistency(source, "control-position") > 0.95
    assert consistency("synthetic-scenes", "control-content") < 0.5
    assert consistency("content-free", "control-content") < 0.1


def test_knn_reads_content_from_the_content_control_not_the_position_control(built):
    knn = {m: _result(built, "synthetic-scenes", m, "postnorm", "probes.json")["knn_miou"] for m in CONTROLS}
    assert knn["control-content"] > 0.6, knn
    assert knn["control-position"] < 0.25, knn
    assert knn["control-content"] > knn["control-position"] + 0.4, knn


def test_junk_dims_hurt_knn_until_they_are_removed(built):
    variance = {m: _result(built, "synthetic-scenes", m, "postnorm", "probes.json")["variance"] for m in CONTROLS}
    junk = variance["control-junkdims"]
    assert set(junk["top_dims"][:8]) == set(range(8))
    assert not set(variance["control-content"]["top_dims"][:8]) & set(range(8))
    curve = {row["n_removed"]: row["knn_miou"] for row in junk["removal"]}
    after = curve[min(n for n in curve if n >= 8)]
    content = {row["n_removed"]: row["knn_miou"] for row in variance["control-content"]["removal"]}
    assert after > curve[0] + 0.2, curve
    assert after > 0.8 * content[0], (curve, content)
    # Removing dims barely matters to a model without junk.
    assert abs(content[min(n for n in content if n >= 8)] - content[0]) < 0.1, content


def test_planted_high_norm_tokens_are_exactly_the_tokens_far_above_the_median(built):
    planted = np.zeros(GRID, dtype=bool)
    planted.reshape(-1)[controls.high_norm_indices(GRID)] = True
    for source in ("synthetic-scenes", "content-free"):
        for model in CONTROLS:
            norms = _maps_npz(built, source, model, "prenorm")["norm_maps"]
            high = norms > 10 * np.median(norms)
            expected = np.broadcast_to(planted, high.shape) if model == "control-highnorm" else np.zeros_like(high)
            assert (high == expected).all(), (source, model)


def test_outlier_share_reads_the_planted_share_on_content_free_inputs(built):
    for model in CONTROLS:
        share = _result(built, "content-free", model, "prenorm", "maps.json")["norms"]["outlier_share"]
        expected = PLANTED_SHARE if model == "control-highnorm" else 0.0
        assert share == pytest.approx(expected, abs=0.005), (model, share)


def test_outlier_share_reads_the_planted_share_on_scenes(built):
    for model in CONTROLS:
        share = _result(built, "synthetic-scenes", model, "prenorm", "maps.json")["norms"]["outlier_share"]
        expected = PLANTED_SHARE if model == "control-highnorm" else 0.0
        assert share == pytest.approx(expected, abs=0.005), (model, share)
