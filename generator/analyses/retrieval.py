"""Patch retrieval under transformations: is the nearest original patch the patch itself?

After the local-representations paper (FAIR1M): every image is transformed (shifted, rotated,
scaled, blurred, noised) and for each labelled object patch of a transformed image the most
similar patch among all original images is retrieved. The hit is classified, first match wins:

1. ``same_patch``: the true source patch of the query (same image; the original patch that holds
   the source point of the query patch's centre, see ``sources.degradations.patch_correspondence``);
2. ``same_fine``: a patch of the query's fine class;
3. ``same_super``: a patch of another fine class of the query's super class;
4. ``background``: a background patch;
5. ``wrong``: a patch of another super class.

With ``exclude_same_image`` the query's own original image is not searched, which measures
category retrieval across images (same-patch hits are then impossible by construction).
Queries are transformed patches whose label is neither ignored nor background; candidates are
original patches whose label is not ignored.

Everything is pure: tensors/arrays in, counts out, on the tokens' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from generator.analyses.probes import nearest_neighbours
from generator.errors import PatchAtlasError

__all__ = ["OUTCOMES", "correspondence_upper_bound", "query_mask", "retrieval_outcomes"]

# In precedence order: an outcome is the first of these the retrieved patch satisfies.
OUTCOMES = ("same_patch", "same_fine", "same_super", "background", "wrong")


def _as_numpy(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_grid_labels(labels, shape3: tuple[int, int, int], what: str) -> np.ndarray:
    arr = _as_numpy(labels, what)
    if arr.shape != shape3:
        raise PatchAtlasError(f"{what} of shape {arr.shape}: expected [n_images, gh, gw] = {shape3}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise PatchAtlasError(f"{what} of dtype {arr.dtype}: expected integer class ids")
    return arr.astype(np.int64)


def _check_correspondence(correspondence, shape3: tuple[int, int, int]) -> np.ndarray:
    corr = _as_numpy(correspondence, "correspondence")
    if corr.shape != (*shape3, 2):
        raise PatchAtlasError(
            f"correspondence of shape {corr.shape}: expected [n_images, gh, gw, 2] = {(*shape3, 2)} "
            "(source row, col of each transformed patch, -1 where none)"
        )
    corr = corr.astype(np.int64)
    n, gh, gw = shape3
    valid = (corr >= 0).all(-1)
    if ((corr[..., 0] >= gh) | (corr[..., 1] >= gw))[valid].any():
        raise PatchAtlasError(f"correspondence holds a source patch outside the {gh} x {gw} grid")
    return corr


def _background_set(background_ids) -> np.ndarray:
    return np.unique(np.asarray(list(background_ids), dtype=np.int64))


def query_mask(trans_labels, background_ids: Sequence[int], ignore_index: int = 255) -> np.ndarray:
    """The transformed patches that are queries: labelled, and not background. bool, labels' shape."""
    labels = _as_numpy(trans_labels, "trans_labels").astype(np.int64)
    return (labels != ignore_index) & ~np.isin(labels, _background_set(background_ids))


def correspondence_upper_bound(
    correspondence, trans_labels, background_ids: Sequence[int], ignore_index: int = 255
) -> float:
    """Share of queries whose true source patch exists: the ceiling on ``same_patch``.

    Rotations and zooms move some patch centres outside the original image (corners, borders);
    those queries cannot be retrieved as the same patch by any representation.
    """
    labels = _as_numpy(trans_labels, "trans_labels")
    if labels.ndim != 3:
        raise PatchAtlasError(f"trans_labels of shape {labels.shape}: expected [n_images, gh, gw]")
    corr = _check_correspondence(correspondence, labels.shape)
    queries = query_mask(labels, background_ids, ignore_index)
    if not queries.any():
        raise PatchAtlasError("trans_labels: no labelled non-background patch to query")
    return float((corr[queries] >= 0).all(-1).mean())


