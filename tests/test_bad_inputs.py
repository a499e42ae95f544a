"""Bad inputs: each gives a clear error naming the input and what to do, or a recorded skip that
the build summary and the site show, and none loses results already written.

Every input of the list and the test that covers it (``COVERAGE`` below is the same table as
data; ``test_every_listed_input_has_a_test`` checks that each named test exists):

==========================================  ==========  ===============================================
input                                       outcome     test
==========================================  ==========  ===============================================
corrupt PNG / JPEG                          skipped     test_unusable_pair_is_skipped_and_recorded
truncated PNG / JPEG                        skipped     test_unusable_pair_is_skipped_and_recorded
CMYK, 16-bit, RGBA, grayscale image         converted   test_sources_real::test_local_folder_loads_every_image_mode
palette, LA, 1-bit, 16-bit mid-grey image   converted   test_every_mode_becomes_8_bit_rgb_the_same_way
1x1 image                                   skipped     test_unusable_pair_is_skipped_and_recorded
20 000 x 20 000 image (decompression bomb)  skipped     test_unusable_pair_is_skipped_and_recorded,
                                                        test_decompression_bomb_limit_is_a_source_option
image smaller than a patch                  skipped     test_unusable_pair_is_skipped_and_recorded
mask of another size than its image         skipped     test_unusable_pair_is_skipped_and_recorded
labels outside the class list               skipped     test_unusable_pair_is_skipped_and_recorded
the same, in a Hub dataset                  skipped     test_hub_rows_that_cannot_be_used_are_skipped
every image unusable                        error       test_folder_without_usable_images_is_an_error
empty dataset                               error       test_empty_dataset_is_refused_before_any_work,
                                                        test_sources_real::test_local_folder_names_the_bad_file
skipped inputs in summary, manifest, site   shown       test_build_summary_manifest_and_site_show_skips
unknown model name (near matches)           error       test_models::test_unknown_model_suggests_near_matches,
                                                        test_pipeline::test_unknown_model_is_rejected_before_any_work
unknown dataset id offline                  error       test_sources_real::test_hub_offline_fails_fast_and_points_to_local_folder
checkpoint with missing or extra keys       error       test_models::test_checkpoint_with_missing_or_extra_keys_is_rejected_with_its_path
mistyped --weights path                     error       test_cli_exit::test_mistyped_weights_path_is_named_before_any_work
named model without weights                 exit 3      test_cli_exit::test_named_model_skipped_fails_unless_allowed
unreachable Hub                             error/warn  test_cli_exit::test_unreachable_hub_with_online_fails_at_once_in_one_line,
                                                        test_cli_exit::test_unreachable_hub_by_default_reads_the_cache_with_one_warning
NaN/inf tokens                              error       test_nan_weights_fail_naming_the_model_and_keep_other_models
full disk                                   error       test_full_disk_names_the_file_and_keeps_the_previous_one,
                                                        test_full_disk_in_the_parquet_writer_keeps_the_previous_table,
                                                        test_full_disk_during_extract_keeps_finished_models
read-only output folder                     error       test_read_only_output_folder_is_named,
                                                        test_read_only_results_folder_is_named
interrupted push                            error       test_push::test_interrupted_push_raises_without_token_and_rerun_completes
config file with a typo'd key               error       test_config_typo_is_rejected_with_the_closest_keys
config file value of the wrong type         error       test_config_value_of_the_wrong_type_is_rejected
hostile strings in class names              escaped     test_site::test_names_from_data_are_escaped_everywhere
hostile strings in model names              error       test_hostile_model_names_are_refused_before_any_work
hostile strings in skipped file names       escaped     test_build_summary_manifest_and_site_show_skips
==========================================  ==========  ===============================================
"""

from __future__ import annotations

import errno
import importlib
import io
import json
import os
import re
import struct
import zlib
from pathlib import Path

import click
import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors.torch import save_file
from test_site import _tags
from test_sources_real import CLASSES, H, W, _mask_array, _write_folder

