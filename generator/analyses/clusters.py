"""Joint unsupervised segmentation: k-means over the patch tokens of many images at once.

One k-means model is fitted on the tokens of every image together, so a cluster id means the
same thing in every image of a gallery. Clusters are then matched one-to-one to ground-truth
classes with the Hungarian algorithm (the metric of STEGO, Hamilton et al. 2022) to report an
mIoU and to colour matched clusters with their class's colour, so that the same class has the
same colour across images, layers and models.

Everything here is pure: tensors and arrays in, results out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from generator.analyses._checks import check_positive_int
from generator.errors import PatchAtlasError

__all__ = [
    "KMeansResult",
    "MatchResult",
    "SegmentationResult",
    "chance_miou",
    "display_ids",
    "hungarian_match",
    "joint_kmeans_segmentation",
    "kmeans",
    "match_from_confusion",
]

# Display ids and cluster maps are stored as int16.
_INT16_MAX = int(np.iinfo(np.int16).max)


# --------------------------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------------------------


@dataclass
class KMeansResult:
    """A fitted k-means model: centroids [k, D] (float32), labels [N] (int64) on the input's
    device, the inertia (sum of squared distances to the assigned centroid) and the number of
    Lloyd iterations the best initialisation ran."""

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int


def _working_dtype(x: torch.Tensor) -> torch.dtype:
    # Half precision loses too much in ||x||^2 - 2 x.c + ||c||^2; float64 input keeps its precision.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _nearest_centroid(
    x: torch.Tensor, x_sq: torch.Tensor, centroids: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid for every row of ``x``.

    Distances are expanded as ||x||^2 - 2 x c^T + ||c||^2 and computed ``chunk_size`` rows at a
    time, so the largest temporary is [chunk_size, k] whatever N is.
    """
    c_sq = (centroids * centroids).sum(dim=1)
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    min_dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        stop = min(start + chunk_size, x.shape[0])
        dist = torch.addmm(c_sq.unsqueeze(0), x[start:stop], centroids.T, alpha=-2.0)
        dist.add_(x_sq[start:stop].unsqueeze(1))
        best, idx = dist.min(dim=1)
        # Cancellation in the expansion can leave tiny negatives for points on a centroid.
        min_dist[start:stop] = best.clamp_min_(0.0)
        labels[start:stop] = idx
    return labels, min_dist


