"""Where clusters fall by grid position: histograms over images, their mode, and how much of a
clustering the position alone decides.

Numpy only (no torch), so that the render stage can draw the position-mode maps from the saved
cluster maps; :mod:`generator.analyses.position` re-exports them beside the token analyses.
"""

from __future__ import annotations

import numpy as np

from generator.analyses._checks import check_positive_int
from generator.errors import PatchAtlasError


def position_cluster_histogram(cluster_maps: np.ndarray, k: int) -> np.ndarray:
    """Share of images in which each grid position falls in each cluster.

    ``cluster_maps`` [n_img, gh, gw] holds ids in [0, k) from one joint fit (or display ids
    aligned across fits). Returns float64 [gh, gw, k]; every position's row sums to 1.
    """
    maps = np.asarray(cluster_maps)
    if maps.ndim != 3 or not np.issubdtype(maps.dtype, np.integer):
        raise PatchAtlasError(
            f"cluster_maps must be integer ids [n_img, gh, gw], got {maps.dtype} {maps.shape}"
        )
    check_positive_int(k, "k")
    if maps.size and (maps.min() < 0 or maps.max() >= k):
        raise PatchAtlasError(
            f"cluster_maps hold ids in [{maps.min()}, {maps.max()}], outside [0, {k}); pass the k of the fit"
        )
    n, gh, gw = maps.shape
    if n == 0:
        raise PatchAtlasError("cluster_maps hold no image")
    position = np.arange(gh * gw).reshape(1, gh, gw)
    codes = (position * k + maps.astype(np.int64)).ravel()
    counts = np.bincount(codes, minlength=gh * gw * k).reshape(gh, gw, k)
    return counts / float(n)


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    safe = np.where(p > 0, p, 1.0)
    return -(p * np.log(safe)).sum(axis=axis)


def positional_consistency(hist: np.ndarray) -> float:
    """How much of a clustering is decided by position alone, from a
    :func:`position_cluster_histogram` [gh, gw, k].

    Defined as the share of the cluster entropy that the position explains,

        consistency = I(position; cluster) / H(cluster)
                    = 1 − mean_p H(hist[p]) / H(mean_p hist[p]),

    with positions weighted equally (every image has every position). It is 1 when each
    position always gets the same cluster (a purely positional clustering: stripes, rings) and
    0 when every position sees the same cluster distribution (position-independent clusters).
    Unlike "mean of the largest share" it does not grow with cluster imbalance. With n images
    the plug-in entropies leave a small positive bias of about (k − 1) / (2 n H(cluster)) for
    position-independent clusterings. A clustering that uses a single cluster has no entropy to
    explain and scores 0.
    """
    h = np.asarray(hist, dtype=np.float64)
    if h.ndim != 3:
        raise PatchAtlasError(f"hist must be [gh, gw, k] shares, got shape {h.shape}")
    per_position = h.reshape(-1, h.shape[-1])
    if not np.allclose(per_position.sum(axis=1), 1.0, atol=1e-6):
        raise PatchAtlasError("hist rows must sum to 1 per position; pass position_cluster_histogram's output")
    total_entropy = float(_entropy(per_position.mean(axis=0)))
    if total_entropy <= 1e-12:
        return 0.0
    conditional = float(_entropy(per_position, axis=1).mean())
    return float(np.clip(1.0 - conditional / total_entropy, 0.0, 1.0))


def position_mode_map(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cluster each position falls in most often [gh, gw] (int64) and how often [gh, gw]:
    the "cluster map averaged over images" of the positional-bias figure."""
    h = np.asarray(hist, dtype=np.float64)
    if h.ndim != 3:
        raise PatchAtlasError(f"hist must be [gh, gw, k] shares, got shape {h.shape}")
    return h.argmax(axis=-1).astype(np.int64), h.max(axis=-1)
