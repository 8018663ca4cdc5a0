"""Per-layer edits and flattening: Layer Transform, Layer Recolor, Composite Layers, Select Layers."""

from __future__ import annotations

from typing import Any

from ..qil_core.errors import InputError
from ..qil_core.layers import (
    INTERPOLATIONS,
    alpha_to_mask,
    composite,
    parse_color,
    recolor_layer,
    select_layers,
    stack_to_images,
    transform_layers,
)
from .common import CATEGORY_LAYERS, layer_choice, layers_input, number, selected, to_document, to_output, to_stack

# The widget's pivot names -> qil_core.layers.transform_layers' pivots.
PIVOTS = {"selection center": "group", "layer center": "layer", "canvas center": "canvas"}


def _float(default: float, lo: float, hi: float, step: float, tip: str) -> tuple[str, dict[str, Any]]:
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tip})


class QILLayerTransform:
    """Move, scale, rotate, flip and fade selected layers (premultiplied resampling: no halos)."""

    DESCRIPTION = (
        "Moves, scales, rotates and flips the selected layers and changes their opacity. Resampling works on "
        "premultiplied alpha, so edges get no coloured fringe; rotated layers grow to fit and every result is "
        "re-cropped to its content. Order: flip, then scale and rotate about the pivot, then move. With several "
        "layers selected and pivot 'selection center' they turn and flip together as one group."
    )
    CATEGORY = CATEGORY_LAYERS
    RETURN_TYPES = ("LAYERS",)
    RETURN_NAMES = ("layers",)
    FUNCTION = "transform"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "layers": layers_input(),
                "layer": layer_choice("all"),
                "dx": _float(0.0, -30000.0, 30000.0, 1.0, "Move right by this many pixels (negative: left)."),
                "dy": _float(0.0, -30000.0, 30000.0, 1.0, "Move down by this many pixels (negative: up)."),
                "scale_x": _float(1.0, 0.01, 100.0, 0.01, "Horizontal scale factor (1 = unchanged)."),
                "scale_y": _float(1.0, 0.01, 100.0, 0.01, "Vertical scale factor (1 = unchanged)."),
                "rotation": _float(0.0, -360.0, 360.0, 0.5, "Rotation in degrees, clockwise on screen."),
                "flip_h": ("BOOLEAN", {"default": False, "tooltip": "Mirror left-right."}),
                "flip_v": ("BOOLEAN", {"default": False, "tooltip": "Mirror top-bottom."}),
                "opacity": _float(1.0, 0.0, 1.0, 0.01, "Multiplies each layer's opacity (1 keeps it, 0 hides it)."),
                "pivot": (
                    list(PIVOTS),
                    {
                        "default": "selection center",
                        "tooltip": "Centre of rotation, scaling and "
                        "flipping: the selected layers' common box, each layer's own box, "
                        "or the canvas.",
                    },
                ),
                "interpolation": (
                    list(INTERPOLATIONS),
                    {
                        "default": "lanczos",
                        "tooltip": "Resampling filter "
                        "for scaling and rotation: lanczos (sharpest), bicubic, bilinear, nearest "
                        "(pixel art).",
                    },
                ),
            },
        }

    def transform(
        self,
        layers: Any,
        layer: str,
        dx: float,
        dy: float,
        scale_x: float,
        scale_y: float,
        rotation: float,
        flip_h: bool,
        flip_v: bool,
        opacity: float,
        pivot: str,
        interpolation: str,
    ) -> tuple[dict]:
        dx, dy = number("dx", dx), number("dy", dy)
        scale_x, scale_y = number("scale_x", scale_x, 0.0, 100.0), number("scale_y", scale_y, 0.0, 100.0)
        rotation, fade = number("rotation", rotation), number("opacity", opacity, 0.0, 1.0)
        if str(pivot) not in PIVOTS:
            raise InputError(f"input 'pivot' must be one of {', '.join(PIVOTS)}, got {pivot!r}")
        stack, chosen = selected(layers, layer)
        out = transform_layers(
            stack,
            chosen,
            pivot=PIVOTS[str(pivot)],
            dx=dx,
            dy=dy,
            scale_x=scale_x,
            scale_y=scale_y,
            rotation=rotation,
            flip_h=flip_h,
            flip_v=flip_v,
            interpolation=interpolation,
        ).layers
        picked = set(chosen)
        out = [item.replace(opacity=item.opacity * fade) if i in picked else item for i, item in enumerate(out)]
        return (to_document(stack.replace(layers=out)),)


