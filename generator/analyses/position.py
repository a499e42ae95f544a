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

from generator.analyses._checks import check_int, check_positive_int

# Numpy only, so that the render stage draws the position-mode maps without torch.
from generator.analyses.position_histograms import (
    position_cluster_histogram,
    position_mode_map,
    positional_consistency,
)
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


# --------------------------------------------------------------------------------------------
# Linear decoding of the position
# --------------------------------------------------------------------------------------------


# Ridge strengths tried by the cross-validation, relative to the mean eigenvalue of the centred
# training Gram matrix (trace / D), so the grid follows the tokens' scale. The top of the grid
# shrinks the probe to predicting the mean position (R² ≈ 0), which CV picks when there is no
# position to read.
RIDGE_GRID = tuple(float(a) for a in np.logspace(-6, 4, 21))
CV_FOLDS = 5


def _r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    residual = float(((pred - target) ** 2).sum())
    spread = float(((target - target.mean()) ** 2).sum())
    return 1.0 - residual / spread if spread > 0 else 0.0


def _shuffled_targets(targets: torch.Tensor, n_img: int, seed: int) -> torch.Tensor:
    """Per image, the (row, col) targets permuted over the patches: the chance-level control.
    Tokens keep their content and their statistics; only their link to a position is cut."""
    rng = np.random.default_rng([seed, 1])
    order = torch.as_tensor(np.stack([rng.permutation(targets.shape[0]) for _ in range(n_img)]),
                            device=targets.device)
    return targets[order]  # [n_img, P, 2]


class _Moments:
    """Sums over one group of images that fix any ridge fit on them: Σx xᵀ, Σx, Σx yᵀ, Σy, Σy²."""

    def __init__(self, dim: int, n_targets: int, device: torch.device):
        f64 = torch.float64
        self.gram = torch.zeros(dim, dim, dtype=f64, device=device)
        self.x = torch.zeros(dim, dtype=f64, device=device)
        self.xy = torch.zeros(dim, n_targets, dtype=f64, device=device)
        self.y = torch.zeros(n_targets, dtype=f64, device=device)
        self.yy = torch.zeros(n_targets, dtype=f64, device=device)
        self.count = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:  # x [m, D], y [m, T], float64
        self.gram += x.T @ x
        self.x += x.sum(dim=0)
        self.xy += x.T @ y
        self.y += y.sum(dim=0)
        self.yy += (y * y).sum(dim=0)
        self.count += x.shape[0]

    def __add__(self, other: _Moments) -> _Moments:
        total = _Moments(self.x.numel(), self.y.numel(), self.x.device)
        for name in ("gram", "x", "xy", "y", "yy"):
            setattr(total, name, getattr(self, name) + getattr(other, name))
        total.count = self.count + other.count
        return total


class _RidgePath:
    """Ridge fits of every strength on one training set, from one eigendecomposition of its
    centred Gram matrix: W(λ) = V diag(1 / (e + λ)) Vᵀ Xᵀy, the closed form of sklearn's Ridge
    with an intercept (features and targets centred on the training means)."""

    def __init__(self, train: _Moments):
        n = train.count
        self.x_mean, self.y_mean = train.x / n, train.y / n
        gram_c = train.gram - n * torch.outer(self.x_mean, self.x_mean)
        self.scale = float(torch.diagonal(gram_c).sum()) / gram_c.shape[0]
        self.eigval, self.eigvec = torch.linalg.eigh(gram_c)
        self.eigval = self.eigval.clamp_min(0.0)
        self.proj = self.eigvec.T @ (train.xy - n * torch.outer(self.x_mean, self.y_mean))

    def weights(self, lam: float) -> torch.Tensor:
        if lam > 0:
            inverse = 1.0 / (self.eigval + lam)
        else:  # λ = 0: the minimum-norm least-squares solution
            keep = self.eigval > self.eigval.max() * 1e-12
            inverse = torch.where(keep, 1.0 / torch.where(keep, self.eigval, 1.0), 0.0)
        return self.eigvec @ (inverse[:, None] * self.proj)

    def squared_error(self, lam: float, held: _Moments) -> torch.Tensor:
        """Σ (y − ŷ)² per target over the images summarised by ``held``, without their tokens."""
        w = self.weights(lam)
        n = held.count
        gram = held.gram - torch.outer(held.x, self.x_mean) - torch.outer(self.x_mean, held.x) \
            + n * torch.outer(self.x_mean, self.x_mean)  # Σ (x − μx)(x − μx)ᵀ
        xy = held.xy - torch.outer(held.x, self.y_mean) - torch.outer(self.x_mean, held.y) \
            + n * torch.outer(self.x_mean, self.y_mean)  # Σ (x − μx)(y − μy)ᵀ
        yy = held.yy - 2 * self.y_mean * held.y + n * self.y_mean**2  # Σ (y − μy)²
        return yy - 2 * (w * xy).sum(dim=0) + (w * (gram @ w)).sum(dim=0)


