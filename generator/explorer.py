"""The explorer's static assets: the gallery's tokens, reduced, for cosine maps in the browser.

For one dataset, ``explorer_reductions`` (in the summarize stage, from the token tables) writes
the ``.bin`` files under ``summary/explorer/<dataset>/``, and ``write_explorer_assets`` (in the
render stage, reading no token table) copies them under ``docs/assets/explorer/<dataset>/``
beside the index:

- ``<model>/L<layer>.bin`` per model × published layer: the gallery images' tokens of the
  gallery's view (post-norm by default) as int8 PCA coordinates, row-major [image, row, col,
  component], then, where the pre-norm view of that layer is published, the pre-norm token
  norms as little-endian uint16 (``norm_top`` × u / 65535);
- ``index.json``: the gallery images, each model's grid and layers, and per layer what the
  browser needs to decode its file (per-component scales, the mean's offset and residual, see
  ``generator/analyses/reduction.py``), the PCA colour bounds, the measured reduction error and
  the ``load_dataset`` config behind it.

The browser fetches the index, then one ``.bin`` per model and layer shown, when it is shown.
The PCA of each config is fitted on its tokens (at most ``FIT_ROWS`` of them, from the shards
read to find the gallery images: the gallery images are the first images, so usually the first
shard alone); the error is measured against the full stored tokens of the gallery.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from generator.analyses.reduction import (
    dequantize_int8,
    fit_reduction,
    quantize_int8,
    reduce_tokens,
    reduction_error,
    similarity_coordinates,
)
from generator.errors import PatchAtlasError
from generator.figures.palette import PALETTE
from generator.store.atomic import atomic_write_bytes, atomic_write_json
from generator.store.layout import dataset_repo_dir, extract_prefix, key_model
from generator.store.manifest import Manifest
from generator.store.parquet import patch_grid, read_patch_table
from generator.store.repo import IMAGES_CONFIG, hub_viewer_url, is_placeholder

# 32 int8 components keep a ViT-S/B token's cosines within a few hundredths (measured per config
# and shown on the page) at 32 bytes a patch: 50 KB per model and layer for 8 images of 14 × 14.
N_COMPONENTS = 32
FIT_ROWS = 1 << 16
ERROR_PAIRS = 20_000
DEFAULT_MODELS = 4
PCA_PERCENTILES = (1.0, 99.0)  # as the PCA maps of generator/analyses/pca.py
_UINT16_MAX = 65535


def explorer_dir(docs: Path, dataset: str) -> Path:
    return Path(docs) / "assets" / "explorer" / dataset


def _colormap(name: str) -> list[int]:
    import matplotlib

    lut = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
    return np.rint(lut * 255).astype(int).ravel().tolist()


def _gallery_tokens(repo: Path, cfg: dict, gallery_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows [≤ FIT_ROWS, D], gallery tokens [n, gh, gw, D]) of one config.

    Shards are read in order until every gallery image is found (the gallery's images are the
    first images, so that is the first shard unless shards are small); the PCA is fitted on the
    tokens of the shards read.
    """
    found: dict[str, np.ndarray] = {}
    rows = []
    for rel in cfg["paths"]:
        ids, tokens, _ = patch_grid(read_patch_table(repo / rel))
        rows.append(tokens.reshape(-1, tokens.shape[-1]))
        wanted = set(gallery_ids)
        found.update({image_id: tokens[i] for i, image_id in enumerate(ids) if image_id in wanted})
        if len(found) == len(wanted):
            break
    missing = [image_id for image_id in gallery_ids if image_id not in found]
    if missing:
        raise PatchAtlasError(f"{repo}: gallery image {missing[0]!r} is in no shard of {cfg['name']}; "
                              f"rerun `patchatlas extract` for this output folder")
    rows = np.concatenate(rows)
    if len(rows) > FIT_ROWS:  # a fixed draw: the same tokens give the same assets
        rows = rows[np.sort(np.random.default_rng(0).choice(len(rows), FIT_ROWS, replace=False))]
    return rows, np.stack([found[i] for i in gallery_ids])


