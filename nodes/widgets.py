"""Node widgets generated from the library's options dataclasses, and the options back from widget values.

`widgets(DecomposeOptions, ["layers", "steps"])` gives the INPUT_TYPES entries with the field's default,
limits, choices and help (as the tooltip), so a widget never restates a limit the library owns. Widget names
may differ from option names (`rename`), and errors then name the widget. Old widget values from saved
workflows are mapped to today's spelling by the node that owns them, in one table (see model_nodes.LEGACY).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from ..qil_core.checks import check_choice
from ..qil_core.options import Options, spec_of

O = TypeVar("O", bound=Options)
_KINDS = {int: "INT", float: "FLOAT", bool: "BOOLEAN", str: "STRING"}


def widget(cls: type[Options], name: str, **changes: Any) -> tuple[Any, dict[str, Any]]:
    """One INPUT_TYPES entry for option `name` of `cls`; `changes` adds or replaces widget settings."""
    f, s = spec_of(cls, name)
    settings: dict[str, Any] = {"default": f.default}
    if s.choices:
        kind: Any = list(s.choices)
        settings["default"] = str(f.default)
    else:
        kind = _KINDS[s.kind]
        if s.lo is not None:
            settings["min"] = s.lo
        if s.hi is not None:
            settings["max"] = s.hi
    settings.update(s.widget)
    settings["tooltip"] = s.help
    settings.update(changes)
    return (kind, settings)


def widgets(
    cls: type[Options], names: Sequence[str], rename: Mapping[str, str] | None = None, **changes: dict[str, Any]
) -> dict[str, tuple[Any, dict[str, Any]]]:
    """INPUT_TYPES entries for `names` in that order (the order saved workflows depend on), renamed as given."""
    rename = rename or {}
    return {rename.get(n, n): widget(cls, n, **changes.get(n, {})) for n in names}


def options_from_widgets(cls: type[O], values: Mapping[str, Any], rename: Mapping[str, str] | None = None) -> O:
    """The checked options object of widget values (keyed by widget name); errors name the widgets."""
    rename = rename or {}
    back = {w: n for n, w in rename.items()}
    named = {back.get(k, k): v for k, v in values.items()}
    for name, value in named.items():
        _, s = spec_of(cls, name)
        if s.choices and s.check is not None:  # a choice the library parses (resolution '640' -> 640): the combo's text
            check_choice(f"input {rename.get(name, name)!r}", value, s.choices)
    return cls.build(named, lambda n: rename.get(n, n))