from generator.cli import cli, main
from generator.config_file import config_defaults
from generator.errors import PatchAtlasError
from generator.extract import ExtractOptions, run_extract
from generator.sources import hub
from generator.sources.base import ClassInfo, SegmentationSource
from generator.sources.hub import hub_source
from generator.sources.images import to_rgb8
from generator.sources.local_folder import local_folder_source
from generator.store import lock as lock_module
from generator.store.atomic import atomic_write_json
from generator.store.parquet import PatchTableWriter

from conftest import TINY_REGISTERS, save_untrained_weights

COVERAGE = {
    "corrupt PNG / JPEG": ["test_unusable_pair_is_skipped_and_recorded"],
    "truncated PNG / JPEG": ["test_unusable_pair_is_skipped_and_recorded"],
    "CMYK, 16-bit, RGBA, grayscale image": ["test_sources_real::test_local_folder_loads_every_image_mode"],
    "palette, LA, 1-bit, 16-bit mid-grey image": ["test_every_mode_becomes_8_bit_rgb_the_same_way"],
    "1x1 image": ["test_unusable_pair_is_skipped_and_recorded"],
    "20 000 x 20 000 image": ["test_unusable_pair_is_skipped_and_recorded",
                              "test_decompression_bomb_limit_is_a_source_option"],
    "image smaller than a patch": ["test_unusable_pair_is_skipped_and_recorded"],
    "mask of another size": ["test_unusable_pair_is_skipped_and_recorded"],
    "labels outside the class list": ["test_unusable_pair_is_skipped_and_recorded",
                                      "test_hub_rows_that_cannot_be_used_are_skipped"],
    "empty dataset": ["test_empty_dataset_is_refused_before_any_work", "test_folder_without_usable_images_is_an_error",
                      "test_sources_real::test_local_folder_names_the_bad_file"],
    "skips shown": ["test_build_summary_manifest_and_site_show_skips"],
    "unknown model name": ["test_models::test_unknown_model_suggests_near_matches",
                           "test_pipeline::test_unknown_model_is_rejected_before_any_work"],
    "unknown dataset id offline": ["test_sources_real::test_hub_offline_fails_fast_and_points_to_local_folder"],
    "checkpoint with missing or extra keys": [
        "test_models::test_checkpoint_with_missing_or_extra_keys_is_rejected_with_its_path",
        "test_checkpoints::test_missing_key_is_named_with_the_file", "test_checkpoints::test_unexpected_key_is_named"],
    "mistyped --weights path": ["test_cli_exit::test_mistyped_weights_path_is_named_before_any_work"],
    "named model without weights": ["test_cli_exit::test_named_model_skipped_fails_unless_allowed"],
    "unreachable Hub": ["test_cli_exit::test_unreachable_hub_with_online_fails_at_once_in_one_line",
                        "test_cli_exit::test_unreachable_hub_by_default_reads_the_cache_with_one_warning"],
    "NaN/inf tokens": ["test_nan_weights_fail_naming_the_model_and_keep_other_models"],
    "full disk": ["test_full_disk_names_the_file_and_keeps_the_previous_one",
                  "test_full_disk_in_the_parquet_writer_keeps_the_previous_table",
                  "test_full_disk_during_extract_keeps_finished_models"],
    "read-only output folder": ["test_read_only_output_folder_is_named", "test_read_only_results_folder_is_named"],
    "interrupted push": ["test_push::test_interrupted_push_raises_without_token_and_rerun_completes"],
    "config file with a typo'd key": ["test_config_typo_is_rejected_with_the_closest_keys",
                                      "test_config_value_of_the_wrong_type_is_rejected"],
    "hostile strings in class or model names": ["test_site::test_names_from_data_are_escaped_everywhere",
                                                "test_hostile_model_names_are_refused_before_any_work",
                                                "test_build_summary_manifest_and_site_show_skips"],
}

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "patchatlas.toml"


@pytest.mark.parametrize("listed", sorted(COVERAGE))
def test_every_listed_input_has_a_test(listed):
    for ref in COVERAGE[listed]:
        module, _, name = ref.rpartition("::")
        where = importlib.import_module(module) if module else importlib.import_module(__name__)
        assert callable(getattr(where, name, None)), f"{listed}: {ref} does not exist"


