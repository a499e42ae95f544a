"""The site escapes everything that comes from data: no script, link or template from a name."""

from __future__ import annotations

import dataclasses
from html.parser import HTMLParser

import pytest

from generator.cli import main
from generator.models.registry import MODELS
from generator.sources import registry as source_registry
from generator.sources.synthetic import synthetic_scenes

from conftest import TINY_RANDOM

HOSTILE = {
    "script": "<script>alert(1)</script>",
    "link": "[click](javascript:alert(1))",
    "template": "{{ 7*7 }}{% raw %}",
    "html": '<img src=x onerror="alert(1)">',
    "table": "a | b",
}


class _TagCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def _tags(html: str) -> list[tuple[str, dict]]:
    """Every start tag with its attributes, as a browser's parser would see them."""
    parser = _TagCollector()
    parser.feed(html)
    return parser.tags


def hostile_scenes(n_images: int = 3, size: int = 64, seed: int = 0):
    source = synthetic_scenes(n_images=n_images, size=size, seed=seed)
    names = list(HOSTILE.values())
    source.classes = [dataclasses.replace(c, name=names[c.id % len(names)] + f" #{c.id}",
                                          super_name=HOSTILE["link"]) for c in source.classes]
    source.name = "hostile-names"
    source.description = "Described as " + HOSTILE["html"] + " and " + HOSTILE["script"]
    return source


@pytest.fixture
def hostile_site(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, TINY_RANDOM.name, TINY_RANDOM)
    monkeypatch.setitem(source_registry.SOURCES, "hostile-names", source_registry.SourceEntry(
        "hostile-names", hostile_scenes, "a source whose names attack the page", {"n_images": 3, "size": 64, "seed": 0}))
    out = tmp_path / "out"
    assert main(["build", "--out", str(out), "--source", "hostile-names", "--models", "tiny_random",
                 "--layers", "last", "--k", "2", "--quiet"]) == 0
    return out


def test_names_from_data_are_escaped_everywhere(hostile_site):
    pages = list((hostile_site / "site").rglob("*.html"))
    assert len(pages) >= 4
    dataset_page = (hostile_site / "site" / "datasets" / "hostile-names" / "index.html").read_text()
    for page in pages:
        html = page.read_text()
        tags = _tags(html)
        assert not [a for t, a in tags if "onerror" in a], page
        assert not [a for t, a in tags if t == "img" and a.get("src") == "x"], page
        assert not [a for t, a in tags if a.get("href", "").startswith("javascript:")], page
        assert "<script>alert(1)</script>" not in html, page
    # The names are still shown, as text.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dataset_page
    assert "{{ 7*7 }}" in dataset_page
    card = (hostile_site / "datasets" / "hostile-names" / "README.md").read_text()
    assert "<script>alert(1)</script>" not in card.split("\n---\n", 1)[1]


def test_top_variance_overlap_counts_shared_dimensions():
    from generator.summarize import _top_variance_overlaps

    def ctx(model, dims):
        return {"last": [{"model": model, "variance": {"top_dims": dims}}]}

    same = list(range(200))
    contexts = {"a": ctx("m", same), "b": ctx("m", same[::-1]), "c": ctx("m", list(range(200, 400)))}
    rows = {(r["a"], r["b"]): r["shared"] for r in _top_variance_overlaps(contexts)}
    assert rows == {("a", "b"): 200, ("a", "c"): 0, ("b", "c"): 0}


def test_leaderboard_says_plainly_when_no_pretrained_model_ran(hostile_site):
    # Only the untrained model ran: it is shown as a reference, never as the leader.
    home = (hostile_site / "site" / "index.html").read_text()
    assert "No pretrained model ran in this build; only reference rows below." in home
    board = home[home.index('id="leaderboard"'):]
    board = board[:board.index("</table>")]
    divider, reference = board.find('class="reference-divider"'), board.find("tiny_random")
    assert 0 <= divider < reference, "the untrained model must sit below the reference divider"
    assert 'class="reference-row"' in board[reference:]
