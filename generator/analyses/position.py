"""Positional bias versus locality bias in patch tokens.

Two different reasons why nearby patches end up in the same cluster:

- **positional bias** — a token encodes *where* it is, so the same position lands in the same
  cluster whatever the image (stripes, border rings, corners). Measured by how consistently a
  position falls in one cluster across images (:func:`positional_consistency`), by how well a
  linear probe decodes (row, col) from a token on held-out images
  (:func:`position_decodability`), and, for the boundary artifact, by how far border-ring
  tokens sit from interior ones (:func:`border_score`, :func:`border_map`);
- **locality bias** — neighbouring patches are similar because they see similar content (smooth
  blobs). Measured by the mean cosine similarity of patch pairs against their grid distance,
  next to the similarity of random patches of different images (:func:`locality_curve`).

The ``content-free`` source (:mod:`generator.sources.content_free`) feeds inputs with no content
at all (constant colours, noise): any structure in their cluster maps comes from the model.

Token arguments are torch tensors [n_img, gh, gw, D]; the work runs on their device (float64
accumulations where sums grow large). Results are numpy arrays and Python floats.
"""

from __future__ import annotations

import numpy as np
import torch

from generator.errors import PatchAtlasError

__all__ = [
    "border_map",
    "border_score",
    "locality_curve",
    "position_cluster_histogram",
    "position_decodability",
    "position_mode_map",
    "positional_consistency",
]


# Largest temporary (in elements) the chunked loops allow themselves: 2**26 float32 = 256 MiB.
_CHUNK_ELEMENTS = 1 << 26


def _check_tokens(tokens: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 4:
        shape = tuple(tokens.shape) if hasattr(tokens, "shape") else type(tokens).__name__
        raise PatchAtlasError(f"{what}: tokens must be a torch.Tensor [n_img, gh, gw, D], got {shape}")
    if tokens.shape[0] < 1 or tokens.shape[1] < 1 or tokens.shape[2] < 1 or tokens.shape[3] < 1:
        raise PatchAtlasError(f"{what}: tokens {tuple(tokens.shape)} have an empty dimension")
    if not tokens.is_floating_point():
        tokens = tokens.to(torch.float32)
    return tokens


def _images_per_chunk(per_image_elements: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, per_image_elements))


# --------------------------------------------------------------------------------------------
# Cluster maps per position
# --------------------------------------------------------------------------------------------


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
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise PatchAtlasError(f"k must be a positive integer, got {k!r}")
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


# --------------------------------------------------------------------------------------------
# Linear decoding of the position
# --------------------------------------------------------------------------------------------


def _r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    residual = float(((pred - target) ** 2).sum())
    spread = float(((target - target.mean()) ** 2).sum())
    return 1.0 - residual / spread if spread > 0 else 0.0


