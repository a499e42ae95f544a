"""Analyses that take tokens chunk by chunk as a model produces them, keeping no layer whole.

Layer-wise curves need every layer of every image; storing them all is what publishing only a
few layers avoids. These accumulators see each chunk of tokens once and keep only what the
result needs, so memory is set by the chunk (and, for the k-NN probe, by the few-shot train
set, which the protocol fixes), never by the number of evaluation images:

- :class:`RunningMoments`: per-dimension mean and variance (Chan et al.'s pairwise merge, in
  float64), the input of the variance spectrum;
- :class:`NormHistogram`: token L2 norms on fixed log-spaced bins, with count, sum and max;
- :class:`StreamingKNN`: the few-shot k-NN probe; train tokens are kept, evaluation tokens are
  classified as they come and only a confusion matrix grows;
- :class:`StreamingKMeans`: k-means segmentation; one k-means is fitted on the first rows (at
  most ``fit_rows``), later rows are assigned to its centroids as they come and only a
  cluster × class confusion matrix grows, matched to the classes at the end.

Each gives the same numbers as the whole-array function it stands for (``feature_variance``,
``knn_predict`` + ``segmentation_metrics``, ``kmeans`` + nearest centroid + ``hungarian_match``),
which the tests check. Pure: tensors in, tensors and dicts out, no I/O.
"""

from __future__ import annotations

import numpy as np
import torch

from generator.analyses.clusters import (
    _check_positive_int,
    _l2_normalized_rows,
    _nearest_centroid,
    _row_squared_norms,
    _working_dtype,
    kmeans,
    match_from_confusion,
)
from generator.analyses.probes import knn_predict, metrics_from_counts
from generator.errors import PatchAtlasError

# Rows per block in the k-means distance computations, as in ``clusters``.
_CHUNK_ROWS = 65536


