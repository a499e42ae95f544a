"""The argument checks every analysis shares: one order (value, then the name that says what it
is) and one wording, so a bad argument reads the same whichever analysis it reached."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from generator.errors import PatchAtlasError

if TYPE_CHECKING:  # the checks themselves need no torch: the render stage uses them without it
    import torch


def _int_range(low: int, high: int | None) -> str:
    if high is not None:
        return f"an integer in [{low}, {high}]"
    return "a positive integer" if low == 1 else f"an integer >= {low}"


def check_int(value, what: str, low: int = 1, high: int | None = None) -> int:
    """``value`` as an ``int`` in [``low``, ``high``]; bools, floats and strings are refused."""
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low
            or (high is not None and value > high)):
        raise PatchAtlasError(f"{what} {value!r}: expected {_int_range(low, high)}")
    return int(value)


def check_positive_int(value, what: str) -> int:
    return check_int(value, what, 1)


def check_choice(value: str, what: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise PatchAtlasError(f"{what} {value!r}: expected one of {', '.join(choices)}")
    return value


def check_features(x: torch.Tensor, what: str, min_rows: int = 1) -> None:
    """``x`` is a floating-point [rows, features] tensor with at least ``min_rows`` rows."""
    if x.ndim != 2:
        raise PatchAtlasError(f"{what} of shape {tuple(x.shape)}: expected a 2-D array [rows, features]")
    if not x.is_floating_point():
        raise PatchAtlasError(f"{what} of dtype {x.dtype}: expected floating point features")
    if x.shape[0] < min_rows:
        raise PatchAtlasError(f"{what} of shape {tuple(x.shape)} has {x.shape[0]} rows: at least {min_rows} "
                              f"{'is' if min_rows == 1 else 'are'} needed")