def position_decodability(
    tokens: torch.Tensor,
    *,
    train_fraction: float = 0.5,
    seed: int = 0,
    ridge: float = 1e-3,
) -> dict:
    """How well a linear probe reads (row, col) out of a patch token, on images it never saw.

    Images (never patches: neighbouring patches of one image share content) are split at
    random into a training part (``train_fraction`` of them, at least one) and a held-out part.
    A ridge regression from the token to its row and to its column is solved in closed form in
    float64 on the tokens' device: features and targets are centred on the training means and
    W = (XᵀX + λ I)⁻¹ Xᵀy with λ = ``ridge`` · trace(XᵀX) / D, so the penalty is relative to
    the tokens' scale. Returns held-out ``row_r2`` and ``col_r2`` (coefficient of
    determination; 1 = exact, ≤ 0 = no better than predicting the mean position) and
    ``row_acc`` / ``col_acc`` (share of held-out patches whose prediction rounds to the right
    row / column), plus the split sizes.
    """
    tokens = _check_tokens(tokens, "position_decodability")
    n, gh, gw, dim = tokens.shape
    if n < 2:
        raise PatchAtlasError(f"position_decodability needs at least 2 images to hold some out, got {n}")
    if not 0.0 < train_fraction < 1.0:
        raise PatchAtlasError(f"train_fraction must lie in (0, 1), got {train_fraction!r}")
    if not ridge >= 0.0:
        raise PatchAtlasError(f"ridge must be >= 0, got {ridge!r}")
    if gh < 2 and gw < 2:
        raise PatchAtlasError(f"a {gh}×{gw} grid has no position to decode")

    device = tokens.device
    n_train = min(n - 1, max(1, int(round(n * train_fraction))))
    order = np.random.default_rng(seed).permutation(n)
    train_ids = torch.as_tensor(np.sort(order[:n_train]), device=device)
    test_ids = torch.as_tensor(np.sort(order[n_train:]), device=device)

    rows = torch.arange(gh, device=device, dtype=torch.float64).repeat_interleave(gw)
    cols = torch.arange(gw, device=device, dtype=torch.float64).repeat(gh)
    targets_one_image = torch.stack([rows, cols], dim=1)  # [gh*gw, 2]
    per_chunk = _images_per_chunk(gh * gw * dim)

    # Normal equations accumulated image chunk by image chunk; every image carries the same
    # targets, so the target sums are closed form.
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    x_sum = torch.zeros(dim, dtype=torch.float64, device=device)
    xy = torch.zeros(dim, 2, dtype=torch.float64, device=device)
    for start in range(0, n_train, per_chunk):
        idx = train_ids[start : start + per_chunk]
        x = tokens[idx].reshape(idx.numel(), gh * gw, dim).to(torch.float64)
        gram += torch.einsum("bpd,bpe->de", x, x)
        x_sum += x.sum(dim=(0, 1))
        xy += torch.einsum("bpd,pt->dt", x, targets_one_image)
    count = n_train * gh * gw
    x_mean = x_sum / count
    y_mean = targets_one_image.mean(dim=0)
    gram_c = gram - count * torch.outer(x_mean, x_mean)
    xy_c = xy - count * torch.outer(x_mean, y_mean)
    lam = ridge * float(torch.diagonal(gram_c).sum()) / dim
    system = gram_c + lam * torch.eye(dim, dtype=torch.float64, device=device)
    if lam > 0:
        weights = torch.linalg.solve(system, xy_c)
    else:
        weights = torch.linalg.pinv(system, hermitian=True) @ xy_c

    preds = []
    for start in range(0, test_ids.numel(), per_chunk):
        idx = test_ids[start : start + per_chunk]
        x = tokens[idx].reshape(-1, dim).to(torch.float64)
        preds.append((x - x_mean) @ weights + y_mean)
    pred = torch.cat(preds)
    truth = targets_one_image.repeat(test_ids.numel(), 1)
    upper = torch.tensor([gh - 1, gw - 1], dtype=torch.float64, device=device)
    hit = torch.round(pred).clamp(min=torch.zeros_like(upper), max=upper) == truth
    return {
        "row_r2": _r2(pred[:, 0], truth[:, 0]),
        "col_r2": _r2(pred[:, 1], truth[:, 1]),
        "row_acc": float(hit[:, 0].double().mean()),
        "col_acc": float(hit[:, 1].double().mean()),
        "n_train_images": int(n_train),
        "n_test_images": int(test_ids.numel()),
    }


# --------------------------------------------------------------------------------------------
# Locality
# --------------------------------------------------------------------------------------------


def _chebyshev_pairs(gh: int, gw: int, max_distance: int, device: torch.device):
    """Ordered pairs of distinct grid positions grouped by Chebyshev distance 1..max_distance:
    flat pair indices sorted by distance and the segment boundaries of each distance."""
    r = torch.arange(gh, device=device).repeat_interleave(gw)
    c = torch.arange(gw, device=device).repeat(gh)
    dist = torch.maximum((r[:, None] - r[None, :]).abs(), (c[:, None] - c[None, :]).abs()).flatten()
    keep = (dist >= 1) & (dist <= max_distance)
    pair_index = torch.nonzero(keep).flatten()
    pair_dist = dist[pair_index]
    order = torch.argsort(pair_dist, stable=True)
    pair_index, pair_dist = pair_index[order], pair_dist[order]
    counts = torch.bincount(pair_dist, minlength=max_distance + 1)[1:]
    return pair_index, counts