def reduce_config(fit_rows: np.ndarray, gallery: np.ndarray, n_components: int = N_COMPONENTS,
                  error_pairs: int = ERROR_PAIRS) -> tuple[np.ndarray, dict]:
    """int8 codes [n·gh·gw, r] of the gallery tokens and what decodes them, with the measured error."""
    fit = fit_reduction(fit_rows, n_components)
    full = gallery.reshape(-1, gallery.shape[-1])
    q, scale = quantize_int8(reduce_tokens(full, fit))
    # The index stores 7 significant digits (float32's); the error is measured on what it stores.
    scale = _short(scale)
    fit.offset, fit.residual = _short(fit.offset), float(_short(fit.residual)[0])
    z = dequantize_int8(q, scale.astype(np.float32))
    error = reduction_error(full, similarity_coordinates(z, fit), n_pairs=error_pairs)
    low, high = np.percentile(z[:, :3], PCA_PERCENTILES, axis=0)
    return q, {"components": fit.n_components, "scale": scale.tolist(), "offset": fit.offset.tolist(),
               "residual": fit.residual, "rgb_low": _short(low).tolist(), "rgb_high": _short(high).tolist(),
               "explained": float(fit.explained_variance_ratio.sum()), "error": error}


def _short(values) -> np.ndarray:
    return np.array([float(f"{v:.7g}") for v in np.atleast_1d(values).astype(np.float64)])


def norm_codes(prenorm: np.ndarray) -> tuple[np.ndarray, float]:
    """Pre-norm token norms [n·gh·gw] as uint16 over one config's range, and that range's top."""
    norms = np.linalg.norm(prenorm.reshape(-1, prenorm.shape[-1]).astype(np.float64), axis=1)
    top = float(norms.max()) if norms.size and norms.max() > 0 else 1.0
    return np.rint(norms / top * _UINT16_MAX).astype("<u2"), top


def explorer_reductions(out: Path, name: str, manifest: Manifest, gallery_ids: list[str], families: dict[str, str],
                        gallery_norm: str, folder: Path) -> dict | None:
    """The summarize step of the explorer: for each model × published layer of one dataset, the
    gallery's tokens reduced and quantized, written as ``folder/<model>/L<layer>.bin``; returns
    how to decode each file and the measured error (None without tokens).

    It reads the token tables, so it runs once per change of its inputs (the summary is skipped
    when nothing changed); the render only copies the files and writes the index.
    """
    repo = dataset_repo_dir(out, name)
    if not gallery_ids:
        return None
    models, rows = [], []
    for key, unit in sorted(manifest.entries(prefix=extract_prefix(name))):
        model = key_model(key)
        if model == IMAGES_CONFIG or model not in families or unit.get("status") != "done":
            continue
        configs = unit.get("configs") or []
        prenorm = {c["layer"]: c for c in configs if c["norm"] == "prenorm" and c.get("paths")}
        layers = []
        # A config recorded without its files (fabricated results, benchmarks/render_speed.py) has no tokens to show.
        for cfg in sorted((c for c in configs if c["norm"] == gallery_norm and c.get("paths")), key=lambda c: c["layer"]):
            fit_rows, gallery = _gallery_tokens(repo, cfg, gallery_ids)
            q, decode = reduce_config(fit_rows, gallery)
            payload = q.tobytes()
            norm_cfg = prenorm.get(cfg["layer"])
            entry = {"layer": cfg["layer"], "config": cfg["name"], "norm_config": None, "norms_offset": None,
                     "norm_top": None, **decode}
            if norm_cfg is not None:
                codes, top = norm_codes(_gallery_tokens(repo, norm_cfg, gallery_ids)[1])
                payload += b"\0" * (len(payload) % 2)  # uint16 values start on an even byte
                entry.update(norm_config=norm_cfg["name"], norms_offset=len(payload), norm_top=top)
                payload += codes.tobytes()
            rel = f"{model}/L{cfg['layer']:02d}.bin"
            atomic_write_bytes(Path(folder) / rel, payload)
            entry.update(file=rel, bytes=len(payload))
            layers.append(entry)
            rows.append({"model": model, "family": families[model], "layer": cfg["layer"], **decode["error"],
                         "explained": decode["explained"], "bytes": len(payload)})
        if layers:
            models.append({"name": model, "family": families[model], "grid": list(gallery.shape[1:3]),
                           "dim": int(gallery.shape[-1]), "layers": layers})
    if not models:
        return None
    return {"models": models, "rows": rows, "gallery_ids": list(gallery_ids)}


