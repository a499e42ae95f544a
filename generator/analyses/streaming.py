"""Analyses that take tokens chunk by chunk as a model produces them, keeping no layer whole.

Layer-wise curves need every layer of every image; storing them all is what publishing only a
few layers avoids. These accumulators see each chunk of tokens once and keep only what the
result needs, so memory is set by the chunk (and, for the k-NN probe, by the few-shot train
set, which the protocol fixes), never by the number of evaluation images:

- :class:`RunningMoments`: per-dimension mean and variance (Chan et al.'s pairwise merge, in
  float64), the input of the variance spectrum;
- :class:`NormHistogram`: token L2 norms on fixed log-spaced bins, with count, sum and max;
- :class:`StreamingKNN`: the few-shot k-NN probe; train tokens are kept, evaluation tokens are
  classified as they come and only a confusion matrix grows.

Each gives the same numbers as the whole-array function it stands for (``feature_variance``,
``knn_predict`` + ``segmentation_metrics``), which the tests check. Pure: tensors in, tensors
and dicts out, no I/O.
"""

from __future__ import annotations

import numpy as np
import torch

from generator.analyses.probes import knn_predict, metrics_from_counts
from generator.errors import PatchAtlasError


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
