"""Where the non-Python assets live: templates, data cards, the site skeleton, mkdocs.yml.

In a wheel they are packed under ``generator/_assets``; in a source checkout they sit at the
repository root. Callers ask here and never build these paths themselves.
"""

from __future__ import annotations

from pathlib import Path

_PACKED = Path(__file__).resolve().parent / "_assets"
_CHECKOUT = Path(__file__).resolve().parent.parent


def asset_root() -> Path:
    return _PACKED if _PACKED.is_dir() else _CHECKOUT


def templates_dir() -> Path:
    return asset_root() / "templates"


def data_cards_dir() -> Path:
    return asset_root() / "data_cards"


def site_skeleton_dir() -> Path:
    return asset_root() / "site"


def mkdocs_config() -> Path:
    return asset_root() / "mkdocs.yml"
