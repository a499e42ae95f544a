"""Few-shot patch classification: segmentation metrics, chunked k-NN and a linear probe.

The protocol of the local-representations paper (Cityscapes, 72 train / 30 val images): every
patch token of the train images is a labelled example, every patch token of the val images is
classified, and the predictions are scored like a segmentation with per-class IoU, mIoU and
pixel accuracy.

- ``segmentation_metrics``: confusion-matrix IoU / mIoU / pixel accuracy.
- ``nearest_neighbours``: exact top-k search, chunked over queries and keys so that a
  150k x 113k x 768 problem fits in GPU memory (one [chunk_size, key_chunk_size] block at a time).
- ``knn_predict``: k-NN classification on top of it. The authors' code uses 1-NN on the raw dot
  product (their paper says cosine), so both ``k`` and ``similarity`` are explicit parameters.
- ``LinearProbe``: one linear layer trained with cross-entropy and Adam, optionally behind a
  non-affine BatchNorm (the paper's choice for MAE, after He et al.'s linear probing recipe).

Everything is pure: arrays/tensors in, arrays/tensors/metrics out, on the inputs' device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from generator.analyses._checks import check_choice, check_features, check_positive_int
from generator.analyses.protocol_fields import KNN_FIELDS
from generator.errors import PatchAtlasError
from generator.options import check_choices, choice_field

__all__ = [
    "MIOU_AVERAGES",
    "SIMILARITIES",
    "LinearProbe",
    "ProbeProtocol",
    "bootstrap_miou",
    "mean_and_variance",
    "standardisation",
    "knn_predict",
    "majority_vote",
    "nearest_neighbours",
    "segmentation_metrics",
]

SIMILARITIES = ("dot", "cosine", "l2")
# How mIoU averages the per-class IoUs (see ``segmentation_metrics``).
MIOU_AVERAGES = ("present", "cityscapes")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def segmentation_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    n_classes: int,
    ignore_index: int = 255,
    eval_classes: Sequence[int] | None = None,
    average: str = "present",
) -> dict:
    """Per-class IoU, mIoU and pixel accuracy of ``pred`` against ``target`` (any equal shapes).

    Pixels (or patches) whose target is ``ignore_index`` are left out. A prediction outside
    ``[0, n_classes)`` counts as wrong for its pixel and as a false positive for no class.

    Returns a dict with
    - ``per_class_iou`` float64 [n_classes]: TP / (TP + FP + FN), nan where the class is absent
      from both prediction and target;
    - ``miou``: the mean IoU over the evaluated classes (``eval_classes``, default all) chosen
      by ``average`` (see ``MIOU_AVERAGES``): ``"present"`` averages the classes present in the
      target, so a class only predicted is left out; ``"cityscapes"`` averages every class whose
      IoU is defined (present in the target or predicted), so a class predicted but absent scores
      0, as cityscapesScripts' ``evalPixelLevelSemanticLabeling.py`` does;
    - ``pixel_accuracy``: the share of evaluated-class target pixels predicted correctly;
    - ``confusion`` int64 [n_classes, n_classes] (rows target, columns prediction) and
      ``n_pixels`` (the number of scored pixels).
    """
    n_classes = check_positive_int(n_classes, "n_classes")
    pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    target = target.detach().cpu().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    if pred.shape != target.shape:
        raise PatchAtlasError(
            f"pred of shape {pred.shape} and target of shape {target.shape}: they must have the same shape"
        )
    pred, target = _as_label_array(pred, "pred"), _as_label_array(target, "target")
    target, pred, valid = _flat_scored(pred, target, n_classes, ignore_index)
    return metrics_from_counts(_counts(pred, target, valid, n_classes), eval_classes, average)


def _counts(pred: np.ndarray, target: np.ndarray, valid: np.ndarray, n_classes: int,
            groups: np.ndarray | None = None, n_groups: int = 1) -> np.ndarray:
    """Counts [C, C + 1] (or [n_groups, C, C + 1] per group id) of the valid flat pixels."""
    target, pred = target[valid], pred[valid]
    in_range = (pred >= 0) & (pred < n_classes)
    # Out-of-range predictions go to an extra column that no IoU reads as a false positive.
    pred_col = np.where(in_range, pred, n_classes)
    cells = n_classes * (n_classes + 1)
    index = target * (n_classes + 1) + pred_col
    if groups is None:
        return np.bincount(index, minlength=cells).reshape(n_classes, n_classes + 1)
    index = index + groups[valid] * cells
    return np.bincount(index, minlength=n_groups * cells).reshape(n_groups, n_classes, n_classes + 1)


def _flat_scored(pred: np.ndarray, target: np.ndarray, n_classes: int, ignore_index: int):
    """Flat int64 target and prediction, and the mask of scored pixels; refuses labels outside the classes."""
    target = target.reshape(-1).astype(np.int64)
    pred = pred.reshape(-1).astype(np.int64)
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= n_classes))
    if bad.any():
        raise PatchAtlasError(
            f"target holds class id {int(target[bad][0])} outside [0, {n_classes}) that is not the "
            f"ignore label {ignore_index}: pass the right n_classes or map it to the ignore label"
        )
    return target, pred, valid


def _as_label_array(x, what: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if not np.issubdtype(arr.dtype, np.integer):
        raise PatchAtlasError(f"{what} of dtype {arr.dtype}: expected integer class ids")
    return arr


def bootstrap_miou(
    pred,
    target,
    n_classes: int,
    *,
    ignore_index: int = 255,
    eval_classes: Sequence[int] | None = None,
    average: str = "present",
    resamples: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> list[float]:
    """Percentile bootstrap interval [lo, hi] of the mIoU, resampling whole images.

    ``pred`` and ``target`` have the same shape [n_images, ...]: the first axis is the image.
    Patches of one image are not independent, so each of the ``resamples`` draws ``n_images``
    images with replacement (``numpy.random.default_rng(seed)``) and scores the sum of their
    counts as ``metrics_from_counts`` does; the interval holds the central ``level`` of those
    mIoUs. Draws where no averaged class is left (mIoU undefined) are skipped; [nan, nan] if all are.
    """
    n_classes = check_positive_int(n_classes, "n_classes")
    resamples = check_positive_int(resamples, "resamples")
    if not 0 < level < 1:
        raise PatchAtlasError(f"level {level!r}: expected a number strictly between 0 and 1")
    pred, target = _as_label_array(pred, "pred"), _as_label_array(target, "target")
    if pred.shape != target.shape or pred.ndim < 1 or pred.shape[0] < 1:
        raise PatchAtlasError(f"pred of shape {pred.shape} and target of shape {target.shape}: expected the "
                              "same shape [n_images, ...] with at least one image")
    n_images = pred.shape[0]
    images = np.repeat(np.arange(n_images), int(np.prod(pred.shape[1:], dtype=np.int64)))
    flat_target, flat_pred, valid = _flat_scored(pred, target, n_classes, ignore_index)
    per_image = _counts(flat_pred, flat_target, valid, n_classes, images, n_images).reshape(n_images, -1)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        weights = np.bincount(rng.integers(0, n_images, n_images), minlength=n_images)
        counts = (weights @ per_image).reshape(n_classes, n_classes + 1)
        values.append(metrics_from_counts(counts, eval_classes, average)["miou"])
    values = np.asarray(values)
    values = values[~np.isnan(values)]
    if not values.size:
        return [float("nan"), float("nan")]
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def check_miou_average(average: str) -> str:
    if average not in MIOU_AVERAGES:
        raise PatchAtlasError(f"mIoU average {average!r}: expected one of {', '.join(MIOU_AVERAGES)}")
    return average


def metrics_from_counts(full: np.ndarray, eval_classes: Sequence[int] | None = None,
                        average: str = "present") -> dict:
    """``segmentation_metrics`` from the counts it is built on: ``full`` int [C, C + 1], rows the
    target class, columns the predicted class and, last, predictions outside the classes.

    Counts of several parts of a dataset add up, so streamed evaluation sums them and calls this once.
    """
    average = check_miou_average(average)
    full = np.asarray(full)
    n_classes = full.shape[0]
    if full.ndim != 2 or full.shape[1] != n_classes + 1:
        raise PatchAtlasError(f"counts of shape {full.shape}: expected [classes, classes + 1]")
    confusion = full[:, :n_classes]
    tp = np.diag(confusion).astype(np.float64)
    target_count = full.sum(axis=1).astype(np.float64)
    pred_count = confusion.sum(axis=0).astype(np.float64)
    union = target_count + pred_count - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class_iou = np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)

    classes = _check_eval_classes(eval_classes, n_classes)
    if average == "present":
        averaged = classes[target_count[classes] > 0]
    else:  # cityscapes: nan only where TP + FP + FN = 0
        averaged = classes[union[classes] > 0]
    miou = float(np.mean(per_class_iou[averaged])) if averaged.size else float("nan")
    scored = target_count[classes].sum()
    pixel_accuracy = float(tp[classes].sum() / scored) if scored > 0 else float("nan")
    return {
        "per_class_iou": per_class_iou,
        "miou": miou,
        "pixel_accuracy": pixel_accuracy,
        "confusion": confusion.astype(np.int64),
        "n_pixels": int(scored),
    }


def _check_eval_classes(eval_classes, n_classes: int) -> np.ndarray:
    if eval_classes is None:
        return np.arange(n_classes)
    classes = np.unique(np.asarray(list(eval_classes), dtype=np.int64))
    if classes.size == 0 or classes.min() < 0 or classes.max() >= n_classes:
        raise PatchAtlasError(
            f"eval_classes {list(eval_classes)!r}: expected a non-empty list of class ids in [0, {n_classes})"
        )
    return classes


# --------------------------------------------------------------------------------------------
# Nearest neighbours
# --------------------------------------------------------------------------------------------


def _as_tensor(x, what: str, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if device is None else x.to(device)
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - defensive
        raise PatchAtlasError(f"{what}: cannot be read as an array ({exc})") from exc
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device or "cpu")


def _working_dtype(x: torch.Tensor) -> torch.dtype:
    # Half precision dot products over 768 dims lose neighbours; float64 input keeps its precision.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prepare(x: torch.Tensor, similarity: str, dtype: torch.dtype) -> torch.Tensor:
    x = x.to(dtype)
    if similarity == "cosine":
        x = F.normalize(x, dim=1, eps=1e-12)
    return x


@torch.no_grad()
def nearest_neighbours(
    queries,
    keys,
    k: int = 1,
    *,
    similarity: str = "dot",
    chunk_size: int = 4096,
    key_chunk_size: int = 65536,
    query_groups=None,
    key_groups=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar keys of every query, exactly, most similar first.

    ``similarity``: ``dot`` (raw inner product), ``cosine`` (inner product of L2-normalised rows)
    or ``l2`` (the negated squared Euclidean distance). The similarity matrix is built one
    [chunk_size, key_chunk_size] block at a time and the running top-k merged across key blocks,
    so memory is bounded whatever the sizes. Ties in similarity are broken arbitrarily.

    ``query_groups`` [M] / ``key_groups`` [N] (optional, integers, both or neither): a key is never
    a neighbour of a query of the same group (e.g. the same image). Where fewer than ``k`` keys
    are eligible the missing neighbours have similarity -inf and index -1.

    Returns (similarities [M, k] float, indices [M, k] int64), tensors on the queries' device.
    """
    similarity = check_choice(similarity, "similarity", SIMILARITIES)
    k = check_positive_int(k, "k")
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    key_chunk_size = check_positive_int(key_chunk_size, "key_chunk_size")
    q = _as_tensor(queries, "queries")
    device = q.device
    t = _as_tensor(keys, "keys", device)
    check_features(q, "queries")
    check_features(t, "keys")
    if q.shape[1] != t.shape[1]:
        raise PatchAtlasError(
            f"queries have {q.shape[1]} features but keys have {t.shape[1]}: use the same model, layer and view"
        )
    if k > t.shape[0]:
        raise PatchAtlasError(f"k = {k} but there are only {t.shape[0]} keys: lower k")
    if (query_groups is None) != (key_groups is None):
        raise PatchAtlasError("query_groups and key_groups: give both (to exclude same-group keys) or neither")
    qg = kg = None
    if query_groups is not None:
        qg = _as_tensor(query_groups, "query_groups", device).reshape(-1).long()
        kg = _as_tensor(key_groups, "key_groups", device).reshape(-1).long()
        if qg.shape[0] != q.shape[0] or kg.shape[0] != t.shape[0]:
            raise PatchAtlasError(
                f"query_groups has {qg.shape[0]} entries for {q.shape[0]} queries and key_groups "
                f"{kg.shape[0]} for {t.shape[0]} keys: give one group per row"
            )

    dtype = _working_dtype(q)
    t = _prepare(t, similarity, dtype)
    t_sq = (t * t).sum(dim=1) if similarity == "l2" else None
    n_keys = t.shape[0]
    out_sim = torch.empty(q.shape[0], k, dtype=dtype, device=device)
    out_idx = torch.empty(q.shape[0], k, dtype=torch.int64, device=device)
    for start in range(0, q.shape[0], chunk_size):
        stop = min(start + chunk_size, q.shape[0])
        qc = _prepare(q[start:stop], similarity, dtype)
        best_sim = torch.full((stop - start, k), float("-inf"), dtype=dtype, device=device)
        best_idx = torch.full((stop - start, k), -1, dtype=torch.int64, device=device)
        for kstart in range(0, n_keys, key_chunk_size):
            kstop = min(kstart + key_chunk_size, n_keys)
            if similarity == "l2":
                block = torch.addmm(t_sq[kstart:kstop].unsqueeze(0), qc, t[kstart:kstop].T, alpha=-2.0)
                block.add_((qc * qc).sum(dim=1, keepdim=True)).neg_()
            else:
                block = qc @ t[kstart:kstop].T
            if qg is not None:
                same = qg[start:stop].unsqueeze(1) == kg[kstart:kstop].unsqueeze(0)
                block.masked_fill_(same, float("-inf"))
            vals, idx = block.topk(min(k, kstop - kstart), dim=1)
            merged_sim = torch.cat([best_sim, vals], dim=1)
            merged_idx = torch.cat([best_idx, idx + kstart], dim=1)
            best_sim, pick = merged_sim.topk(k, dim=1)
            best_idx = merged_idx.gather(1, pick)
        best_idx[torch.isneginf(best_sim)] = -1
        out_sim[start:stop] = best_sim
        out_idx[start:stop] = best_idx
    return out_sim, out_idx