def _rows(x: torch.Tensor, dim: int | None, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise PatchAtlasError(f"{what}: expected a tensor [rows, {dim or 'dim'}], got "
                              f"{tuple(getattr(x, 'shape', ()))}")
    return x


class RunningMoments:
    """Mean and population variance of every dimension over all rows seen so far."""

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.dim = dim
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self._m2 = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = _rows(x, self.dim, "RunningMoments.update").to(self.mean.device, torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        chunk_mean = x.mean(dim=0)
        chunk_m2 = ((x - chunk_mean) ** 2).sum(dim=0)
        total = self.count + n
        delta = chunk_mean - self.mean
        # Merging two sets' moments exactly (no E[x²] − E[x]² cancellation at large offsets).
        self.mean += delta * (n / total)
        self._m2 += chunk_m2 + delta * delta * (self.count * n / total)
        self.count = total

    def variance(self) -> torch.Tensor:
        if self.count == 0:
            raise PatchAtlasError("RunningMoments: no rows seen; the variance is undefined")
        return self._m2 / self.count


class NormHistogram:
    """L2 norms of token rows on fixed log-spaced bins (fixed, so chunks add up exactly)."""

    def __init__(self, low: float = 1e-2, high: float = 1e5, bins: int = 140):
        if not 0 < low < high or bins < 1:
            raise PatchAtlasError(f"NormHistogram: need 0 < low < high and bins ≥ 1, got {low}, {high}, {bins}")
        self.edges = np.geomspace(low, high, bins + 1)
        self.counts = np.zeros(bins + 2, dtype=np.int64)  # under, bins…, over
        self.count, self.total, self.max = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        norms = _rows(x, None, "NormHistogram.update").float().norm(dim=1).cpu().numpy().astype(np.float64)
        if norms.size == 0:
            return
        index = np.searchsorted(self.edges, norms, side="right")  # 0: below low; bins+1: above high
        self.counts += np.bincount(index, minlength=self.counts.size)
        self.count += norms.size
        self.total += float(norms.sum())
        self.max = max(self.max, float(norms.max()))

    def quantile(self, q: float) -> float:
        """The upper edge of the bin holding the q-quantile (exact to one bin width)."""
        if self.count == 0:
            raise PatchAtlasError("NormHistogram: no rows seen")
        position = int(np.searchsorted(np.cumsum(self.counts), q * self.count, side="left"))
        return float(self.edges[min(position, len(self.edges) - 1)])

    def summary(self) -> dict:
        return {"count": self.count, "mean": self.total / max(self.count, 1), "max": self.max,
                "median": self.quantile(0.5), "p99": self.quantile(0.99),
                "edges": self.edges.tolist(), "counts": self.counts[1:-1].tolist(),
                "below": int(self.counts[0]), "above": int(self.counts[-1])}


class StreamingKNN:
    """The few-shot k-NN probe with the evaluation tokens streamed.

    ``add_train`` keeps the labelled train rows (the protocol's fixed few-shot set); after the
    first ``add_eval`` no more train rows are taken. ``add_eval`` classifies a chunk against
    them and adds its counts; ``metrics`` gives what ``segmentation_metrics`` gives on all the
    evaluation rows at once, from counts of fixed size.
    """

    def __init__(self, n_classes: int, *, ignore_index: int = 255, k: int = 1, similarity: str = "dot"):
        self.n_classes, self.ignore_index, self.k, self.similarity = n_classes, ignore_index, k, similarity
        self._train_x: list[torch.Tensor] = []
        self._train_y: list[torch.Tensor] = []
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None
        self.counts = np.zeros((n_classes, n_classes + 1), dtype=np.int64)

    def add_train(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self._bank is not None:
            raise PatchAtlasError("StreamingKNN: train rows after evaluation rows; the train images come first")
        x = _rows(x, None, "StreamingKNN.add_train")
        y = y.reshape(-1).long()
        keep = y != self.ignore_index
        self._train_x.append(x[keep])
        self._train_y.append(y[keep])

    def add_eval(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = _rows(x, None, "StreamingKNN.add_eval")
        if self._bank is None:
            if sum(len(t) for t in self._train_y) == 0:
                raise PatchAtlasError("StreamingKNN: no labelled train rows before the evaluation rows")
            self._bank = torch.cat(self._train_x), torch.cat(self._train_y)
            self._train_x, self._train_y = [], []
        y = y.reshape(-1).long()
        keep = y != self.ignore_index
        if not bool(keep.any()):
            return
        pred = knn_predict(self._bank[0], self._bank[1], x[keep], k=self.k, similarity=self.similarity,
                           n_classes=self.n_classes, ignore_index=self.ignore_index).cpu().numpy()
        target = y[keep].cpu().numpy()
        if target.min() < 0 or target.max() >= self.n_classes:
            raise PatchAtlasError(f"StreamingKNN: labels outside [0, {self.n_classes}) that are not the ignore "
                                  f"label {self.ignore_index}")
        pred = np.where((pred >= 0) & (pred < self.n_classes), pred, self.n_classes)
        self.counts += np.bincount(target * (self.n_classes + 1) + pred,
                                   minlength=self.counts.size).reshape(self.counts.shape)

    def metrics(self) -> dict:
        """Per-class IoU, mIoU and pixel accuracy of everything evaluated so far."""
        return metrics_from_counts(self.counts)


class StreamingKMeans:
    """k-means segmentation of a stream of token rows, scored by Hungarian matching.

    Clustering is unsupervised, so every row counts towards the fit, labelled or not. The first
    ``fit_rows`` rows seen are buffered (callers feed the few-shot train images first, so the
    fit sees the same images whatever the evaluation set). When the buffer is full, or at
    :meth:`result` if fewer rows came, one :func:`~generator.analyses.clusters.kmeans` is fitted
    on it, on the rows' device; with ``l2_normalize`` rows are projected to the unit sphere
    first, as in ``joint_kmeans_segmentation``. The buffer is then assigned to the nearest
    centroid and dropped, and every later row is assigned as it comes. Only a k × n_classes
    confusion matrix of labelled rows (label ≠ ``ignore_index``) grows, so memory is set by
    ``fit_rows`` and the chunk, never by the number of rows.

    A chunk that overfills the buffer is split: its first rows complete the fit, the rest are
    assigned after it, so the result does not depend on where chunks begin and end. It equals
    ``kmeans`` on the first ``fit_rows`` rows, nearest-centroid labels for all rows and
    ``hungarian_match`` on the labelled ones. Rows added after :meth:`result` are assigned to
    the same fit.
    """

    def __init__(self, k: int, n_classes: int, *, ignore_index: int = 255, fit_rows: int = 65536,
                 seed: int = 0, n_init: int = 3, max_iter: int = 100, l2_normalize: bool = True):
        for name, value in (("k", k), ("n_classes", n_classes), ("fit_rows", fit_rows),
                            ("n_init", n_init), ("max_iter", max_iter)):
            _check_positive_int(name, value)
        if k > fit_rows:
            raise PatchAtlasError(f"StreamingKMeans: k={k} exceeds fit_rows={fit_rows}, the most rows the "
                                  f"k-means is fitted on; lower k or raise fit_rows")
        if 0 <= ignore_index < n_classes:
            raise PatchAtlasError(f"StreamingKMeans: ignore_index={ignore_index} collides with a class id "
                                  f"(n_classes={n_classes})")
        self.k, self.n_classes, self.ignore_index, self.fit_rows = k, n_classes, ignore_index, fit_rows
        self.seed, self.n_init, self.max_iter, self.l2_normalize = seed, n_init, max_iter, l2_normalize
        self.dim: int | None = None
        self._buffer_x: list[torch.Tensor] = []
        self._buffer_y: list[torch.Tensor] = []
        self._buffered = 0
        self._centroids: torch.Tensor | None = None
        self._inertia = float("nan")
        self._fitted_rows = 0
        self.rows = 0
        self.confusion = np.zeros((k, n_classes), dtype=np.int64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Take a chunk of token rows [rows, D] and their labels [rows]."""
        x = _rows(x, self.dim, "StreamingKMeans.add")
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.numel() != x.shape[0]:
            raise PatchAtlasError(f"StreamingKMeans.add: expected integer labels, one per row ({x.shape[0]}), "
                                  f"got {type(y).__name__} {tuple(getattr(y, 'shape', ()))}")
        y = y.reshape(-1).long().cpu()
        bad = (y != self.ignore_index) & ((y < 0) | (y >= self.n_classes))
        if bool(bad.any()):
            raise PatchAtlasError(f"StreamingKMeans.add: labels {torch.unique(y[bad])[:5].tolist()} outside "
                                  f"[0, {self.n_classes}) that are not the ignore label {self.ignore_index}")
        if not bool(torch.isfinite(x).all()):
            raise PatchAtlasError("StreamingKMeans.add: the tokens hold NaN or infinite values; clean or drop "
                                  "those tokens before clustering")
        self.dim = x.shape[1]
        start = 0
        if self._centroids is None:
            start = min(self.fit_rows - self._buffered, x.shape[0])
            if start > 0:
                # Copies, so that a slice does not keep the caller's whole chunk alive.
                self._buffer_x.append(x[:start].clone())
                self._buffer_y.append(y[:start].clone())
                self._buffered += start
            if self._buffered == self.fit_rows:
                self._fit()
        if start < x.shape[0]:
            self._assign(self._prepared(x[start:]), y[start:])

    def result(self) -> dict:
        """mIoU, pixel accuracy, per-class IoU (NaN for absent classes) and the cluster → class
        matching of every labelled row assigned so far; the inertia is the fit's, in the space
        it was fitted in (on the unit sphere with ``l2_normalize``)."""
        if self._centroids is None:
            self._fit()
        if int(self.confusion.sum()) == 0:
            raise PatchAtlasError(f"StreamingKMeans: none of the {self.rows} rows is labelled (all are the "
                                  f"ignore label {self.ignore_index}); nothing to score")
        match = match_from_confusion(self.confusion)
        return {"k": self.k, "miou": match.miou, "pixel_accuracy": match.pixel_accuracy,
                "per_class_iou": match.per_class_iou.tolist(),
                "cluster_to_class": match.cluster_to_class.tolist(),
                "inertia": self._inertia, "fit_rows": self._fitted_rows, "rows": self.rows}

    def _prepared(self, x: torch.Tensor) -> torch.Tensor:
        if self.l2_normalize:
            return _l2_normalized_rows(x, _CHUNK_ROWS)
        return x.to(_working_dtype(x) if x.is_floating_point() else torch.float32)

    def _fit(self) -> None:
        if self._buffered < self.k:
            raise PatchAtlasError(f"StreamingKMeans: k={self.k} exceeds the {self._buffered} rows available to "
                                  f"fit the k-means; lower k or feed more rows")
        device = self._buffer_x[0].device
        x = self._prepared(torch.cat([chunk.to(device) for chunk in self._buffer_x]))
        y = torch.cat(self._buffer_y)
        self._buffer_x, self._buffer_y, self._buffered = [], [], 0
        fit = kmeans(x, self.k, n_init=self.n_init, max_iter=self.max_iter, seed=self.seed,
                     chunk_size=_CHUNK_ROWS)
        self._centroids, self._inertia, self._fitted_rows = fit.centroids, fit.inertia, x.shape[0]
        # Assigned like every later row (fit.labels would be the same up to the float32 centroids).
        self._assign(x, y)

    def _assign(self, x: torch.Tensor, y: torch.Tensor) -> None:
        assert self._centroids is not None
        x = x.to(self._centroids.device)
        centroids = self._centroids.to(x.dtype)
        labels, _ = _nearest_centroid(x, _row_squared_norms(x, _CHUNK_ROWS), centroids, _CHUNK_ROWS)
        self.rows += x.shape[0]
        keep = y != self.ignore_index
        if not bool(keep.any()):
            return
        pred = labels.cpu()[keep].numpy()
        self.confusion += np.bincount(pred * self.n_classes + y[keep].numpy(),
                                      minlength=self.confusion.size).reshape(self.confusion.shape)
