"""Layer-wise curves of unpublished layers: streamed from the extraction pass, or a pass of their own.

Three runs of ``run_extract`` (the ``patchatlas extract`` stage) on the same source, side by
side in one process, each in a fresh output folder:

- ``publish only``: ``--layers last`` without layer-wise curves (``--curve-layers last``): the
  baseline, what the curves cost is measured against it;
- ``fused``: ``--layers last --curve-layers all``; the extraction pass also asks the model for
  the other layers and streams them into the accumulators (k-NN, k-means, variance, norms);
- ``separate``: the baseline, then the same command with ``--curve-layers all``, which reuses
  every shard and runs a pass of its own over the images (what a resumed or distributed run
  does).

Degraded variants are off in all three (they are the same work in each). It prints a table,
checks that the fused and separate curves agree, and writes JSON (``--json``).

Run: ``python benchmarks/layerwise_stream.py [--device auto|cpu|cuda] [--images 64] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import command_line, machine_info, resolve_device, sync  # noqa: E402
from generator.extract import ExtractOptions, run_extract  # noqa: E402
from generator.sources.synthetic import synthetic_scenes  # noqa: E402
from generator.store.atomic import atomic_write_json  # noqa: E402


def _extract(out: Path, source, model: str, device: str, batch_size: int | None, curve_layers: str) -> float:
    options = ExtractOptions(layers="last", curve_layers=curve_layers, device=device, batch_size=batch_size,
                             variants=False, progress=False)
    start = time.perf_counter()
    outcome = run_extract(out, [source], [model], options)[source.name][0]
    sync(device)
    if outcome.status not in ("done", "reused"):
        raise SystemExit(f"{model}: extraction {outcome.status} ({outcome.reason})")
    return time.perf_counter() - start


def _curves(out: Path, source_name: str, model: str) -> list[dict]:
    return json.loads((out / "results" / source_name / model / "layerwise.json").read_text())["layers"]


def measure(model: str, n_images: int, size: int, device: str, batch_size: int | None, work: Path) -> dict:
    source = synthetic_scenes(n_images, size)
    # Warm-up: model construction, allocator and thread pools, on a few images.
    _extract(work / "warm", synthetic_scenes(min(4, n_images), size), model, device, batch_size, "all")
    shutil.rmtree(work / "warm")
    baseline = _extract(work / "baseline", source, model, device, batch_size, "last")
    fused = _extract(work / "fused", source, model, device, batch_size, "all")
    first = _extract(work / "separate", source, model, device, batch_size, "last")
    second = _extract(work / "separate", source, model, device, batch_size, "all")
    fused_rows = _curves(work / "fused", source.name, model)
    separate_rows = _curves(work / "separate", source.name, model)
    agree = all(a["layer"] == b["layer"] and a["knn_miou"] == b["knn_miou"] and a["kmeans"] == b["kmeans"]
                and np.allclose(a["variance_spectrum"], b["variance_spectrum"], rtol=1e-6)
                for a, b in zip(fused_rows, separate_rows, strict=True))
    separate = first + second
    runs = {"publish only": baseline, "fused": fused, "separate": separate}
    return {
        "model": model, "images": n_images, "size": size, "device": device, "batch_size": batch_size,
        "streamed_layers": [row["layer"] for row in fused_rows],
        "seconds": runs, "img_s": {name: n_images / s for name, s in runs.items()},
        "curves_cost_fused_s": fused - baseline, "curves_cost_separate_s": separate - baseline,
        "separate_second_run_s": second, "fused_speedup_over_separate": separate / fused,
        "curves_agree": agree,
    }


def render(report: dict) -> str:
    lines = [f"{report['model']} on {report['images']} synthetic scenes of {report['size']} px, "
             f"device {report['device']}; layers streamed: {report['streamed_layers']}",
             "| run | seconds | img/s | curves cost over publish only |", "|---|---|---|---|"]
    base = report["seconds"]["publish only"]
    for name, seconds in report["seconds"].items():
        extra = "—" if name == "publish only" else f"{seconds - base:+.2f} s"
        lines.append(f"| {name} | {seconds:.2f} | {report['img_s'][name]:.2f} | {extra} |")
    lines.append(f"fused is {report['fused_speedup_over_separate']:.2f}× faster than separate; "
                 f"curves agree: {report['curves_agree']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--model", default="random", help="a registry model whose weights are here (default: "
                                                          "the random ViT-S/16 baseline)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = str(resolve_device(args.device))
    with tempfile.TemporaryDirectory(prefix="patchatlas-layerwise-") as work:
        report = measure(args.model, args.images, args.size, device, args.batch_size, Path(work))
    report["machine"] = machine_info(torch.device(device), command_line(__file__, argv))
    print(render(report))
    if args.json:
        atomic_write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
