"""Render speed of a full atlas: N models × M datasets of fabricated results.

Writes an output folder shaped exactly like `patchatlas extract` + `analyze` leave it (manifest,
images tables, k-means maps, positional/PCA/norm maps, attention) with random contents, then
times `patchatlas summarize` and `patchatlas render` (figures + pages + `mkdocs build`) on it and
reports the page weight.

Run: ``python benchmarks/render_speed.py [--models 30] [--datasets 5] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generator.extract import SHARD_BYTES, record_source, write_images  # noqa: E402
from generator.models.registry import MODELS  # noqa: E402
from generator.site import RenderOptions, run_render  # noqa: E402
from generator.sources.synthetic import synthetic_scenes  # noqa: E402
from generator.store.atomic import atomic_write_json  # noqa: E402
from generator.store.manifest import Manifest  # noqa: E402
from generator.summarize import run_summarize  # noqa: E402

FAMILIES = ("CL", "MIM", "CL+MIM", "supervised", "language", "random")
LAYERS = (3, 6, 9, 12)
VIEWS = ("prenorm", "postnorm")
KS = (4, 8, 16)
GRID = (14, 14)
HEADS = 6


def fabricate(out: Path, n_models: int, n_datasets: int, n_images: int, rng: np.random.Generator) -> list[str]:
    manifest = Manifest.load(out / "manifest.json")
    base = MODELS["random"]
    names = []
    for i in range(n_models):
        entry = dataclasses.replace(base, name=f"model{i:02d}", family=FAMILIES[i % len(FAMILIES)])
        MODELS[entry.name] = entry
        names.append(entry.name)
    for d in range(n_datasets):
        source = synthetic_scenes(n_images=n_images, size=224, seed=d)
        source.name = f"dataset{d}"
        record_source(source, manifest)
        write_images(source, out / "datasets" / source.name, manifest, SHARD_BYTES)
        ids = list(source.dataset["image_id"])
        labels = rng.integers(0, source.num_classes, (n_images, *GRID)).astype(np.int16)
        for model in names:
            configs = [{"name": f"{model}-L{layer:02d}-{view}", "path": f"{model}/L{layer:02d}-{view}/x.parquet",
                        "layer": layer, "norm": view, "dim": 384, "num_rows": n_images * 196, "num_bytes": 1}
                       for layer in LAYERS for view in VIEWS]
            manifest.set(f"extract/{source.name}/{model}", {
                "status": "done", "params": {"label_rule": "majority"}, "files": {}, "configs": configs,
                "prefix_path": None, "attention_path": None, "layers": list(LAYERS), "grid": list(GRID),
                "dim": 384, "weights": {"source": "random-init", "location": "seed=0", "revision": ""},
                "model": model, "source": source.name})
            results = out / "results" / source.name / model
            for cfg in configs:
                unit = results / cfg["name"]
                unit.mkdir(parents=True, exist_ok=True)
                header = {"source": source.name, "model": model, "config": cfg["name"], "layer": cfg["layer"],
                          "norm": cfg["norm"], "image_ids": ids, "grid": list(GRID)}
                kmeans = []
                for k in KS:
                    maps = rng.integers(0, k, (n_images, *GRID)).astype(np.int16)
                    np.savez_compressed(unit / f"kmeans-k{k}.npz", cluster_maps=maps, display_maps=maps,
                                        labels=labels, image_ids=np.asarray(ids))
                    kmeans.append({"k": k, "miou": float(rng.random()), "pixel_accuracy": float(rng.random()),
                                   "per_class_iou": [], "cluster_to_class": [], "inertia": 1.0,
                                   "chance_miou": 0.1, "positional_consistency": float(rng.random())})
                atomic_write_json(unit / "kmeans.json", {**header, "kmeans": kmeans,
                                                         "stability": {"k": 8, "seeds": 3, "mean_ari": 0.8, "min_ari": 0.7}})
                arrays = {"border_map": rng.random(GRID), "pca_rgb": rng.integers(0, 256, (n_images, *GRID, 3), dtype=np.uint8)}
                maps_json = {**header, "border_score": float(rng.random()),
                             "position": {"row_r2": 0.5, "col_r2": 0.5, "row_acc": 0.5, "col_acc": 0.5},
                             "locality": {"distance": list(range(1, 14)), "mean_cosine": sorted(rng.random(13))[::-1],
                                          "random_baseline": 0.1},
                             "pca_explained_variance_ratio": [0.3, 0.2, 0.1]}
                if cfg["norm"] == "prenorm":
                    norms = rng.gamma(5.0, 4.0, (n_images, *GRID)).astype(np.float32)
                    counts, edges = np.histogram(norms, bins=64)
                    arrays["norm_maps"] = norms
                    maps_json["norms"] = {"threshold": 50.0, "outlier_share": 0.01, "median": 20.0, "max": 80.0,
                                          "histogram": {"counts": counts.tolist(), "edges": edges.tolist()}}
                np.savez_compressed(unit / "maps.npz", **arrays, image_ids=np.asarray(ids))
                atomic_write_json(unit / "maps.json", maps_json)
            np.savez_compressed(results / "attention.npz", image_ids=np.asarray(ids),
                                cls_maps=rng.random((n_images, HEADS, *GRID)).astype(np.float32))
            atomic_write_json(results / "attention.json", {"image_ids": ids, "mass": 0.6, "heads": HEADS,
                                                           "per_head": [0.4] * HEADS, "best_head": 0, "best": 0.4,
                                                           "mean": 0.4})
    manifest.save()
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=30)
    parser.add_argument("--datasets", type=int, default=5)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        fabricate(out, args.models, args.datasets, args.images, np.random.default_rng(0))
        fabricate_s = time.perf_counter() - start
        start = time.perf_counter()
        run_summarize(out, RenderOptions())
        summarize_s = time.perf_counter() - start
        start = time.perf_counter()
        run_render(out, RenderOptions())
        render_s = time.perf_counter() - start
        site = out / "site"
        files = [p for p in site.rglob("*") if p.is_file()]
        pages = {p.relative_to(site).as_posix(): p.stat().st_size for p in files if p.suffix == ".html"}
        biggest = max(pages.items(), key=lambda kv: kv[1])
        report = {"models": args.models, "datasets": args.datasets, "images_per_gallery": RenderOptions().gallery_images,
                  "summarize_seconds": summarize_s, "render_seconds": render_s, "fabricate_seconds": fabricate_s, "site_files": len(files),
                  "site_mib": sum(p.stat().st_size for p in files) / 2**20, "pages": len(pages),
                  "largest_page": {"path": biggest[0], "kib": biggest[1] / 1024}}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