def retrieval_outcomes(
    orig_tokens,
    orig_labels,
    trans_tokens,
    trans_labels,
    correspondence,
    fine_to_super,
    background_ids: Sequence[int],
    *,
    exclude_same_image: bool = False,
    similarity: str = "cosine",
    ignore_index: int = 255,
    chunk_size: int = 4096,
) -> dict:
    """Classify the nearest original patch of every query patch of the transformed images.

    ``orig_tokens`` / ``trans_tokens``: [n, gh, gw, D] (image i of one is image i of the other);
    labels [n, gh, gw] fine class ids; ``correspondence`` [n, gh, gw, 2] as made by
    ``patch_correspondence``; ``fine_to_super`` [n_classes] super class id of each fine class;
    ``background_ids``: the fine classes that are background.

    Returns a dict: ``counts`` and ``shares`` (outcome -> int / float, keys ``OUTCOMES``),
    ``n_queries``, ``outcome`` (int8 [n_queries], index into ``OUTCOMES``, queries in row-major
    order of [n, gh, gw]), ``upper_bound`` (``correspondence_upper_bound``; 0 when the own image
    is excluded), and the parameters that shape the result.
    """
    orig = orig_tokens if isinstance(orig_tokens, torch.Tensor) else torch.from_numpy(np.asarray(orig_tokens))
    trans = trans_tokens if isinstance(trans_tokens, torch.Tensor) else torch.from_numpy(np.asarray(trans_tokens))
    if orig.ndim != 4 or trans.shape != orig.shape:
        raise PatchAtlasError(
            f"orig_tokens of shape {tuple(orig.shape)} and trans_tokens of shape {tuple(trans.shape)}: "
            "expected equal shapes [n_images, gh, gw, D]"
        )
    trans = trans.to(orig.device)
    n, gh, gw, dim = orig.shape
    o_labels = _check_grid_labels(orig_labels, (n, gh, gw), "orig_labels")
    t_labels = _check_grid_labels(trans_labels, (n, gh, gw), "trans_labels")
    corr = _check_correspondence(correspondence, (n, gh, gw))
    super_of = np.asarray(fine_to_super, dtype=np.int64).reshape(-1)
    background = _background_set(background_ids)

    labelled = [lbl[lbl != ignore_index] for lbl in (o_labels, t_labels)]
    for lbl in labelled:
        if lbl.size and (lbl.min() < 0 or lbl.max() >= super_of.size):
            raise PatchAtlasError(
                f"labels hold class id {int(lbl.max())} but fine_to_super covers {super_of.size} classes: "
                "give one super class per fine class"
            )

    queries = query_mask(t_labels, background, ignore_index)
    candidates = o_labels != ignore_index
    if not queries.any():
        raise PatchAtlasError("trans_labels: no labelled non-background patch to query")
    if not candidates.any():
        raise PatchAtlasError("orig_labels: every original patch is unlabelled; nothing to retrieve")

    image_of = np.broadcast_to(np.arange(n)[:, None, None], (n, gh, gw))
    q_flat = np.flatnonzero(queries.reshape(-1))
    c_flat = np.flatnonzero(candidates.reshape(-1))
    device = orig.device
    q_tok = trans.reshape(-1, dim)[torch.from_numpy(q_flat).to(device)]
    c_tok = orig.reshape(-1, dim)[torch.from_numpy(c_flat).to(device)]
    groups = {}
    if exclude_same_image:
        groups = dict(query_groups=image_of.reshape(-1)[q_flat], key_groups=image_of.reshape(-1)[c_flat])
        if np.unique(groups["key_groups"]).size < 2:
            raise PatchAtlasError("exclude_same_image needs labelled original patches in at least two images")
    _, idx = nearest_neighbours(q_tok, c_tok, 1, similarity=similarity, chunk_size=chunk_size, **groups)
    hit = c_flat[idx[:, 0].cpu().numpy()]

    q_label = t_labels.reshape(-1)[q_flat]
    h_label = o_labels.reshape(-1)[hit]
    q_image = image_of.reshape(-1)[q_flat]
    source = corr.reshape(-1, 2)[q_flat]
    has_source = (source >= 0).all(-1)
    source_flat = np.where(has_source, q_image * gh * gw + source[:, 0] * gw + source[:, 1], -1)

    same_patch = hit == source_flat
    same_fine = h_label == q_label
    same_super = super_of[h_label] == super_of[q_label]
    is_background = np.isin(h_label, background)
    outcome = np.select(
        [same_patch, same_fine, same_super, is_background],
        [0, 1, 2, 3],
        default=4,
    ).astype(np.int8)

    counts = {name: int((outcome == i).sum()) for i, name in enumerate(OUTCOMES)}
    n_queries = int(outcome.size)
    return {
        "counts": counts,
        "shares": {name: counts[name] / n_queries for name in OUTCOMES},
        "n_queries": n_queries,
        "outcome": outcome,
        "upper_bound": 0.0 if exclude_same_image else float(has_source.mean()),
        "exclude_same_image": bool(exclude_same_image),
        "similarity": similarity,
    }