def _check_labels(y: torch.Tensor, n_rows: int, what: str) -> torch.Tensor:
    y = y.reshape(-1) if y.ndim > 1 and y.numel() == n_rows else y
    if y.ndim != 1 or y.shape[0] != n_rows:
        raise PatchAtlasError(f"{what} of shape {tuple(y.shape)}: expected one label per row ({n_rows})")
    if torch.is_floating_point(y) or y.dtype == torch.bool:
        raise PatchAtlasError(f"{what} of dtype {y.dtype}: expected integer class ids")
    return y.long()


def _labelled_rows(y: torch.Tensor, n_classes: int | None, ignore_index: int, what: str):
    """Mask of rows with a real label, and the number of classes (inferred if not given)."""
    keep = y != ignore_index
    if not bool(keep.any()):
        raise PatchAtlasError(f"{what}: every row carries the ignore label {ignore_index}; nothing to learn from")
    labels = y[keep]
    if n_classes is None:
        n_classes = int(labels.max()) + 1
    n_classes = check_positive_int(n_classes, "n_classes")
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise PatchAtlasError(
            f"{what} holds class ids outside [0, {n_classes}) other than the ignore label "
            f"{ignore_index}: pass the right n_classes or map them to the ignore label"
        )
    return keep, n_classes


