"""Replace Layer Pixels: put a layer edited by any image model back into the LAYERS document, keeping its shape."""

from __future__ import annotations

from typing import Any

from ..qil_core.errors import InputError
from ..qil_core.layers.replace import REGIONS, replace_layer_pixels
from .common import CATEGORY_LAYERS, image_batch, layers_input, number, selected, to_document

# widget label -> library policy
ALPHA_CHOICES = {"keep layer alpha": "keep", "edited image alpha": "image", "re-matte by difference": "difference"}


class QILReplaceLayerImage:
    """Replace one layer's pixels with an edited IMAGE (from Qwen-Image-Edit or any model), keeping its shape."""

    DESCRIPTION = (
        "Puts an edited picture of one layer back into the layer document. Typical use: Select Layers gives the "
        "layer as a canvas-sized image, an image model (e.g. Qwen-Image-Edit) changes it, and this node writes "
        "the result back. The picture may come at another size (the edit model's working size): it is scaled "
        "back to the region it shows, the canvas or the layer's own box (region 'auto' picks by size, then "
        "aspect ratio). Alpha: 'keep layer alpha' changes only colours, so the layer keeps its exact shape and, "
        "after exact recomposition, nothing outside it changes; 'edited image alpha' takes the picture's own "
        "alpha (RGBA only); 're-matte by difference' keeps the old alpha where the picture did not change and "
        "makes pixels that changed by more than the tolerance opaque (new content joins the layer)."
    )
    CATEGORY = CATEGORY_LAYERS
    RETURN_TYPES = ("LAYERS",)
    RETURN_NAMES = ("layers",)
    FUNCTION = "replace"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "layers": layers_input(),
                "layer": (
                    "STRING",
                    {
                        "default": "-1",
                        "tooltip": "The one layer to replace: an index (0 = bottom, -1 = top) or its exact name.",
                    },
                ),
                "image": (
                    "IMAGE",
                    {
                        "tooltip": "The edited picture of that layer (the first image of a batch), "
                        "showing the whole canvas or the layer's box; any size."
                    },
                ),
                "alpha": (
                    list(ALPHA_CHOICES),
                    {
                        "default": "keep layer alpha",
                        "tooltip": "keep layer alpha: "
                        "only colours change. edited image alpha: use the picture's alpha (RGBA). re-matte by "
                        "difference: changed pixels become opaque, the rest keeps the layer's alpha.",
                    },
                ),
            },
            "optional": {
                "region": (
                    list(REGIONS),
                    {
                        "default": "auto",
                        "tooltip": "What the picture shows: the whole "
                        "canvas, the layer's box, or auto (by size, then aspect ratio).",
                    },
                ),
                "tolerance": (
                    "FLOAT",
                    {
                        "default": 0.1,
                        "min": 0.01,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "re-matte by difference: how much a colour must change (0..1, largest channel) to "
                        "count as new content.",
                    },
                ),
            },
        }

    def replace(
        self, layers: Any, layer: str, image: Any, alpha: str, region: str = "auto", tolerance: float = 0.1
    ) -> tuple[dict]:
        if alpha not in ALPHA_CHOICES:
            raise InputError(f"input 'alpha' must be one of {', '.join(ALPHA_CHOICES)}, got {alpha!r}")
        tol = number("tolerance", tolerance, 0.01, 1.0)
        stack, chosen = selected(layers, layer)
        if len(chosen) != 1:
            raise InputError(f"input 'layer' {layer!r} selects {len(chosen)} layers; choose exactly one")
        pic = image_batch(image).numpy()
        out = replace_layer_pixels(stack, chosen[0], pic, alpha=ALPHA_CHOICES[alpha], region=str(region), tolerance=tol)
        return (to_document(out),)


NODE_CLASS_MAPPINGS = {"QILReplaceLayerImage": QILReplaceLayerImage}
NODE_DISPLAY_NAME_MAPPINGS = {"QILReplaceLayerImage": "Replace Layer Pixels"}
