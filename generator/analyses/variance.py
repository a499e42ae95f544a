"""High-variance features: the per-dimension variance spectrum and what removing its top does.

The local-representations paper finds that masked-image-modelling ViTs (MAE, SimMIM) put a
few hundred feature dimensions at variances far above the rest; they carry little class
information but dominate every distance, so k-NN fails while a linear probe (which can give
them zero weight) does not. Deleting the top-N variance dimensions — counted on the *train*
tokens only, then removed from train and val alike — restores k-NN (MAE: 0.058 -> 0.295 mIoU at
N = 200). Standardising every dimension (``batchnorm_normalise``) is the alternative remedy.

Everything is pure: tensors in, tensors/metrics out, on the inputs' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from generator.analyses._checks import check_features, check_int, check_positive_int
from generator.analyses.probes import (
    LinearProbe,
    knn_predict,
    mean_and_variance,
    segmentation_metrics,
    standardisation,
)
from generator.errors import PatchAtlasError

__all__ = [
    "REMOVAL_COUNTS",
    "batchnorm_normalise",
    "feature_variance",
    "removal_counts_for",
    "removal_curve",
    "remove_dims",
    "top_set_overlap",
    "top_variance_dims",
    "variance_spectrum",
]

# The numbers of top-variance dimensions the paper removes (ViT-B: 768 dims).
REMOVAL_COUNTS = (0, 10, 20, 30, 40, 50, 100, 200, 400, 600, 750)


def _as_tensor(x, what: str, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if device is None else x.to(device)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x))).to(device or "cpu")


def feature_variance(train_x) -> torch.Tensor:
    """Population variance of every feature dimension over the train tokens: float64 [D].

    Only train tokens are used, so the dimensions removed from val are chosen without val.
    """
    x = _as_tensor(train_x, "train_x")
    check_features(x, "train_x")
    return mean_and_variance(x)[1]


def _check_variance(var, what: str = "var") -> torch.Tensor:
    v = _as_tensor(var, what)
    if v.ndim != 1 or v.numel() == 0:
        raise PatchAtlasError(f"{what} of shape {tuple(v.shape)}: expected a 1-D per-dimension variance")
    return v


def variance_spectrum(var) -> tuple[torch.Tensor, torch.Tensor]:
    """The variances sorted in decreasing order, and the dimension order that sorts them.

    Equal variances keep their dimension order (stable sort), so the spectrum is reproducible.
    """
    v = _check_variance(var)
    values, order = torch.sort(v, descending=True, stable=True)
    return values, order


def top_variance_dims(var, n: int) -> torch.Tensor:
    """Indices (int64, ascending variance rank) of the ``n`` highest-variance dimensions."""
    v = _check_variance(var)
    n = check_int(n, "n (the number of dimensions)", 0, v.numel())
    return variance_spectrum(v)[1][:n]


def remove_dims(x, dims):
    """``x`` without the feature columns ``dims`` (last axis); numpy in, numpy out, tensor in, tensor out."""
    dim = x.shape[-1]
    drop = np.unique(np.asarray(dims.cpu() if isinstance(dims, torch.Tensor) else dims, dtype=np.int64).reshape(-1))
    if drop.size and (drop.min() < -dim or drop.max() >= dim):
        raise PatchAtlasError(f"dims {drop.tolist()[:10]}...: indices out of range for {dim} features")
    keep_mask = np.ones(dim, dtype=bool)
    keep_mask[drop] = False
    if not keep_mask.any():
        raise PatchAtlasError(f"removing {drop.size} of {dim} dimensions leaves no features: remove fewer")
    keep = np.flatnonzero(keep_mask)
    if isinstance(x, torch.Tensor):
        return x.index_select(x.ndim - 1, torch.from_numpy(keep).to(x.device))
    return np.asarray(x)[..., keep]


def removal_counts_for(dim: int, counts: Sequence[int] = REMOVAL_COUNTS) -> list[int]:
    """The removal counts that leave at least one dimension of ``dim`` (N < D)."""
    check_positive_int(dim, "dim (the number of features)")
    return [int(n) for n in counts if 0 <= n < dim]


def _train_test_pair(train_x, test_x) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as 2-D tensors on the train device, with the same number of features."""
    tr = _as_tensor(train_x, "train_x")
    te = _as_tensor(test_x, "test_x", tr.device)
    check_features(tr, "train_x")
    check_features(te, "test_x")
    if tr.shape[1] != te.shape[1]:
        raise PatchAtlasError(f"train_x has {tr.shape[1]} features but test_x has {te.shape[1]}")
    return tr, te


