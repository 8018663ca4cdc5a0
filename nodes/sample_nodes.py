"""The sampling nodes: Decompose Image, Text to Layers, Decompose Layer (thin adapters over qil_core.model.pipeline).

Each validates the model link, then lets the pipeline check every parameter before any work (linked values skip
ComfyUI's widget limits), reports each denoising step to the progress bar and checks Cancel after each step.
"""

from __future__ import annotations

from typing import Any

import torch

from ..qil_core.errors import InputError
from ..qil_core.layers import stack_to_images
from . import host
from .common import CATEGORY, LAYERS_TIP, SELECT_TIP, image_batch, mask_batch, select, to_document, to_output, to_stack
from .model_runtime import MODEL_TYPE, check_model, run_placement

RESOLUTIONS = ("640", "1024", "custom")
OUTPUT_SIZES = ("processing", "original")
SEMANTICS = (
    "Layers are bottom first: layer 0 ('Background') is at the bottom, the last layer on top, and stacking them in "
    "order rebuilds the picture. The prompt describes the WHOLE image (what is in it), not one layer; empty works "
    "too (there is no automatic captioning). IMAGE outputs are RGBA on the full canvas; MASK outputs are 1 - alpha "
    "(ComfyUI's convention: 1 = transparent). 50 steps with true CFG 4.0 is the reference setting; 20-30 steps "
    "are faster. VRAM: the transformer is 40.9 GB in bf16 (20.5 GB as fp8mixed) and the text encoder 9.4 GB "
    "(fp8); the loader's memory mode keeps what fits on the GPU and streams the rest. Cancel stops after the "
    "current step."
)


def _common(model_tip: str) -> dict[str, Any]:
    """Inputs shared by the sampling nodes, in widget order after the node's own first inputs."""
    return {
        "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": model_tip}),
        "negative_prompt": ("STRING", {"default": " ", "multiline": True, "tooltip": "What to steer away from; "
                            "the reference uses a single space. Only used when cfg > 1."}),
    }


def _sampling(layers_default: int, layers_tip: str) -> dict[str, Any]:
    return {
        "layers": ("INT", {"default": layers_default, "min": 1, "max": 20, "tooltip": layers_tip}),
        "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Denoising steps: 50 is the reference "
                  "setting, 20-30 is faster with a little less detail."}),
        "cfg": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 100.0, "step": 0.1, "round": 0.01,
                "tooltip": "True classifier-free guidance scale (4.0 reference); 1 turns it off and runs 2x faster."}),
        "cfg_normalize": ("BOOLEAN", {"default": True, "tooltip": "Rescale the guided prediction to the norm of "
                          "the conditional one (the reference does; keeps colours from burning at high cfg)."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                 "tooltip": "Noise seed; the same seed, inputs and settings give the same layers."}),
    }


def _size_inputs() -> dict[str, Any]:
    return {
        "resolution": (list(RESOLUTIONS), {"default": "640", "tooltip": "Processing size: 640 or 1024 pixels of "
                       "area at the image's aspect (640 is what the model was tuned for), or custom: longest side "
                       "= max_side."}),
        "max_side": ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 32, "tooltip": "Longest side in pixels "
                     "for resolution 'custom' (rounded to a multiple of 32); ignored otherwise."}),
    }


HIDDEN = {"unique_id": "UNIQUE_ID"}


