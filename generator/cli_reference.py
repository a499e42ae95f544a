"""The CLI reference page, written from click's own definition of every command.

``python -m generator.cli_reference`` rewrites the committed page, ``site/guide/cli.md`` (``--check``
exits 1 instead when it is stale); a test checks that the page equals this module's output, so
an option added, renamed or re-documented in ``generator/cli.py`` without regenerating fails
instead of leaving a stale copy. Each row is
what ``patchatlas COMMAND --help`` prints for that option (``Parameter.get_help_record``).
"""

from __future__ import annotations

import argparse
import html
import inspect
import re
import sys

import click

from generator.assets import site_skeleton_dir
from generator.cli import cli
from generator.store.atomic import atomic_write_text

PROG = "patchatlas"
REGENERATE = "python -m generator.cli_reference"
# The page in a source checkout (the skeleton the render stage copies); a wheel has no use for it.
CLI_PAGE = site_skeleton_dir() / "guide" / "cli.md"

# The Markdown syntax that can start mid-line in help text (emphasis, links, attribute lists);
# ``generator.site.md_escape`` escapes more for data on pages, but importing the render stage
# here would pull in torch for a page of text.
_MD_SPECIAL = re.compile(r"([\\*_{}\[\]])")
_CODE_SPAN = re.compile(r"`([^`]+)`")


def _md_text(text: str) -> str:
    """Help text as Markdown: its `code` spans kept as code, everything else literal.

    Pipes are written as entities so that a cell of a Markdown table never splits on them.
    """
    parts = []
    for i, piece in enumerate(_CODE_SPAN.split(text)):
        escaped = html.escape(piece, quote=False)
        if i % 2:
            parts.append(f"<code>{escaped.replace('|', '&#124;')}</code>")
        else:
            parts.append(_MD_SPECIAL.sub(r"\\\1", escaped).replace("|", "&#124;"))
    return "".join(parts)


def _code(text: str) -> str:
    return f"<code>{html.escape(text, quote=False).replace('|', '&#124;')}</code>"


def _paragraphs(help_text: str | None) -> list[str]:
    """A command's docstring as paragraphs, each joined onto one line."""
    text = inspect.cleandoc(help_text or "")
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def options_table(command: click.Command, ctx: click.Context) -> str:
    rows = [record for param in command.get_params(ctx) if (record := param.get_help_record(ctx))]
    lines = ["| option | meaning |", "|---|---|"]
    lines += [f"| {_code(opts)} | {_md_text(meaning)} |" for opts, meaning in rows]
    return "\n".join(lines)


def command_section(name: str, command: click.Command, parent: click.Context) -> str:
    ctx = click.Context(command, info_name=name, parent=parent, **command.context_settings)
    usage = " ".join([PROG, name, *command.collect_usage_pieces(ctx)])
    body = [f"## `{PROG} {name}`", f"`{usage}`", *map(_md_text, _paragraphs(command.help)), options_table(command, ctx)]
    return "\n\n".join(body)


def cli_reference(group: click.Group = cli) -> str:
    """The whole page: the global options, then each command in the order ``cli.py`` defines them."""
    ctx = click.Context(group, info_name=PROG, **group.context_settings)
    sections = [
        "# CLI reference",
        f"<!-- Generated from generator/cli.py by `{REGENERATE}`; do not edit by hand. -->",
        f"`{PROG} [-v] COMMAND [OPTIONS]`: global options go before the command; each table is what "
        f"`{PROG} COMMAND --help` prints.",
        *map(_md_text, _paragraphs(group.help)),
        "## Global options",
        options_table(group, ctx),
        *(command_section(name, command, ctx) for name, command in group.commands.items() if not command.hidden),
    ]
    return "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write site/guide/cli.md from the commands' definitions.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale; write nothing")
    args = parser.parse_args(argv)
    page = cli_reference()
    current = CLI_PAGE.read_text(encoding="utf-8") if CLI_PAGE.is_file() else None
    if args.check:
        if page != current:
            print(f"{CLI_PAGE} is stale: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    if page != current:
        atomic_write_text(CLI_PAGE, page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
