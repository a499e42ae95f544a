"""Extraction throughput and GPU-path checks.

Prints a table and writes JSON (``--json``):

- encoder forward throughput (img/s, inputs already on the device) for random-weight ViTs:
  a naive fp32 loop at batch 32 next to the PatchAtlas encoder path (bf16 autocast on CUDA,
  larger batch), measured side by side in one process;
- agreement of the device path with the CPU float32 reference (max relative error of tokens)
  and of k-means on the device with k-means on the CPU (mIoU of the same clustering task);
- wall time of ``patchatlas build`` on the synthetic scenes with the random model.

Run: ``python benchmarks/extract_throughput.py [--device cuda] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import sync  # noqa: E402
from generator.analyses.clusters import joint_kmeans_segmentation  # noqa: E402
from generator.cli import main as cli_main  # noqa: E402
from generator.models.encoder import load_encoder  # noqa: E402
from generator.models.registry import ModelEntry  # noqa: E402

ARCHS = {"vit_small_patch16_224": "ViT-S/16", "vit_base_patch16_224": "ViT-B/16"}


def _timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def forward_throughput(arch: str, device: torch.device, naive_batch: int, tuned_batch: int, repeats: int) -> dict:
    entry = ModelEntry(f"random_{arch}", arch, "random", 16, 224, 224, 1, pretrained=False)
    encoder = load_encoder(entry, device=device)
    depth = encoder.depth
    layers = [depth // 4, depth // 2, 3 * depth // 4, depth]
    naive_x = torch.randn(naive_batch, 3, 224, 224, device=device)
    tuned_x = torch.randn(tuned_batch, 3, 224, 224, device=device)

    def naive():
        with torch.no_grad():
            encoder.model.forward_intermediates(naive_x, indices=[i - 1 for i in layers], norm=False,
                                                return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True)

    def tuned():
        encoder.tokens(tuned_x, layers)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    naive_s = _timed(naive, device, repeats)
    tuned_s = _timed(tuned, device, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"model": ARCHS[arch], "naive_img_s": naive_batch / naive_s, "tuned_img_s": tuned_batch / tuned_s,
            "speedup": (tuned_batch / tuned_s) / (naive_batch / naive_s), "naive_batch": naive_batch,
            "tuned_batch": tuned_batch, "peak_gib": peak}


def device_agreement(device: torch.device) -> dict:
    """Tokens and k-means on the device against the CPU float32 reference."""
    entry = ModelEntry("random_vits16", "vit_small_patch16_224", "random", 16, 224, 224, 1, pretrained=False)
    cpu = load_encoder(entry, device="cpu")
    dev = load_encoder(entry, device=device)
    images = list(np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8))
    ref = cpu.tokens(cpu.preprocess(images), [12]).layers[(12, "postnorm")].patch
    got = dev.tokens(dev.preprocess(images), [12]).layers[(12, "postnorm")].patch.cpu()
    rel = float((got - ref).norm() / ref.norm())
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, (32, 14, 14))
    centres = rng.normal(size=(6, 64)).astype(np.float32) * 3
    tokens = torch.from_numpy(centres[labels] + rng.normal(size=(32, 14, 14, 64)).astype(np.float32))
    cpu_seg = joint_kmeans_segmentation(tokens, labels, 6, 6)
    dev_seg = joint_kmeans_segmentation(tokens.to(device), labels, 6, 6)
    return {"token_rel_error_vs_cpu_fp32": rel, "kmeans_miou_cpu": cpu_seg.match.miou,
            "kmeans_miou_device": dev_seg.match.miou}


def build_wall_time(device: str, n_images: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        code = cli_main(["build", "--out", tmp, "--models", "random", "--source", "synthetic-scenes",
                         "--source-option", f"n_images={n_images}", "--device", device, "--batch-size", "64",
                         "--quiet", "--no-html"])
        return {"n_images": n_images, "exit_code": code, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--build-images", type=int, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    repeats = args.repeats or (10 if gpu else 2)
    machine = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    rows = [forward_throughput(arch, device, 32 if gpu else 4, 256 if gpu else 8, repeats) for arch in ARCHS]
    report = {"machine": machine, "torch": torch.__version__, "forward": rows,
              "agreement": device_agreement(device) if gpu else None,
              "build": build_wall_time(args.device, args.build_images or (512 if gpu else 16))}
    print(f"machine: {machine}, torch {torch.__version__}")
    print(f"{'model':<10} {'naive img/s':>12} {'tuned img/s':>12} {'speed-up':>9} {'peak GiB':>9}")
    for r in rows:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{r['model']:<10} {r['naive_img_s']:>12.0f} {r['tuned_img_s']:>12.0f} {r['speedup']:>8.2f}× {peak:>9}")
    if report["agreement"]:
        print("agreement:", json.dumps(report["agreement"]))
    print("build:", json.dumps(report["build"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
