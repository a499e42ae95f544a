"""Patch retrieval under transformations, on tokens built so that the right outcome is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generator.analyses.retrieval import OUTCOMES, correspondence_upper_bound, query_mask, retrieval_outcomes
from generator.errors import PatchAtlasError
from generator.sources.degradations import TRANSFORMS, apply_transform, patch_correspondence

N_IMG, GH, GW, DIM = 6, 8, 8, 32
IGNORE = 255
# Fine classes: 0 background; 1, 2 vehicles; 3, 4 ships; 5 a court (its own super class).
FINE_TO_SUPER = np.array([0, 1, 1, 2, 2, 3])
BACKGROUND = [0]


def labels(seed=0):
    rng = np.random.default_rng(seed)
    lab = rng.choice(6, size=(N_IMG, GH, GW), p=[0.4, 0.12, 0.12, 0.12, 0.12, 0.12])
    lab[0, 0, :3] = IGNORE
    return lab


def identity_correspondence():
    rows, cols = np.meshgrid(np.arange(GH), np.arange(GW), indexing="ij")
    return np.broadcast_to(np.stack([rows, cols], -1), (N_IMG, GH, GW, 2)).copy()


def random_tokens(seed):
    return np.random.default_rng(seed).normal(size=(N_IMG, GH, GW, DIM)).astype(np.float32)


def run(orig, lab, trans, corr=None, trans_lab=None, **kw):
    corr = identity_correspondence() if corr is None else corr
    trans_lab = lab if trans_lab is None else trans_lab
    return retrieval_outcomes(orig, lab, trans, trans_lab, corr, FINE_TO_SUPER, BACKGROUND, **kw)


def test_identity_transform_retrieves_the_same_patch():
    lab = labels()
    tokens = random_tokens(1)
    res = run(tokens, lab, tokens)
    n_queries = query_mask(lab, BACKGROUND).sum()
    assert res["n_queries"] == n_queries
    assert res["counts"]["same_patch"] == n_queries
    assert res["shares"]["same_patch"] == 1.0
    assert res["upper_bound"] == 1.0
    assert sum(res["counts"].values()) == n_queries
    # Tensors in give the same answer as arrays.
    res_t = run(torch.tensor(tokens), torch.tensor(lab), torch.tensor(tokens), similarity="dot")
    assert res_t["counts"] == res["counts"]


def test_tokens_encoding_only_class_retrieve_the_class_not_the_patch():
    lab = labels()
    rng = np.random.default_rng(2)
    class_vec = rng.normal(size=(6, DIM)) * 5
    orig = class_vec[lab.clip(0, 5)] + 0.1 * rng.normal(size=(N_IMG, GH, GW, DIM))
    trans = class_vec[lab.clip(0, 5)] + 0.1 * rng.normal(size=(N_IMG, GH, GW, DIM))
    shares = run(orig, lab, trans)["shares"]
    assert shares["same_patch"] < 0.1  # about 1 in the ~60 patches of a class
    assert shares["same_fine"] > 0.85
    assert shares["same_patch"] + shares["same_fine"] == pytest.approx(1.0)


def test_tokens_encoding_only_super_class_retrieve_the_super_class():
    lab = labels()
    rng = np.random.default_rng(3)
    super_vec = rng.normal(size=(4, DIM)) * 5
    sup = FINE_TO_SUPER[lab.clip(0, 5)]
    orig = super_vec[sup] + 0.1 * rng.normal(size=(N_IMG, GH, GW, DIM))
    trans = super_vec[sup] + 0.1 * rng.normal(size=(N_IMG, GH, GW, DIM))
    shares = run(orig, lab, trans)["shares"]
    assert shares["same_patch"] + shares["same_fine"] + shares["same_super"] == pytest.approx(1.0)
    assert shares["same_super"] > 0.3  # classes 1-4 share their super class with a sibling
    assert shares["background"] == 0.0 and shares["wrong"] == 0.0


def test_control_shuffled_tokens_are_mostly_wrong_or_background():
    lab = labels()
    orig = random_tokens(4)
    trans = random_tokens(5)  # no relation to the originals
    shares = run(orig, lab, trans)["shares"]
    assert shares["same_patch"] < 0.05
    assert shares["background"] + shares["wrong"] > 0.6
    assert shares["background"] > 0.25  # background is 40 % of candidates


def test_exclude_same_image_removes_same_patch_hits():
    lab = labels()
    tokens = random_tokens(6)
    res = run(tokens, lab, tokens, exclude_same_image=True)
    assert res["counts"]["same_patch"] == 0
    assert res["n_queries"] == query_mask(lab, BACKGROUND).sum()
    assert res["upper_bound"] == 0.0
    # Tokens = image identity + class: with the own image excluded the class still comes back.
    rng = np.random.default_rng(7)
    # Image identity and class live in orthogonal halves of the feature space.
    image_vec = np.zeros((N_IMG, 1, 1, DIM))
    image_vec[..., : DIM // 2] = rng.normal(size=(N_IMG, 1, 1, DIM // 2)) * 5
    class_vec = np.zeros((6, DIM))
    class_vec[:, DIM // 2 :] = rng.normal(size=(6, DIM // 2)) * 3
    orig = image_vec + class_vec[lab.clip(0, 5)] + 0.1 * rng.normal(size=(N_IMG, GH, GW, DIM))
    trans = image_vec + class_vec[lab.clip(0, 5)] + 0.1 * rng.normal(size=(N_IMG, GH, GW, DIM))
    within = run(orig, lab, trans, similarity="l2")["shares"]
    across = run(orig, lab, trans, similarity="l2", exclude_same_image=True)["shares"]
    assert within["same_patch"] + within["same_fine"] > 0.95
    assert across["same_patch"] == 0.0 and across["same_fine"] > 0.95


def brute_force(orig, o_lab, trans, t_lab, corr, exclude):
    """Plain loops over queries and candidates, cosine similarity."""
    o = orig / np.linalg.norm(orig, axis=-1, keepdims=True)
    t = trans / np.linalg.norm(trans, axis=-1, keepdims=True)
    out = []
    for i, r, c in np.ndindex(*t_lab.shape):
        if t_lab[i, r, c] in (IGNORE, 0):
            continue
        best, best_at = -np.inf, None
        for j, rr, cc in np.ndindex(*o_lab.shape):
            if o_lab[j, rr, cc] == IGNORE or (exclude and j == i):
                continue
            s = o[j, rr, cc] @ t[i, r, c]
            if s > best:
                best, best_at = s, (j, rr, cc)
        j, rr, cc = best_at
        q, h = t_lab[i, r, c], o_lab[j, rr, cc]
        if j == i and tuple(corr[i, r, c]) == (rr, cc):
            out.append("same_patch")
        elif h == q:
            out.append("same_fine")
        elif FINE_TO_SUPER[h] == FINE_TO_SUPER[q]:
            out.append("same_super")
        elif h == 0:
            out.append("background")
        else:
            out.append("wrong")
    return out


@pytest.mark.parametrize("exclude", [False, True])
def test_matches_brute_force(exclude):
    lab = labels(8)
    rng = np.random.default_rng(9)
    class_vec = rng.normal(size=(6, DIM))
    orig = class_vec[lab.clip(0, 5)] + 1.5 * rng.normal(size=(N_IMG, GH, GW, DIM))
    trans = orig + 3.0 * rng.normal(size=orig.shape)
    corr = identity_correspondence()
    corr[:, 0] = -1  # the top row has no source
    trans_lab = lab.copy()
    trans_lab[1, 2, :] = IGNORE
    res = run(orig, lab, trans, corr=corr, trans_lab=trans_lab, exclude_same_image=exclude, chunk_size=17)
    expected = brute_force(orig, lab, trans, trans_lab, corr, exclude)
    assert [OUTCOMES[i] for i in res["outcome"]] == expected
    assert len({*expected}) >= 4  # a mix of outcomes, not a trivial case


def test_precedence_on_a_hand_built_case():
    # One image, 1 x 4 grid: query patches 0..3 retrieve hand-picked originals.
    orig = np.eye(4, dtype=np.float32)[None, None]  # patch k = e_k
    o_lab = np.array([[[1, 2, 3, 0]]])
    t_lab = np.array([[[1, 1, 1, 1]]])
    trans = np.eye(4, dtype=np.float32)[[0, 1, 2, 3]][None, None]
    corr = np.array([[[[0, 0], [0, 0], [0, 0], [0, 0]]]])  # all sources are patch 0
    res = retrieval_outcomes(orig, o_lab, trans, t_lab, corr, np.array([0, 1, 1, 2]), [0])
    # hits: patch 0 (its source) / patch 1 (class 2, same super) / class 3 (other super) / bg
    assert [OUTCOMES[i] for i in res["outcome"]] == ["same_patch", "same_super", "wrong", "background"]
    corr_none = np.full_like(corr, -1)
    res = retrieval_outcomes(orig, o_lab, trans, t_lab, corr_none, np.array([0, 1, 1, 2]), [0])
    assert OUTCOMES[res["outcome"][0]] == "same_fine"  # same patch impossible without a source


def test_rotation_same_patch_share_equals_the_correspondence_upper_bound():
    """Tokens that follow image content exactly: a transformed patch's token is its source
    patch's token, so same-patch retrieval reaches the geometric ceiling and no further."""
    lab = labels(10)
    orig = random_tokens(11)
    rng = np.random.default_rng(12)
    bounds = []
    for deg in TRANSFORMS["rotate"]:
        out = apply_transform(np.zeros((128, 128, 3), np.uint8), None, "rotate", deg)
        corr1 = patch_correspondence(out.to_source, (128, 128), (GH, GW))
        corr = np.broadcast_to(corr1, (N_IMG, GH, GW, 2)).copy()
        has = (corr >= 0).all(-1)
        img_idx = np.broadcast_to(np.arange(N_IMG)[:, None, None], (N_IMG, GH, GW))
        trans = rng.normal(size=orig.shape).astype(np.float32)
        trans[has] = orig[img_idx[has], corr[has][:, 0], corr[has][:, 1]]
        trans_lab = np.full_like(lab, IGNORE)
        trans_lab[has] = lab[img_idx[has], corr[has][:, 0], corr[has][:, 1]]
        trans_lab[~has] = 1  # labelled corners without a source
        bound = correspondence_upper_bound(corr, trans_lab, BACKGROUND)
        res = run(orig, lab, trans, corr=corr, trans_lab=trans_lab)
        # Originals with the ignore label cannot be hit; every other source is found.
        sourced_ok = has & (trans_lab != 0)
        src_lab = np.where(has, lab[img_idx, corr[..., 0].clip(0), corr[..., 1].clip(0)], IGNORE)
        reachable = (sourced_ok & (src_lab != IGNORE)).sum()
        assert res["counts"]["same_patch"] == reachable
        assert res["upper_bound"] == pytest.approx(bound)
        assert res["shares"]["same_patch"] <= bound
        bounds.append(bound)
    assert bounds[-1] < 1.0
    assert all(a >= b for a, b in zip(bounds, bounds[1:]))


def test_bad_input():
    lab = labels()
    tokens = random_tokens(0)
    with pytest.raises(PatchAtlasError, match="equal shapes"):
        run(tokens, lab, tokens[:, :4])
    with pytest.raises(PatchAtlasError, match="correspondence"):
        run(tokens, lab, tokens, corr=identity_correspondence()[..., :1])
    with pytest.raises(PatchAtlasError, match="fine_to_super"):
        retrieval_outcomes(tokens, lab, tokens, lab, identity_correspondence(), np.array([0, 1]), BACKGROUND)
    with pytest.raises(PatchAtlasError, match="no labelled"):
        run(tokens, lab, tokens, trans_lab=np.zeros_like(lab))
    with pytest.raises(PatchAtlasError, match="at least two images"):
        retrieval_outcomes(
            tokens[:1], lab[:1], tokens[:1], lab[:1], identity_correspondence()[:1], FINE_TO_SUPER, BACKGROUND,
            exclude_same_image=True,
        )