class QILLayerRecolor:
    """Hue, saturation, lightness, brightness, contrast, tint, colour replacement, invert; alpha untouched."""

    DESCRIPTION = (
        "Recolours the selected layers. Only colour changes: every layer's alpha stays bit-identical. Steps run "
        "in this order: invert, replace colour, hue / saturation, lightness, brightness, contrast, tint. Colours "
        "are written '#RRGGBB', '#RGB', a name like 'red', or 'r,g,b'; leave a colour empty to skip its step."
    )
    CATEGORY = CATEGORY_LAYERS
    RETURN_TYPES = ("LAYERS",)
    RETURN_NAMES = ("layers",)
    FUNCTION = "recolor"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "layers": layers_input(),
                "layer": layer_choice("all"),
                "hue_shift": _float(0.0, -180.0, 180.0, 1.0, "Turn the hue by this many degrees."),
                "saturation": _float(0.0, -1.0, 1.0, 0.01, "-1 = grey, 0 = unchanged, 1 = twice as saturated."),
                "lightness": _float(0.0, -1.0, 1.0, 0.01, "Mix towards black (-1) or white (1)."),
                "brightness": _float(0.0, -1.0, 1.0, 0.01, "Added to every channel."),
                "contrast": _float(0.0, -1.0, 1.0, 0.01, "-1 = flat grey, 0 = unchanged, 1 = hard threshold."),
                "tint": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Colour to tint towards (keeps each pixel's luminosity); empty = no tint.",
                    },
                ),
                "tint_strength": _float(0.5, 0.0, 1.0, 0.01, "How far to tint: 0 = none, 1 = fully."),
                "replace_color": ("STRING", {"default": "", "tooltip": "Colour to find; empty = no replacement."}),
                "replace_with": ("STRING", {"default": "", "tooltip": "Its new colour (needed with replace_color)."}),
                "tolerance": _float(
                    0.1,
                    0.0,
                    1.0,
                    0.01,
                    "How close a pixel must be to replace_color (0 = exact, 1 = everything); edges fade out smoothly.",
                ),
                "invert": ("BOOLEAN", {"default": False, "tooltip": "Invert the colours (not the alpha)."}),
            },
        }

    def recolor(
        self,
        layers: Any,
        layer: str,
        hue_shift: float,
        saturation: float,
        lightness: float,
        brightness: float,
        contrast: float,
        tint: str,
        tint_strength: float,
        replace_color: str,
        replace_with: str,
        tolerance: float,
        invert: bool,
    ) -> tuple[dict]:
        params = {
            "hue_shift": number("hue_shift", hue_shift),
            "saturation": number("saturation", saturation, -1, 1),
            "lightness": number("lightness", lightness, -1, 1),
            "brightness": number("brightness", brightness, -1, 1),
            "contrast": number("contrast", contrast, -1, 1),
            "tint_strength": number("tint_strength", tint_strength, 0, 1),
            "tolerance": number("tolerance", tolerance, 0, 1),
        }
        colours: dict[str, tuple[float, float, float] | None] = {}
        for name, value in (("tint", tint), ("replace_color", replace_color), ("replace_with", replace_with)):
            text = str(value or "").strip()
            colours[name] = parse_color(text) if text else None  # parse here so errors name the input early
        stack, chosen = selected(layers, layer)
        out = list(stack.layers)
        for i in chosen:
            out[i] = recolor_layer(
                out[i],
                hue_shift=params["hue_shift"],
                saturation=params["saturation"],
                lightness=params["lightness"],
                brightness=params["brightness"],
                contrast=params["contrast"],
                tint=colours["tint"],
                tint_strength=params["tint_strength"],
                replace_color=colours["replace_color"],
                replace_with=colours["replace_with"],
                tolerance=params["tolerance"],
                invert=bool(invert),
            )
        return (to_document(stack.replace(layers=out)),)


class QILCompositeLayers:
    """LAYERS -> one flattened RGBA IMAGE + MASK, with every blend mode, opacity and visibility applied."""

    DESCRIPTION = (
        "Flattens the layer document into one picture the size of its canvas: blend modes, opacity and "
        "visibility applied as Photoshop shows 8-bit documents. The IMAGE has 4 channels (RGBA) and the MASK "
        "is its transparency (1 = transparent). Give a background colour to get an opaque picture."
    )
    CATEGORY = CATEGORY_LAYERS
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    FUNCTION = "flatten"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"layers": layers_input()},
            "optional": {
                "background": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Colour behind all layers ('#ffffff', 'white', 'r,g,b'); empty = transparent.",
                    },
                ),
            },
        }

    def flatten(self, layers: Any, background: str = "") -> tuple[Any, Any]:
        text = str(background or "").strip()
        bg = (*parse_color(text), 1.0) if text else None
        rgba = composite(to_stack(layers), background=bg)  # (H, W, 4) straight RGBA
        return to_output(rgba[None]), to_output(alpha_to_mask(rgba[..., 3])[None])


class QILSelectLayer:
    """Pick layers by index or name: a LAYERS document of just those, plus their frames as IMAGE and MASK."""

    DESCRIPTION = (
        "Keeps only the chosen layers (in the order you list them) on the same canvas, and also outputs them "
        "as canvas-sized RGBA frames and masks for ordinary image nodes. Indices start at 0 for the bottom "
        "layer; -1 is the top one."
    )
    CATEGORY = CATEGORY_LAYERS
    RETURN_TYPES = ("LAYERS", "IMAGE", "MASK")
    RETURN_NAMES = ("layers", "image", "mask")
    FUNCTION = "pick"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "layers": layers_input(),
                "layer": layer_choice("-1"),
            },
        }

    def pick(self, layers: Any, layer: str) -> tuple[dict, Any, Any]:
        chosen = select_layers(*selected(layers, layer))
        images, masks = stack_to_images(chosen, full_canvas=True)
        return to_document(chosen), to_output(images), to_output(masks)


NODE_CLASS_MAPPINGS = {
    "QILLayerTransform": QILLayerTransform,
    "QILLayerRecolor": QILLayerRecolor,
    "QILCompositeLayers": QILCompositeLayers,
    "QILSelectLayer": QILSelectLayer,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QILLayerTransform": "Layer Transform",
    "QILLayerRecolor": "Layer Recolor",
    "QILCompositeLayers": "Composite Layers",
    "QILSelectLayer": "Select Layers",
}
