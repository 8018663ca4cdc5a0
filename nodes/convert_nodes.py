"""IMAGE + MASK batches <-> LAYERS, so plain image nodes and layer nodes plug into each other."""

from __future__ import annotations

from typing import Any

from ..qil_core.errors import InputError
from ..qil_core.layers import stack_from_images, stack_to_images
from .common import CATEGORY_LAYERS, image_batch, layers_input, mask_batch, to_document, to_output, to_stack


def split_names(text: str) -> list[str] | None:
    """Layer names from a widget: one per line, or comma-separated on one line; None when blank."""
    text = str(text).strip()
    if not text:
        return None
    parts = text.splitlines() if "\n" in text else text.split(",")
    return [p.strip() for p in parts]


class QILImagesToLayers:
    """IMAGE batch (+ MASK) -> LAYERS: one layer per batch item, bottom first, each cropped to its content."""

    DESCRIPTION = (
        "Turns an image batch into a layer document: item 0 becomes the bottom layer. Alpha comes from a "
        "4-channel IMAGE and/or the MASK (ComfyUI masks are 1 = transparent, as LoadImage gives them); both "
        "apply when both are connected. A mask batch of 1 is used for every image, and a mask of another size "
        "is resized. Each layer is cropped to its visible pixels and keeps its place on the canvas."
    )
    CATEGORY = CATEGORY_LAYERS
    RETURN_TYPES = ("LAYERS",)
    RETURN_NAMES = ("layers",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Images, one layer per batch item (item 0 = bottom). RGB or RGBA."}),
            },
            "optional": {
                "mask": (
                    "MASK",
                    {"tooltip": "Transparency, 1 = transparent (LoadImage's MASK). Batch of 1 or one per image."},
                ),
                "names": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "Layer names bottom first, one per line (or comma-separated). "
                        "Empty: 'Layer 1', 'Layer 2', ...",
                    },
                ),
            },
        }

    def convert(self, image: Any, mask: Any = None, names: str = "") -> tuple[dict]:
        batch = image_batch(image)
        masks = mask_batch(mask) if mask is not None else None
        n = max(batch.shape[0], masks.shape[0] if masks is not None else 0)
        wanted = split_names(names)
        if wanted is not None and len(wanted) != n:
            raise InputError(
                f"input 'names' lists {len(wanted)} names for {n} layers; give one name per layer, "
                "bottom first, or leave it empty"
            )
        return (to_document(stack_from_images(batch, masks, names=wanted)),)


class QILLayersToImages:
    """LAYERS -> RGBA IMAGE batch + MASK batch, one frame per layer (bottom first)."""

    DESCRIPTION = (
        "Turns a layer document into an image batch with alpha (4 channels) and the matching MASK batch "
        "(1 = transparent), one frame per layer, bottom first: feed them to Save Image, Preview Image or any "
        "image node. With full_canvas on, every layer sits at its place on the document canvas; off, frames "
        "cover the box that holds all layers (nothing clipped). Opacity, blend mode and visibility are not "
        "applied here: use Composite Layers for the flattened picture."
    )
    CATEGORY = CATEGORY_LAYERS
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("images", "masks")
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "layers": layers_input(),
                "full_canvas": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "On: frames are the canvas size. Off: frames cover all "
                        "layers, including parts moved off the canvas.",
                    },
                ),
            },
        }

    def convert(self, layers: Any, full_canvas: bool = True) -> tuple[Any, Any]:
        images, masks = stack_to_images(to_stack(layers), full_canvas=bool(full_canvas))
        return to_output(images), to_output(masks)


NODE_CLASS_MAPPINGS = {"QILImagesToLayers": QILImagesToLayers, "QILLayersToImages": QILLayersToImages}
NODE_DISPLAY_NAME_MAPPINGS = {"QILImagesToLayers": "Images to Layers", "QILLayersToImages": "Layers to Images"}