def _squared_distances(
    x: torch.Tensor, x_sq: torch.Tensor, points: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """All squared distances [N, m] from the rows of ``x`` to a few ``points`` (m small)."""
    p_sq = (points * points).sum(dim=1)
    out = torch.empty(x.shape[0], points.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        stop = min(start + chunk_size, x.shape[0])
        dist = torch.addmm(p_sq.unsqueeze(0), x[start:stop], points.T, alpha=-2.0)
        dist.add_(x_sq[start:stop].unsqueeze(1))
        out[start:stop] = dist.clamp_min_(0.0)
    return out


def _sample_proportional(
    weights: torch.Tensor, n: int, generator: torch.Generator
) -> torch.Tensor:
    """Draw ``n`` indices with probability proportional to ``weights`` (with replacement).

    Inverse-CDF sampling on a float64 cumulative sum rather than ``torch.multinomial``, which
    refuses more than 2**24 categories on CUDA; a joint fit easily has more tokens than that.
    """
    cdf = torch.cumsum(weights.to(torch.float64), dim=0)
    total = cdf[-1]
    u = torch.rand(n, generator=generator, device=weights.device, dtype=torch.float64) * total
    idx = torch.searchsorted(cdf, u, right=True)
    return idx.clamp_(max=weights.shape[0] - 1)


def _kmeans_plus_plus(
    x: torch.Tensor, x_sq: torch.Tensor, k: int, generator: torch.Generator, chunk_size: int
) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, as in scikit-learn): each new
    centre is the best of 2 + log(k) candidates drawn proportionally to the squared distance to
    the closest centre chosen so far."""
    n = x.shape[0]
    n_trials = 2 + int(math.log(k))
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = torch.randint(n, (1,), generator=generator, device=x.device)
    centroids[0] = x[first[0]]
    closest = _squared_distances(x, x_sq, centroids[:1], chunk_size)[:, 0]
    for c in range(1, k):
        if float(closest.sum()) <= 0.0:
            # Every point already sits on a centre (fewer distinct points than k): any point
            # will do; empty clusters are re-seeded later.
            candidates = torch.randint(n, (n_trials,), generator=generator, device=x.device)
        else:
            candidates = _sample_proportional(closest, n_trials, generator)
        cand_dist = _squared_distances(x, x_sq, x[candidates], chunk_size)
        potentials = torch.minimum(closest.unsqueeze(1), cand_dist)
        best = int(torch.argmin(potentials.sum(dim=0, dtype=torch.float64)))
        centroids[c] = x[candidates[best]]
        closest = potentials[:, best].contiguous()
    return centroids


def _cluster_sums(
    x: torch.Tensor, labels: torch.Tensor, k: int, chunk_size: int
) -> torch.Tensor:
    """Per-cluster sums of the rows of ``x`` in float64, chunk by chunk."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        stop = min(start + chunk_size, x.shape[0])
        rows = x[start:stop].to(torch.float64)
        if x.device.type == "cpu":
            sums.index_add_(0, labels[start:stop], rows)
        else:
            # index_add_ on accelerators accumulates with atomics in no fixed order, which would
            # make a fit depend on scheduling; a one-hot matmul is reproducible.
            one_hot = F.one_hot(labels[start:stop], k).to(torch.float64)
            sums += one_hot.T @ rows
    return sums


def _lloyd(
    x: torch.Tensor,
    x_sq: torch.Tensor,
    centroids: torch.Tensor,
    *,
    max_iter: int,
    shift_tol: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Lloyd iterations from ``centroids``; returns centroids, labels, inertia, iterations."""
    k = centroids.shape[0]
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - read after the loop: the iterations run
        labels, min_dist = _nearest_centroid(x, x_sq, centroids, chunk_size)
        counts = torch.bincount(labels, minlength=k)
        sums = _cluster_sums(x, labels, k, chunk_size)
        new_centroids = (sums / counts.clamp_min(1).unsqueeze(1).to(torch.float64)).to(x.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel() > 0:
            # An empty cluster restarts at the points worst served by the current centroids.
            farthest = torch.topk(min_dist, empty.numel()).indices
            new_centroids[empty] = x[farthest]
        shift = float(((new_centroids - centroids).to(torch.float64) ** 2).sum())
        centroids = new_centroids
        if shift <= shift_tol:
            break
    # Labels and inertia always refer to the centroids that are returned.
    labels, min_dist = _nearest_centroid(x, x_sq, centroids, chunk_size)
    inertia = float(min_dist.sum(dtype=torch.float64))
    return centroids, labels, inertia, n_iter


def _row_squared_norms(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """||x_i||^2 for every row, chunk by chunk so no [N, D] temporary is made."""
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        rows = x[start : start + chunk_size]
        out[start : start + chunk_size] = (rows * rows).sum(dim=1)
    return out


def _mean_feature_variance(x: torch.Tensor, chunk_size: int) -> float:
    """Mean over features of the per-feature variance, two passes in float64, chunk by chunk
    (a float64 copy of all tokens would double the memory of a large joint fit)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        total += x[start : start + chunk_size].sum(dim=0, dtype=torch.float64)
    mean = total / x.shape[0]
    squares = torch.zeros_like(mean)
    for start in range(0, x.shape[0], chunk_size):
        centred = x[start : start + chunk_size].to(torch.float64) - mean
        squares += (centred * centred).sum(dim=0)
    return float((squares / x.shape[0]).mean())


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    n_init: int = 3,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    chunk_size: int = 65536,
) -> KMeansResult:
    """Lloyd's k-means on ``x`` [N, D] with greedy k-means++ seeding, best of ``n_init``.

    Runs on ``x.device``; bfloat16/float16 inputs are computed in float32 (float64 stays
    float64). Convergence follows scikit-learn: stop when the summed squared centroid shift is
    at most ``tol`` times the mean per-feature variance of ``x``. The result is deterministic
    for a ``seed`` on a given device. Distances use float32 matmuls: if TF32 matmuls are
    enabled globally on a GPU they lose precision, so leave them off for clustering.
    """
    if not isinstance(x, torch.Tensor):
        raise PatchAtlasError(f"k-means: x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise PatchAtlasError(f"k-means: x must be 2-D [N, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.to(torch.float32)
    check_positive_int(k, "k")
    check_positive_int(n_init, "n_init")
    check_positive_int(max_iter, "max_iter")
    check_positive_int(chunk_size, "chunk_size")
    n = x.shape[0]
    if k > n:
        raise PatchAtlasError(f"k-means: k={k} exceeds the number of points N={n}; lower k")
    if not (tol >= 0.0):
        raise PatchAtlasError(f"k-means: tol must be >= 0, got {tol!r}")
    x = x.to(_working_dtype(x)).contiguous()
    if not all(bool(torch.isfinite(x[i : i + chunk_size]).all()) for i in range(0, n, chunk_size)):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise PatchAtlasError(
            f"k-means: x contains {n_nan} NaN and {n_inf} infinite values; "
            "clean or drop those tokens before clustering"
        )

    x_sq = _row_squared_norms(x, chunk_size)
    shift_tol = tol * _mean_feature_variance(x, chunk_size)
    generator = torch.Generator(device=x.device)
    generator.manual_seed(int(seed))

    best: KMeansResult | None = None
    for _ in range(n_init):
        init = _kmeans_plus_plus(x, x_sq, k, generator, chunk_size)
        centroids, labels, inertia, n_iter = _lloyd(
            x, x_sq, init, max_iter=max_iter, shift_tol=shift_tol, chunk_size=chunk_size
        )
        if best is None or inertia < best.inertia:
            best = KMeansResult(centroids.to(torch.float32), labels, inertia, n_iter)
    assert best is not None
    return best


# --------------------------------------------------------------------------------------------
# Hungarian matching against ground truth
# --------------------------------------------------------------------------------------------


@dataclass
class MatchResult:
    """Clusters matched one-to-one to classes.

    ``confusion[j, c]`` counts non-ignored pixels (or patches) in cluster j with true class c.
    ``cluster_to_class[j]`` is the class cluster j is matched to, or -1.
    ``per_class_iou[c]`` is nan for a class absent from the target (it never takes part in the
    matching, so it is then also absent from the matched predictions).
    """

    miou: float
    per_class_iou: np.ndarray
    pixel_accuracy: float
    cluster_to_class: np.ndarray
    confusion: np.ndarray


def _check_ids(name: str, values: np.ndarray, upper: int, ignore_index: int | None) -> None:
    valid = (values >= 0) & (values < upper)
    if ignore_index is not None:
        valid |= values == ignore_index
    if not bool(valid.all()):
        bad = np.unique(values[~valid])[:5].tolist()
        allowed = f"[0, {upper})" + (f" or {ignore_index}" if ignore_index is not None else "")
        raise PatchAtlasError(f"{name} holds ids {bad} outside {allowed}; check n_clusters/n_classes")


def _as_int_array(name: str, values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.integer):
        raise PatchAtlasError(f"{name} must hold integer ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def hungarian_match(
    pred: np.ndarray,
    target: np.ndarray,
    n_clusters: int,
    n_classes: int,
    ignore_index: int = 255,
) -> MatchResult:
    """Match clusters to classes one-to-one and score the matched prediction (STEGO's metric).

    Convention:
    - Pixels whose target is ``ignore_index`` are left out of everything.
    - Only classes present in the target take part; the assignment maximises the number of
      pixels whose cluster is matched to their class (``scipy.optimize.linear_sum_assignment``),
      so with k < C some classes stay unmatched and with k > C some clusters do. A pair with
      zero overlap is not kept as a match.
    - For a class c matched to cluster j: TP = confusion[j, c], FP = the rest of cluster j,
      FN = the pixels of class c outside cluster j. Pixels of unmatched clusters are therefore
      false negatives of the class they cover; an unmatched present class has IoU 0.
    - mIoU is the mean IoU over classes present in the target; pixel accuracy is the matched
      (TP) fraction of non-ignored pixels.
    """
    check_positive_int(n_clusters, "n_clusters")
    check_positive_int(n_classes, "n_classes")
    pred = _as_int_array("pred", pred)
    target = _as_int_array("target", target)
    if pred.shape != target.shape:
        raise PatchAtlasError(
            f"pred shape {pred.shape} differs from target shape {target.shape}; "
            "they must be label maps of the same images"
        )
    if 0 <= ignore_index < n_classes:
        raise PatchAtlasError(
            f"ignore_index={ignore_index} collides with a class id (n_classes={n_classes})"
        )
    keep = target != ignore_index
    if not bool(keep.any()):
        raise PatchAtlasError("target has no labelled pixels (all are ignore_index); nothing to score")
    p = pred[keep]
    t = target[keep]
    _check_ids("pred", p, n_clusters, None)
    _check_ids("target", t, n_classes, None)

    confusion = np.bincount(p * n_classes + t, minlength=n_clusters * n_classes)
    confusion = confusion.reshape(n_clusters, n_classes).astype(np.int64)
    return match_from_confusion(confusion)


def match_from_confusion(confusion: np.ndarray) -> MatchResult:
    """The Hungarian matching and its scores from a confusion matrix [n_clusters, n_classes]
    of non-ignored pixels (``confusion[j, c]``: pixels in cluster j with true class c).

    The convention is :func:`hungarian_match`'s, which builds the matrix from label maps and
    calls this; a caller that counts pixels chunk by chunk calls it directly.
    """
    confusion = _as_int_array("confusion", confusion)
    if confusion.ndim != 2 or 0 in confusion.shape:
        raise PatchAtlasError(
            f"confusion must be a 2-D [n_clusters, n_classes] count matrix, got shape {confusion.shape}"
        )
    if bool((confusion < 0).any()):
        raise PatchAtlasError("confusion holds negative counts; it must count pixels")
    if int(confusion.sum()) == 0:
        raise PatchAtlasError("confusion counts no labelled pixels; nothing to score")
    n_clusters, n_classes = confusion.shape

    class_count = confusion.sum(axis=0)
    cluster_count = confusion.sum(axis=1)
    present = np.flatnonzero(class_count > 0)
    rows, cols = linear_sum_assignment(confusion[:, present], maximize=True)
    cols = present[cols]
    matched = confusion[rows, cols] > 0
    rows, cols = rows[matched], cols[matched]

    cluster_to_class = np.full(n_clusters, -1, dtype=np.int64)
    cluster_to_class[rows] = cols

    tp = np.zeros(n_classes, dtype=np.float64)
    fp = np.zeros(n_classes, dtype=np.float64)
    tp[cols] = confusion[rows, cols]
    fp[cols] = cluster_count[rows] - confusion[rows, cols]
    fn = class_count - tp
    per_class_iou = np.full(n_classes, np.nan, dtype=np.float64)
    per_class_iou[present] = tp[present] / (tp[present] + fp[present] + fn[present])

    return MatchResult(
        miou=float(per_class_iou[present].mean()),
        per_class_iou=per_class_iou,
        pixel_accuracy=float(tp.sum() / class_count.sum()),
        cluster_to_class=cluster_to_class,
        confusion=confusion,
    )


def display_ids(labels: np.ndarray, cluster_to_class: np.ndarray, n_classes: int) -> np.ndarray:
    """Relabel cluster ids for colouring: a cluster matched to class c becomes c, and the
    unmatched clusters become n_classes, n_classes + 1, ... in order of cluster id.

    Because matched clusters take their class's id, the same class gets the same colour in
    every image of a joint fit and across models and layers.
    """
    check_positive_int(n_classes, "n_classes")
    labels = _as_int_array("labels", labels)
    mapping = _as_int_array("cluster_to_class", cluster_to_class)
    if mapping.ndim != 1:
        raise PatchAtlasError(f"cluster_to_class must be 1-D [k], got shape {mapping.shape}")
    if bool(((mapping < -1) | (mapping >= n_classes)).any()):
        raise PatchAtlasError(f"cluster_to_class holds ids outside [-1, {n_classes})")
    matched = mapping[mapping >= 0]
    if np.unique(matched).size != matched.size:
        raise PatchAtlasError("cluster_to_class matches two clusters to one class; it must be one-to-one")
    _check_ids("labels", labels, mapping.shape[0], None)
    lut = mapping.copy()
    unmatched = np.flatnonzero(mapping < 0)
    lut[unmatched] = n_classes + np.arange(unmatched.size)
    return lut[labels]


# --------------------------------------------------------------------------------------------
# The joint segmentation protocol
# --------------------------------------------------------------------------------------------


@dataclass
class SegmentationResult:
    """One joint k-means fit over a set of images, matched to their ground truth.

    ``cluster_maps`` and ``display_maps`` are [n_img, gh, gw] int16; ``l2_normalized`` records
    whether tokens were L2-normalised before clustering.
    """

    k: int
    seed: int
    cluster_maps: np.ndarray
    display_maps: np.ndarray
    match: MatchResult
    inertia: float
    l2_normalized: bool


def _l2_normalized_rows(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Rows scaled to unit L2 norm in the working dtype (zero rows stay zero), written chunk by
    chunk into one new tensor so a half-precision input is never copied twice."""
    dtype = _working_dtype(x) if x.is_floating_point() else torch.float32
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        rows = x[start : start + chunk_size].to(dtype)
        out[start : start + chunk_size] = F.normalize(rows, p=2.0, dim=1)
    return out


def joint_kmeans_segmentation(
    tokens: torch.Tensor,
    labels: np.ndarray,
    k: int,
    n_classes: int,
    *,
    ignore_index: int = 255,
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 100,
    l2_normalize: bool = True,
    chunk_size: int = 65536,
) -> SegmentationResult:
    """Fit one k-means on the patch tokens [n_img, gh, gw, D] of all images together, and match
    the clusters to the patch labels [n_img, gh, gw].

    With ``l2_normalize`` tokens are projected to the unit sphere first, so clusters follow
    direction (cosine similarity) rather than the norm, which in ViTs is dominated by a few
    high-norm artifact tokens.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 4:
        shape = tuple(tokens.shape) if hasattr(tokens, "shape") else type(tokens).__name__
        raise PatchAtlasError(f"tokens must be a torch.Tensor [n_img, gh, gw, D], got {shape}")
    labels = _as_int_array("labels", labels)
    if labels.shape != tuple(tokens.shape[:3]):
        raise PatchAtlasError(
            f"labels shape {labels.shape} does not match the token grid {tuple(tokens.shape[:3])}"
        )
    check_positive_int(n_classes, "n_classes")
    check_positive_int(k, "k")
    if n_classes + k > _INT16_MAX:
        raise PatchAtlasError(f"n_classes + k = {n_classes + k} does not fit the int16 display ids")

    n_img, gh, gw, dim = tokens.shape
    flat = tokens.reshape(-1, dim)
    if l2_normalize:
        flat = _l2_normalized_rows(flat, chunk_size)
    fit = kmeans(flat, k, n_init=n_init, max_iter=max_iter, seed=seed, chunk_size=chunk_size)

    cluster_maps = fit.labels.cpu().numpy().reshape(n_img, gh, gw)
    match = hungarian_match(cluster_maps, labels, k, n_classes, ignore_index=ignore_index)
    shown = display_ids(cluster_maps, match.cluster_to_class, n_classes)
    return SegmentationResult(
        k=int(k),
        seed=int(seed),
        cluster_maps=cluster_maps.astype(np.int16),
        display_maps=shown.astype(np.int16),
        match=match,
        inertia=fit.inertia,
        l2_normalized=bool(l2_normalize),
    )


def chance_miou(
    target: np.ndarray,
    n_clusters: int,
    n_classes: int,
    ignore_index: int = 255,
    seed: int = 0,
    n_permutations: int = 5,
    *,
    pred: np.ndarray | None = None,
) -> float:
    """Hungarian mIoU of cluster assignments that carry no information about the target.

    With ``pred`` given, its cluster ids are shuffled among the labelled pixels, which keeps
    its cluster-size histogram exactly; without it, ids are drawn uniformly. The mean over
    ``n_permutations`` draws is the control baseline: the Hungarian matching picks the best of
    many pairings, so even uninformative clusters score above zero.
    """
    check_positive_int(n_permutations, "n_permutations")
    target = _as_int_array("target", target)
    keep = target != ignore_index
    if pred is not None:
        pred = _as_int_array("pred", pred)
        if pred.shape != target.shape:
            raise PatchAtlasError(f"pred shape {pred.shape} differs from target shape {target.shape}")
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(n_permutations):
        shuffled = np.zeros_like(target)
        if pred is None:
            shuffled[keep] = rng.integers(0, n_clusters, size=int(keep.sum()))
        else:
            shuffled[keep] = rng.permutation(pred[keep])
        scores.append(hungarian_match(shuffled, target, n_clusters, n_classes, ignore_index).miou)
    return float(np.mean(scores))
