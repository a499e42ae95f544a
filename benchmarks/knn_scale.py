"""k-NN at the Cityscapes protocol's size on the device: 150k query × 113k train patches × 768.

Checks that the chunked search fits and reports its time and peak memory; on a small slice it
also checks the result against an unchunked brute force.

Run: ``python benchmarks/knn_scale.py [--device cuda] [--queries 150000] [--train 113000]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generator.analyses.probes import knn_predict  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--queries", type=int, default=150_000)
    parser.add_argument("--train", type=int, default=113_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=19)
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    train = torch.randn(args.train, args.dim, device=device, generator=gen).half()
    test = torch.randn(args.queries, args.dim, device=device, generator=gen).half()
    labels = torch.randint(0, args.classes, (args.train,), device=device, generator=gen)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pred = knn_predict(train, labels, test, k=1, similarity="dot", n_classes=args.classes)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    # Brute force on a slice: the chunked search must pick the same neighbours.
    sl = slice(0, 2048)
    brute = labels[(test[sl].float() @ train.float().T).argmax(1)]
    agree = float((pred[sl] == brute).float().mean())
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "queries": args.queries, "train": args.train, "dim": args.dim, "seconds": seconds,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
              "agreement_with_brute_force_on_2048": agree}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
