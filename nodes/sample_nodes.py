"""The sampling nodes: Decompose Image, Text to Layers, Decompose Layer (thin adapters over
qil_core.model.pipeline.decompose).

Each validates the model link, then lets the pipeline check every parameter before any work (linked values skip
ComfyUI's widget limits), reports each denoising step to the progress bar and checks Cancel after each step.
"""

from __future__ import annotations

from typing import Any

import torch

from ..qil_core.errors import InputError
from . import host
from .common import CATEGORY, LAYERS_TIP, SELECT_TIP, image_batch, select, to_document, to_stack
from .model_runtime import MODEL_TYPE, run_placement
from .sample_inputs import (
    HIDDEN,
    OUTPUT_SIZES,
    RECOMPOSE_CHOICES,
    RECOMPOSE_TIP,
    SEMANTICS,
    check_counts,
    input_mask,
    layer_images,
    parse_resolution,
    processing_size,
    prompt_inputs,
    recompose_mode,
    sampling_inputs,
    size_inputs,
)


class QILDecompose:
    """Decompose each image into N RGBA layers with Qwen-Image-Layered."""

    DESCRIPTION = (
        "Splits a picture into N transparent layers with Qwen-Image-Layered. " + SEMANTICS + " Transparency of the "
        "input: an RGBA IMAGE uses its alpha; a connected MASK replaces it (alpha = 1 - mask); Load Image's empty "
        "64x64 mask for pictures without alpha is ignored. output_size 'original' maps the layers back to the "
        "input's size, each layer's alpha following the input's own edges. recompose 'exact' (default with "
        "'original') corrects the layers' colours so that together they give back the input. Batches: with B "
        "images, LAYERS is a list of B documents (one per image), so every node after it runs once per image and "
        "Save PSD writes B files; the IMAGE and MASK outputs hold all B x N "
        "layers, image by image, each bottom first."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LAYERS", "IMAGE", "MASK")
    RETURN_NAMES = ("layers", "images", "masks")
    OUTPUT_IS_LIST = (True, False, False)
    OUTPUT_TOOLTIPS = ("One layer document per input image, bottom layer first.",
                       "All layers as RGBA images on the full canvas (B x N), bottom first per image.",
                       "Their masks, 1 - alpha (B x N).")
    FUNCTION = "decompose"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load Qwen-Layered."}),
                "image": ("IMAGE", {"tooltip": "The picture(s) to split; a batch gives one layer document per image."}),
                **prompt_inputs("Describe the whole image (all of it, not one layer), e.g. 'a red car on a beach at "
                          "sunset with the title SUMMER'. Empty works too."),
                **sampling_inputs(4, "How many layers to make (1-20); 3-6 suits most pictures."),
                **size_inputs(),
                "output_size": (list(OUTPUT_SIZES), {"default": "processing", "tooltip": "processing: layers at the "
                                "size the model ran at. original: scaled back to the input image's size."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional transparency of the input (1 = transparent, as Load Image "
                         "gives it); replaces the image's alpha."}),
                "recompose": (list(RECOMPOSE_CHOICES), {"default": "auto", "tooltip": RECOMPOSE_TIP}),
            },
            "hidden": HIDDEN,
        }

    def decompose(self, model: Any, image: Any, prompt: str, negative_prompt: str, layers: int, steps: int,
                  cfg: float, cfg_normalize: bool, seed: int, resolution: str, max_side: int, output_size: str,
                  mask: Any = None, recompose: str = "auto",
                  unique_id: str | None = None) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
        from ..qil_core.model.pipeline.decompose import decompose  # on first use: keeps the pack import fast

        handle, layers, steps = check_counts(model, layers, steps)
        img = image_batch(image)  # [B, H, W, C]; a missing batch dimension is added (D2)
        res = parse_resolution(resolution)
        mode = recompose_mode(recompose, output_size)
        with run_placement(handle, *processing_size(img.shape[2], img.shape[1], res, max_side), layers) as pl:
            stacks = decompose(handle.model, img, mask=input_mask(mask, img), prompt=prompt,
                               negative_prompt=negative_prompt, layers=layers, steps=steps, cfg=cfg,
                               cfg_normalize=bool(cfg_normalize), seed=seed, resolution=res,
                               max_side=max_side if res == "custom" else None, output_size=output_size,
                               recompose=mode, placement=pl,
                               callback=host.make_callback(steps * img.shape[0], node_id=unique_id,
                                                           label="Decompose Image"))
        return ([to_document(s) for s in stacks], *layer_images(stacks))


