"""`patchatlas doctor` reports what a build would be missing, and never prints the token."""

from __future__ import annotations

import re

from generator.cli import main

from conftest import TINY_SUPERVISED

SECRET = "hf_plantedSecretToken1234567890"


def _plant_cache(cache_dir, repo: str) -> None:
    commit = "0" * 40
    repo_dir = cache_dir / f"models--{repo.replace('/', '--')}"
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "snapshots" / commit / "model.safetensors").write_bytes(b"weights")


def test_doctor_reports_cached_weights_and_login_without_the_token(tmp_path, tiny_models, monkeypatch, capsys):
    from huggingface_hub import constants

    _plant_cache(tmp_path / "hub", "timm/vit_tiny_patch16_224.augreg_in21k")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    code = main(["doctor", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert SECRET not in out
    assert "a token is configured" in out
    lines = {m.group(1): line for line in out.splitlines() if (m := re.search(r"\] weights (\S+)", line))}
    assert lines[TINY_SUPERVISED.name].startswith("[ok")
    assert lines["dino_vits16"].startswith("[warn") and "not cached" in lines["dino_vits16"]
    assert lines["tiny_random"].startswith("[ok")


def test_doctor_fails_on_a_missing_checkpoint(tmp_path, capsys):
    code = main(["doctor", "--out", str(tmp_path), "--weights", f"dino_vits16={tmp_path / 'none.pth'}"])
    out = capsys.readouterr().out
    assert code == 1
    assert "none.pth not found" in out
