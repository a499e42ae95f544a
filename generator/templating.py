"""The one Jinja environment and the escapers that site pages and dataset cards share.

Text that comes from data (dataset, class and model names) goes through ``md`` or
``md_inline`` on a Markdown page and through ``yaml_str`` in front matter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import jinja2
import markupsafe

# Characters that would start Markdown or HTML syntax when they come from data (names, labels).
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def md(value) -> markupsafe.Markup:
    """Text shown as text in Markdown: HTML specials become entities, Markdown specials are escaped."""
    return markupsafe.Markup(_MD_SPECIAL.sub(r"\\\1", str(markupsafe.escape(str(value)))))


def md_inline(value) -> markupsafe.Markup:
    """``md`` on one line, for headings and table cells."""
    return md(" ".join(str(value).split()))


def yaml_str(value) -> markupsafe.Markup:
    """A double-quoted scalar that YAML and Python both read back as exactly ``value``.

    JSON string syntax is a subset of both; characters JSON leaves raw but YAML would fold or
    reject (NEL, line/paragraph separators, other non-printables) are escaped as well.
    """
    text = json.dumps(str(value), ensure_ascii=False)
    escaped = "".join(
        ch if ch.isprintable() else (f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        for ch in text)
    return markupsafe.Markup(escaped)


def environment(loader_dir: Path, *, autoescape: bool, finalize: Callable | None = None) -> jinja2.Environment:
    """Templates under ``loader_dir``: undefined names fail, block tags leave no blank lines, and
    the escapers above are the filters ``md``, ``md_inline`` and ``yaml_str``."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(loader_dir)), autoescape=autoescape,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        finalize=finalize,
    )
    env.filters.update(md=md, md_inline=md_inline, yaml_str=yaml_str)
    return env
