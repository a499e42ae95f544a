"""Layer-wise curves of the layers that are not published, computed as the tokens come out.

Publishing every layer of every model is what makes the datasets large; layer-wise curves need
every layer. For the layers a build does not publish, the extraction pass also asks the model
for those layers and feeds their tokens to the streaming accumulators of
``generator.analyses.streaming`` — the few-shot k-NN probe, k-means segmentation with one
cluster per class, the variance spectrum of the train tokens and the pre-norm token norms — then
drops them. Nothing is stored but the results, so memory is bounded by the batch, the few-shot
train set and the k-means fit rows, not by the dataset.

The accumulators need every image once, in order. When extraction does not pass over all of
them (a resumed run whose first shards were already written, a distributed run, or a source
whose shards are all current), a pass of its own over the images does the same.

The result, ``results/<source>/<model>/layerwise.json``, is a manifest unit of its own
(``stream/<source>/<model>``), reused while the tokens' parameters, the layers and the probe
protocol (``ProbeProtocol``, recorded in the file) stay the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from generator.analyses.probes import ProbeProtocol
from generator.analyses.streaming import NormHistogram, RunningMoments, StreamingKMeans, StreamingKNN
from generator.batches import encoder_if_available, labelled_batches
from generator.errors import PatchAtlasError
from generator.models.encoder import NORMS, Encoder, TokenBatch, resolve_layers
from generator.models.registry import ModelEntry, model_geometry
from generator.sources.base import SegmentationSource
from generator.sources.splits import few_shot_split
from generator.store.atomic import atomic_write_json
from generator.store.layout import layerwise_path, stream_key
from generator.store.manifest import Manifest, params_hash

if TYPE_CHECKING:  # for annotations only: extract imports this module
    from generator.extract import ExtractOptions

# 4: a pass of its own cuts its batches at the extraction's shard boundaries.
STREAM_VERSION = "4"
# Rows the layer-wise k-means is fitted on (the first ones: the train images' tokens); enough for
# k = the number of classes, small enough that the fit stays a fraction of the pass.
KMEANS_FIT_ROWS = 65536


def unit_protocol(source: SegmentationSource, entry: ModelEntry, options: ExtractOptions) -> ProbeProtocol:
    """The build's probe protocol with this (source, model)'s label rule, train count and BatchNorm flag."""
    return options.probe.for_unit(label_rule=options.label_rule, train_count=source.probe_train_count,
                                  batchnorm=entry.probe_batchnorm)


def streamed_layers(curve_layers, depth: int, published: list[int]) -> list[int]:
    """The layers whose curves come from streaming: asked for, and not published."""
    return [layer for layer in resolve_layers(curve_layers, depth) if layer not in set(published)]


@dataclass
class StreamPlan:
    """What the layer-wise unit of one (source, model) still has to compute."""

    key: str
    path: Path
    layers: list[int]
    params: dict


def plan_stream(source: SegmentationSource, entry: ModelEntry, options: ExtractOptions, out: Path,
                manifest: Manifest, tokens_hash: str, published: list[int]) -> StreamPlan | None:
    """The unit's plan, or None when there is nothing to compute: its record is current, or every
    asked-for layer is published (then an earlier stream result is removed, as the analyses
    cover those layers)."""
    key = stream_key(source.name, entry.name)
    path = layerwise_path(out, source.name, entry.name)
    layers = streamed_layers(options.curve_layers, model_geometry(entry).depth, published) \
        if source.probes and len(source) >= 2 else []
    if not layers:
        if manifest.get(key) is not None:
            path.unlink(missing_ok=True)
            manifest.remove(key)
            manifest.save()
        return None
    params = {"tokens": tokens_hash, "layers": layers, "protocol": unit_protocol(source, entry, options).record(),
              "version": STREAM_VERSION}
    if manifest.is_done(key, params, out):
        return None
    return StreamPlan(key, path, layers, params)


def run_stream_unit(source: SegmentationSource, entry: ModelEntry, options: ExtractOptions, out: Path,
                    manifest: Manifest, tokens_hash: str, encoder: Encoder | None, published: list[int],
                    fused: LayerwiseAccumulator | None = None,
                    spans: Sequence[tuple[int, int]] | None = None) -> None:
    """Compute (or reuse) the layer-wise results of the unpublished layers of one (source, model).

    ``fused`` is an accumulator the extraction pass fed with every image: its results are used
    as they are, and no pass of its own runs. ``spans`` are the image ranges the extraction
    passes over one at a time (its shards); a pass of its own cuts its batches within them.
    """
    plan = plan_stream(source, entry, options, out, manifest, tokens_hash, published)
    if plan is None:
        return
    if fused is not None and fused.layers == plan.layers and fused.complete:
        results = fused.result()
    else:
        encoder = encoder or encoder_if_available(entry, options)
        if encoder is None:
            return
        results = layerwise_results(source, encoder, plan.layers, options, spans)
    atomic_write_json(plan.path, {"source": source.name, "model": entry.name, "streamed": True,
                                  "protocol": plan.params["protocol"], "layers": results})
    manifest.set(plan.key, {"status": "done", "params": plan.params, "params_hash": params_hash(plan.params),
                            "files": {str(plan.path.relative_to(out)): manifest.sha256(plan.path)}})
    manifest.save()


class LayerwiseAccumulator:
    """Per layer, the k-NN probe, k-means segmentation (k = the number of classes, fitted on the
    first ``KMEANS_FIT_ROWS`` tokens, Hungarian-matched), the train variance spectrum (all three
    post-norm) and the token norms (pre-norm) of one source, fed every image once in dataset
    order, by the extraction pass or by a pass of its own. Tokens of a batch are dropped once
    counted."""

    def __init__(self, source: SegmentationSource, layers: list[int], encoder: Encoder, options: ExtractOptions):
        dim, device, (grid_h, grid_w) = encoder.embed_dim, encoder.device, encoder.grid
        self.layers, self.dim, self.total, self.model = list(layers), dim, len(source), encoder.entry.name
        # The train bank is the one thing kept; half precision halves it on GPUs.
        self._bank_dtype = torch.float16 if device.type == "cuda" else torch.float32
        train_ids, _ = few_shot_split(source.dataset["image_id"], train_count=source.probe_train_count)
        self.n_train = len(train_ids)
        n_classes = len(source.classes)
        self.protocol = unit_protocol(source, encoder.entry, options)
        self._knn = {layer: StreamingKNN(n_classes, ignore_index=source.ignore_index, k=self.protocol.knn_k,
                                         similarity=self.protocol.knn_similarity,
                                         average=self.protocol.miou_average) for layer in layers}
        self._moments = {layer: RunningMoments(dim, device) for layer in layers}
        self._norms = {layer: NormHistogram() for layer in layers}
        rows = len(source) * grid_h * grid_w
        self._kmeans = {layer: StreamingKMeans(min(n_classes, rows, KMEANS_FIT_ROWS), n_classes,
                                               ignore_index=source.ignore_index, fit_rows=KMEANS_FIT_ROWS)
                        for layer in layers}
        self.seen = 0

    @property
    def complete(self) -> bool:
        return self.seen == self.total

    def update(self, first_index: int, labels: np.ndarray, batch: TokenBatch) -> None:
        """Count the tokens of images ``first_index`` … (labels [B, gh, gw]); the images must come
        in dataset order, as the few-shot train images are the first ones."""
        if first_index != self.seen:
            raise PatchAtlasError(f"layer-wise curves: images from {first_index} after {self.seen} seen; "
                                  "every image must come once, in dataset order")
        device = self._moments[self.layers[0]].mean.device
        y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).reshape(-1)
        if device.type == "cuda":  # from pageable memory the copy would wait for the device first
            y = y.pin_memory().to(device, non_blocking=True)
        y = y.to(device)
        n_images, per_image = labels.shape[0], labels.shape[1] * labels.shape[2]
        split = min(max(self.n_train - self.seen, 0), n_images) * per_image  # rows of train images
        posts = {layer: batch.layers[(layer, "postnorm")].patch.reshape(-1, self.dim) for layer in self.layers}
        pres = {layer: batch.layers[(layer, "prenorm")].patch.reshape(-1, self.dim) for layer in self.layers}
        # The one read-back of the batch (the accumulators read nothing back): all layers checked at
        # once, before any of them is counted.
        finite = torch.stack([torch.isfinite(pres[layer]).all() & torch.isfinite(posts[layer]).all()
                              for layer in self.layers]).tolist()
        if not all(finite):
            raise PatchAtlasError(f"{self.model} on images {first_index}..{first_index + n_images - 1}, "
                                  f"layer {self.layers[finite.index(False)]}: NaN/inf tokens; the weights or the "
                                  "inputs are broken")
        for layer in self.layers:
            post, pre = posts[layer], pres[layer]
            if split:
                self._knn[layer].update(post[:split].to(self._bank_dtype), y[:split], train=True)
                self._moments[layer].update(post[:split])
            if split < len(post):
                self._knn[layer].update(post[split:].to(self._bank_dtype), y[split:])
            self._kmeans[layer].update(post, y)
            self._norms[layer].update(pre)
        self.seen += n_images

    def result(self) -> list[dict]:
        rows = []
        for layer in self.layers:
            metrics = self._knn[layer].result()
            spectrum = torch.sort(self._moments[layer].result(), descending=True).values
            kmeans = self._kmeans[layer].result()
            rows.append({
                "layer": layer, "knn_miou": metrics["miou"], "knn_pixel_accuracy": metrics["pixel_accuracy"],
                "per_class_iou": [None if np.isnan(v) else float(v) for v in metrics["per_class_iou"]],
                "n_train_images": self.n_train, "n_val_images": self.seen - self.n_train,
                "variance_spectrum": spectrum.cpu().tolist(), "prenorm_norms": self._norms[layer].result(),
                "kmeans": {key: kmeans[key] for key in ("k", "miou", "pixel_accuracy", "fit_rows")},
            })
        return rows


def layerwise_results(source: SegmentationSource, encoder: Encoder, layers: list[int],
                      options: ExtractOptions, spans: Sequence[tuple[int, int]] | None = None) -> list[dict]:
    """A pass of its own over the source, for when extraction did not feed the accumulators
    (its shards were already written, or a distributed run wrote them).

    The accumulators' sums depend on where batches start, so the images go in batches cut as
    the extraction cuts them, within each span (shard) of ``spans``: the results are then the
    bytes the fused pass gives, whichever pass a (resumed) build took.
    """
    spans = list(spans or [(0, len(source))])
    accumulator = LayerwiseAccumulator(source, layers, encoder, options)
    total = sum(-(-(stop - start) // options.batch_size) for start, stop in spans)
    progress = tqdm(total=total, disable=not options.progress, desc=f"{encoder.entry.name} layer-wise",
                    unit="batch")
    with progress:
        for start, stop in spans:
            batches = labelled_batches(source.dataset.select(range(start, stop)), options.batch_size, encoder,
                                       options.label_rule, source.ignore_index, decode=options.decode)
            for _image_ids, images, labels in batches:
                accumulator.update(accumulator.seen, labels,
                                   encoder.tokens(encoder.preprocess(images), layers, list(NORMS)))
                progress.update()
    return accumulator.result()