def position_decodability(
    tokens: torch.Tensor,
    *,
    train_fraction: float = 0.5,
    seed: int = 0,
    ridge_grid: tuple[float, ...] = RIDGE_GRID,
    cv_folds: int = CV_FOLDS,
) -> dict:
    """How well a linear probe reads (row, col) out of a patch token, on images it never saw.

    Images (never patches: neighbouring patches of one image share content) are split at
    random into a training part (``train_fraction`` of them, at least one) and a held-out part.
    A ridge regression from the token to its row and column (intercept included) is solved in
    closed form in float64 on the tokens' device. Its strength is chosen by cross-validation
    over the training images, in ``cv_folds`` folds of whole images (training image i of the
    shuffled order goes to fold i mod folds) over λ = a · trace(XᵀX) / D for a in
    ``ridge_grid`` (X the centred tokens the fit sees, so a is free of the tokens' scale). The
    a with the smallest validation squared error, summed over folds, rows and columns, is
    refitted on all training images. With a single training image there is nothing to
    cross-validate and the strongest λ of the grid is used.

    The same pipeline (its own cross-validation included) run on targets shuffled over the
    patches of each image gives the **chance level**: what this probe scores on these tokens
    when they carry no position. Returns held-out ``row_r2`` / ``col_r2`` (coefficient of
    determination: 1 = exact, 0 = no better than predicting the mean position, < 0 = worse),
    ``row_chance_r2`` / ``col_chance_r2``, ``row_acc`` / ``col_acc`` (share of held-out patches
    whose prediction rounds to the right row / column) and the chance accuracies, ``alpha``
    (the chosen λ, as sklearn's Ridge ``alpha`` on these tokens in float64), ``relative_alpha``
    (a), ``cv_folds`` (0 without cross-validation), ``train_images`` (in fold order: image i of
    the list is in fold i mod ``cv_folds``), ``ridge_grid`` and the split sizes.
    """
    tokens = _check_tokens(tokens, "position_decodability")
    n, gh, gw, dim = tokens.shape
    if n < 2:
        raise PatchAtlasError(f"position_decodability needs at least 2 images to hold some out, got {n}")
    if not 0.0 < train_fraction < 1.0:
        raise PatchAtlasError(f"train_fraction must lie in (0, 1), got {train_fraction!r}")
    grid = np.asarray(ridge_grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 1 or not (np.isfinite(grid) & (grid >= 0)).all():
        raise PatchAtlasError(f"ridge_grid must be a non-empty sequence of finite strengths >= 0, got {ridge_grid!r}")
    check_int(cv_folds, "cv_folds", 2)
    if gh < 2 and gw < 2:
        raise PatchAtlasError(f"a {gh}×{gw} grid has no position to decode")

    device = tokens.device
    n_train = min(n - 1, max(1, int(round(n * train_fraction))))
    order = np.random.default_rng(seed).permutation(n)
    train_order = order[:n_train]  # shuffled: the fold of a training image is its rank mod folds
    test_ids = torch.as_tensor(np.sort(order[n_train:]), device=device)
    folds = min(int(cv_folds), n_train)

    rows = torch.arange(gh, device=device, dtype=torch.float64).repeat_interleave(gw)
    cols = torch.arange(gw, device=device, dtype=torch.float64).repeat(gh)
    targets = torch.stack([rows, cols], dim=1)  # [P, 2]
    shuffled = _shuffled_targets(targets, n, seed)  # [n, P, 2]
    per_chunk = _images_per_chunk(gh * gw * dim)

    # Targets 0, 1: (row, col); 2, 3: the same shuffled within each image (the chance level).
    moments = [_Moments(dim, 4, device) for _ in range(max(folds, 1))]
    fold_of = {int(img): rank % max(folds, 1) for rank, img in enumerate(train_order)}
    for img in train_order:
        x = tokens[int(img)].reshape(gh * gw, dim).to(torch.float64)
        moments[fold_of[int(img)]].update(x, torch.cat([targets, shuffled[int(img)]], dim=1))
    train = moments[0]
    for extra in moments[1:]:
        train = train + extra

    full = _RidgePath(train)
    # Validation error per (target pair, strength): row 0 the true targets, row 1 the shuffled.
    errors = np.zeros((2, len(grid)))
    for f in range(folds if folds >= 2 else 0):
        rest = [m for g, m in enumerate(moments) if g != f]
        fit_on = rest[0]
        for extra in rest[1:]:
            fit_on = fit_on + extra
        path = _RidgePath(fit_on)
        for i, a in enumerate(grid):
            error = path.squared_error(a * path.scale, moments[f])
            errors[0, i] += float(error[:2].sum())
            errors[1, i] += float(error[2:].sum())
    # Without folds there is no validation error to compare: the strongest strength is taken.
    chosen = [int(np.argmax(grid))] * 2 if folds < 2 else [int(np.argmin(e)) for e in errors]

    upper = torch.tensor([gh - 1, gw - 1], dtype=torch.float64, device=device)
    scores = {}
    for name, columns, pick in (("", (0, 1), chosen[0]), ("chance_", (2, 3), chosen[1])):
        lam = float(grid[pick]) * full.scale
        weights = full.weights(lam)[:, list(columns)]
        y_mean = full.y_mean[list(columns)]
        preds, truth = [], []
        for start in range(0, test_ids.numel(), per_chunk):
            idx = test_ids[start : start + per_chunk]
            x = tokens[idx].reshape(-1, dim).to(torch.float64)
            preds.append((x - full.x_mean) @ weights + y_mean)
            truth.append(targets.repeat(idx.numel(), 1) if not name else shuffled[idx].reshape(-1, 2))
        pred, true = torch.cat(preds), torch.cat(truth)
        hit = torch.round(pred).clamp(min=torch.zeros_like(upper), max=upper) == true
        scores.update({f"row_{name}r2": _r2(pred[:, 0], true[:, 0]), f"col_{name}r2": _r2(pred[:, 1], true[:, 1]),
                       f"row_{name}acc": float(hit[:, 0].double().mean()),
                       f"col_{name}acc": float(hit[:, 1].double().mean())})
        if not name:
            scores.update({"alpha": lam, "relative_alpha": float(grid[pick])})
    return {
        **scores,
        "cv_folds": folds if folds >= 2 else 0,
        "train_fraction": float(train_fraction),
        "ridge_grid": grid.tolist(),
        "train_images": [int(i) for i in train_order],
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
    check_positive_int(max_distance, "max_distance")
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
    check_positive_int(ring, "ring")
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
