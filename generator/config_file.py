"""Command options from a TOML file: ``patchatlas build --config patchatlas.toml``.

The file gives option values as defaults: anything given on the command line still wins, and
the file wins over a ``--preset``. Layout::

    # Top-level keys: every command that has the option takes it, the others ignore it, so one
    # file serves extract, analyze, render and build alike.
    out = "build"
    models = ["dino_vits16", "mae_vitb16", "random"]
    label-rule = "nearest"
    source-option = { n_images = 32 }

    # A table per command (extract, analyze, render, build): for that command, over the
    # top-level keys. `build` runs the three stages, so it reads their tables too ([build] last).
    [analyze]
    k = [4, 8]

Keys are the long option names without the leading dashes (``label-rule``; ``label_rule`` is
the same key). A key that no command has, or that the command of its table does not have, is an
error naming the file, the key and the closest valid keys: a typo must never fall back to a
default silently. Values have the option's type: a string, an integer, a number or true/false;
comma-separated options (``source``, ``models``, ``layers``, ``norms``, ``k``) also take a list,
and repeatable ``KEY=VALUE`` options (``source-option``, ``weights``) a list of such strings or a
table. Relative paths are relative to the current folder, as on the command line.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from generator.errors import PatchAtlasError

CONFIG_COMMANDS = ("extract", "analyze", "summarize", "render", "build")
# The tables each command reads, later over earlier: build runs every stage.
TABLES_READ = {"build": ("extract", "analyze", "summarize", "render", "build")}
# Options that choose the file or the preset themselves: they belong on the command line.
COMMAND_LINE_ONLY = ("config", "preset")


def read_toml(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise PatchAtlasError(f"config file {path} not found; pass an existing TOML file to --config "
                              "(see examples/patchatlas.toml)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise PatchAtlasError(f"config file {path}: not valid TOML ({err}); fix the line it names") from None


def option_keys(command: click.Command) -> dict[str, click.Option]:
    """The keys a config file may set for ``command``: its long option names, dashed."""
    keys = {}
    for param in command.params:
        if not isinstance(param, click.Option) or not param.expose_value or param.is_eager:
            continue
        long_names = [opt for opt in param.opts if opt.startswith("--")]
        if long_names:
            keys[long_names[0][2:]] = param
    return keys


def _normal(key: str) -> str:
    return key.strip().replace("_", "-")


def _unknown_key(path: Path, key: str, valid: list[str], where: str, owners: list[str] = ()) -> PatchAtlasError:
    close = difflib.get_close_matches(_normal(key), valid, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    if owners:
        hint += f" It is an option of {', '.join(owners)}: move it to the top level or to their tables."
    if _normal(key) in COMMAND_LINE_ONLY:
        return PatchAtlasError(f"config file {path}: {key!r}{where} cannot be set in a config file; pass "
                               f"--{_normal(key)} on the command line")
    return PatchAtlasError(f"config file {path}: unknown key {key!r}{where}.{hint} Valid keys: {', '.join(valid)}")


def _bad_value(path: Path, key: str, value: Any, expected: str) -> PatchAtlasError:
    return PatchAtlasError(f"config file {path}: {key} = {value!r}: expected {expected}")


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def option_value(path: Path, key: str, option: click.Option, value: Any) -> Any:
    """``value`` from the file as the option's default, after checking its type."""
    if option.is_flag and not option.multiple:
        if not isinstance(value, bool):
            raise _bad_value(path, key, value, "true or false")
        return value
    if option.multiple:
        if isinstance(value, dict):
            value = [f"{k}={v}" for k, v in value.items()]
        if not isinstance(value, list) or not all(_scalar(v) for v in value):
            raise _bad_value(path, key, value, 'a list of "KEY=VALUE" strings or a table of values')
        return [str(v) for v in value]
    kind = option.type
    if isinstance(kind, click.Choice):
        if not isinstance(value, str):
            raise _bad_value(path, key, value, f"one of {', '.join(str(c) for c in kind.choices)}")
    elif isinstance(kind, click.types.IntParamType):  # IntRange included
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad_value(path, key, value, "an integer")
    elif isinstance(kind, click.types.FloatParamType):  # FloatRange included
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad_value(path, key, value, "a number")
    else:  # strings and paths; comma-separated options may be lists
        if isinstance(value, list) and value and all(_scalar(v) for v in value):
            return ",".join(str(v) for v in value)
        if not _scalar(value):
            raise _bad_value(path, key, value, "a string (or a list, for comma-separated values)")
        return str(value)
    try:
        return kind.convert(value, option, None)
    except click.BadParameter as err:
        raise _bad_value(path, key, value, err.message) from None


def _table_values(path: Path, table: Mapping[str, Any], options: dict[str, click.Option], where: str,
                  strict: bool, valid: list[str], owners: Mapping[str, list[str]]) -> dict[str, Any]:
    values = {}
    for key, value in table.items():
        option = options.get(_normal(key))
        if option is None:
            if strict or _normal(key) in COMMAND_LINE_ONLY:
                raise _unknown_key(path, key, valid, where, owners.get(_normal(key), []))
            continue
        values[option.name] = option_value(path, key, option, value)
    return values


def config_defaults(path: str | Path, command_name: str, commands: Mapping[str, click.Command]) -> dict[str, Any]:
    """The option defaults for ``command_name`` from the file at ``path`` (parameter name -> value).

    ``commands`` are the commands that read config files; a top-level key must be an option of
    one of them, a key in ``[command]`` an option of that command.
    """
    path = Path(path).expanduser()
    data = read_toml(path)
    per_command = {name: option_keys(command) for name, command in commands.items()}
    known_anywhere = sorted({key for keys in per_command.values() for key in keys})
    owners = {key: [name for name, keys in per_command.items() if key in keys] for key in known_anywhere}
    top = {k: v for k, v in data.items() if not (isinstance(v, dict) and k in commands)}
    for key in top:
        if _normal(key) not in known_anywhere:
            raise _unknown_key(path, key, known_anywhere + sorted(commands), "")
    options = per_command[command_name]
    own = {option.name for option in options.values()}
    values = _table_values(path, top, options, "", strict=False, valid=known_anywhere, owners=owners)
    tables = {}
    for name in commands:
        if isinstance(data.get(name), dict):
            # Every table is checked, so a typo under [render] is found by `extract --config` too.
            tables[name] = _table_values(path, data[name], per_command[name], f" in [{name}]", strict=True,
                                         valid=sorted(per_command[name]), owners=owners)
    for name in TABLES_READ.get(command_name, (command_name,)):
        values.update({key: value for key, value in tables.get(name, {}).items() if key in own})
    return values
