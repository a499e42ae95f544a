"""Published dataset folders as a user of the Hub meets them.

One build over a local folder of images (two tiny models, one of them under a non-commercial
licence) is shared by the module. The published files (the dataset repository, the Markdown
pages, the HTML site and its search index) must name the Hub repository, never a path of the
machine that built them; the card's metadata must state every licence; and the tables must
carry their class names, displayable masks and the geometry that made them.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from huggingface_hub import DatasetCard
from PIL import Image

from generator.cli import main
from generator.errors import PatchAtlasError
from generator.figures.palette import PALETTE
from generator.models.registry import MODELS
from generator.store.repo import (
    ConfigCardInfo,
    combined_license,
    hub_repo_id,
    parse_hub_repo,
    render_dataset_card,
    size_category,
)

from conftest import TINY_RANDOM, offline_tiny_zoo
from test_push import api, hub  # noqa: F401 - the stand-in Hub's fixtures

CLASSES = [{"id": 0, "name": "sky", "super_name": "background"},
           {"id": 1, "name": "ball", "super_name": "object"},
           {"id": 2, "name": "box", "super_name": "object"}]
SIDE = 64
N_GOOD = 3
# A model row like an MAE one: its tokens may not be used commercially.
TINY_NC = dataclasses.replace(TINY_RANDOM, name="tiny_nc", license="cc-by-nc-4.0")


def _mask(seed: int) -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[16 + seed:40, 8:30] = 1
    mask[36:60, 34 + seed:62] = 2
    mask[:3, :] = 255  # unlabelled
    return mask


def _write_folder(root: Path) -> dict[str, np.ndarray]:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.json").write_text(json.dumps(CLASSES))
    masks = {}
    for i in range(N_GOOD):
        rgb = np.random.default_rng(i).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"img{i}.png")
        masks[f"img{i}"] = _mask(i)
        Image.fromarray(masks[f"img{i}"]).save(root / "masks" / f"img{i}.png")
    # An unreadable image: skipped, and listed on the dataset's page.
    (root / "images" / "broken.png").write_bytes(b"not a png")
    Image.fromarray(_mask(0)).save(root / "masks" / "broken.png")
    return masks


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    mp = offline_tiny_zoo(tmp_path_factory)
    mp.setitem(MODELS, TINY_NC.name, TINY_NC)
    # Its own build, not conftest's shared tiny_builds: a local folder of its own and a model without a class token.
    root = tmp_path_factory.mktemp("hubdata")
    folder = root / "my-scenes"
    masks = _write_folder(folder)
    out = root / "out"
    code = main(["build", "--out", str(out), "--source", "local-folder", "--source-option", f"path={folder}",
                 "--models", "tiny_random,tiny_nc", "--layers", "last", "--k", "2",
                 "--gallery-k", "2", "--device", "cpu", "--quiet"])
    name = "local-my-scenes"
    yield {"out": out, "root": root, "folder": folder, "code": code, "masks": masks, "name": name,
           "repo": out / "datasets" / name}
    mp.undo()


def _published_files(out: Path):
    for part in ("datasets", "docs", "site"):
        yield from (p for p in sorted((out / part).rglob("*")) if p.is_file())


def _machine_paths(built) -> list[str]:
    return [str(p) for p in (built["root"], built["out"], built["folder"], Path.home())
            ] + [str(built["out"].resolve()), str(built["folder"].resolve())]


def _card(built) -> DatasetCard:
    return DatasetCard.load(built["repo"] / "README.md")


def _downloads_line(built, config: str) -> str:
    text = (built["out"] / "docs" / "downloads.md").read_text(encoding="utf-8")
    shown = config.replace("_", "\\_")
    return next(line for line in text.splitlines() if line.startswith((f"| [{shown}]", f"| {shown} |")))


def test_no_published_file_names_a_path_of_the_build_machine(built):
    assert built["code"] == 0
    files = list(_published_files(built["out"]))
    assert any(p.name == "search_index.json" for p in files) and any(p.suffix == ".parquet" for p in files)
    leaks = [(str(p.relative_to(built["out"])), path) for p in files for path in _machine_paths(built)
             if path.encode() in p.read_bytes()]
    assert leaks == []
    # The skipped file is still listed, by its name inside the dataset folder.
    page = (built["out"] / "docs" / "datasets" / f"{built['name']}.md").read_text(encoding="utf-8")
    assert "images/broken.png" in page


def test_unpublished_dataset_names_the_placeholder_repository_and_says_so(built):
    card = _card(built)
    assert f'load_dataset("YOUR_ORG/{built["name"]}", "tiny_nc-L02-prenorm", split="train")' in card.text
    assert "not yet published" in card.text
    line = _downloads_line(built, "tiny_random-L02-postnorm")
    assert f'`load_dataset("YOUR_ORG/{built["name"]}", "tiny_random-L02-postnorm", split="train")`' in line
    downloads = (built["out"] / "docs" / "downloads.md").read_text(encoding="utf-8")
    assert "Not yet published" in downloads
    assert "huggingface.co" not in line  # no link to a repository that does not exist


def test_hub_repo_option_names_the_repository_and_links_the_viewer(built, tmp_path):
    out = built["out"]
    assert main(["render", "--out", str(out), "--hub-repo", "atlas-org", "--no-html", "--quiet"]) == 0
    repo_id = f"atlas-org/{built['name']}"
    card = _card(built)
    assert f'load_dataset("{repo_id}", "tiny_nc-L02-prenorm", split="train")' in card.text
    assert "not yet published" not in card.text and f"https://huggingface.co/datasets/{repo_id}" in card.text
    line = _downloads_line(built, "tiny_random-L02-postnorm")
    assert f"(https://huggingface.co/datasets/{repo_id}/viewer/tiny_random-L02-postnorm)" in line
    assert f'`load_dataset("{repo_id}", "tiny_random-L02-postnorm", split="train")`' in line
    page = (out / "docs" / "datasets" / f"{built['name']}.md").read_text(encoding="utf-8")
    assert f'load_dataset("{repo_id}", "images"' in page
    # A later run without the option keeps the recorded repository.
    assert main(["render", "--out", str(out), "--no-html", "--quiet"]) == 0
    assert repo_id in _downloads_line(built, "tiny_random-L02-postnorm")


def test_hub_repo_that_cannot_fit_the_datasets_is_refused(built):
    from generator.store.repo import check_hub_repo_fits

    check_hub_repo_fits("org/one", ["voc"])
    with pytest.raises(PatchAtlasError, match="names one repository, but there are 2 datasets"):
        check_hub_repo_fits("org/one", ["voc", "ade"])
    with pytest.raises(PatchAtlasError, match="not among the datasets"):
        check_hub_repo_fits({"vocc": "org/x"}, ["voc"])
    # The command says so before changing anything.
    assert main(["render", "--out", str(built["out"]), "--hub-repo", "nosuch=org/x", "--no-html", "--quiet"]) != 0


def test_hub_repo_values():
    assert hub_repo_id("voc", "org") == "org/voc" and hub_repo_id("voc", "org/atlas-voc") == "org/atlas-voc"
    assert hub_repo_id("voc", {"voc": "org/x"}) == "org/x" and hub_repo_id("ade", {"voc": "org/x"}) == "YOUR_ORG/ade"
    assert hub_repo_id("voc", None) == "YOUR_ORG/voc"
    assert parse_hub_repo(["voc=org/x", "ade=org"]) == {"voc": "org/x", "ade": "org"}
    for bad in (["a/b/c"], ["org", "other"], ["voc=org/x", "org"], ["voc=bad name/x"]):
        with pytest.raises(PatchAtlasError, match="--hub-repo"):
            parse_hub_repo(bad)


def test_card_metadata_states_every_licence(built):
    data = _card(built).data
    assert data.license == "other"
    # The folder's images have no stated licence; the models are apache-2.0 and cc-by-nc-4.0.
    assert data.license_name == "apache-2.0-and-cc-by-nc-4.0-and-unknown"
    assert data.config_licenses["tiny_nc-L02-prenorm"] == ["unknown", "cc-by-nc-4.0"]
    assert data.config_licenses["tiny_random-L02-postnorm"] == ["unknown", "apache-2.0"]
    assert data.config_licenses["tiny_nc-prefix"] == ["unknown", "cc-by-nc-4.0"]
    assert data.size_categories == ["n<1K"]
    defaults = [c["config_name"] for c in data.configs if c.get("default")]
    assert defaults == ["tiny_nc-L02-prenorm"]
    # The default config is what load_dataset opens when no config is named.
    ds = datasets.load_dataset(str(built["repo"]), split="train")
    assert len(ds) == N_GOOD * 16 and "embedding" in ds.column_names


def _config(name, licence):
    return ConfigCardInfo(name=f"{name}-L12-postnorm", data_files=f"{name}/L12-postnorm/*.parquet", model=name,
                          model_id=f"timm/{name}", revision="", layer=12, norm="postnorm", input_size=224,
                          patch_size=16, label_rule="majority", dim=8, num_rows=2_000_000, num_bytes=1,
                          license=licence)


def test_a_card_with_an_mae_config_never_claims_cc0_or_apache_alone():
    info = {"name": "scenes", "license": "CC0-1.0", "num_images": 10}
    text = render_dataset_card(info, [_config("dino", "apache-2.0"), _config("mae", "cc-by-nc-4.0")])
    data = DatasetCard(text).data
    assert data.license == "other" and "cc-by-nc-4.0" in data.license_name
    assert data.license_name == "apache-2.0-and-cc-by-nc-4.0-and-cc0-1.0"
    assert data.config_licenses["mae-L12-postnorm"] == ["CC0-1.0", "cc-by-nc-4.0"]
    assert data.size_categories == ["1M<n<10M"]
    row = next(line for line in text.splitlines() if line.startswith("| mae-L12-postnorm |"))
    assert row.rstrip(" |").endswith("CC0-1.0 \\+ cc-by-nc-4.0")
    # One licence the Hub knows, shared by images and model, is published as it is.
    same = DatasetCard(render_dataset_card({"name": "s", "license": "apache-2.0"}, [_config("dino", "apache-2.0")]))
    assert same.data.license == "apache-2.0" and getattr(same.data, "license_name", None) is None
    # A licence the Hub has no id for is never passed off as one.
    assert combined_license(["dinov3-license"]) == {
        "license": "other", "license_name": "dinov3-license",
        "license_details": "Each config is under every licence listed for it in config_licenses: dinov3-license."}
    assert [size_category(n) for n in (999, 1000, 10**7)] == ["n<1K", "1K<n<10K", "10M<n<100M"]


def test_labels_are_class_labels_with_the_class_names(built):
    ds = datasets.load_dataset(str(built["repo"]), "tiny_random-L02-postnorm", split="train")
    label = ds.features["label"]
    assert isinstance(label, datasets.ClassLabel)
    assert label.names[:3] == ["sky", "ball", "box"] and label.names[255] == "unlabelled"
    assert set(ds["label"]) <= {0, 1, 2, 255} and {1, 2} <= set(ds["label"])


def test_masks_are_palette_pngs_with_the_same_ids(built):
    ds = datasets.load_dataset(str(built["repo"]), "images", split="train").cast_column(
        "mask", datasets.Image(decode=False))
    assert ds["image_id"] == sorted(built["masks"])
    for row in ds:
        image = Image.open(io.BytesIO(row["mask"]["bytes"]))
        assert image.mode == "P"
        np.testing.assert_array_equal(np.array(image), built["masks"][row["image_id"]])
        palette = np.asarray(image.getpalette()[:256 * 3], dtype=np.uint8).reshape(-1, 3)
        np.testing.assert_array_equal(palette[:3], PALETTE[:3])  # the atlas' class colours
        assert palette[255].tolist() == [0, 0, 0]  # unlabelled shows black, as on the site


def test_shards_record_their_geometry(built):
    shard = next((built["repo"] / "tiny_random" / "L02-postnorm").glob("*.parquet"))
    geometry = json.loads(pq.read_schema(shard).metadata[b"patchatlas"])
    assert geometry == {"model": "tiny_random", "model_id": "random", "layer": 2, "view": "postnorm",
                        "input_size": 64, "patch_size": 16, "grid": [4, 4], "resize": "squash",
                        "label_rule": "majority"}
    prefix = next((built["repo"] / "tiny_random" / "prefix").glob("*.parquet"))
    assert json.loads(pq.read_schema(prefix).metadata[b"patchatlas"])["input_size"] == 64


def test_duckdb_reads_the_embeddings_as_vectors(built, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    shard = next((built["repo"] / "tiny_random" / "L02-postnorm").glob("*.parquet"))
    # Parquet has no fixed-size list type: read_parquet gives FLOAT[], DuckDB's list functions apply.
    sims = duckdb.sql(f"SELECT list_cosine_similarity(embedding, embedding) FROM read_parquet('{shard}')").fetchall()
    assert len(sims) == N_GOOD * 16 and np.allclose([s for (s,) in sims], 1.0, atol=1e-3)
    # Through Arrow the column is a fixed-size list, DuckDB's ARRAY: array functions need no cast
    # (DuckDB has no float16, so this holds for float32 shards).
    from generator.store.parquet import PatchTableWriter

    path = tmp_path / "f32.parquet"
    with PatchTableWriter(path, 8, dtype="float32", label_names=["a", "b"]) as writer:
        writer.write_batch(["x"], np.random.default_rng(0).standard_normal((1, 2, 2, 8)).astype(np.float32),
                           np.zeros((1, 2, 2), np.int16))
    f32_table = pq.read_table(path)  # noqa: F841 - DuckDB finds the Arrow table by its name
    sims = duckdb.sql("SELECT array_cosine_similarity(embedding, embedding) FROM f32_table").fetchall()
    assert np.allclose([s for (s,) in sims], 1.0, atol=1e-6)


def test_push_publishes_a_card_that_names_the_pushed_repository(built, hub, api, monkeypatch):
    monkeypatch.setattr("generator.store.push._make_api", lambda _: api)
    assert main(["push", "--out", str(built["out"]), "--dataset", built["name"], "--repo", "atlas-org/pushed"]) == 0
    card = hub.repos["atlas-org/pushed"]["main"]["README.md"].decode("utf-8")
    assert 'load_dataset("atlas-org/pushed", "tiny_nc-L02-prenorm", split="train")' in card
    assert (built["repo"] / "README.md").read_text(encoding="utf-8") == card


def test_palette_masks_keep_every_id_and_leave_wide_masks_alone():
    from generator.store.masks import palette_mask_png

    def png(array, mode=None):
        buffer = io.BytesIO()
        Image.fromarray(array, mode=mode).save(buffer, format="PNG")
        return buffer.getvalue()

    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for source in (png(ids), png(ids.astype(np.uint16))):
        out = Image.open(io.BytesIO(palette_mask_png(source, PALETTE, ignore_index=255)))
        assert out.mode == "P"
        np.testing.assert_array_equal(np.array(out), ids)
    few = np.array([[0, 2], [2, 0]], dtype=np.uint8)  # few ids: the palette is not shrunk and remapped
    np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(palette_mask_png(png(few), PALETTE)))), few)
    wide = png(np.array([[0, 300]], dtype=np.uint16))
    assert palette_mask_png(wide, PALETTE) == wide  # ids beyond 8 bits stay a 16-bit PNG
    with pytest.raises(PatchAtlasError, match="does not decode"):
        palette_mask_png(b"not a png", PALETTE)
    with pytest.raises(PatchAtlasError, match="one class id per pixel"):
        palette_mask_png(png(np.zeros((2, 2, 3), np.uint8)), PALETTE)
