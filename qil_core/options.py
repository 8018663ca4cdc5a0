"""Options as data: each option's default, range, choices and help text written once, as dataclass field metadata.

A job's options are a frozen dataclass deriving from `Options` whose fields are declared with `option(...)`.
Constructing one validates every field (`__post_init__`), so an options object that exists is a valid one.
The front ends read the same metadata: the CLI builds its argparse flags from it (`qil_core/cli/options.py`)
and the nodes build their `INPUT_TYPES` widgets from it (`nodes/widgets.py`), so nothing is written twice.

Adding an option is one field: `name: int = option(3, "what it does", lo=1, hi=9)` in the job's class, then
its name in the node's and the command's field list if it is to be shown there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from .checks import check_choice, check_int, check_number
from .errors import InputError

META = "qil_option"
O = TypeVar("O", bound="Options")


@dataclass(frozen=True)
class Spec:
    """What a front end needs to show and check one option (the default lives on the dataclass field)."""

    help: str
    kind: type  # int, float, bool or str: the widget and argparse type
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()  # allowed values (for a choice shown as text, the shown strings)
    hint: str = ""  # appended to error messages: how to fix it
    nullable: bool = False  # None means "not set" and is always allowed
    check: Callable[[str, Any], Any] | None = None  # custom check(name_shown, value) -> normalised value
    widget: Mapping[str, Any] = field(default_factory=dict)  # node-only extras: step, round, multiline, default
    metavar: str | None = None  # CLI placeholder


def option(
    default: Any,
    help: str,
    *,
    kind: type | None = None,
    lo: float | None = None,
    hi: float | None = None,
    choices: tuple = (),
    hint: str = "",
    check: Callable[[str, Any], Any] | None = None,
    widget: Mapping[str, Any] | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field carrying its Spec; `kind` defaults to the default's type (give it when default is None)."""
    if kind is None:
        if default is None:
            raise TypeError("option(None, ...) needs kind=")
        kind = type(default)
    spec = Spec(
        help=help,
        kind=kind,
        lo=lo,
        hi=hi,
        choices=tuple(choices),
        hint=hint,
        nullable=default is None,
        check=check,
        widget=dict(widget or {}),
        metavar=metavar,
    )
    return field(default=default, metadata={META: spec})


def specs(cls: type | Options) -> Iterator[tuple[dataclasses.Field, Spec]]:
    """(field, spec) of every option of an options class, in declaration order."""
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if META in f.metadata:
            yield f, f.metadata[META]


def spec_of(cls: type | Options, name: str) -> tuple[dataclasses.Field, Spec]:
    """The field and spec of one option; KeyError naming the class for an unknown one."""
    for f, s in specs(cls):
        if f.name == name:
            return f, s
    raise KeyError(f"{getattr(cls, '__name__', type(cls).__name__)} has no option {name!r}")


def retuned(cls: type, name: str, default: Any = dataclasses.MISSING, **changes: Any) -> Any:
    """The field `name` of `cls` again with another default and/or help/limits: a subclass's own variant."""
    f, s = spec_of(cls, name)
    return field(
        default=f.default if default is dataclasses.MISSING else default,
        metadata={META: dataclasses.replace(s, **changes)},
    )


def check_value(spec: Spec, shown: str, value: Any) -> Any:
    """Validate one value against its spec; errors name the option as `shown` (a flag, a widget, a parameter)."""
    if value is None and spec.nullable:
        return None
    if spec.check is not None:
        return spec.check(shown, value)
    if spec.choices:
        return check_choice(shown, value, spec.choices, spec.hint)
    if spec.kind is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise InputError(f"{shown} must be true or false, got {value!r}{spec.hint}")
    if spec.kind is int:
        return check_int(shown, value, spec.lo, spec.hi, spec.hint)  # type: ignore[arg-type]
    if spec.kind is float:
        return check_number(shown, value, spec.lo, spec.hi, spec.hint)
    if not isinstance(value, str):
        raise InputError(f"{shown} must be a str, got {type(value).__name__}{spec.hint}")
    return value


class Options:
    """Base of the options dataclasses: validated on construction, built from any front end's values."""

    def __post_init__(self) -> None:
        for f, s in specs(self):
            object.__setattr__(self, f.name, check_value(s, f.name, getattr(self, f.name)))
        self.check_together(lambda n: n)

    def check_together(self, shown: Callable[[str], str]) -> None:
        """Checks across fields (a subclass's); `shown(name)` is the name to put in the message."""

    @classmethod
    def build(cls: type[O], values: Mapping[str, Any], shown: Callable[[str], str] = lambda n: n) -> O:
        """An options object from `values` (option name -> value), each checked under the name `shown(name)`.

        The front ends use this so that errors name their flags or widgets; library callers just call the class.
        Unknown names are refused (a typo must not be dropped silently).
        """
        known = {f.name: s for f, s in specs(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InputError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(known)}")
        checked = {k: check_value(known[k], shown(k), v) for k, v in values.items()}
        defaults = {f.name: f.default for f, _ in specs(cls)}
        probe = {**defaults, **checked}
        cls.check_together(_Peek(probe), shown)  # type: ignore[arg-type]
        return cls(**checked)

    def values(self) -> dict[str, Any]:
        """Option name -> value, in declaration order."""
        return {f.name: getattr(self, f.name) for f, _ in specs(self)}

    def changed(self: O, **values: Any) -> O:
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **values)  # type: ignore[type-var]


class _Peek:
    """Attribute view of a values dict, so `check_together` runs before the object exists (to name the inputs)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.__dict__.update(values)
