"""Running an encoder over one shard's images and writing that shard's token tables."""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from generator.batches import (
    labelled_batches,
)
from generator.concurrency import BackgroundCalls
from generator.errors import PatchAtlasError
from generator.extract.plan import ExtractOptions, Shard, TableSpec, table_geometry
from generator.models.encoder import NORMS, QKV_VIEWS, Encoder
from generator.sources.base import SegmentationSource
from generator.store.manifest import file_sha256
from generator.store.parquet import (
    AttentionTableWriter,
    PatchTableWriter,
    PrefixTableWriter,
    check_float16_range,
)
from generator.store.schema import label_names
from generator.stream import LayerwiseAccumulator


def extract_shard(source: SegmentationSource, encoder: Encoder, shard: Shard, tables: dict[str, TableSpec],
                  options: ExtractOptions, repo: Path, layerwise: LayerwiseAccumulator | None = None) -> dict[str, str]:
    """Run one model over one shard's images and write the given tables of that shard.

    The forward pass goes only as deep as the tables need, or as ``layerwise`` needs: its
    layers' tokens (the unpublished layers of the layer-wise curves) come from the same pass and
    are counted, not written. Returns the written files (path relative to ``repo`` → sha256).
    """
    entry, dim, dtype = encoder.entry, encoder.embed_dim, options.embedding_dtype
    kinds = ["cls"] * (encoder.num_prefix_tokens - entry.num_registers) + ["register"] * entry.num_registers
    token_tables = [t for t in tables.values() if t.view in NORMS]
    layers = sorted({t.layer for t in token_tables})
    norms = [norm for norm in options.norms if any(t.view == norm for t in token_tables)]
    if layerwise is not None:
        layers, norms = sorted(set(layers) | set(layerwise.layers)), list(NORMS)
    with_attention = any(t.kind == "attention" or t.view in QKV_VIEWS for t in tables.values())
    images = source.dataset.select(range(shard.start, shard.stop))

    # ExitStack hands an exception to every writer, so none of them renames a partial file; the
    # background writer is entered last, so it is drained (or stopped) before the files close.
    with contextlib.ExitStack() as stack:
        # q/k/v concatenate the heads: heads × head_dim, the embedding width in timm ViTs.
        names = label_names(source.classes, source.ignore_index)
        patch_writers = {(t.layer, t.view): stack.enter_context(PatchTableWriter(
            repo / rel, dim, dtype=dtype, label_names=names,
            geometry=table_geometry(encoder, options, layer=t.layer, view=t.view)))
            for rel, t in tables.items() if t.kind == "patches"}
        prefix_writers = {(t.layer, t.view): stack.enter_context(PrefixTableWriter(
            repo / rel, dim, dtype=dtype, geometry=table_geometry(encoder, options, layer=None, view=None)))
            for rel, t in tables.items() if t.kind == "prefix"}
        attention_writer = next((stack.enter_context(AttentionTableWriter(repo / rel))
                                 for rel, t in tables.items() if t.kind == "attention"), None)
        # Tables are independent files: several encode at once (Arrow releases the GIL).
        table_pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, min(len(tables), os.cpu_count() or 1)), thread_name_prefix="table"))
        background = stack.enter_context(BackgroundCalls(depth=2))

        def write(image_ids, labels, patches, prefixes, cls_maps):  # runs on the writer thread
            calls = [(patch_writers[key].write_batch, (image_ids, array, labels)) for key, array in patches.items()]
            calls += [(prefix_writers[key].write_batch, (image_ids, key[0], key[1], array, kinds))
                      for key, array in prefixes.items()]
            if attention_writer is not None:
                calls.append((attention_writer.write_batch, (image_ids, cls_maps)))
            list(table_pool.map(lambda call: call[0](*call[1]), calls))

        batches = labelled_batches(images, options.batch_size, encoder, options.label_rule, source.ignore_index,
                                   decode=options.decode)
        total = -(-len(images) // options.batch_size)
        desc = f"{entry.name} on {source.name}" + (f" [{shard.index + 1}/{shard.total}]" if shard.total > 1 else "")
        first_index = shard.start
        for image_ids, pixels_uint8, labels in tqdm(batches, total=total, disable=not options.progress,
                                                    desc=desc, unit="batch"):
            pixels = encoder.preprocess(pixels_uint8)
            if with_attention:
                batch, attention = encoder.tokens_and_attention(pixels, layers, norms)
            else:
                batch, attention = encoder.tokens(pixels, layers, norms), None
            tokens = {key: toks.patch for key, toks in batch.layers.items()}
            if attention is not None:
                tokens.update({(encoder.depth, view): t for view, t in attention.views.items()})
            where = f"{entry.name} on images {image_ids[0]}..{image_ids[-1]}"
            background.submit(
                write, image_ids, labels,
                {key: to_host(t, dtype, f"{where}, layer {key[0]} ({key[1]})")
                 for key, t in tokens.items() if key in patch_writers},
                {key: to_host(toks.prefix, dtype, f"{where}, layer {key[0]} ({key[1]}) prefix")
                 for key, toks in batch.layers.items() if key in prefix_writers},
                attention.cls_maps.cpu().numpy() if attention_writer is not None else None)
            # After the published tokens went to the host, so that their copies do not wait for
            # the accumulators' work on the device.
            if layerwise is not None:
                layerwise.update(first_index, labels, batch)
            first_index += len(image_ids)
    return {rel: file_sha256(repo / rel) for rel in tables}


def to_host(tokens: torch.Tensor, dtype: str, where: str) -> np.ndarray:
    """Tokens as a host array of the stored dtype, refusing values the table cannot hold.

    The cast happens on the model's device, so a GPU sends half the bytes for float16; one
    reduction checks both NaN/inf (which it propagates) and float16's range.
    """
    peak = float(tokens.abs().amax()) if tokens.numel() else 0.0
    if not math.isfinite(peak):
        raise PatchAtlasError(f"{where}: NaN/inf tokens; the weights or the inputs are broken")
    if dtype == "float16":
        check_float16_range(peak, f"{where}: tokens")
    return tokens.to(getattr(torch, dtype)).cpu().numpy()
