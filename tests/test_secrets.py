"""The Hub token is read only through Hugging Face's own mechanisms (here ``HF_TOKEN``) and goes
only into the Authorization header of Hub requests: never into printed output, logs, manifests,
dataset cards, results or the site.

A freshly drawn token is planted, then `build`, `doctor`, `push --dry-run` and `push` run as a
user would run them, against the local stand-in for the Hub of test_push.py. Every byte they
wrote or printed is searched for the token; the stand-in must have received it, so the search
cannot pass merely because the token was never read.
"""

from __future__ import annotations

import logging
import secrets
import string

from generator.cli import main

from test_push import REPO, hub  # noqa: F401  (hub: a fixture, the local stand-in for the Hub)

TOKEN = "hf_" + "".join(secrets.choice(string.ascii_letters) for _ in range(34))


def _files_holding(root, needle: bytes) -> list[str]:
    return [str(p) for p in sorted(root.rglob("*")) if p.is_file() and needle in p.read_bytes()]


def test_planted_token_reaches_the_hub_and_nothing_else(hub, tmp_path, tiny_models, monkeypatch,  # noqa: F811
                                                        capfd, caplog):
    from huggingface_hub import constants

    caplog.set_level(logging.INFO)
    for name in ("generator", "huggingface_hub"):
        caplog.set_level(logging.DEBUG, logger=name)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the build itself needs no network
    out = tmp_path / "out"
    assert main(["build", "--out", str(out), "--models", "tiny_random", "--source-option", "n_images=4",
                 "--source-option", "size=64", "--layers", "last", "--k", "2", "--gallery-k", "2",
                 "--linear-max-steps", "50", "--device", "cpu", "--quiet"]) == 0
    main(["doctor", "--out", str(out)])  # its exit code depends on this machine; its output must not

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    push = ["push", "--out", str(out), "--dataset", "synthetic-scenes", "--repo", REPO]
    assert main([*push, "--dry-run"]) == 0
    assert main(push) == 0
    printed_out, printed_err = capfd.readouterr()

    # The token was read and used: every request to the Hub carried it, and the push landed.
    assert hub.authorizations and set(hub.authorizations) == {f"Bearer {TOKEN}"}
    assert "README.md" in hub.repos[REPO]["main"] and hub.commits == 1
    assert "a token is configured" in printed_out  # doctor saw it too

    needle = TOKEN.encode()
    assert needle not in printed_out.encode() and needle not in printed_err.encode()
    assert TOKEN not in caplog.text
    assert (out / "manifest.json").is_file() and (out / "site" / "index.html").is_file()
    assert _files_holding(tmp_path, needle) == []
    # What was uploaded is what was written, so it holds no token either.
    assert [path for path, data in hub.repos[REPO]["main"].items() if needle in data] == []
    assert [r.path for r in hub.requests if needle in r.body or TOKEN in str(r.headers)] == []
