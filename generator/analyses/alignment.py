"""Colours that mean the same thing across models and layers, and how stable a clustering is.

Two clusterings of the same patches (another model, another layer, another seed) number their
clusters arbitrarily. :func:`align_to_reference` renames the clusters of one onto the clusters
of a reference by the Hungarian method on their co-occurrence counts — the same matching
:func:`generator.analyses.clusters.hungarian_match` does against ground truth — so that a
shared colour marks the most overlapping region. :func:`cluster_stability` measures how much a
joint k-means fit depends on its seed with the adjusted Rand index (Hubert & Arabie 1985).

Everything here is pure numpy: label arrays in, label arrays and numbers out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from generator.analyses.clusters import display_ids, hungarian_match
from generator.errors import PatchAtlasError

__all__ = ["adjusted_rand_index", "align_to_reference", "alignment_lut", "cluster_stability"]

# Every patch takes part in an alignment; -1 cannot collide with a reference cluster id.
_NO_IGNORE = -1


def _int_labels(name: str, values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.integer):
        raise PatchAtlasError(f"{name} must hold integer cluster ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def alignment_lut(labels: np.ndarray, reference: np.ndarray, k: int, k_ref: int) -> np.ndarray:
    """The renaming [k] that :func:`align_to_reference` applies: entry j is the new id of
    cluster j (a reference id in [0, k_ref) when matched, k_ref + rank otherwise)."""
    labels = _int_labels("labels", labels)
    reference = _int_labels("reference", reference)
    if labels.shape != reference.shape:
        raise PatchAtlasError(
            f"labels shape {labels.shape} differs from reference shape {reference.shape}; "
            "align two clusterings of the same patches"
        )
    match = hungarian_match(labels, reference, k, k_ref, ignore_index=_NO_IGNORE)
    return display_ids(np.arange(k), match.cluster_to_class, k_ref)


def align_to_reference(labels: np.ndarray, reference: np.ndarray, k: int, k_ref: int) -> np.ndarray:
    """Rename the clusters of ``labels`` (ids in [0, k)) after those of ``reference`` (ids in
    [0, k_ref)), two clusterings of the same patches, any shape.

    The one-to-one matching maximises the number of patches whose cluster is renamed to the
    reference cluster they fall in (Hungarian method on the k × k_ref co-occurrence matrix;
    pairs that never co-occur are not matched). Matched clusters take their reference id;
    unmatched ones (k > k_ref, or no overlap) take k_ref, k_ref + 1, ... in order of their own
    id, so they never borrow a reference colour. Returns int64 labels of the input's shape.
    """
    lut = alignment_lut(labels, reference, k, k_ref)
    return lut[_int_labels("labels", labels)]


def adjusted_rand_index(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Adjusted Rand index of two labellings of the same items (any integer ids, any shape).

    From the contingency table n_ij: counting ordered pairs of distinct items, tp pairs share a
    cluster in both labellings, fp only in ``labels_b``, fn only in ``labels_a``, tn in neither;
    ARI = 2 (tp·tn − fn·fp) / ((tp + fn)(fn + tn) + (tp + fp)(fp + tn)), which equals Hubert and
    Arabie's (index − expected) / (max − expected). The pair counts are exact Python integers,
    so millions of patches neither overflow nor round; identical partitions (including the
    degenerate all-in-one-cluster case) score 1.0.
    """
    a = _int_labels("labels_a", labels_a).ravel()
    b = _int_labels("labels_b", labels_b).ravel()
    if a.shape != b.shape:
        raise PatchAtlasError(
            f"labellings have {a.size} and {b.size} items; compare clusterings of the same patches"
        )
    n = a.size
    _, a_idx = np.unique(a, return_inverse=True)
    _, b_idx = np.unique(b, return_inverse=True)
    n_b = int(b_idx.max()) + 1 if n else 1
    pair_codes = a_idx.astype(np.int64) * n_b + b_idx
    cell_counts = np.unique(pair_codes, return_counts=True)[1].astype(np.int64)
    row_counts = np.bincount(a_idx).astype(np.int64)
    col_counts = np.bincount(b_idx).astype(np.int64)

    sum_cells = int((cell_counts * cell_counts).sum())
    sum_rows = int((row_counts * row_counts).sum())
    sum_cols = int((col_counts * col_counts).sum())
    tp = sum_cells - n
    fp = sum_cols - sum_cells
    fn = sum_rows - sum_cells
    tn = n * n - fp - fn - sum_cells
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def cluster_stability(label_sets: Sequence[np.ndarray]) -> dict:
    """How much a clustering depends on its seed: the adjusted Rand index between every pair of
    clusterings of the same patches (e.g. joint k-means with seeds 0, 1, 2, ...).

    Returns ``mean_ari`` and ``min_ari`` over the distinct pairs and ``pairwise`` [m, m]
    (symmetric, ones on the diagonal). 1 means the same partition whatever the seed; 0 means
    no more agreement than chance.
    """
    sets = [_int_labels(f"label_sets[{i}]", s) for i, s in enumerate(label_sets)]
    if len(sets) < 2:
        raise PatchAtlasError(
            f"cluster_stability needs at least two clusterings, got {len(sets)}; fit with several seeds"
        )
    shape = sets[0].shape
    for i, s in enumerate(sets):
        if s.shape != shape:
            raise PatchAtlasError(
                f"label_sets[{i}] has shape {s.shape}, label_sets[0] has {shape}; "
                "stability compares clusterings of the same patches"
            )
    m = len(sets)
    pairwise = np.eye(m, dtype=np.float64)
    for i in range(m):
        for j in range(i + 1, m):
            pairwise[i, j] = pairwise[j, i] = adjusted_rand_index(sets[i], sets[j])
    upper = pairwise[np.triu_indices(m, k=1)]
    return {"mean_ari": float(upper.mean()), "min_ari": float(upper.min()), "pairwise": pairwise}
