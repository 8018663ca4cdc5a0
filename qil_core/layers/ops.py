"""Stack edits users expect: select, delete, move, reorder, merge down, duplicate, drop empty, set properties.

Every function returns a new `LayerStack` (the input is never modified; pixel arrays are shared where a
layer is unchanged). Layers are addressed by index (negative counts from the top) or exact name, through
`LayerStack.index_of`, so a wrong key always raises LayerIndexError ("layer 5 requested, 3 available").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from ..errors import InputError
from .composite import composite_layers, union_bbox
from .stack import LayerStack

logger = logging.getLogger(__name__)

Key = int | str

_RANGE = re.compile(r"(\d+)\s*(?:-|\.\.)\s*(\d+)")
_INT = re.compile(r"[+-]?\d+")

# Properties `set_layer_props` may change (pixels change through transform / recolor instead).
EDITABLE_PROPS = ("name", "x", "y", "opacity", "blend_mode", "visible")


def parse_layer_keys(spec: str) -> list[Key]:
    """Parse '0,2,-1', '1-3' (inclusive, also '1..3') or 'sky,logo' into a list of indices and names."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"layer list {spec!r} is empty; give indices like '0,2,-1', a range '1-3' or names")
    keys: list[Key] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            raise InputError(f"layer list {spec!r} has an empty entry; remove the extra comma")
        if _INT.fullmatch(token):
            keys.append(int(token))
        elif m := _RANGE.fullmatch(token):
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise InputError(f"layer range {token!r} runs backwards; write it low to high, e.g. '{hi}-{lo}'")
            keys.extend(range(lo, hi + 1))
        else:
            keys.append(token)
    return keys


def layer_indices(stack: LayerStack, keys: Sequence[Key] | Key) -> list[int]:
    """Resolve keys (indices or names) to indices in the order given, first occurrence kept."""
    if isinstance(keys, (int, str)):
        keys = [keys]
    out: list[int] = []
    for key in keys:
        i = stack.index_of(key)
        if i not in out:
            out.append(i)
    return out


def select_layers(stack: LayerStack, keys: Sequence[Key] | Key) -> LayerStack:
    """A stack holding only the addressed layers, in the order the keys list them (duplicates once)."""
    return stack.replace(layers=[stack.layers[i] for i in layer_indices(stack, keys)])


def delete_layers(stack: LayerStack, keys: Sequence[Key] | Key) -> LayerStack:
    """The stack without the addressed layers (deleting all of them leaves an empty stack)."""
    drop = set(layer_indices(stack, keys))
    return stack.replace(layers=[layer for i, layer in enumerate(stack.layers) if i not in drop])


def move_layer(stack: LayerStack, key: Key, to_index: int) -> LayerStack:
    """Move one layer so that it ends at position `to_index` (0 = bottom, -1 = top)."""
    i = stack.index_of(key)
    n = len(stack.layers)
    if isinstance(to_index, bool) or not isinstance(to_index, int) or not -n <= to_index < n:
        raise InputError(f"move_layer: to_index must be an int in {-n}..{n - 1}, got {to_index!r}")
    layers = list(stack.layers)
    layer = layers.pop(i)
    layers.insert(to_index % n, layer)
    return stack.replace(layers=layers)


def reorder_layers(stack: LayerStack, order: Sequence[int]) -> LayerStack:
    """New order bottom first: position i gets old layer order[i]; `order` must be a permutation of 0..N-1."""
    n = len(stack.layers)
    got = [int(i) for i in order]
    if sorted(got) != list(range(n)):
        raise InputError(f"reorder_layers: order must list every index 0..{n - 1} exactly once, got {list(order)!r}")
    return stack.replace(layers=[stack.layers[i] for i in got])


def merge_down(stack: LayerStack, key: Key) -> LayerStack:
    """Merge a layer into the one below it, Photoshop's Merge Down.

    The upper layer is blended onto the lower layer's own pixels with the upper's blend mode and opacity;
    the result keeps the lower layer's name, opacity, blend mode and visibility, and is cropped to content.
    A hidden upper layer contributes nothing and is dropped.
    """
    i = stack.index_of(key)
    if i == 0:
        raise InputError(f"merge_down: layer {key!r} is the bottom layer; there is no layer below to merge into")
    upper, lower = stack.layers[i], stack.layers[i - 1]
    if not upper.visible or upper.opacity == 0 or upper.pixels.size == 0:
        logger.info("merge_down: upper layer %r is hidden or empty and is dropped", upper.name)
        merged = lower
    else:
        base = lower.replace(opacity=1.0, blend_mode="normal", visible=True)
        rect = union_bbox([base, upper])
        if rect is None:  # cannot happen: upper has pixels
            raise InputError(f"merge_down: layers {upper.name!r} and {lower.name!r} have no pixels to merge")
        pixels = composite_layers([base, upper], rect)  # (h, w, 4) straight RGBA of the union box
        merged = lower.replace(pixels=pixels, x=rect[0], y=rect[1]).cropped()
    layers = list(stack.layers)
    layers[i - 1 : i + 1] = [merged]
    return stack.replace(layers=layers)


def duplicate_layer(stack: LayerStack, key: Key, name: str | None = None) -> LayerStack:
    """Insert a copy of a layer directly above it, named `name` or '<name> copy'."""
    i = stack.index_of(key)
    src = stack.layers[i]
    copy = src.replace(pixels=src.pixels.copy(), name=name if name is not None else f"{src.name} copy".strip())
    layers = list(stack.layers)
    layers.insert(i + 1, copy)
    return stack.replace(layers=layers)


def drop_empty_layers(stack: LayerStack) -> LayerStack:
    """The stack without layers that have no pixel with alpha > 0."""
    return stack.replace(layers=[layer for layer in stack.layers if not layer.is_empty])


def set_layer_props(stack: LayerStack, key: Key, **props: object) -> LayerStack:
    """Change name / x / y / opacity / blend_mode / visible of one layer (validated like a new Layer)."""
    unknown = sorted(set(props) - set(EDITABLE_PROPS))
    if unknown:
        raise InputError(
            f"set_layer_props: unknown propert{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(unknown)}; editable: {', '.join(EDITABLE_PROPS)}"
        )
    for name in ("x", "y"):
        if name in props and (isinstance(props[name], bool) or not isinstance(props[name], int)):
            raise InputError(f"set_layer_props: {name} must be an int (canvas pixels), got {props[name]!r}")
    if "visible" in props and not isinstance(props["visible"], bool):
        raise InputError(f"set_layer_props: visible must be True or False, got {props['visible']!r}")
    if "name" in props and not isinstance(props["name"], str):
        raise InputError(f"set_layer_props: name must be a string, got {props['name']!r}")
    i = stack.index_of(key)
    layers = list(stack.layers)
    layers[i] = layers[i].replace(**props)  # a new Layer: __post_init__ validates opacity and blend_mode
    return stack.replace(layers=layers)