def locality_curve(
    tokens: torch.Tensor, max_distance: int | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean cosine similarity of two patches of one image against their grid distance.

    Distance is the Chebyshev distance max(|Δrow|, |Δcol|), so distance 1 is the 8-neighbourhood
    and every distance is a square ring. For each d in 1..``max_distance`` (default: the largest
    the grid allows) the mean runs over all ordered pairs of distinct patches at distance d in
    every image. The ``random_baseline`` is the mean cosine similarity over all pairs of patches
    taken from two *different* images — computed exactly from per-image sums of unit tokens, not
    sampled. Locality bias shows as a curve that starts above the baseline and decays to it;
    tokens that ignore their neighbours give a flat curve at the baseline.

    Returns (distances int64 [m], mean_cosine float64 [m], random_baseline float).
    """
    tokens = _check_tokens(tokens, "locality_curve")
    n, gh, gw, dim = tokens.shape
    largest = max(gh, gw) - 1
    if largest < 1:
        raise PatchAtlasError(f"a {gh}×{gw} grid has no pair of patches")
    if max_distance is None:
        max_distance = largest
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)) or max_distance < 1:
        raise PatchAtlasError(f"max_distance must be a positive integer, got {max_distance!r}")
    max_distance = min(int(max_distance), largest)
    if n < 2:
        raise PatchAtlasError("locality_curve needs at least 2 images for the between-image baseline")

    device = tokens.device
    n_pos = gh * gw
    pair_index, counts = _chebyshev_pairs(gh, gw, max_distance, device)
    per_chunk = _images_per_chunk(n_pos * max(n_pos, dim))
    pair_sums = torch.zeros(pair_index.numel(), dtype=torch.float64, device=device)
    image_sums = torch.zeros(n, dim, dtype=torch.float64, device=device)
    for start in range(0, n, per_chunk):
        x = tokens[start : start + per_chunk].reshape(-1, n_pos, dim).to(torch.float32)
        unit = torch.nn.functional.normalize(x, dim=-1)
        cos = unit @ unit.transpose(1, 2)  # [b, n_pos, n_pos]
        pair_sums += cos.reshape(cos.shape[0], -1)[:, pair_index].to(torch.float64).sum(dim=0)
        image_sums[start : start + x.shape[0]] = unit.to(torch.float64).sum(dim=1)

    # Sum per distance from a cumulative sum over the distance-sorted pairs: deterministic on
    # every device, unlike scattered atomic adds.
    cumulative = torch.cumsum(pair_sums, dim=0)
    ends = torch.cumsum(counts, dim=0) - 1
    totals = cumulative[ends]
    totals = torch.cat([totals[:1], totals[1:] - totals[:-1]])
    denom = counts.to(torch.float64) * n
    mean_cosine = torch.where(denom > 0, totals / denom.clamp_min(1), torch.nan)

    everything = image_sums.sum(dim=0)
    between = float(everything @ everything) - float((image_sums * image_sums).sum())
    random_baseline = between / (n_pos * n_pos * n * (n - 1))
    distances = np.arange(1, max_distance + 1, dtype=np.int64)
    return distances, mean_cosine.cpu().numpy(), float(random_baseline)


# --------------------------------------------------------------------------------------------
# Boundary artifacts
# --------------------------------------------------------------------------------------------


def _ring_mask(gh: int, gw: int, ring: int, device: torch.device) -> torch.Tensor:
    r = torch.arange(gh, device=device)[:, None]
    c = torch.arange(gw, device=device)[None, :]
    return (r < ring) | (r >= gh - ring) | (c < ring) | (c >= gw - ring)


def _position_means(tokens: torch.Tensor) -> torch.Tensor:
    """Mean token per grid position over all images, float64 [gh, gw, D]."""
    n, gh, gw, dim = tokens.shape
    total = torch.zeros(gh, gw, dim, dtype=torch.float64, device=tokens.device)
    per_chunk = _images_per_chunk(gh * gw * dim)
    for start in range(0, n, per_chunk):
        total += tokens[start : start + per_chunk].to(torch.float64).sum(dim=0)
    return total / n


def _mean_squared_distance(tokens: torch.Tensor, centre: torch.Tensor, where: torch.Tensor) -> float:
    """Mean over images and the positions in ``where`` of ||token − centre||²."""
    n, gh, gw, dim = tokens.shape
    total = 0.0
    per_chunk = _images_per_chunk(gh * gw * dim)
    for start in range(0, n, per_chunk):
        x = tokens[start : start + per_chunk][:, where].to(torch.float64)
        total += float(((x - centre) ** 2).sum())
    return total / (n * int(where.sum()))


def border_score(tokens: torch.Tensor, ring: int = 1) -> float:
    """How far border tokens sit from interior tokens, in units of the interior tokens' spread.

    With B the ``ring`` outermost rows and columns of the grid and I the rest, and means taken
    over all images,

        score = ||mean_B(x) − mean_I(x)|| / sqrt(mean_I ||x − mean_I(x)||²).

    The denominator is the root-mean-square distance of interior tokens from their mean, so the
    score is unit-free and comparable across models and layers. Tokens that do not depend on
    position score ~0 (only sampling noise, shrinking as 1/sqrt(number of tokens)); a component
    shared by border tokens scores its length relative to the content spread. Per-image offsets
    cancel, since every image contributes to both means.
    """
    tokens = _check_tokens(tokens, "border_score")
    n, gh, gw, dim = tokens.shape
    if isinstance(ring, bool) or not isinstance(ring, (int, np.integer)) or ring < 1:
        raise PatchAtlasError(f"ring must be a positive integer, got {ring!r}")
    if gh <= 2 * ring or gw <= 2 * ring:
        raise PatchAtlasError(f"a {gh}×{gw} grid has no interior inside a ring of width {ring}")
    border = _ring_mask(gh, gw, ring, tokens.device)
    means = _position_means(tokens)
    border_mean = means[border].mean(dim=0)
    interior_mean = means[~border].mean(dim=0)
    spread = _mean_squared_distance(tokens, interior_mean, ~border) ** 0.5
    gap = float(torch.linalg.vector_norm(border_mean - interior_mean))
    if spread == 0.0:
        return 0.0 if gap == 0.0 else float("inf")
    return gap / spread


def border_map(tokens: torch.Tensor) -> np.ndarray:
    """Per-position deviation of the mean token from the global mean token, float64 [gh, gw].

    map[p] = ||mean_images(x_p) − mean_all(x)|| / sqrt(mean_all ||x − mean_all(x)||²): averaging
    over images first removes content, so what remains is what a position adds whatever the
    image — a ring lights up for a border artifact, and a position-independent model gives a
    flat map near 0. Same units as :func:`border_score` (spread of all tokens here).
    """
    tokens = _check_tokens(tokens, "border_map")
    n, gh, gw, dim = tokens.shape
    means = _position_means(tokens)
    global_mean = means.reshape(-1, dim).mean(dim=0)
    everywhere = torch.ones(gh, gw, dtype=torch.bool, device=tokens.device)
    spread = _mean_squared_distance(tokens, global_mean, everywhere) ** 0.5
    deviation = torch.linalg.vector_norm(means - global_mean, dim=-1)
    if spread == 0.0:
        return np.zeros((gh, gw), dtype=np.float64)
    return (deviation / spread).cpu().numpy()