def _resolution(resolution: Any) -> int | str:
    if resolution not in RESOLUTIONS:
        raise InputError(f"input 'resolution' must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
    return "custom" if resolution == "custom" else int(resolution)


def _checked(model: Any, layers: Any, steps: Any, name: str = "layers") -> tuple[Any, int, int]:
    """The model handle (D14) and the layer and step counts, checked before any work (linked values, D10)."""
    from ..qil_core.model.pipeline_checks import MAX_LAYERS, check_int, check_steps

    return check_model(model), check_int(name, layers, 1, MAX_LAYERS), check_steps(steps)


def _size(width: int, height: int, resolution: int | str, max_side: Any) -> tuple[int, int]:
    """The processing size the pipeline will use, for the memory plan (a square guess where it cannot tell)."""
    from ..qil_core.model.imaging import bucket_size

    if resolution == "custom" and not isinstance(max_side, int):
        return 640, 640  # the pipeline refuses it with a message naming max_side
    return bucket_size(max(1, width), max(1, height), resolution, max_side if resolution == "custom" else None)


def _images(stacks: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer of every stack as full-canvas RGBA frames and MASKs, stack by stack, each bottom first."""
    pairs = [stack_to_images(s, full_canvas=True) for s in stacks]
    return to_output(torch.cat([p[0] for p in pairs])), to_output(torch.cat([p[1] for p in pairs]))


def _mask(mask: Any, image: torch.Tensor) -> torch.Tensor | None:
    """The MASK input; LoadImage's 64x64 all-zero stand-in for 'no alpha' is ignored when the sizes differ."""
    if mask is None:
        return None
    m = mask_batch(mask)
    if m.shape[-2:] != image.shape[1:3] and not bool(m.any()):
        return None
    return m


class QILDecompose:
    """Decompose each image into N RGBA layers with Qwen-Image-Layered."""

    DESCRIPTION = (
        "Splits a picture into N transparent layers with Qwen-Image-Layered. " + SEMANTICS + " Transparency of the "
        "input: an RGBA IMAGE uses its alpha; a connected MASK replaces it (alpha = 1 - mask); Load Image's empty "
        "64x64 mask for pictures without alpha is ignored. output_size 'original' maps the layers back to the "
        "input's size. Batches: with B images, LAYERS is a list of B documents (one per image), so every node "
        "after it runs once per image and Save PSD writes B files; the IMAGE and MASK outputs hold all B x N "
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
                **_common("Describe the whole image (all of it, not one layer), e.g. 'a red car on a beach at "
                          "sunset with the title SUMMER'. Empty works too."),
                **_sampling(4, "How many layers to make (1-20); 3-6 suits most pictures."),
                **_size_inputs(),
                "output_size": (list(OUTPUT_SIZES), {"default": "processing", "tooltip": "processing: layers at the "
                                "size the model ran at. original: scaled back to the input image's size."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Optional transparency of the input (1 = transparent, as Load Image "
                         "gives it); replaces the image's alpha."}),
            },
            "hidden": HIDDEN,
        }

    def decompose(self, model: Any, image: Any, prompt: str, negative_prompt: str, layers: int, steps: int,
                  cfg: float, cfg_normalize: bool, seed: int, resolution: str, max_side: int, output_size: str,
                  mask: Any = None, unique_id: str | None = None) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
        from ..qil_core.model.pipeline import decompose  # on first use: keeps the pack import fast

        handle, layers, steps = _checked(model, layers, steps)
        img = image_batch(image)  # [B, H, W, C]; a missing batch dimension is added (D2)
        res = _resolution(resolution)
        with run_placement(handle, *_size(img.shape[2], img.shape[1], res, max_side), layers) as pl:
            stacks = decompose(handle.model, img, mask=_mask(mask, img), prompt=prompt, negative_prompt=negative_prompt,
                               layers=layers, steps=steps, cfg=cfg, cfg_normalize=bool(cfg_normalize), seed=seed,
                               resolution=res, max_side=max_side if res == "custom" else None,
                               output_size=output_size, placement=pl,
                               callback=host.make_callback(steps * img.shape[0], node_id=unique_id,
                                                           label="Decompose Image"))
        return ([to_document(s) for s in stacks], *_images(stacks))


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
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load Qwen-Layered."}),
                **_common("Describe the whole picture to generate."),
                "width": ("INT", {"default": 640, "min": 64, "max": 4096, "step": 16,
                          "tooltip": "Canvas width in px."}),
                "height": ("INT", {"default": 640, "min": 64, "max": 4096, "step": 16,
                           "tooltip": "Canvas height in px."}),
                **_sampling(4, "How many layers to make (1-20)."),
            },
            "hidden": HIDDEN,
        }

    def generate(self, model: Any, prompt: str, negative_prompt: str, width: int, height: int, layers: int,
                 steps: int, cfg: float, cfg_normalize: bool, seed: int,
                 unique_id: str | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
        from ..qil_core.model.pipeline import text_to_layers
        from ..qil_core.model.pipeline_checks import check_int

        handle, layers, steps = _checked(model, layers, steps)
        width, height = check_int("width", width, 64, 4096), check_int("height", height, 64, 4096)
        with run_placement(handle, width, height, layers) as pl:
            stack = text_to_layers(handle.model, prompt, width=width, height=height, negative_prompt=negative_prompt,
                                   layers=layers, steps=steps, cfg=cfg, cfg_normalize=bool(cfg_normalize), seed=seed,
                                   placement=pl, callback=host.make_callback(steps, node_id=unique_id,
                                                                             label="Text to Layers"))
        return (to_document(stack), *_images([stack]))


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
    FUNCTION = "decompose_layer"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load Qwen-Layered."}),
                "layers": ("LAYERS", {"tooltip": LAYERS_TIP}),
                "layer": ("STRING", {"default": "-1", "tooltip": "The one layer to split: an index (0 = bottom, -1 "
                          "= top) or its exact name."}),
                **_common("Describe the content of that layer."),
                **{("sub_layers" if k == "layers" else k): v for k, v in
                   _sampling(3, "How many sub-layers to split it into (1-20).").items()},
                **_size_inputs(),
            },
            "hidden": HIDDEN,
        }

    def decompose_layer(self, model: Any, layers: Any, layer: str, prompt: str, negative_prompt: str,
                        sub_layers: int, steps: int, cfg: float, cfg_normalize: bool, seed: int, resolution: str,
                        max_side: int, unique_id: str | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
        from ..qil_core.model.pipeline import decompose_layer

        handle, sub_layers, steps = _checked(model, sub_layers, steps, "sub_layers")
        stack = to_stack(layers)
        chosen = select(stack, layer)
        if len(chosen) != 1:
            raise InputError(f"input 'layer' {layer!r} selects {len(chosen)} layers; choose exactly one ({SELECT_TIP})")
        res = _resolution(resolution)
        target = stack.layers[chosen[0]]
        with run_placement(handle, *_size(target.width, target.height, res, max_side), sub_layers) as pl:
            out = decompose_layer(handle.model, stack, chosen[0], layers=sub_layers, prompt=prompt,
                                  negative_prompt=negative_prompt, steps=steps, cfg=cfg,
                                  cfg_normalize=bool(cfg_normalize), seed=seed, resolution=res,
                                  max_side=max_side if res == "custom" else None, placement=pl,
                                  callback=host.make_callback(steps, node_id=unique_id, label="Decompose Layer"))
        new = out.replace(layers=out.layers[chosen[0]: chosen[0] + len(out.layers) - len(stack.layers) + 1])
        return (to_document(out), *_images([new]))


NODE_CLASS_MAPPINGS = {"QILDecompose": QILDecompose, "QILTextToLayers": QILTextToLayers,
                       "QILDecomposeLayer": QILDecomposeLayer}
NODE_DISPLAY_NAME_MAPPINGS = {"QILDecompose": "Decompose Image", "QILTextToLayers": "Text to Layers",
                              "QILDecomposeLayer": "Decompose Layer"}
