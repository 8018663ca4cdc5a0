"""Edit steps on a `LayerStack`, run left to right: per-layer groups (recolor, transform, properties) and stack edits.

This is the engine behind the `edit` command (and the demo); the command line only builds the step list. The
layers of one group are transformed together about a shared pivot (`transform.transform_layers`): by default
the centre of their common box, so several layers turn, scale and flip as one; option "pivot" picks "layer"
(each about its own centre), "canvas" or an (x, y) point.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from .image_file import float_rgba, open_image, pil_array
from .ops import (
    delete_layers,
    drop_empty_layers,
    duplicate_layer,
    layer_indices,
    merge_down,
    move_layer,
    parse_layer_keys,
    select_layers,
)
from .recolor import recolor_layer
from .replace import replace_layer_pixels
from .stack import Layer, LayerStack
from .transform import resize_stack, transform_layers

logger = logging.getLogger(__name__)

# Options that belong to a `--layer` group, by destination, with the library call they feed.
_RECOLOR = ("hue_shift", "saturation", "lightness", "brightness", "contrast", "tint", "replace", "invert")
_TRANSFORM = ("move", "scale", "scale_x", "scale_y", "rotation", "flip_h", "flip_v", "interpolation", "pivot")
_PROPERTIES = ("opacity", "blend_mode", "rename", "visible")


@dataclass
class LayerEdit:
    """One `--layer KEYS` group and the per-layer options that followed it (dest -> value)."""

    keys: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StackEdit:
    """One stack edit (`delete`, `keep`, `move_to`, `merge_down`, `duplicate`, `drop_empty`, `resize`,
    `replace_pixels` with value (layer key, picture path, alpha policy))."""

    op: str
    value: Any = None


Step = LayerEdit | StackEdit


def resolve_keys(stack: LayerStack, keys: str) -> list[int]:
    """Indices (bottom first, no duplicates, in stack order) addressed by a KEYS spec."""
    return sorted(layer_indices(stack, parse_layer_keys(keys)))  # parse_layer_keys never returns an empty list


def _recolor(layer: Layer, opts: dict[str, Any]) -> Layer:
    if not any(k in opts for k in _RECOLOR):
        return layer
    kw: dict[str, Any] = {
        k: opts[k] for k in ("hue_shift", "saturation", "lightness", "brightness", "contrast", "invert") if k in opts
    }
    if "tint" in opts:
        kw["tint"], kw["tint_strength"] = opts["tint"]
    if "replace" in opts:
        src, dst, tol = opts["replace"]
        kw.update(replace_color=src, replace_with=dst)
        if tol is not None:
            kw["tolerance"] = tol
    return recolor_layer(layer, **kw)


def _properties(layer: Layer, opts: dict[str, Any]) -> Layer:
    props = {k: opts[k] for k in _PROPERTIES if k in opts}
    if "rename" in props:
        props["name"] = props.pop("rename")
    return layer.replace(**props) if props else layer


def read_picture(path: str | os.PathLike[str]) -> np.ndarray:
    """An edited picture file -> straight float32 RGB, or RGBA when the file has transparency (image_file's reader)."""
    what = f"replacement picture {os.fspath(path)!r}"
    im = open_image(path, what)
    try:
        alpha = "A" in im.getbands() or "transparency" in im.info
        rgba = float_rgba(pil_array(im), what)
    finally:
        im.close()
    return rgba if alpha else np.ascontiguousarray(rgba[..., :3])


def edit_group(stack: LayerStack, indices: Sequence[int], opts: dict[str, Any]) -> LayerStack:
    """Apply one group's options to the layers at `indices`: recolor each, transform them together, then set
    properties. The transform turns, scales and flips the layers as one group about opts["pivot"] (default the
    centre of their common box; "layer" = each about its own centre, "canvas", or an (x, y) point)."""
    chosen = sorted(set(indices))
    layers = list(stack.layers)
    for i in chosen:
        layers[i] = _recolor(layers[i], opts)
    stack = stack.replace(layers=layers)
    if any(k in opts for k in _TRANSFORM):
        if "scale" in opts and ("scale_x" in opts or "scale_y" in opts):
            raise InputError("--scale sets both axes; use either --scale or --scale-x/--scale-y in one group")
        if set(opts) & set(_TRANSFORM) == {"pivot"}:
            raise InputError(
                "--pivot sets the centre of --scale, --rotate and --flip-h/--flip-v; add one of them "
                "to the group, or drop --pivot"
            )
        s = opts.get("scale", 1.0)
        dx, dy = opts.get("move", (0.0, 0.0))
        stack = transform_layers(
            stack,
            chosen,
            pivot=opts.get("pivot", "group"),
            dx=dx,
            dy=dy,
            scale_x=opts.get("scale_x", s),
            scale_y=opts.get("scale_y", s),
            rotation=opts.get("rotation", 0.0),
            flip_h=bool(opts.get("flip_h")),
            flip_v=bool(opts.get("flip_v")),
            interpolation=opts.get("interpolation", "lanczos"),
        )
    layers = list(stack.layers)
    for i in chosen:
        layers[i] = _properties(layers[i], opts)
        logger.debug("edited layer %d %r with %s", i, layers[i].name, opts)
    return stack.replace(layers=layers)


def apply_edits(stack: LayerStack, steps: Sequence[Step]) -> LayerStack:
    """Run edit steps left to right and return the new stack; layers no step addresses are left as they were."""
    for step in steps:
        if isinstance(step, LayerEdit):
            if not step.options:
                raise InputError(f"--layer {step.keys} is followed by no edit option; add e.g. --move or --hue")
            stack = edit_group(stack, resolve_keys(stack, step.keys), step.options)
        elif step.op == "delete":
            stack = delete_layers(stack, parse_layer_keys(str(step.value)))
        elif step.op == "keep":
            stack = select_layers(stack, parse_layer_keys(str(step.value)))
        elif step.op == "move_to":
            key, to = step.value
            stack = move_layer(stack, stack.index_of(key), to)
        elif step.op == "merge_down":
            stack = merge_down(stack, stack.index_of(str(step.value)))
        elif step.op == "duplicate":
            stack = duplicate_layer(stack, stack.index_of(str(step.value)))
        elif step.op == "drop_empty":
            stack = drop_empty_layers(stack)
        elif step.op == "resize":
            w, h = step.value
            stack = resize_stack(stack, w, h)
        elif step.op == "replace_pixels":
            key, path, policy = step.value
            stack = replace_layer_pixels(stack, stack.index_of(key), read_picture(path), alpha=policy)
        else:
            raise InputError(f"unknown stack edit {step.op!r}")
    return stack