# ---------------------------------------------------------------------------------------------
# Files that are not usable images

def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height`` pixels."""
    data = bytearray(_encoded(np.zeros((1, 1), np.uint8), "PNG"))
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR checksum
    return bytes(data)


def _rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_pair(root: Path, stem: str, image: bytes, suffix: str, mask: np.ndarray | bytes) -> tuple[Path, Path]:
    image_path, mask_path = root / "images" / f"{stem}{suffix}", root / "masks" / f"{stem}.png"
    image_path.write_bytes(image)
    mask_path.write_bytes(mask if isinstance(mask, bytes) else _encoded(mask, "PNG"))
    return image_path, mask_path


def _truncated(data: bytes) -> bytes:
    return data[:len(data) // 2]


# name -> (writes the pair and returns the culprit path, expected reason)
BAD_PAIRS = {
    "corrupt png": (lambda root: _write_pair(root, "bad", b"\x89PNG\r\n\x1a\n not a png", ".png", _mask_array(0))[0],
                    r"cannot read this image.*corrupt"),
    "corrupt jpeg": (lambda root: _write_pair(root, "bad", b"\xff\xd8\xff\xe0 not a jpeg", ".jpg", _mask_array(0))[0],
                     r"cannot read this image.*corrupt"),
    "truncated png": (lambda root: _write_pair(root, "bad", _truncated(_encoded(_rgb(1), "PNG")), ".png",
                                               _mask_array(0))[0], r"\(OSError: image file is truncated\)"),
    "truncated jpeg": (lambda root: _write_pair(root, "bad", _truncated(_encoded(_rgb(1), "JPEG")), ".jpg",
                                                _mask_array(0))[0],
                       r"\(OSError: (image file is truncated|Truncated File Read)"),
    "corrupt mask": (lambda root: _write_pair(root, "bad", _encoded(_rgb(1), "PNG"), ".png", b"not a png")[1],
                     r"cannot read this mask"),
    "1x1 image": (lambda root: _write_pair(root, "bad", _encoded(_rgb(1, 1, 1), "PNG"), ".png",
                                           np.zeros((1, 1), np.uint8))[0], r"1x1 pixels.*min_side=8"),
    "smaller than a patch": (lambda root: _write_pair(root, "bad", _encoded(_rgb(1, 7, 30), "PNG"), ".png",
                                                      np.zeros((7, 30), np.uint8))[0], r"30x7 pixels.*min_side=8"),
    "20000x20000 image": (lambda root: _write_pair(root, "bad", _png_claiming(20000, 20000), ".png",
                                                   _mask_array(0))[0],
                          r"image of 400,000,000 pixels exceeds the decompression-bomb limit of 100,000,000"
                          r" pixels.*--source-option max_pixels=N"),
    "mask of another size": (lambda root: _write_pair(root, "bad", _encoded(_rgb(1), "PNG"), ".png",
                                                      np.zeros((H + 1, W), np.uint8))[1],
                             rf"mask is {W}x{H + 1} but its image .*bad.png is {W}x{H}"),
    "labels outside the class list": (lambda root: _write_pair(root, "bad", _encoded(_rgb(1), "PNG"), ".png",
                                                               np.full((H, W), 9, np.uint8))[1],
                                      r"mask values 9 are neither class ids.*classes.json"),
}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # a source may raise PIL's limit
    root = tmp_path / "scenes"
    masks = _write_folder(root)
    return root, masks


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_unusable_pair_is_skipped_and_recorded(folder, case):
    root, masks = folder
    write, reason = BAD_PAIRS[case]
    culprit = write(root)
    source = local_folder_source(str(root))
    assert source.dataset["image_id"] == sorted(masks)  # every good pair kept, the bad one left out
    assert [s["path"] for s in source.skipped] == [str(culprit)]
    assert re.search(reason, source.skipped[0]["reason"]), source.skipped[0]["reason"]
    assert "\n" not in source.skipped[0]["reason"]


def test_folder_without_usable_images_is_an_error(tmp_path):
    root = tmp_path / "broken"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.json").write_text(json.dumps(CLASSES))
    for i in range(4):
        _write_pair(root, f"img{i}", b"garbage", ".png", _mask_array(i))
    with pytest.raises(PatchAtlasError) as caught:
        local_folder_source(str(root), name="broken")
    message = str(caught.value)
    assert "dataset 'broken' has no usable images" in message
    assert str(root / "images" / "img0.png") in message and "cannot read this image" in message
    assert "(and 1 more)" in message and "fix or replace" in message


def test_decompression_bomb_limit_is_a_source_option(folder):
    root, masks = folder
    big, _ = _write_pair(root, "big", _encoded(_rgb(3, 200, 150), "PNG"), ".png", np.zeros((200, 150), np.uint8))
    default = local_folder_source(str(root))
    assert "big" in default.dataset["image_id"] and default.skipped == []  # 30 000 pixels: fine by default
    source = local_folder_source(str(root), max_pixels=20_000)
    # The same files with another limit give other images, so the revision (and reuse) differs.
    assert source.revision != default.revision
    assert "big" not in source.dataset["image_id"] and len(source) == len(masks)
    assert source.skipped == [{"path": str(big), "reason": source.skipped[0]["reason"]}]
    assert "150x200 = 30,000 pixels exceeds the decompression-bomb limit of 20,000" in source.skipped[0]["reason"]
    assert source.params["max_pixels"] == 20_000
    for bad in (0, -5, "many", True):
        with pytest.raises(PatchAtlasError, match="max_pixels=.*positive integer"):
            local_folder_source(str(root), max_pixels=bad)


def test_every_mode_becomes_8_bit_rgb_the_same_way(tmp_path, monkeypatch):
    rgb = _rgb(5, 8, 8)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    colours = np.asarray(palette.getpalette(), np.uint8).reshape(-1, 3)
    alpha = np.full((8, 8), 0, np.uint8)  # fully transparent: the colours must survive
    grey = Image.fromarray(rgb[..., 0])
    cases = {
        "palette": (palette, colours[np.asarray(palette)]),
        "LA": (Image.merge("LA", [grey, Image.fromarray(alpha)]), np.repeat(rgb[..., :1], 3, axis=2)),
        "RGBA": (Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), rgb),
        "1-bit": (Image.fromarray(rgb[..., 0] > 127), np.repeat(np.where(rgb[..., :1] > 127, 255, 0), 3, axis=2)),
        "16-bit": (Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), np.repeat(rgb[..., :1], 3, axis=2)),
        "CMYK": (Image.fromarray(rgb).convert("CMYK"), rgb),
    }
    for name, (img, expected) in cases.items():
        got = to_rgb8(img)
        assert got.mode == "RGB", name
        np.testing.assert_array_equal(np.asarray(got), expected.astype(np.uint8), err_msg=name)
    assert np.asarray(to_rgb8(Image.fromarray(np.full((2, 2), 1000, np.uint16)))).max() == 4  # scaled, not clipped
    with pytest.raises(PatchAtlasError, match="mode F"):
        to_rgb8(Image.fromarray(np.zeros((2, 2), np.float32)))

    # The folder and the Hub source decode the same file to the same pixels.
    root = tmp_path / "modes"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.json").write_text(json.dumps(CLASSES))
    encoded = _encoded(np.dstack([rgb, alpha]), "PNG")
    _write_pair(root, "rgba", encoded, ".png", np.zeros((8, 8), np.uint8))
    from_folder = np.asarray(local_folder_source(str(root)).dataset[0]["image"])
    split = datasets.Dataset.from_dict({"image": [{"bytes": encoded, "path": None}],
                                        "mask": [Image.fromarray(np.zeros((8, 8), np.uint8))]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "mask": datasets.Image()}))
    monkeypatch.setattr(hub, "_offline_flag", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: split)
    from_hub = np.asarray(hub_source("owner/voc", classes="pascal-voc").dataset[0]["image"])
    np.testing.assert_array_equal(from_folder, rgb)
    np.testing.assert_array_equal(from_hub, rgb)


def test_hub_rows_that_cannot_be_used_are_skipped(monkeypatch):
    good = _encoded(_rgb(1), "PNG")
    rows = [
        (good, np.zeros((H, W), np.uint8)),  # kept
        (b"garbage", np.zeros((H, W), np.uint8)),  # corrupt image
        (good, np.zeros((H + 2, W), np.uint8)),  # mask of another size
        (good, np.full((H, W), 30, np.uint8)),  # 30: no VOC class, not the ignore label
        (_encoded(_rgb(2, 1, 1), "PNG"), np.zeros((1, 1), np.uint8)),  # 1x1
        (_png_claiming(20000, 20000), np.zeros((H, W), np.uint8)),  # decompression bomb
        (_encoded(_rgb(3), "JPEG"), np.full((H, W), 255, np.uint8)),  # kept, all ignore
    ]
    split = datasets.Dataset.from_dict(
        {"image": [{"bytes": image, "path": None} for image, _ in rows], "mask": [Image.fromarray(m) for _, m in rows]},
        features=datasets.Features({"image": datasets.Image(), "mask": datasets.Image()}))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setattr(hub, "_offline_flag", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: split)
    source = hub_source("owner/voc", classes="pascal-voc")
    assert source.dataset["image_id"] == ["validation-000000", "validation-000006"]
    reasons = {int(re.search(r"row (\d+)", s["path"]).group(1)): s["reason"] for s in source.skipped}
    assert sorted(reasons) == [1, 2, 3, 4, 5]
    assert "cannot read this image" in reasons[1]
    assert f"mask is {W}x{H + 2} but the image is {W}x{H}" in reasons[2]
    assert "mask values 30 are neither class ids" in reasons[3] and "classes=" in reasons[3]
    assert "1x1 pixels" in reasons[4] and "decompression-bomb" in reasons[5]
    assert all("owner/voc" in s["path"] for s in source.skipped)
    # An 8-bit RGB file passes through as stored: a JPEG is not recompressed.
    cells = source.dataset.cast_column("image", datasets.Image(decode=False))["image"]
    assert cells[1]["bytes"] == rows[6][0] and cells[0]["bytes"] == good

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: split.select([1, 3]))
    with pytest.raises(PatchAtlasError, match="'owner--voc-validation' has no usable images.*row 0.*cannot read"):
        hub_source("owner/voc", classes="pascal-voc")


def test_empty_dataset_is_refused_before_any_work(tmp_path, tiny_models):
    empty = datasets.Dataset.from_dict({"image_id": [], "image": [], "mask": []}, features=datasets.Features({
        "image_id": datasets.Value("string"), "image": datasets.Image(), "mask": datasets.Image()}))
    source = SegmentationSource("nothing-here", empty, [ClassInfo(0, "thing", "thing")])
    with pytest.raises(PatchAtlasError, match="dataset 'nothing-here' has no images"):
        run_extract(tmp_path / "out", [source], ["tiny_random"], ExtractOptions(device="cpu", progress=False))
    assert not (tmp_path / "out" / "datasets").exists()


# ---------------------------------------------------------------------------------------------
# A build with skipped inputs: summary, manifest, site

HOSTILE_FILE = '<img src=x onerror="alert(1)"> | [x](javascript:alert(1))'


def test_build_summary_manifest_and_site_show_skips(folder, tmp_path, tiny_models, capsys):
    root, masks = folder
    skipped = {
        str(_write_pair(root, "tiny", _encoded(_rgb(1, 1, 1), "PNG"), ".png", np.zeros((1, 1), np.uint8))[0]),
        str(_write_pair(root, "zz_labels", _encoded(_rgb(2), "PNG"), ".png", np.full((H, W), 7, np.uint8))[1]),
        str(_write_pair(root, HOSTILE_FILE, b"garbage", ".png", _mask_array(1))[0]),
    }
    out = tmp_path / "out"
    code = main(["build", "--out", str(out), "--source", "local-folder", "--source-option", f"path={root}",
                 "--source-option", "name=scenes", "--models", "tiny_random", "--layers", "last", "--k", "2",
                 "--gallery-k", "2", "--linear-max-steps", "50", "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # One line per skipped input while extracting, and again in the summary.
    for path in skipped:
        assert sum(path in line and line.startswith("warning: skipped input of scenes") for line in
                   captured.err.splitlines()) == 1, path
        assert sum(path in line and "SKIPPED input" in line for line in captured.out.splitlines()) == 1, path
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest.get("entries", manifest)["sources/scenes"]
    assert {s["path"] for s in entry["skipped_images"]} == skipped
    assert entry["num_images"] == len(masks)
    # The dataset page shows a "Skipped inputs" warning with one row per file, escaped.
    page = (out / "docs" / "datasets" / "scenes.md").read_text()
    assert '!!! warning "Skipped inputs: 3 file(s) not used"' in page
    html = (out / "site" / "datasets" / "scenes" / "index.html").read_text()
    table = html[html.index("Skipped inputs"):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 1 + 3  # header + one row per skipped file
    for name in ("tiny.png", "zz_labels.png", "1x1 pixels", "mask values 7"):
        assert name in table, name
    tags = _tags(html)
    assert not [a for t, a in tags if "onerror" in a]
    assert not [a for t, a in tags if a.get("href", "").startswith("javascript:")]
    assert "&lt;img src=x onerror=" in table


# ---------------------------------------------------------------------------------------------
# NaN tokens, a full disk, a read-only folder: finished results survive

def _unit_files(out: Path, model: str) -> dict[str, str]:
    manifest = json.loads((out / "manifest.json").read_text())
    entries = manifest.get("entries", manifest)
    unit = entries[f"extract/synthetic-scenes/{model}"]
    assert unit["status"] == "done"
    return unit["files"]


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or p.name.startswith(".part-"))]


EXTRACT = ["extract", "--source", "synthetic-scenes", "--source-option", "n_images=3", "--source-option", "size=32",
           "--layers", "last", "--norms", "postnorm", "--device", "cpu", "--quiet"]


def test_nan_weights_fail_naming_the_model_and_keep_other_models(tmp_path, tiny_models, capsys):
    ckpt = tmp_path / "broken.safetensors"
    state = save_untrained_weights(TINY_REGISTERS, ckpt, seed=3)
    state["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(state, str(ckpt))
    out = tmp_path / "out"
    code = main([*EXTRACT, "--out", str(out), "--models", "tiny_random,tiny_reg", "--weights", f"tiny_reg={ckpt}"])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"error: tiny_reg\b.*NaN/inf tokens; the weights or the inputs are broken", err), err
    repo = out / "datasets" / "synthetic-scenes"
    for rel, digest in _unit_files(out, "tiny_random").items():
        assert _sha256(repo / rel) == digest, rel
    entries = json.loads((out / "manifest.json").read_text())["entries"]
    assert entries.get("extract/synthetic-scenes/tiny_reg", {}).get("status") != "done"
    assert not [p for p in repo.rglob("*.parquet") if "tiny_reg" in p.relative_to(repo).parts]
    assert _temporaries(out) == []


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    target = tmp_path / "results" / "kmeans.json"
    atomic_write_json(target, {"miou": 0.5})
    before = target.read_bytes()
    real_write_bytes = Path.write_bytes

    def half_then_full(self, data):  # the disk fills up halfway through the temporary file
        real_write_bytes(self, data[:len(data) // 2])
        _no_space()

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    with pytest.raises(PatchAtlasError) as caught:
        atomic_write_json(target, {"miou": 0.75, "padding": "x" * 1000})
    message = str(caught.value)
    assert str(target) in message and "the disk is full" in message and "MB free" in message
    assert "free some space" in message and "--out" in message
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["kmeans.json"]


def test_full_disk_in_the_parquet_writer_keeps_the_previous_table(tmp_path, monkeypatch):
    path = tmp_path / "tiny" / "L01-postnorm" / "train-00000-of-00001.parquet"
    tokens, labels = np.ones((2, 2, 2, 8), np.float32), np.zeros((2, 2, 2), np.int16)
    with PatchTableWriter(path, 8) as writer:
        writer.write_batch(["a", "b"], tokens, labels)
    before = path.read_bytes()

    def arrow_full(self, *args, **kwargs):  # Arrow keeps only the message of the failed system call
        raise OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", arrow_full)
    with pytest.raises(PatchAtlasError, match=rf"{re.escape(str(path))}: the disk is full"):
        with PatchTableWriter(path, 8) as writer:
            writer.write_batch(["c", "d"], tokens * 2, labels)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_full_disk_during_extract_keeps_finished_models(tmp_path, tiny_models, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main([*EXTRACT, "--out", str(out), "--models", "tiny_random"]) == 0
    repo = out / "datasets" / "synthetic-scenes"
    finished = _unit_files(out, "tiny_random")
    real_write_table = pq.ParquetWriter.write_table

    def full_for_the_second_model(self, *args, **kwargs):
        if "tiny_reg" in str(self.where):
            _no_space()
        return real_write_table(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_for_the_second_model)
    ckpt = tmp_path / "reg.safetensors"
    save_untrained_weights(TINY_REGISTERS, ckpt, seed=1)
    code = main([*EXTRACT, "--out", str(out), "--models", "tiny_random,tiny_reg", "--weights", f"tiny_reg={ckpt}"])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(rf"error: {re.escape(str(repo / 'tiny_reg'))}\S*\.parquet: the disk is full", err), err
    assert "Traceback" not in err
    assert _unit_files(out, "tiny_random") == finished
    for rel, digest in finished.items():
        assert _sha256(repo / rel) == digest, rel
    assert _temporaries(out) == []


def _refuse_writes_in(monkeypatch, folder: Path) -> None:
    """As the kernel refuses a non-root user in a read-only folder: root ignores permissions."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    import tempfile

    real_mkstemp, real_open = tempfile.mkstemp, open

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(Path(dir) / "tmpXXXX"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    def lock_open(path, *args, **kwargs):
        if Path(path).resolve().parent == folder.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(lock_module, "open", lock_open, raising=False)


@pytest.fixture
def restore_permissions():
    folders: list[Path] = []
    yield folders
    for folder in folders:
        folder.chmod(0o755)


def test_read_only_output_folder_is_named(tmp_path, monkeypatch, restore_permissions, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"version": 1, "entries": {}}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    restore_permissions.append(out)
    _refuse_writes_in(monkeypatch, out)
    assert main(["analyze", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"output folder {out}: cannot be written" in err and "Permission denied" in err
    assert "choose another --out or fix its permissions" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_read_only_results_folder_is_named(tmp_path, monkeypatch, restore_permissions):
    results = tmp_path / "out" / "results"
    target = results / "summary.json"
    atomic_write_json(target, {"kept": True})
    restore_permissions.append(results)
    _refuse_writes_in(monkeypatch, results)
    with pytest.raises(PatchAtlasError) as caught:
        atomic_write_json(target, {"kept": False})
    message = str(caught.value)
    assert message.startswith(f"{results}: folder is not writable")
    assert "summary.json cannot be written there" in message and "chmod u+w" in message
    assert json.loads(target.read_text()) == {"kept": True}


# ---------------------------------------------------------------------------------------------
# Config files

def _resolved(command: str, args: list[str]) -> dict:
    """The option values ``command`` would run with, as click resolves them (nothing is run)."""
    parent = click.Context(cli, info_name="patchatlas")
    ctx = cli.commands[command].make_context(command, list(args), parent=parent)
    return ctx.params


def test_example_config_is_valid_for_every_command():
    for command in ("extract", "analyze", "render", "build"):
        params = _resolved(command, ["--config", str(EXAMPLE_CONFIG)])
        assert str(params["out"]) == "build"
    build = _resolved("build", ["--config", str(EXAMPLE_CONFIG)])
    assert build["sources"] == "synthetic-scenes,content-free"
    assert build["source_options"] == ("n_images=16", "size=224")
    assert build["models"] == "dino_vits16,dinov2_vits14_reg,mae_vitb16,random"
    assert build["ks"] == "4,8,16" and build["gallery_k"] == 8  # build reads the stage tables


def test_config_loses_to_the_command_line_and_wins_over_the_preset(tmp_path):
    config = tmp_path / "atlas.toml"
    config.write_text('label_rule = "majority"\nlayers = [4, 8]\n[extract]\nbatch-size = 3\n')
    for order in (["--preset", "paper-cityscapes", "--config", str(config)],
                  ["--config", str(config), "--preset", "paper-cityscapes"]):
        params = _resolved("extract", order)
        assert params["label_rule"] == "majority"  # the file over the preset's "nearest"
        assert params["layers"] == "4,8" and params["batch_size"] == 3
        assert params["sources"] == "paper-cityscapes"  # what the file leaves alone, the preset sets
    params = _resolved("extract", ["--config", str(config), "--label-rule", "nearest", "--batch-size", "5"])
    assert params["label_rule"] == "nearest" and params["batch_size"] == 5
    assert _resolved("analyze", ["--config", str(config)])["ks"] == "4,8,16"  # [extract] is extract's alone


@pytest.mark.parametrize("text, match", [
    ('modles = "dino_vits16"\n', r"unknown key 'modles'\. Did you mean 'models'\?"),
    ('label-rul = "nearest"\n', r"unknown key 'label-rul'\. Did you mean 'label-rule'\?"),
    ('[analyse]\nk = 4\n', r"unknown key 'analyse'\. Did you mean 'analyze'\?"),
    ('[analyze]\ngallery-k = 4\n', r"unknown key 'gallery-k' in \[analyze\]\. It is an option of summarize, render, build"),
    ('preset = "paper-cityscapes"\n', r"'preset' cannot be set in a config file; pass --preset"),
])
def test_config_typo_is_rejected_with_the_closest_keys(tmp_path, capsys, text, match):
    config = tmp_path / "typo.toml"
    config.write_text(text)
    assert main(["extract", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: config file {config}: " in err and re.search(match, err), err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("text, match", [
    ("batch-size = \"big\"\n", r"batch-size = 'big': expected an integer"),
    ("batch-size = 0\n", r"batch-size = 0: expected .*>=1"),
    ("label-rule = \"median\"\n", r"label-rule = 'median': expected .*nearest"),
    ("quiet = \"yes\"\n", r"quiet = 'yes': expected true or false"),
    ("shard-mb = true\n", r"shard-mb = True: expected a number"),
    ("source-option = 16\n", r"source-option = 16: expected a list of \"KEY=VALUE\" strings or a table"),
    ("models = { a = 1 }\n", r"models = \{'a': 1\}: expected a string"),
    ("out = \n", r"not valid TOML"),
])
def test_config_value_of_the_wrong_type_is_rejected(tmp_path, text, match):
    config = tmp_path / "types.toml"
    config.write_text(text)
    with pytest.raises(PatchAtlasError, match=match):
        config_defaults(config, "extract", {name: cli.commands[name] for name in ("extract", "analyze", "render",
                                                                                   "build")})
    with pytest.raises(PatchAtlasError, match="config file .*missing.toml not found"):
        config_defaults(tmp_path / "missing.toml", "extract", {"extract": cli.commands["extract"]})


# ---------------------------------------------------------------------------------------------
# Hostile model names

@pytest.mark.parametrize("name", ['<script>alert(1)</script>', "../../etc/passwd", "dino_vits16\n| x |"])
@pytest.mark.parametrize("option", ["--models", "--weights"])
def test_hostile_model_names_are_refused_before_any_work(tmp_path, tiny_models, capsys, name, option):
    out = tmp_path / "out"
    value = name if option == "--models" else f"{name}=/nowhere.pth"
    models = [] if option == "--models" else ["--models", "tiny_random"]
    assert main(["extract", "--out", str(out), "--source", "synthetic-scenes", "--source-option", "n_images=1",
                 "--source-option", "size=32", option, value, *models, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"error: unknown model {name!r}." in err and "patchatlas models" in err  # quoted: data, not markup
    assert not (out / "datasets").exists() and not list(out.glob("**/*.parquet"))
