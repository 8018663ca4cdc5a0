"""Number, choice and finite checks for every front end: one home, messages that name the input.

Each checker takes the name to show, so the message speaks the caller's language: library callers see the
parameter (`layers`), CLI users the flag (`--layers`), node users the widget (`input 'opacity'`). Values that
arrive through ComfyUI links or Python calls skip any widget limit, so nothing here relies on them; NaN and
inf are refused explicitly (NaN passes every `lo <= v <= hi` written the other way round).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from .errors import InputError

T = TypeVar("T")


def describe_range(lo: float | None, hi: float | None) -> str:
    """'1..20', '>= 0', '<= 1' or '' (no limit), numbers in their shortest form."""
    if lo is not None and hi is not None:
        return f"{lo:g}..{hi:g}" if isinstance(lo, float) or isinstance(hi, float) else f"{lo}..{hi}"
    if lo is not None:
        return f">= {lo:g}"
    if hi is not None:
        return f"<= {hi:g}"
    return ""


def _within(lo: float | None, hi: float | None) -> str:
    """' in 1..20', ' >= 0', ' <= 1' or '': the range as it follows "must be"."""
    span = describe_range(lo, hi)
    return f" in {span}" if lo is not None and hi is not None else f" {span}" if span else ""


def _in_range(v: float, lo: float | None, hi: float | None) -> bool:
    return (lo is None or v >= lo) and (hi is None or v <= hi)


def check_number(
    name: str, value: Any, lo: float | None = None, hi: float | None = None, hint: str = "", *, loose: bool = False
) -> float:
    """`value` as a finite float within lo..hi (either may be None), else InputError naming `name`.

    Strict (default): ints, floats and numpy numbers only, never bool. `loose=True` takes anything `float()`
    takes (numpy scalars, 0-d arrays, tensors of one element, numeric strings), as the layer engine always has.
    """
    within = _within(lo, hi)
    if loose:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{name} must be a number{within}, got {value!r}{hint}") from None
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise InputError(f"{name} must be a number{within}, got {type(value).__name__} {value!r}{hint}")
        v = float(value)
    if not math.isfinite(v):
        raise InputError(f"{name} must be a finite number{within}, got {value!r}{hint}")
    if not _in_range(v, lo, hi):
        raise InputError(f"{name} must be{within}, got {value!r}{hint}")
    return v


def check_int(
    name: str, value: Any, lo: int | None = None, hi: int | None = None, hint: str = "", *, allow_float: bool = False
) -> int:
    """`value` as an int within lo..hi, else InputError naming `name` and the range.

    Ints and numpy ints only (never bool); `allow_float=True` also takes a whole float such as 3.0 (widgets
    and links in ComfyUI sometimes deliver those).
    """
    integral = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not integral and allow_float and isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or not float(value).is_integer():
            raise InputError(f"{name} must be a whole number, got {value!r}{hint}")
        value, integral = int(value), True
    if not integral:
        raise InputError(f"{name} must be an integer{_within(lo, hi)}, got {value!r} ({type(value).__name__}){hint}")
    if not _in_range(int(value), lo, hi):
        raise InputError(f"{name} must be{_within(lo, hi)}, got {value}{hint}")
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[T], hint: str = "") -> T:
    """`value` if it is one of `choices` (compared with ==), else InputError listing them."""
    for c in choices:
        if type(value) is type(c) and value == c:
            return c
    listed = " or ".join(repr(c) for c in choices) if len(choices) == 2 else "one of " + ", ".join(map(str, choices))
    raise InputError(f"{name} must be {listed}, got {value!r}{hint}")


def check_finite(name: str, array: Any) -> None:
    """Refuse an array (numpy or torch) holding NaN or inf, naming it."""
    a = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    if a.size and not bool(np.isfinite(a).all()):
        raise InputError(f"{name} contains NaN or inf; check what produced it")
