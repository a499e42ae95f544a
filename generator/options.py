"""Option records declared once: an option's default and its allowed values live on the field of
its dataclass (``ExtractOptions``, ``AnalyzeOptions``, ``SummarizeOptions``, ``ProbeProtocol``),
and the command line reads them from there, so the two cannot drift apart."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from generator.errors import PatchAtlasError


def choice_field(default: Any, choices: Sequence[str]) -> Any:
    """A dataclass field that accepts only ``choices`` (for a sequence field: each element)."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def _field(cls, name: str) -> dataclasses.Field:
    try:
        return next(f for f in dataclasses.fields(cls) if f.name == name)
    except StopIteration:
        raise KeyError(f"{cls.__name__} has no option {name!r}") from None


def option_default(cls, name: str) -> Any:
    """The default of ``cls``'s field ``name`` (a factory's value for factory fields)."""
    f = _field(cls, name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def option_choices(cls, name: str) -> tuple[str, ...]:
    return _field(cls, name).metadata["choices"]


def option_name(name: str) -> str:
    """How the command line spells a field: ``label_rule`` → ``--label-rule``."""
    return "--" + name.replace("_", "-")


def check_choices(record) -> None:
    """Every field of ``record`` declared with choices holds one of them (or only them)."""
    for f in dataclasses.fields(record):
        choices = f.metadata.get("choices")
        if not choices:
            continue
        value = getattr(record, f.name)
        values = [value] if isinstance(value, str) or not isinstance(value, Sequence) else list(value)
        for item in values:
            if item not in choices:
                raise PatchAtlasError(f"{option_name(f.name)} {item!r}: expected one of {', '.join(choices)}")
