"""The paper-cityscapes preset on a miniature Cityscapes folder in the official layout."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from generator.cli import main
from generator.sources.cityscapes import paper_cityscapes_source
from generator.sources.presets import CITYSCAPES_TRAIN_CITIES, CITYSCAPES_VAL_CITIES

ROAD_LABEL_ID, CAR_LABEL_ID, UNLABELLED_ID = 7, 26, 0  # train ids 0 and 13; 255


def _fake_cityscapes(root, per_city=12, height=256, width=512):
    """Frames of 256×512 (two 256-px tiles each): road on top, car below, an unlabelled corner."""
    rng = np.random.default_rng(0)
    for split, cities in (("train", CITYSCAPES_TRAIN_CITIES), ("val", CITYSCAPES_VAL_CITIES)):
        for city in cities:
            (root / "leftImg8bit" / split / city).mkdir(parents=True)
            (root / "gtFine" / split / city).mkdir(parents=True)
            for i in range(per_city):
                stem = f"{city}_{i:06d}_000019"
                image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                mask = np.full((height, width), ROAD_LABEL_ID, dtype=np.uint8)
                mask[height // 2:] = CAR_LABEL_ID
                mask[:16, :16] = UNLABELLED_ID
                Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                Image.fromarray(mask).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")


def test_split_tiles_and_labels_follow_the_protocol(tmp_path):
    _fake_cityscapes(tmp_path)
    source = paper_cityscapes_source(str(tmp_path))
    ids = source.dataset["image_id"]
    assert len(ids) == (72 + 30) * 2 and source.probe_train_count == 72 * 2
    train_cities = {i.split("/")[0] for i in ids[:144]}
    val_cities = {i.split("/")[0] for i in ids[144:]}
    assert train_cities == set(CITYSCAPES_TRAIN_CITIES) and val_cities == set(CITYSCAPES_VAL_CITIES)
    first = source.dataset[0]
    assert first["image"].size == first["mask"].size == (256, 256)  # each encoder resizes the tile
    mask = np.asarray(first["mask"])
    assert set(np.unique(mask)) <= {0, 13, 255}
    assert (mask[:100] == 0).mean() > 0.9 and (mask[-100:] == 13).all()
    assert paper_cityscapes_source(str(tmp_path)).dataset["image_id"] == ids  # deterministic


def test_preset_runs_the_protocol_end_to_end(tmp_path, tiny_models):
    _fake_cityscapes(tmp_path / "cityscapes", per_city=10)
    out = tmp_path / "out"
    assert main(["build", "--out", str(out), "--preset", "paper-cityscapes", "--source-option",
                 f"path={tmp_path / 'cityscapes'}", "--models", "tiny_random", "--k", "2", "--quiet",
                 "--no-html"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())["entries"]
    assert manifest["extract/paper-cityscapes/tiny_random"]["params"]["label_rule"] == "nearest"
    assert manifest["extract/paper-cityscapes/tiny_random"]["params"]["resize"] == "short-side-crop"
    probes = json.loads((out / "results" / "paper-cityscapes" / "tiny_random" / "tiny_random-L02-postnorm"
                         / "probes.json").read_text())
    assert probes["n_train_images"] == 144 and probes["n_val_images"] == 60
    assert probes["knn_k"] == 1 and probes["knn_similarity"] == "dot"
    # The Cityscapes protocol averages as cityscapesScripts does, and says so in the result.
    assert probes["protocol"]["miou_average"] == "cityscapes" and probes["protocol"]["label_rule"] == "nearest"
