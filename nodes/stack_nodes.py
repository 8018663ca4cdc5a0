"""Stack edits users expect: delete, duplicate, merge down, move, drop empty; and layer properties."""

from __future__ import annotations

from typing import Any

from ..qil_core.errors import InputError
from ..qil_core.layers import (
    BLEND_MODES,
    delete_layers,
    drop_empty_layers,
    duplicate_layer,
    merge_down,
    move_layer,
    select_layers,
    set_layer_props,
)
from .common import (
    CATEGORY_LAYERS,
    integer,
    layer_choice,
    layers_input,
    number,
    select,
    selected,
    to_document,
    to_stack,
)

OPERATIONS = ("delete", "keep only", "duplicate", "merge down", "move to", "drop empty")
KEEP = "keep"


class QILLayerStackEdit:
    """Delete, keep, duplicate, merge down or move layers, or drop the empty ones."""

    DESCRIPTION = (
        "Edits the layer list. delete: remove the chosen layers. keep only: remove all others. duplicate: copy "
        "each chosen layer just above itself. merge down: blend each chosen layer into the one below it (its "
        "blend mode and opacity applied; the lower layer keeps its name and settings). move to: put the chosen "
        "layer at position 'to_index' (0 = bottom, -1 = top). drop empty: remove fully transparent layers "
        "('layer' is ignored)."
    )
    CATEGORY = CATEGORY_LAYERS
    RETURN_TYPES = ("LAYERS",)
    RETURN_NAMES = ("layers",)
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "layers": layers_input(),
                "operation": (
                    list(OPERATIONS),
                    {"default": "delete", "tooltip": "What to do with the chosen layers (see the node description)."},
                ),
                "layer": layer_choice("-1"),
                "to_index": (
                    "INT",
                    {
                        "default": 0,
                        "min": -8000,
                        "max": 8000,
                        "tooltip": "For 'move to': the new position, 0 = bottom, -1 = top.",
                    },
                ),
            },
        }

    def edit(self, layers: Any, operation: str, layer: str, to_index: int = 0) -> tuple[dict]:
        stack = to_stack(layers)
        if operation == "drop empty":
            return (to_document(drop_empty_layers(stack)),)
        if operation not in OPERATIONS:
            raise InputError(f"input 'operation' must be one of {', '.join(OPERATIONS)}, got {operation!r}")
        chosen = select(stack, layer)
        if operation == "delete":
            stack = delete_layers(stack, chosen)
        elif operation == "keep only":
            stack = select_layers(stack, sorted(chosen))
        elif operation == "duplicate":
            for i in sorted(chosen, reverse=True):  # from the top down, so lower indices stay valid
                stack = duplicate_layer(stack, i)
        elif operation == "merge down":
            for i in sorted(chosen, reverse=True):
                stack = merge_down(stack, i)
        else:
            if len(chosen) != 1:
                raise InputError(f"'move to' moves one layer; input 'layer' chose {len(chosen)}")
            stack = move_layer(stack, chosen[0], integer("to_index", to_index))
        return (to_document(stack),)


class QILSetLayerProperties:
    """Rename layers and set opacity, blend mode and visibility; 'keep' leaves a property as it is."""

    DESCRIPTION = (
        "Sets properties of the chosen layers: name, opacity (0..1, negative = keep), blend mode (any of the 26 "
        "core modes; each maps to a PSD blend key) and visibility. Hidden layers stay in the document and in "
        "saved PSDs, but Composite Layers leaves them out."
    )
    CATEGORY = CATEGORY_LAYERS
    RETURN_TYPES = ("LAYERS",)
    RETURN_NAMES = ("layers",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "layers": layers_input(),
                "layer": layer_choice("-1"),
                "name": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "New name (any language); empty = keep. With "
                        "several layers chosen, ' 1', ' 2', ... is appended.",
                    },
                ),
                "opacity": (
                    "FLOAT",
                    {
                        "default": -1.0,
                        "min": -1.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "New opacity 0..1; negative = keep.",
                    },
                ),
                "blend_mode": ([KEEP, *BLEND_MODES], {"default": KEEP, "tooltip": "New blend mode; keep = unchanged."}),
                "visible": ([KEEP, "show", "hide"], {"default": KEEP, "tooltip": "Show or hide; keep = unchanged."}),
            },
        }

    def apply(self, layers: Any, layer: str, name: str, opacity: float, blend_mode: str, visible: str) -> tuple[dict]:
        opacity = number("opacity", opacity, -1.0, 1.0)
        if blend_mode != KEEP and blend_mode not in BLEND_MODES:
            raise InputError(f"input 'blend_mode' {blend_mode!r} is unknown; use one of {', '.join(BLEND_MODES)}")
        if visible not in (KEEP, "show", "hide"):
            raise InputError(f"input 'visible' must be keep, show or hide, got {visible!r}")
        stack, chosen = selected(layers, layer)
        for n, i in enumerate(chosen, start=1):
            props: dict[str, Any] = {}
            if str(name).strip():
                props["name"] = str(name) if len(chosen) == 1 else f"{name} {n}"
            if opacity >= 0:
                props["opacity"] = opacity
            if blend_mode != KEEP:
                props["blend_mode"] = blend_mode
            if visible != KEEP:
                props["visible"] = visible == "show"
            stack = set_layer_props(stack, i, **props)
        return (to_document(stack),)


class QILCombineLayers:
    """Stack one layer document on top of another (e.g. layers from two images or two decompositions)."""

    DESCRIPTION = (
        "Puts the layers of 'top' above the layers of 'bottom', keeping every layer's place, name and "
        "settings. The canvas is the bottom document's, or the larger of the two when 'canvas' is 'union'."
    )
    CATEGORY = CATEGORY_LAYERS
    RETURN_TYPES = ("LAYERS",)
    RETURN_NAMES = ("layers",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "bottom": ("LAYERS", {"tooltip": "These layers stay below."}),
                "top": ("LAYERS", {"tooltip": "These layers go on top, in their own order."}),
                "canvas": (
                    ["bottom", "union"],
                    {
                        "default": "bottom",
                        "tooltip": "Canvas size of the result: the "
                        "bottom document's, or wide and tall enough for both canvases.",
                    },
                ),
            },
        }

    def combine(self, bottom: Any, top: Any, canvas: str = "bottom") -> tuple[dict]:
        low, high = to_stack(bottom, "bottom"), to_stack(top, "top")
        if canvas not in ("bottom", "union"):
            raise InputError(f"input 'canvas' must be 'bottom' or 'union', got {canvas!r}")
        width, height = low.size if canvas == "bottom" else (max(low.width, high.width), max(low.height, high.height))
        return (to_document(low.replace(width=width, height=height, layers=[*low.layers, *high.layers])),)


NODE_CLASS_MAPPINGS = {
    "QILLayerStackEdit": QILLayerStackEdit,
    "QILSetLayerProperties": QILSetLayerProperties,
    "QILCombineLayers": QILCombineLayers,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QILLayerStackEdit": "Edit Layer Stack",
    "QILSetLayerProperties": "Set Layer Properties",
    "QILCombineLayers": "Combine Layers",
}