def batchnorm_normalise(train_x, test_x, eps: float = 1e-6):
    """Standardise train and test with the train mean and (population) std of each dimension.

    This is what a non-affine BatchNorm in eval mode does after seeing the train set, the
    normalised-features alternative to removing dimensions. Returns (train, test) in the
    inputs' float dtype, on the train tensor's device.
    """
    tr, te = _train_test_pair(train_x, test_x)
    # The linear probe's BatchNorm uses the same statistics (with eps = 0).
    mean, scale = standardisation(tr, eps)
    out_dtype = tr.dtype
    return (
        ((tr.to(torch.float64) - mean) * scale).to(out_dtype),
        ((te.to(torch.float64) - mean) * scale).to(out_dtype),
    )


def top_set_overlap(var_a, var_b, n: int = 200) -> int:
    """How many of the top-``n`` variance dimensions two spectra share (paper: 196 of 200)."""
    a, b = _check_variance(var_a, "var_a"), _check_variance(var_b, "var_b")
    if a.numel() != b.numel():
        raise PatchAtlasError(f"var_a has {a.numel()} dimensions and var_b {b.numel()}: compare the same model")
    top_a = set(top_variance_dims(a, n).tolist())
    top_b = set(top_variance_dims(b, n).tolist())
    return len(top_a & top_b)


def removal_curve(
    train_x,
    train_y,
    test_x,
    test_y,
    counts: Sequence[int] = REMOVAL_COUNTS,
    *,
    n_classes: int,
    ignore_index: int = 255,
    eval_classes: Sequence[int] | None = None,
    knn_kwargs: dict | None = None,
    linear_kwargs: dict | None = None,
    average: str = "present",
) -> list[dict]:
    """k-NN (and linear) mIoU after deleting the top-N train-variance dimensions, for each N.

    ``counts`` larger than or equal to the number of features are skipped. ``knn_kwargs`` go to
    ``knn_predict`` (k, similarity, chunk sizes); ``linear_kwargs`` to ``LinearProbe``, or None
    to skip the linear probe (its ``linear_miou`` is then None); ``average`` is the mIoU rule
    (``segmentation_metrics``). Returns one dict per N:
    ``n_removed``, ``knn_miou``, ``knn_pixel_accuracy``, ``linear_miou``, ``linear_pixel_accuracy``.
    """
    tr, te = _train_test_pair(train_x, test_x)
    target = np.asarray(test_y.cpu() if isinstance(test_y, torch.Tensor) else test_y).reshape(-1)
    if target.shape[0] != te.shape[0]:
        raise PatchAtlasError(f"test_y has {target.shape[0]} labels for {te.shape[0]} test rows")
    order = variance_spectrum(feature_variance(tr))[1]
    knn_kwargs = dict(knn_kwargs or {})
    rows = []
    for n in removal_counts_for(tr.shape[1], counts):
        dims = order[:n]
        tr_n, te_n = remove_dims(tr, dims), remove_dims(te, dims)
        knn = knn_predict(tr_n, train_y, te_n, n_classes=n_classes, ignore_index=ignore_index, **knn_kwargs)
        knn_m = segmentation_metrics(knn.cpu().numpy(), target, n_classes, ignore_index, eval_classes, average)
        row = {
            "n_removed": n,
            "knn_miou": knn_m["miou"],
            "knn_pixel_accuracy": knn_m["pixel_accuracy"],
            "linear_miou": None,
            "linear_pixel_accuracy": None,
        }
        if linear_kwargs is not None:
            probe = LinearProbe(n_classes=n_classes, ignore_index=ignore_index, **linear_kwargs)
            lin = probe.fit(tr_n, train_y).predict(te_n)
            lin_m = segmentation_metrics(lin.cpu().numpy(), target, n_classes, ignore_index, eval_classes, average)
            row["linear_miou"] = lin_m["miou"]
            row["linear_pixel_accuracy"] = lin_m["pixel_accuracy"]
        rows.append(row)
    return rows
