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

Each takes a batch with ``update`` and gives what it has counted with ``result``. Each gives the
same numbers as the whole-array function it stands for (``feature_variance``,
``knn_predict`` + ``segmentation_metrics``, ``kmeans`` + nearest centroid + ``hungarian_match``),
which the tests check. Pure: tensors in, tensors and dicts out, no I/O.

They are fed once per batch while a model runs, on its device. Their state lives on the device
of the rows they get, and nothing in ``update`` reads a value back to the host, so a
GPU keeps running ahead of the host: counts are added with fixed-size scatters (never
``torch.bincount``, which reads its input's range back on CUDA), rows that must not count go to
a spare bin that is dropped, and the checks that need a value (labels outside the classes,
NaN/inf tokens) are counted on the device and raised when the results are read. Only the
once-per-run steps read back: building the k-NN train bank and fitting the k-means.
"""

from __future__ import annotations

import numpy as np
import torch

from generator.analyses._checks import check_features, check_positive_int
from generator.analyses.clusters import (
    _l2_normalized_rows,
    _nearest_centroid,
    _row_squared_norms,
    _working_dtype,
    kmeans,
    match_from_confusion,
)
from generator.analyses.probes import (
    _labelled_rows,
    check_miou_average,
    majority_vote,
    metrics_from_counts,
    nearest_neighbours,
)
from generator.errors import PatchAtlasError

# Rows per block in the k-means distance computations, as in ``clusters``.
_CHUNK_ROWS = 65536
# How many of the offending labels an error names, and the filler for "none (yet)".
_NAMED_LABELS = 5
_NO_LABEL = torch.iinfo(torch.int64).max


def _rows(x: torch.Tensor, dim: int | None, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise PatchAtlasError(f"{what}: expected a tensor [rows, {dim or 'dim'}], got "
                              f"{tuple(getattr(x, 'shape', ()))}")
    return x


def _drop_unlabelled_first(device: torch.device) -> bool:
    """Whether to drop unlabelled rows before classifying them. That saves their k-NN search but
    gives a tensor whose size depends on the labels, which on an accelerator the host must wait
    for; there they are classified too and counted into the spare bin."""
    return device.type == "cpu"


def _add_counts(counts: torch.Tensor, index: torch.Tensor) -> None:
    """``counts[i] += (index == i).sum()`` for every i, in place: a scatter into a fixed size,
    so (unlike ``torch.bincount``) nothing is read back to size the result."""
    counts.index_add_(0, index, torch.ones_like(index))


def _smallest_distinct(held: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The ``_NAMED_LABELS`` smallest distinct entries of ``held`` and ``values`` together,
    ascending, padded with ``_NO_LABEL``: a fixed-size record of offending labels kept on the
    device (``torch.unique`` would read back how many there are)."""
    pool = torch.cat([held, values])
    picked = [pool.min()]
    for _ in range(_NAMED_LABELS - 1):
        picked.append(torch.where(pool > picked[-1], pool, _NO_LABEL).min())
    return torch.stack(picked)


class RunningMoments:
    """Mean and population variance of every dimension over all rows seen so far.

    The state lives on ``device``, or without one on the device of the first rows."""

    def __init__(self, dim: int, device: str | torch.device | None = None):
        self.dim = dim
        self.count = 0
        self._follow_rows = device is None
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self._m2 = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = _rows(x, self.dim, "RunningMoments.update")
        n = x.shape[0]
        if n == 0:
            return
        if self._follow_rows and self.count == 0:
            self.mean, self._m2 = self.mean.to(x.device), self._m2.to(x.device)
        x = x.to(self.mean.device, torch.float64)
        chunk_mean = x.mean(dim=0)
        chunk_m2 = ((x - chunk_mean) ** 2).sum(dim=0)
        total = self.count + n
        delta = chunk_mean - self.mean
        # Merging two sets' moments exactly (no E[x²] − E[x]² cancellation at large offsets).
        self.mean += delta * (n / total)
        self._m2 += chunk_m2 + delta * delta * (self.count * n / total)
        self.count = total

    def result(self) -> torch.Tensor:
        """The population variance of every dimension, float64 [dim]."""
        if self.count == 0:
            raise PatchAtlasError("RunningMoments: no rows seen; the variance is undefined")
        return self._m2 / self.count


class NormHistogram:
    """L2 norms of token rows on fixed log-spaced bins (fixed, so chunks add up exactly).

    The bin counts, sum and max are kept on the device of the first rows; ``counts``, ``total``
    and ``max`` read them back."""

    def __init__(self, low: float = 1e-2, high: float = 1e5, bins: int = 140):
        if not 0 < low < high or bins < 1:
            raise PatchAtlasError(f"NormHistogram: need 0 < low < high and bins ≥ 1, got {low}, {high}, {bins}")
        self.edges = np.geomspace(low, high, bins + 1)
        self.count = 0
        self._edges: torch.Tensor | None = None  # the edges on the rows' device, with the state below
        self._counts: torch.Tensor | None = None  # under, bins…, over
        self._total: torch.Tensor | None = None
        self._max: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        norms = _rows(x, None, "NormHistogram.update").float().norm(dim=1)
        if norms.shape[0] == 0:
            return
        if self._counts is None:
            self._edges = torch.from_numpy(self.edges).to(norms.device)
            self._counts = torch.zeros(len(self.edges) + 1, dtype=torch.int64, device=norms.device)
            self._total = torch.zeros((), dtype=torch.float64, device=norms.device)
            self._max = torch.zeros((), dtype=torch.float64, device=norms.device)
        norms = norms.to(self._counts.device, torch.float64)
        # right=True is np.searchsorted's side="right": edges[i-1] <= norm < edges[i] gives i, so
        # 0 is below low and bins+1 at or above high (NaN too, as numpy sorts it last).
        _add_counts(self._counts, torch.bucketize(norms, self._edges, right=True))
        self.count += norms.shape[0]
        self._total += norms.sum()
        self._max = torch.maximum(self._max, norms.max())

    @property
    def counts(self) -> np.ndarray:
        if self._counts is None:
            return np.zeros(len(self.edges) + 1, dtype=np.int64)
        return self._counts.cpu().numpy()

    @property
    def total(self) -> float:
        return 0.0 if self._total is None else float(self._total)

    @property
    def max(self) -> float:
        return 0.0 if self._max is None else float(self._max)

    def quantile(self, q: float) -> float:
        """The upper edge of the bin holding the q-quantile (exact to one bin width)."""
        if self.count == 0:
            raise PatchAtlasError("NormHistogram: no rows seen")
        position = int(np.searchsorted(np.cumsum(self.counts), q * self.count, side="left"))
        return float(self.edges[min(position, len(self.edges) - 1)])

    def result(self) -> dict:
        return {"count": self.count, "mean": self.total / max(self.count, 1), "max": self.max,
                "median": self.quantile(0.5), "p99": self.quantile(0.99),
                "edges": self.edges.tolist(), "counts": self.counts[1:-1].tolist(),
                "below": int(self.counts[0]), "above": int(self.counts[-1])}


class StreamingKNN:
    """The few-shot k-NN probe with the evaluation tokens streamed.

    ``update(x, y, train=True)`` keeps the labelled train rows (the protocol's fixed few-shot
    set); after the first evaluation chunk no more train rows are taken. ``update(x, y)``
    classifies an evaluation chunk against them and adds its counts; ``result`` gives what
    ``segmentation_metrics`` gives on all the
    evaluation rows at once, from counts of fixed size, kept on the evaluation rows' device.
    Evaluation labels outside the classes (other than ``ignore_index``) are counted as they come
    and refused by ``result``.
    """

    def __init__(self, n_classes: int, *, ignore_index: int = 255, k: int = 1, similarity: str = "dot",
                 average: str = "present"):
        self.n_classes, self.ignore_index, self.k, self.similarity = n_classes, ignore_index, k, similarity
        self.average = check_miou_average(average)
        self._train_x: list[torch.Tensor] = []
        self._train_y: list[torch.Tensor] = []
        self._bank: tuple[torch.Tensor, torch.Tensor] | None = None
        # Flat [C × (C + 1)] counts (target × prediction, last column: predictions outside the
        # classes) and one spare bin for rows that do not count.
        self._counts: torch.Tensor | None = None
        self._bad_labels: torch.Tensor | None = None

    @property
    def counts(self) -> np.ndarray:
        """Target × predicted class counts [C, C + 1], the last column predictions outside the classes."""
        shape = (self.n_classes, self.n_classes + 1)
        if self._counts is None:
            return np.zeros(shape, dtype=np.int64)
        return self._counts[:-1].reshape(shape).cpu().numpy()

    def update(self, x: torch.Tensor, y: torch.Tensor, *, train: bool = False) -> None:
        """Count one chunk of rows: train rows (``train=True``, all before the first evaluation
        chunk) go to the bank, evaluation rows are classified against it."""
        if train:
            self._update_train(x, y)
        else:
            self._update_eval(x, y)

    def _update_train(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self._bank is not None:
            raise PatchAtlasError("StreamingKNN: train rows after evaluation rows; the train images come first")
        x, y = self._rows_and_labels(x, y, "StreamingKNN.update(train=True)")
        if _drop_unlabelled_first(x.device):
            keep = y != self.ignore_index
            x, y = x[keep], y[keep]
        # Elsewhere unlabelled rows are kept until the bank is built, once.
        self._train_x.append(x)
        self._train_y.append(y)

    def _update_eval(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = self._rows_and_labels(x, y, "StreamingKNN.update")
        if self._bank is None:
            self._bank = self._built_bank()
        if _drop_unlabelled_first(x.device):
            keep = y != self.ignore_index
            x, y = x[keep], y[keep]
        if x.shape[0] == 0:
            return
        if self._counts is None:
            self._counts = torch.zeros(self.n_classes * (self.n_classes + 1) + 1, dtype=torch.int64, device=x.device)
            self._bad_labels = torch.zeros((), dtype=torch.int64, device=x.device)
        bank_x, bank_y = self._bank
        # knn_predict on the bank, without its per-call label checks: the bank was checked once.
        _, neighbours = nearest_neighbours(x, bank_x, self.k, similarity=self.similarity)
        pred = majority_vote(bank_y.to(neighbours.device)[neighbours], self.n_classes)
        n = self.n_classes
        labelled = y != self.ignore_index
        in_classes = (y >= 0) & (y < n)
        self._bad_labels += (labelled & ~in_classes).sum().to(self._bad_labels.device)
        pred = torch.where((pred >= 0) & (pred < n), pred, n)
        index = torch.where(labelled & in_classes, y * (n + 1) + pred, n * (n + 1))  # the spare bin last
        _add_counts(self._counts, index.to(self._counts.device))

    def result(self) -> dict:
        """Per-class IoU, mIoU and pixel accuracy of everything evaluated so far."""
        if self._bad_labels is not None and int(self._bad_labels) > 0:
            raise PatchAtlasError(f"StreamingKNN: labels outside [0, {self.n_classes}) that are not the ignore "
                                  f"label {self.ignore_index}")
        return metrics_from_counts(self.counts, average=self.average)

    def _rows_and_labels(self, x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = _rows(x, None, what)
        if not isinstance(y, torch.Tensor) or y.numel() != x.shape[0]:
            raise PatchAtlasError(f"{what}: expected one label per row ({x.shape[0]}), got "
                                  f"{type(y).__name__} {tuple(getattr(y, 'shape', ()))}")
        return x, y.reshape(-1).to(x.device, torch.long)

    def _built_bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The labelled train rows, checked as ``knn_predict`` checks them (once: this reads back)."""
        if self._train_y:
            x, y = torch.cat(self._train_x), torch.cat(self._train_y)
            keep = y != self.ignore_index
            x, y = x[keep], y[keep]
        if not self._train_y or y.shape[0] == 0:
            raise PatchAtlasError("StreamingKNN: no labelled train rows before the evaluation rows")
        check_features(x, "train_x")
        _labelled_rows(y, self.n_classes, self.ignore_index, "train_y")
        self._train_x, self._train_y = [], []
        return x, y


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
    ``fit_rows`` and the chunk, never by the number of rows. It is kept on the rows' device, and
    so are the counts of labels outside the classes and of chunks with NaN/inf tokens, which the
    fit and :meth:`result` refuse.

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
            check_positive_int(value, name)
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
        # On the first rows' device: the flat k × n_classes confusion and a spare bin for rows
        # that do not count; how many labels were outside the classes and how many chunks held
        # NaN/inf tokens; the smallest few of those labels, for the error.
        self._confusion: torch.Tensor | None = None
        self._problems: torch.Tensor | None = None
        self._bad_labels: torch.Tensor | None = None

    @property
    def confusion(self) -> np.ndarray:
        """Cluster × class counts [k, n_classes] of the labelled rows assigned so far."""
        if self._confusion is None:
            return np.zeros((self.k, self.n_classes), dtype=np.int64)
        return self._confusion[:-1].reshape(self.k, self.n_classes).cpu().numpy()

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Take a chunk of token rows [rows, D] and their labels [rows]."""
        x = _rows(x, self.dim, "StreamingKMeans.update")
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.numel() != x.shape[0]:
            raise PatchAtlasError(f"StreamingKMeans.update: expected integer labels, one per row ({x.shape[0]}), "
                                  f"got {type(y).__name__} {tuple(getattr(y, 'shape', ()))}")
        y = y.reshape(-1).to(x.device, torch.long)
        if self._confusion is None:
            self._confusion = torch.zeros(self.k * self.n_classes + 1, dtype=torch.int64, device=x.device)
            self._problems = torch.zeros(2, dtype=torch.int64, device=x.device)
            self._bad_labels = torch.full((_NAMED_LABELS,), _NO_LABEL, dtype=torch.int64, device=x.device)
        bad = (y != self.ignore_index) & ((y < 0) | (y >= self.n_classes))
        self._problems += torch.stack([bad.sum(), torch.isfinite(x).all().logical_not().long()])
        self._bad_labels = _smallest_distinct(self._bad_labels, torch.where(bad, y, _NO_LABEL))
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
        self._check_inputs()
        if self._centroids is None:
            self._fit()
        confusion = self.confusion
        if int(confusion.sum()) == 0:
            raise PatchAtlasError(f"StreamingKMeans: none of the {self.rows} rows is labelled (all are the "
                                  f"ignore label {self.ignore_index}); nothing to score")
        match = match_from_confusion(confusion)
        return {"k": self.k, "miou": match.miou, "pixel_accuracy": match.pixel_accuracy,
                "per_class_iou": match.per_class_iou.tolist(),
                "cluster_to_class": match.cluster_to_class.tolist(),
                "inertia": self._inertia, "fit_rows": self._fitted_rows, "rows": self.rows}

    def _prepared(self, x: torch.Tensor) -> torch.Tensor:
        if self.l2_normalize:
            return _l2_normalized_rows(x, _CHUNK_ROWS)
        return x.to(_working_dtype(x) if x.is_floating_point() else torch.float32)

    def _check_inputs(self) -> None:
        """Refuse what ``update`` counted without stopping: labels outside the classes, NaN/inf tokens
        (a read-back, so only at the fit and at the result)."""
        if self._problems is None:
            return
        bad_labels, non_finite = self._problems.tolist()
        if bad_labels:
            named = [label for label in self._bad_labels.tolist() if label != _NO_LABEL]
            raise PatchAtlasError(f"StreamingKMeans.update: labels {named} outside [0, {self.n_classes}) that are "
                                  f"not the ignore label {self.ignore_index}")
        if non_finite:
            raise PatchAtlasError("StreamingKMeans.update: the tokens hold NaN or infinite values; clean or drop "
                                  "those tokens before clustering")

    def _fit(self) -> None:
        self._check_inputs()
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
        y = y.to(labels.device)
        counted = (y != self.ignore_index) & (y >= 0) & (y < self.n_classes)
        index = torch.where(counted, labels * self.n_classes + y, self.k * self.n_classes)  # the spare bin last
        _add_counts(self._confusion, index.to(self._confusion.device))