def majority_vote(neighbour_labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The most frequent label in each row of ``neighbour_labels`` [M, k] (nearest first).

    A tie between classes goes to the tied class whose best-ranked neighbour is nearest, so
    k = 1 and a k-vote without a clear majority both fall back on the nearest neighbour.
    """
    m, k = neighbour_labels.shape
    if k == 1:
        return neighbour_labels[:, 0].clone()
    counts = torch.zeros(m, n_classes, dtype=torch.int64, device=neighbour_labels.device)
    counts.scatter_add_(1, neighbour_labels, torch.ones_like(neighbour_labels))
    # k - rank is largest for the nearest occurrence of a class; it is < k + 1, so it only
    # separates classes with equal counts.
    closeness = (k - torch.arange(k, device=neighbour_labels.device)).expand(m, k).contiguous()
    bonus = torch.zeros(m, n_classes, dtype=torch.int64, device=neighbour_labels.device)
    bonus.scatter_reduce_(1, neighbour_labels, closeness, reduce="amax")
    return (counts * (k + 1) + bonus).argmax(dim=1)


def knn_predict(
    train_x,
    train_y,
    test_x,
    *,
    k: int = 1,
    similarity: str = "dot",
    chunk_size: int = 4096,
    key_chunk_size: int = 65536,
    n_classes: int | None = None,
    ignore_index: int = 255,
):
    """k-NN class of every row of ``test_x`` [M, D] from labelled ``train_x`` [N, D].

    Train rows labelled ``ignore_index`` are not candidates. The class is the majority among
    the ``k`` nearest train rows; ties go to the tied class of the nearest neighbour (see
    ``majority_vote``). Defaults (k = 1, dot product) follow the authors' evaluation code.
    ``n_classes`` defaults to the largest train label + 1.

    Returns int64 labels [M]: a numpy array if ``test_x`` is one, else a tensor on its device.
    """
    as_numpy = not isinstance(test_x, torch.Tensor)
    q = _as_tensor(test_x, "test_x")
    device = q.device
    x = _as_tensor(train_x, "train_x", device)
    check_features(x, "train_x")
    y = _check_labels(_as_tensor(train_y, "train_y", device), x.shape[0], "train_y")
    keep, n_classes = _labelled_rows(y, n_classes, ignore_index, "train_y")
    x, y = x[keep], y[keep]
    _, idx = nearest_neighbours(
        q, x, k, similarity=similarity, chunk_size=chunk_size, key_chunk_size=key_chunk_size
    )
    pred = majority_vote(y[idx], n_classes)
    return pred.cpu().numpy() if as_numpy else pred


# --------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------


LINEAR_SOLVERS = ("lbfgs", "adam")

# Rows per chunk when accumulating feature moments in float64: bounds the temporary on the GPU.
_MOMENT_CHUNK_ROWS = 65536


def mean_and_variance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and population variance of ``x`` [N, D] in float64, two passes, chunked."""
    n = x.shape[0]
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, n, _MOMENT_CHUNK_ROWS):
        total += x[start : start + _MOMENT_CHUNK_ROWS].to(torch.float64).sum(dim=0)
    mean = total / n
    # Centring before squaring avoids the cancellation of E[x^2] - E[x]^2 at large offsets.
    sq = torch.zeros_like(total)
    for start in range(0, n, _MOMENT_CHUNK_ROWS):
        centred = x[start : start + _MOMENT_CHUNK_ROWS].to(torch.float64) - mean
        sq += (centred * centred).sum(dim=0)
    return mean, sq / n


