"""The paper-ade20k preset on a miniature ADEChallengeData2016 folder in the official layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from generator.cli import main
from generator.errors import PatchAtlasError
from generator.sources.ade20k import paper_ade20k_source
from generator.sources.presets import ade20k_train_val_split
from generator.sources.registry import load_source

HEIGHT, WIDTH = 32, 48


def _planted_annotation(index: int) -> np.ndarray:
    """Raw values 0..150 spread over the frame, with a fixed corner of 'other' (0), wall (1) and
    the last class (150), so the remap can be checked pixel by pixel."""
    raw = ((np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) + index) % 151).astype(np.uint8)
    raw[:4, :4] = 0
    raw[:4, 4:8] = 1
    raw[4:8, :4] = 150
    return raw


def _fake_ade20k(root, n_training=6, n_validation=4):
    rng = np.random.default_rng(0)
    for split, prefix, count in (("training", "ADE_train", n_training), ("validation", "ADE_val", n_validation)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(1, count + 1):
            stem = f"{prefix}_{i:08d}"
            image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{stem}.jpg")
            Image.fromarray(_planted_annotation(i)).save(root / "annotations" / split / f"{stem}.png")
    return root


def test_split_counts_order_and_pools(tmp_path):
    source = paper_ade20k_source(str(_fake_ade20k(tmp_path)), n_train=3, n_val=2, seed=0)
    ids = source.dataset["image_id"]
    assert len(ids) == 5 and source.probe_train_count == 3 and len(set(ids)) == 5
    training = {f"ADE_train_{i:08d}" for i in range(1, 7)}
    validation = {f"ADE_val_{i:08d}" for i in range(1, 5)}
    assert set(ids[:3]) <= training and set(ids[3:]) <= validation
    assert source.params == {"path": str(tmp_path), "n_train": 3, "n_val": 2, "seed": 0}
    assert source.num_classes == 150 and source.ignore_index == 255
    assert source.dataset[0]["image"].size == (WIDTH, HEIGHT)  # kept at its own size


def test_draw_is_deterministic_and_seeded(tmp_path):
    root = str(_fake_ade20k(tmp_path))
    first = paper_ade20k_source(root, n_train=3, n_val=2, seed=0)
    again = paper_ade20k_source(root, n_train=3, n_val=2, seed=0)
    other = paper_ade20k_source(root, n_train=3, n_val=2, seed=1)
    assert again.dataset["image_id"] == first.dataset["image_id"] and again.revision == first.revision
    assert other.dataset["image_id"] != first.dataset["image_id"] and other.revision != first.revision


def test_two_pool_split_is_order_free_nested_and_disjoint():
    train_pool = [f"ADE_train_{i:08d}" for i in range(1, 41)]
    val_pool = [f"ADE_val_{i:08d}" for i in range(1, 21)]
    train, val = ade20k_train_val_split(train_pool, val_pool, 10, 5, seed=3)
    assert len(train) == 10 and len(val) == 5 and set(train) <= set(train_pool) and set(val) <= set(val_pool)
    assert ade20k_train_val_split(train_pool[::-1], val_pool[::-1], 10, 5, seed=3) == (train, val)
    # One pool's count never moves the other pool's picks; a larger count keeps the smaller draw.
    assert ade20k_train_val_split(train_pool, val_pool, 10, 8, seed=3)[0] == train
    assert set(ade20k_train_val_split(train_pool, val_pool, 12, 5, seed=3)[0]) > set(train)
    with pytest.raises(PatchAtlasError, match="both the training and the validation pool"):
        ade20k_train_val_split(train_pool, val_pool + [train_pool[0]], 2, 2)


def test_annotations_are_remapped_exactly(tmp_path):
    source = paper_ade20k_source(str(_fake_ade20k(tmp_path)), n_train=6, n_val=4)
    for row in source.dataset:
        index = int(row["image_id"].rsplit("_", 1)[1])
        raw = _planted_annotation(index).astype(np.int64)
        mask = np.asarray(row["mask"])
        assert mask.shape == (HEIGHT, WIDTH)
        assert (mask[:4, :4] == 255).all() and (mask[:4, 4:8] == 0).all() and (mask[4:8, :4] == 149).all()
        np.testing.assert_array_equal(mask, np.where(raw == 0, 255, raw - 1))


def test_missing_annotation_is_named(tmp_path):
    root = _fake_ade20k(tmp_path)
    (root / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    with pytest.raises(PatchAtlasError, match=r"ADE_val_00000002\.jpg.*ADE_val_00000002\.png.*ADEChallengeData2016"):
        paper_ade20k_source(str(root), n_train=2, n_val=1)


@pytest.mark.parametrize("path", ["", "missing", "empty"])
def test_missing_or_empty_folder_asks_for_the_path(tmp_path, path):
    (tmp_path / "empty").mkdir()
    folder = str(tmp_path / path) if path else ""
    with pytest.raises(PatchAtlasError, match=r"--source-option path="):
        paper_ade20k_source(folder)


def test_too_many_requested_images_reports_the_counts(tmp_path):
    root = str(_fake_ade20k(tmp_path))
    with pytest.raises(PatchAtlasError, match=r"n_train=7.*only 6 images.*training 6, validation 4"):
        paper_ade20k_source(root, n_train=7, n_val=2)
    with pytest.raises(PatchAtlasError, match=r"n_val=5.*only 4 images"):
        load_source("paper-ade20k", path=root, n_train=2, n_val=5)


def test_preset_trains_the_probes_on_exactly_the_train_images(tmp_path, tiny_models):
    root = _fake_ade20k(tmp_path / "ade")
    expected = paper_ade20k_source(str(root), n_train=3, n_val=2).dataset["image_id"]
    out = tmp_path / "out"
    assert main(["build", "--out", str(out), "--preset", "paper-ade20k", "--source-option", f"path={root}",
                 "--source-option", "n_train=3", "--source-option", "n_val=2", "--models", "tiny_random",
                 "--layers", "last", "--k", "2", "--no-html", "--quiet", "--device", "cpu"]) == 0
    entries = json.loads((out / "manifest.json").read_text())["entries"]
    assert entries["sources/paper-ade20k"]["probe_train_count"] == 3
    assert entries["extract/paper-ade20k/tiny_random"]["params"]["label_rule"] == "nearest"
    config = out / "results" / "paper-ade20k" / "tiny_random" / "tiny_random-L02-postnorm"
    probes = json.loads((config / "probes.json").read_text())
    assert probes["n_train_images"] == 3 and probes["n_val_images"] == 2
    assert probes["knn_k"] == 1 and probes["knn_similarity"] == "dot"
    # The probes train on the first n_train images in dataset order: exactly the drawn training ones.
    with np.load(config / "maps.npz") as maps:
        image_ids = [str(i) for i in maps["image_ids"]]
    assert image_ids == expected and all(i.startswith("ADE_train_") for i in image_ids[:3])