def write_explorer_assets(docs: Path, name: str, reductions: dict | None, folder: Path, images: list[dict],
                          gallery_norm: str, repo_id: str, model_order=sorted) -> dict | None:
    """The render step of the explorer: copy one dataset's reduced tokens (``folder``, written by
    :func:`explorer_reductions`) under ``docs/assets/explorer/<dataset>/`` and write the index the
    browser reads; returns what its pages show (None without tokens).

    ``images`` are the gallery's rows (``image_id``, ``image``: the thumbnail's path from the
    docs root), the same images the reductions were made of.
    """
    if not reductions:
        return None
    if [img["image_id"] for img in images] != reductions["gallery_ids"]:
        raise PatchAtlasError(f"{folder}: the explorer's tokens are of other gallery images than this render shows; "
                              f"rerun `patchatlas summarize`")
    target = explorer_dir(docs, name)
    models = sorted(copy.deepcopy(reductions["models"]), key=lambda m: model_order(m["name"]))
    for model in models:
        for entry in model["layers"]:
            source = Path(folder) / entry["file"]
            if not source.is_file():
                raise PatchAtlasError(f"{source}: the explorer's tokens are missing; rerun `patchatlas summarize`")
            (target / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target / entry["file"], source.read_bytes())
            entry["url"] = hub_viewer_url(repo_id, entry["config"])
    rows = reductions["rows"]
    defaults = [m["name"] for m in models[:DEFAULT_MODELS]]
    index = {
        "dataset": name, "repo_id": repo_id, "published": not is_placeholder(repo_id),
        "view": gallery_norm, "components": N_COMPONENTS, "error_pairs": ERROR_PAIRS,
        "images": [{"id": img["image_id"], "src": f"../../../{img['image']}"} for img in images],
        "models": models, "default_models": defaults,
        "palette": [list(map(int, c)) for c in PALETTE], "colormaps": {"similarity": _colormap("viridis"),
                                                                      "norms": _colormap("magma")},
    }
    index_path = atomic_write_json(target / "index.json", index)
    index_bytes = index_path.stat().st_size
    image_bytes = sum((Path(docs) / img["image"]).stat().st_size for img in images
                      if (Path(docs) / img["image"]).is_file())
    deepest = {m["name"]: m["layers"][-1]["bytes"] for m in models}
    return {
        "index": f"assets/explorer/{name}/index.json", "models": [m["name"] for m in models],
        "default_models": defaults, "n_images": len(images), "components": N_COMPONENTS,
        "error_pairs": ERROR_PAIRS, "view": gallery_norm, "errors": rows,
        "error_mean": float(np.mean([r["mean"] for r in rows])), "error_p95": float(max(r["p95"] for r in rows)),
        "weight": {"index": index_bytes, "images": image_bytes,
                   "default_layers": sum(deepest[m] for m in defaults),
                   "per_layer": max(r["bytes"] for r in rows), "total": index_bytes + sum(r["bytes"] for r in rows)},
    }


def load_explorer_index(path: Path) -> dict:
    """An explorer index as written (for tests and benchmarks: the same file the browser reads)."""
    return json.loads(Path(path).read_text())
