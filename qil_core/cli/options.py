"""argparse flags generated from an options dataclass (`qil_core/options.py`), and the options back from args.

`add_options(group, DecomposeOptions, ["layers", "steps"])` adds `--layers` and `--steps` with the field's
default, range (in the help), choices and help text; `from_args(DecomposeOptions, args, names)` builds the
checked options object, its errors naming the flags (`--layers must be in 1..20, got 0`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..checks import describe_range
from ..options import Options, spec_of
from .common import finite_float

O = TypeVar("O", bound=Options)


def flag(name: str) -> str:
    """The CLI flag of an option name: layers -> --layers, max_side -> --max-side."""
    return "--" + name.replace("_", "-")


def _help(text: str, default: Any, span: str, show_default: bool) -> str:
    extra = [span] if span else []
    if show_default and default is not None:
        extra.append(
            f"default {default!r}" if isinstance(default, str) and not default.strip() else f"default {default}"
        )
    suffix = f" ({'; '.join(extra)})" if extra else ""
    return (text.rstrip(".") + suffix).replace("%", "%%")


def add_options(
    group: Any, cls: type[Options], names: Sequence[str], *, defaults: Mapping[str, Any] | None = None
) -> None:
    """Add one flag per option name to `group` (a parser or argument group), all generated from the fields.

    `defaults` replaces a field's default for this command only (the demo's small settings, say).
    """
    for name in names:
        f, s = spec_of(cls, name)
        default = (defaults or {}).get(name, f.default)
        if s.kind is bool:
            if default:
                group.add_argument(
                    f"--no-{name.replace('_', '-')}",
                    dest=name,
                    action="store_false",
                    help=_help("Turn off (on by default): " + s.help, None, "", False),
                )
            else:
                group.add_argument(flag(name), dest=name, action="store_true", help=_help(s.help, None, "", False))
            continue
        kw: dict[str, Any] = {"dest": name, "default": default}
        if s.choices:
            kw["choices"] = s.choices
            kw["default"] = None if default is None else str(default)
            span = ""
        else:
            kw["type"] = {int: int, float: finite_float}.get(s.kind, str)
            span = describe_range(s.lo, s.hi)
        if s.metavar:
            kw["metavar"] = s.metavar
        group.add_argument(flag(name), help=_help(s.help, kw["default"], span, True), **kw)


def from_args(
    cls: type[O],
    args: argparse.Namespace,
    names: Sequence[str],
    extra: Mapping[str, Any] | None = None,
    shown: Callable[[str], str] = flag,
) -> O:
    """The options object of the flags `names` (plus `extra` values), checked with errors naming the flags."""
    values = {n: getattr(args, n) for n in names}
    return cls.build({**values, **(extra or {})}, shown)
