"""The sampling nodes: Decompose Image, Text to Layers, Decompose Layer (thin adapters over
qil_core.model.pipeline.decompose).

Each validates the model link, then lets the pipeline check every parameter before any work (linked values skip
ComfyUI's widget limits), reports each denoising step to the progress bar and checks Cancel after each step.
"""

from __future__ import annotations

from typing import Any

import torch

from ..qil_core.errors import InputError
from ..qil_core.model.pipeline.options import DecomposeLayerOptions, DecomposeOptions, TextToLayersOptions
from .common import CATEGORY, SELECT_TIP, image_batch, layers_input, selected, to_document
from .model_runtime import MODEL_TYPE, check_model, run_placement
from .sample_inputs import (
    CAPTION_TOOLTIP,
    DECOMPOSE_LAYER_OPTIONAL,
    DECOMPOSE_LAYER_RENAME,
    DECOMPOSE_LAYER_WIDGETS,
    DECOMPOSE_OPTIONAL,
    DECOMPOSE_WIDGETS,
    HIDDEN,
    PROMPT_TEXT,
    SEMANTICS,
    TEXT_TO_LAYERS_WIDGETS,
    input_mask,
    job_inputs,
    layer_images,
    processing_size,
    prompt_used,
)
from .widgets import options_from_widgets, widgets


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
    RETURN_TYPES = ("LAYERS", "IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("layers", "images", "masks", "caption")
    OUTPUT_IS_LIST = (True, False, False, False)
    OUTPUT_TOOLTIPS = (
        "One layer document per input image, bottom layer first.",
        "All layers as RGBA images on the full canvas (B x N), bottom first per image.",
        "Their masks, 1 - alpha (B x N).",
        CAPTION_TOOLTIP,
    )
    FUNCTION = "decompose"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load Qwen-Layered."}),
                "image": ("IMAGE", {"tooltip": "The picture(s) to split; a batch gives one layer document per image."}),
                **widgets(DecomposeOptions, DECOMPOSE_WIDGETS),
            },
            "optional": {
                "mask": (
                    "MASK",
                    {
                        "tooltip": "Optional transparency of the input (1 = transparent, as Load Image "
                        "gives it); replaces the image's alpha."
                    },
                ),
                **widgets(DecomposeOptions, DECOMPOSE_OPTIONAL),
                "prompt_text": PROMPT_TEXT,
            },
            "hidden": HIDDEN,
        }

    def decompose(
        self,
        model: Any,
        image: Any,
        prompt: str,
        negative_prompt: str,
        layers: int,
        steps: int,
        cfg: float,
        cfg_normalize: bool,
        seed: int,
        resolution: str,
        max_side: int,
        output_size: str,
        mask: Any = None,
        recompose: str = "auto",
        auto_caption: bool = True,
        caption_language: str = "en",
        prompt_text: str | None = None,
        unique_id: str | None = None,
    ) -> dict[str, Any]:
        from ..qil_core.model.pipeline.decompose import run_decompose  # on first use: keeps the pack import fast

        handle = check_model(model)
        prompt = prompt if prompt_text is None else prompt_text
        values = dict(
            prompt=prompt,
            negative_prompt=negative_prompt,
            layers=layers,
            steps=steps,
            cfg=cfg,
            cfg_normalize=bool(cfg_normalize),
            seed=seed,
            resolution=resolution,
            max_side=max_side,
            output_size=output_size,
            recompose=recompose,
            auto_caption=auto_caption,
            caption_language=caption_language,
        )
        opts = options_from_widgets(DecomposeOptions, values)
        img = image_batch(image)  # [B, H, W, C]; a missing batch dimension is added (D2)
        with run_placement(handle, *processing_size(img.shape[2], img.shape[1], opts), opts.layers) as pl:
            run = job_inputs(pl, opts.steps, unique_id, "Decompose Image", handle.sampler, runs=img.shape[0])
            stacks = run_decompose(handle.model, img, opts, run, mask=input_mask(mask, img))
        used = prompt_used(stacks, prompt)
        return {"ui": {"text": [used]}, "result": ([to_document(s) for s in stacks], *layer_images(stacks), used)}


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
    OUTPUT_TOOLTIPS = (
        "The layer document, bottom layer first.",
        "The layers as RGBA images (N), bottom first.",
        "Their masks, 1 - alpha (N).",
    )
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load Qwen-Layered."}),
                **widgets(TextToLayersOptions, TEXT_TO_LAYERS_WIDGETS),
            },
            "hidden": HIDDEN,
        }

    def generate(
        self,
        model: Any,
        prompt: str,
        negative_prompt: str,
        width: int,
        height: int,
        layers: int,
        steps: int,
        cfg: float,
        cfg_normalize: bool,
        seed: int,
        unique_id: str | None = None,
    ) -> tuple[dict, torch.Tensor, torch.Tensor]:
        from ..qil_core.model.pipeline.decompose import run_text_to_layers

        handle = check_model(model)
        values = dict(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            layers=layers,
            steps=steps,
            cfg=cfg,
            cfg_normalize=bool(cfg_normalize),
            seed=seed,
        )
        opts = options_from_widgets(TextToLayersOptions, values)
        with run_placement(handle, opts.width, opts.height, opts.layers) as pl:
            run = job_inputs(pl, opts.steps, unique_id, "Text to Layers", handle.sampler)
            stack = run_text_to_layers(handle.model, opts, run)
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
    RETURN_TYPES = ("LAYERS", "IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("layers", "sub_layers", "sub_masks", "caption")
    OUTPUT_TOOLTIPS = (
        "The document with the layer replaced by its sub-layers.",
        "The new sub-layers as RGBA images on the full canvas, bottom first.",
        "Their masks, 1 - alpha.",
        "The prompt used: the auto-caption of the layer when the prompt was empty.",
    )
    FUNCTION = "decompose_layer"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load Qwen-Layered."}),
                "layers": layers_input(),
                "layer": (
                    "STRING",
                    {
                        "default": "-1",
                        "tooltip": "The one layer to split: an index (0 = bottom, -1 = top) or its exact name.",
                    },
                ),
                **widgets(DecomposeLayerOptions, DECOMPOSE_LAYER_WIDGETS, DECOMPOSE_LAYER_RENAME),
            },
            "optional": {
                **widgets(DecomposeLayerOptions, DECOMPOSE_LAYER_OPTIONAL),
                "prompt_text": PROMPT_TEXT,
            },
            "hidden": HIDDEN,
        }

    def decompose_layer(
        self,
        model: Any,
        layers: Any,
        layer: str,
        prompt: str,
        negative_prompt: str,
        sub_layers: int,
        steps: int,
        cfg: float,
        cfg_normalize: bool,
        seed: int,
        resolution: str,
        max_side: int,
        recompose: str = "exact",
        auto_caption: bool = True,
        caption_language: str = "en",
        prompt_text: str | None = None,
        unique_id: str | None = None,
    ) -> dict[str, Any]:
        from ..qil_core.model.pipeline.layer_split import run_decompose_layer, split_size

        handle = check_model(model)
        prompt = prompt if prompt_text is None else prompt_text
        values = dict(
            prompt=prompt,
            negative_prompt=negative_prompt,
            sub_layers=sub_layers,
            steps=steps,
            cfg=cfg,
            cfg_normalize=bool(cfg_normalize),
            seed=seed,
            resolution=resolution,
            max_side=max_side,
            recompose=recompose,
            auto_caption=auto_caption,
            caption_language=caption_language,
        )
        opts = options_from_widgets(DecomposeLayerOptions, values, DECOMPOSE_LAYER_RENAME)
        stack, chosen = selected(layers, layer)
        if len(chosen) != 1:
            raise InputError(f"input 'layer' {layer!r} selects {len(chosen)} layers; choose exactly one ({SELECT_TIP})")
        width, height = split_size(stack, chosen[0], opts)  # the padded layer's processing size
        with run_placement(handle, width, height, opts.layers) as pl:
            run = job_inputs(pl, opts.steps, unique_id, "Decompose Layer", handle.sampler)
            out = run_decompose_layer(handle.model, stack, chosen[0], opts, run)
        new = out.replace(layers=out.layers[chosen[0] : chosen[0] + len(out.layers) - len(stack.layers) + 1])
        used = prompt_used([out], prompt)
        return {"ui": {"text": [used]}, "result": (to_document(out), *layer_images([new]), used)}


NODE_CLASS_MAPPINGS = {
    "QILDecompose": QILDecompose,
    "QILTextToLayers": QILTextToLayers,
    "QILDecomposeLayer": QILDecomposeLayer,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QILDecompose": "Decompose Image",
    "QILTextToLayers": "Text to Layers",
    "QILDecomposeLayer": "Decompose Layer",
}