def standardisation(train_x: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale) float64 [D] such that ``(x - mean) * scale`` standardises every dimension
    with the exact statistics of all of ``train_x``: scale = 1 / sqrt(var + eps).

    A dimension that is constant on the train rows (variance + eps = 0) gets scale 0: it carries
    nothing to learn from. With ``eps = 0`` the result is unchanged by any per-dimension affine
    map a * x + b of the features (a != 0, up to the sign of a).
    """
    mean, var = mean_and_variance(train_x)
    denom = var + float(eps)
    scale = torch.where(denom > 0, torch.rsqrt(torch.where(denom > 0, denom, 1.0)), torch.zeros_like(denom))
    return mean, scale


class LinearProbe:
    """One linear layer on frozen tokens, trained with cross-entropy to convergence.

    The objective is the mean cross-entropy over the labelled train rows plus
    ``weight_decay / 2 * ||W||²`` (the weights, not the bias, as scikit-learn's
    ``LogisticRegression`` penalises them: its ``C`` is ``1 / (weight_decay * n_rows)``). It is
    convex, and with ``weight_decay > 0`` strictly so, so "trained to convergence" names one
    classifier whatever the optimiser; ``solver="lbfgs"`` (the default) reaches it with
    full-batch L-BFGS (strong-Wolfe line search) from zero weights, stopping when the largest
    gradient entry is below ``tolerance``, the loss stops changing, or after ``max_steps``
    iterations — a budget that does not grow with the number of rows. ``solver="adam"`` is the
    paper's optimiser, run for ``epochs`` passes of ``batch_size`` rows at learning rate ``lr``
    (``seed`` draws the batch order); it is kept for comparisons and stops wherever the epochs end.

    With ``batchnorm=True`` the features are standardised first with the exact mean and variance
    of all train rows, what MAE's linear probe (``BatchNorm1d(affine=False, eps=1e-6)``,
    facebookresearch/mae ``main_linprobe.py``) estimates with running statistics; exact
    statistics and no ``eps`` make the probe's predictions unchanged by per-dimension affine
    maps of the features. Rows labelled ``ignore_index`` are dropped. The fit is deterministic.

    After ``fit``: ``steps_`` (L-BFGS iterations or Adam steps), ``final_loss_`` (the objective on
    all train rows at the end), ``grad_max_`` (its largest gradient entry), ``converged_``
    (L-BFGS stopped before its budget) and ``loss_history_`` (the objective per iteration / epoch).
    """

    def __init__(
        self,
        *,
        n_classes: int | None = None,
        solver: str = "lbfgs",
        weight_decay: float = 1e-4,
        max_steps: int = 500,
        tolerance: float = 1e-5,
        lr: float = 1e-3,
        epochs: int = 20,
        batch_size: int = 1024,
        batchnorm: bool = False,
        seed: int = 0,
        ignore_index: int = 255,
    ):
        if n_classes is not None:
            check_positive_int(n_classes, "n_classes")
        if solver not in LINEAR_SOLVERS:
            raise PatchAtlasError(f"solver {solver!r}: expected one of {', '.join(LINEAR_SOLVERS)}")
        for name, value, low_open in (("lr", lr, True), ("tolerance", tolerance, True),
                                      ("weight_decay", weight_decay, False)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (low_open and value == 0):
                raise PatchAtlasError(f"{name} {value!r}: expected a number {'> 0' if low_open else '>= 0'}")
        self.n_classes = n_classes
        self.solver = solver
        self.weight_decay = float(weight_decay)
        self.max_steps = check_positive_int(max_steps, "max_steps")
        self.tolerance = float(tolerance)
        self.lr = float(lr)
        self.epochs = check_positive_int(epochs, "epochs")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.batchnorm = bool(batchnorm)
        self.seed = int(seed)
        self.ignore_index = int(ignore_index)
        self.weight_: torch.Tensor | None = None
        self.bias_: torch.Tensor | None = None
        self.mean_: torch.Tensor | None = None
        self.scale_: torch.Tensor | None = None
        self.n_classes_: int | None = None
        self.steps_ = 0
        self.final_loss_ = float("nan")
        self.grad_max_ = float("nan")
        self.converged_ = False
        self.loss_history_: list[float] = []

    def settings(self) -> dict:
        """The parameters that change the fitted probe, to record with its results."""
        common = {"solver": self.solver, "weight_decay": self.weight_decay, "batchnorm": self.batchnorm}
        if self.solver == "lbfgs":
            return {**common, "max_steps": self.max_steps, "tolerance": self.tolerance}
        return {**common, "lr": self.lr, "epochs": self.epochs, "batch_size": self.batch_size, "seed": self.seed}

    def _standardised(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean_ is None:
            return x
        return ((x.to(torch.float64) - self.mean_) * self.scale_).to(x.dtype)

    def _objective(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(torch.addmm(bias, x, weight.T), y)
        if self.weight_decay:
            loss = loss + 0.5 * self.weight_decay * (weight * weight).sum()
        return loss

    def fit(self, x, y) -> LinearProbe:
        feats = _as_tensor(x, "x")
        check_features(feats, "x")
        device = feats.device
        labels = _check_labels(_as_tensor(y, "y", device), feats.shape[0], "y")
        keep, n_classes = _labelled_rows(labels, self.n_classes, self.ignore_index, "y")
        dtype = _working_dtype(feats)
        # Cast once, not once per step (the tokens usually come as float16).
        feats, labels = feats[keep].to(dtype), labels[keep]
        self.mean_ = self.scale_ = None
        if self.batchnorm:
            self.mean_, self.scale_ = standardisation(feats)
            feats = self._standardised(feats)
        # Zero weights: the objective is convex, and a start that favours no class or dimension
        # keeps the fit deterministic and blind to sign flips of standardised dimensions.
        weight = torch.zeros(n_classes, feats.shape[1], dtype=dtype, device=device, requires_grad=True)
        bias = torch.zeros(n_classes, dtype=dtype, device=device, requires_grad=True)
        if self.solver == "lbfgs":
            self._fit_lbfgs(feats, labels, weight, bias)
        else:
            self._fit_adam(feats, labels, weight, bias)
        weight.grad = bias.grad = None
        loss = self._objective(feats, labels, weight, bias)
        grads = torch.autograd.grad(loss, [weight, bias])
        self.final_loss_ = float(loss.detach())
        self.grad_max_ = float(max(g.abs().max() for g in grads))
        self.weight_, self.bias_ = weight.detach(), bias.detach()
        self.n_classes_ = n_classes
        return self

    def _fit_lbfgs(self, feats, labels, weight, bias) -> None:
        optimiser = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=self.max_steps,
                                      max_eval=2 * self.max_steps, tolerance_grad=self.tolerance,
                                      tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")
        history: list[float] = []

        def closure():
            optimiser.zero_grad(set_to_none=True)
            loss = self._objective(feats, labels, weight, bias)
            loss.backward()
            history.append(float(loss.detach()))
            return loss

        optimiser.step(closure)
        self.steps_ = int(optimiser.state[weight].get("n_iter", 0))
        self.converged_ = self.steps_ < self.max_steps
        self.loss_history_ = history

    def _fit_adam(self, feats, labels, weight, bias) -> None:
        device = feats.device
        # On GPUs the fused Adam is one kernel per step instead of one per parameter and operation.
        optimiser = torch.optim.Adam([weight, bias], lr=self.lr, fused=device.type == "cuda")
        generator = torch.Generator().manual_seed(self.seed + 1)
        n = feats.shape[0]
        self.loss_history_, self.steps_ = [], 0
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=generator).to(device)
            # The loss stays on the device until the epoch ends: reading it every step would make
            # the host wait for the device at each of the thousands of small steps.
            total = torch.zeros((), dtype=torch.float64, device=device)
            for start in range(0, n, self.batch_size):
                batch = order[start : start + self.batch_size]
                loss = self._objective(feats[batch], labels[batch], weight, bias)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += loss.detach().double() * batch.numel()
                self.steps_ += 1
            self.loss_history_.append(float(total) / n)
        self.converged_ = False  # a fixed number of epochs says nothing about convergence

    def _require_fit(self) -> torch.Tensor:
        if self.weight_ is None:
            raise PatchAtlasError("LinearProbe: call fit(x, y) before predict")
        return self.weight_

    @torch.no_grad()
    def predict_logits(self, x, chunk_size: int = 65536) -> torch.Tensor:
        """Class scores [M, n_classes] as a tensor on the model's device."""
        weight = self._require_fit()
        feats = _as_tensor(x, "x", weight.device)
        check_features(feats, "x")
        if feats.shape[1] != weight.shape[1]:
            raise PatchAtlasError(
                f"x has {feats.shape[1]} features but the probe was fitted on {weight.shape[1]}"
            )
        chunks = [torch.addmm(self.bias_, self._standardised(feats[s : s + chunk_size].to(weight.dtype)), weight.T)
                  for s in range(0, feats.shape[0], chunk_size)]
        return torch.cat(chunks, dim=0)

    def predict(self, x):
        """Predicted class [M] (int64): numpy if ``x`` is numpy, else a tensor on the model's device."""
        pred = self.predict_logits(x).argmax(dim=1)
        return pred if isinstance(x, torch.Tensor) else pred.cpu().numpy()


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeProtocol:
    """Every setting that changes a few-shot probe number, in one record.

    Built once per build from the options (or a preset) and handed to both the layer-wise
    curves streamed during extraction and the analyses, so both score with the same rule; the
    per-unit facts (``label_rule`` of the tokens, ``train_count`` of the source, ``batchnorm`` of
    the model) are filled in by ``for_unit``. ``record()`` is what every probe result stores.
    """

    knn_k: int = 1  # the local-representations code: 1-NN on dot-product similarity
    knn_similarity: str = choice_field("dot", SIMILARITIES)
    miou_average: str = choice_field("present", MIOU_AVERAGES)
    linear_weight_decay: float = 1e-4
    linear_max_steps: int = 500
    linear_tolerance: float = 1e-5
    bootstrap_resamples: int = 200
    bootstrap_seed: int = 0
    label_rule: str | None = None
    train_count: int | None = None  # None: the first half of the images train (few_shot_split)
    batchnorm: bool | None = None

    # What the k-NN curves depend on: two curves may share a chart only if these agree.
    KNN_FIELDS: ClassVar[tuple[str, ...]] = KNN_FIELDS

    def validate(self) -> ProbeProtocol:
        """Raise a PatchAtlasError naming the first setting with a bad value; changes nothing."""
        check_choices(self)
        check_positive_int(self.knn_k, "--knn-k")
        check_positive_int(self.linear_max_steps, "--linear-max-steps")
        check_positive_int(self.bootstrap_resamples, "bootstrap_resamples")
        if not self.linear_weight_decay >= 0:
            raise PatchAtlasError(f"--linear-weight-decay {self.linear_weight_decay!r}: expected a number >= 0")
        if not self.linear_tolerance > 0:
            raise PatchAtlasError(f"linear_tolerance {self.linear_tolerance!r}: expected a positive number")
        return self

    def for_unit(self, *, label_rule: str | None, train_count: int | None, batchnorm: bool) -> ProbeProtocol:
        return replace(self, label_rule=label_rule, train_count=train_count, batchnorm=bool(batchnorm))

    def linear_probe(self, n_classes: int, ignore_index: int) -> LinearProbe:
        return LinearProbe(n_classes=n_classes, ignore_index=ignore_index, weight_decay=self.linear_weight_decay,
                           max_steps=self.linear_max_steps, tolerance=self.linear_tolerance,
                           batchnorm=bool(self.batchnorm))

    def record(self) -> dict:
        return asdict(self)

    def knn_record(self) -> dict:
        return {key: getattr(self, key) for key in self.KNN_FIELDS}