class QILTextToLayers:
    """Generate N RGBA layers from a prompt (no input image)."""

    DESCRIPTION = (
        "Generates a layered picture from a text prompt alone. " + SEMANTICS + " The released weights are tuned "
        "for decomposing images, so text-to-layers quality is limited; for best results generate a picture with an "
        "image model and decompose it. Width and height are rounded to multiples of 16."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LAYERS", "IMAGE", "MASK")
    RETURN_NAMES = ("layers", "images", "masks")
    OUTPUT_TOOLTIPS = ("The layer document, bottom layer first.", "The layers as RGBA images (N), bottom first.",
                       "Their masks, 1 - alpha (N).")
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load Qwen-Layered."}),
                **prompt_inputs("Describe the whole picture to generate."),
                "width": ("INT", {"default": 640, "min": 64, "max": 4096, "step": 16,
                          "tooltip": "Canvas width in px."}),
                "height": ("INT", {"default": 640, "min": 64, "max": 4096, "step": 16,
                           "tooltip": "Canvas height in px."}),
                **sampling_inputs(4, "How many layers to make (1-20)."),
            },
            "hidden": HIDDEN,
        }

    def generate(self, model: Any, prompt: str, negative_prompt: str, width: int, height: int, layers: int,
                 steps: int, cfg: float, cfg_normalize: bool, seed: int,
                 unique_id: str | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
        from ..qil_core.model.pipeline.checks import check_int
        from ..qil_core.model.pipeline.decompose import text_to_layers

        handle, layers, steps = check_counts(model, layers, steps)
        width, height = check_int("width", width, 64, 4096), check_int("height", height, 64, 4096)
        with run_placement(handle, width, height, layers) as pl:
            stack = text_to_layers(handle.model, prompt, width=width, height=height, negative_prompt=negative_prompt,
                                   layers=layers, steps=steps, cfg=cfg, cfg_normalize=bool(cfg_normalize), seed=seed,
                                   placement=pl, callback=host.make_callback(steps, node_id=unique_id,
                                                                             label="Text to Layers"))
        return (to_document(stack), *layer_images([stack]))


class QILDecomposeLayer:
    """Decompose one layer of a stack into sub-layers, in place (recursive decomposition)."""

    DESCRIPTION = (
        "Splits one layer of a layer document into sub-layers and puts them where the layer was (bottom first), so "
        "the rest of the stack is unchanged. The layer's own pixels and alpha are the input; the sub-layers keep "
        "its position, opacity, blend mode and visibility, never paint outside its alpha, and are named "
        "'<layer> / 1' (bottom) to '<layer> / N'. The prompt describes that layer's content. Outputs the new "
        "document and the sub-layers as RGBA images on the full canvas with their masks (1 - alpha). " + SEMANTICS
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LAYERS", "IMAGE", "MASK")
    RETURN_NAMES = ("layers", "sub_layers", "sub_masks")
    OUTPUT_TOOLTIPS = ("The document with the layer replaced by its sub-layers.",
                       "The new sub-layers as RGBA images on the full canvas, bottom first.",
                       "Their masks, 1 - alpha.")
    FUNCTION = "decompose_layer"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load Qwen-Layered."}),
                "layers": ("LAYERS", {"tooltip": LAYERS_TIP}),
                "layer": ("STRING", {"default": "-1", "tooltip": "The one layer to split: an index (0 = bottom, -1 "
                          "= top) or its exact name."}),
                **prompt_inputs("Describe the content of that layer."),
                **{("sub_layers" if k == "layers" else k): v for k, v in
                   sampling_inputs(3, "How many sub-layers to split it into (1-20).").items()},
                **size_inputs(),
            },
            "optional": {
                "recompose": (["exact", "model"], {"default": "exact", "tooltip": "exact: the sub-layers' colours "
                              "are corrected so that, stacked normally, they give back the layer's pixels wherever "
                              "they are visible (alpha never changes; residual in the log and the document's "
                              "metadata). model: the colours as the model made them."}),
            },
            "hidden": HIDDEN,
        }

    def decompose_layer(self, model: Any, layers: Any, layer: str, prompt: str, negative_prompt: str,
                        sub_layers: int, steps: int, cfg: float, cfg_normalize: bool, seed: int, resolution: str,
                        max_side: int, recompose: str = "exact",
                        unique_id: str | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
        from ..qil_core.model.pipeline.decompose import decompose_layer

        handle, sub_layers, steps = check_counts(model, sub_layers, steps, "sub_layers")
        stack = to_stack(layers)
        chosen = select(stack, layer)
        if len(chosen) != 1:
            raise InputError(f"input 'layer' {layer!r} selects {len(chosen)} layers; choose exactly one ({SELECT_TIP})")
        res = parse_resolution(resolution)
        mode = recompose_mode(recompose)
        target = stack.layers[chosen[0]]
        with run_placement(handle, *processing_size(target.width, target.height, res, max_side), sub_layers) as pl:
            out = decompose_layer(handle.model, stack, chosen[0], layers=sub_layers, prompt=prompt,
                                  negative_prompt=negative_prompt, steps=steps, cfg=cfg,
                                  cfg_normalize=bool(cfg_normalize), seed=seed, resolution=res,
                                  max_side=max_side if res == "custom" else None, recompose=mode, placement=pl,
                                  callback=host.make_callback(steps, node_id=unique_id, label="Decompose Layer"))
        new = out.replace(layers=out.layers[chosen[0]: chosen[0] + len(out.layers) - len(stack.layers) + 1])
        return (to_document(out), *layer_images([new]))


NODE_CLASS_MAPPINGS = {"QILDecompose": QILDecompose, "QILTextToLayers": QILTextToLayers,
                       "QILDecomposeLayer": QILDecomposeLayer}
NODE_DISPLAY_NAME_MAPPINGS = {"QILDecompose": "Decompose Image", "QILTextToLayers": "Text to Layers",
                              "QILDecomposeLayer": "Decompose Layer"}
