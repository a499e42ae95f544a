"""Layer-wise curves of the layers that are not published, computed as the tokens come out.

Publishing every layer of every model is what makes the datasets large; layer-wise curves need
every layer. For the layers a build does not publish, extraction runs one more pass over the
images and feeds each layer's tokens to the streaming accumulators of
``generator.analyses.streaming`` — the few-shot k-NN probe, the variance spectrum of the train
tokens and the pre-norm token norms — then drops them. Nothing is stored but the results, so
memory is bounded by the batch and the few-shot train set, not by the dataset.

The result, ``results/<source>/<model>/layerwise.json``, is a manifest unit of its own
(``stream/<source>/<model>``), reused while the tokens' parameters, the layers and the k-NN
settings stay the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from generator.analyses.streaming import NormHistogram, RunningMoments, StreamingKNN
from generator.batches import encoder_if_available, labelled_batches
from generator.models.encoder import Encoder, resolve_layers
from generator.models.registry import ModelEntry, model_geometry
from generator.sources.base import SegmentationSource
from generator.sources.splits import few_shot_split
from generator.store.atomic import atomic_write_json
from generator.store.manifest import Manifest, file_sha256, params_hash

STREAM_VERSION = "1"
LAYERWISE_FILE = "layerwise.json"


def stream_key(source_name: str, model: str) -> str:
    return f"stream/{source_name}/{model}"


def streamed_layers(curve_layers, depth: int, published: list[int]) -> list[int]:
    """The layers whose curves come from streaming: asked for, and not published."""
    return [layer for layer in resolve_layers(curve_layers, depth) if layer not in set(published)]


def run_stream_unit(source: SegmentationSource, entry: ModelEntry, options, out: Path, manifest: Manifest,
                    tokens_hash: str, encoder: Encoder | None, published: list[int]) -> None:
    """Compute (or reuse) the layer-wise results of the unpublished layers of one (source, model)."""
    key = stream_key(source.name, entry.name)
    path = Path(out) / "results" / source.name / entry.name / LAYERWISE_FILE
    layers = streamed_layers(options.curve_layers, model_geometry(entry).depth, published) \
        if source.probes and len(source) >= 2 else []
    if not layers:
        # Every asked-for layer is published (the analyses cover it): drop an earlier stream result.
        if manifest.get(key) is not None:
            path.unlink(missing_ok=True)
            manifest.remove(key)
            manifest.save()
        return
    params = {"tokens": tokens_hash, "layers": layers, "knn_k": options.knn_k,
              "knn_similarity": options.knn_similarity, "train_count": source.probe_train_count,
              "version": STREAM_VERSION}
    if manifest.is_done(key, params, out):
        return
    encoder = encoder or encoder_if_available(entry, options)
    if encoder is None:
        return
    results = layerwise_results(source, encoder, layers, options)
    atomic_write_json(path, {"source": source.name, "model": entry.name, "streamed": True, "layers": results})
    manifest.set(key, {"status": "done", "params": params, "params_hash": params_hash(params),
                       "files": {str(path.relative_to(out)): file_sha256(path)}})
    manifest.save()


def layerwise_results(source: SegmentationSource, encoder: Encoder, layers: list[int], options) -> list[dict]:
    """One pass over the source: per layer, k-NN mIoU (post-norm), train variance spectrum
    (post-norm) and token norms (pre-norm). Tokens of a batch are dropped once counted."""
    dim, device = encoder.embed_dim, encoder.device
    # The train bank is the one thing kept; half precision halves it on GPUs.
    bank_dtype = torch.float16 if device.type == "cuda" else torch.float32
    train_ids, _ = few_shot_split(source.dataset["image_id"], train_count=source.probe_train_count)
    n_train = len(train_ids)
    n_classes = len(source.classes)
    knn = {layer: StreamingKNN(n_classes, ignore_index=source.ignore_index, k=options.knn_k,
                               similarity=options.knn_similarity) for layer in layers}
    moments = {layer: RunningMoments(dim, device) for layer in layers}
    norms = {layer: NormHistogram() for layer in layers}
    seen = 0

    batches = labelled_batches(source.dataset, options.batch_size, encoder, options.label_rule,
                               source.ignore_index)
    total = -(-len(source) // options.batch_size)
    for image_ids, images, labels in tqdm(batches, total=total, disable=not options.progress,
                                          desc=f"{encoder.entry.name} layer-wise", unit="batch"):
        batch = encoder.tokens(encoder.preprocess(images), layers, ["prenorm", "postnorm"])
        y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).reshape(-1).to(device)
        per_image = labels.shape[1] * labels.shape[2]
        split = min(max(n_train - seen, 0), len(image_ids)) * per_image  # rows of train images
        for layer in layers:
            post = batch.layers[(layer, "postnorm")].patch.reshape(-1, dim)
            if split:
                knn[layer].add_train(post[:split].to(bank_dtype), y[:split])
                moments[layer].update(post[:split])
            if split < len(post):
                knn[layer].add_eval(post[split:].to(bank_dtype), y[split:])
            norms[layer].update(batch.layers[(layer, "prenorm")].patch.reshape(-1, dim))
        seen += len(image_ids)
    rows = []
    for layer in layers:
        metrics = knn[layer].metrics()
        spectrum = torch.sort(moments[layer].variance(), descending=True).values
        rows.append({
            "layer": layer, "knn_miou": metrics["miou"], "knn_pixel_accuracy": metrics["pixel_accuracy"],
            "per_class_iou": [None if np.isnan(v) else float(v) for v in metrics["per_class_iou"]],
            "n_train_images": n_train, "n_val_images": seen - n_train,
            "variance_spectrum": spectrum.cpu().tolist(), "prenorm_norms": norms[layer].summary(),
        })
    return rows
