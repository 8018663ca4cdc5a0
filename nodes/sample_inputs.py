"""Inputs and helpers the sampling nodes share: widget declarations, the semantics text, checks, outputs."""

from __future__ import annotations

from typing import Any

import torch

from ..qil_core.errors import InputError
from ..qil_core.layers import stack_to_images
from .common import mask_batch, to_output
from .model_runtime import check_model

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


def prompt_inputs(model_tip: str) -> dict[str, Any]:
    """Inputs shared by the sampling nodes, in widget order after the node's own first inputs."""
    return {
        "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": model_tip}),
        "negative_prompt": ("STRING", {"default": " ", "multiline": True, "tooltip": "What to steer away from; "
                            "the reference uses a single space. Only used when cfg > 1."}),
    }


def sampling_inputs(layers_default: int, layers_tip: str) -> dict[str, Any]:
    """Layer count, steps, true CFG, cfg_normalize and seed (with the frontend's control after generate)."""
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


def size_inputs() -> dict[str, Any]:
    """The resolution mode and max_side widgets."""
    return {
        "resolution": (list(RESOLUTIONS), {"default": "640", "tooltip": "Processing size: 640 or 1024 pixels of "
                       "area at the image's aspect (640 is what the model was tuned for), or custom: longest side "
                       "= max_side."}),
        "max_side": ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 32, "tooltip": "Longest side in pixels "
                     "for resolution 'custom' (rounded to a multiple of 32); ignored otherwise."}),
    }


HIDDEN = {"unique_id": "UNIQUE_ID"}

RECOMPOSE_CHOICES = ("auto", "exact", "model")
RECOMPOSE_TIP = (
    "exact: the layers' colours are corrected so that together they give back the input picture (within 1/255 "
    "wherever they are visible; alpha is never changed; the residual is logged and stored in the document's "
    "metadata). model: the colours as the model made them. auto: exact for output_size 'original', model for "
    "'processing'."
)


def recompose_mode(value: Any, output_size: str = "original") -> str:
    """The recompose widget as the pipeline takes it ('exact' or 'model'); auto follows output_size."""
    if value not in RECOMPOSE_CHOICES:
        raise InputError(f"input 'recompose' must be one of {', '.join(RECOMPOSE_CHOICES)}, got {value!r}")
    if value == "auto":
        return "exact" if output_size == "original" else "model"
    return str(value)


def parse_resolution(resolution: Any) -> int | str:
    """The resolution widget ('640', '1024', 'custom') as the pipeline takes it."""
    if resolution not in RESOLUTIONS:
        raise InputError(f"input 'resolution' must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
    return "custom" if resolution == "custom" else int(resolution)


def check_counts(model: Any, layers: Any, steps: Any, name: str = "layers") -> tuple[Any, int, int]:
    """The model handle (D14) and the layer and step counts, checked before any work (linked values, D10)."""
    from ..qil_core.model.pipeline.checks import MAX_LAYERS, check_int, check_steps

    return check_model(model), check_int(name, layers, 1, MAX_LAYERS), check_steps(steps)


def processing_size(width: int, height: int, resolution: int | str, max_side: Any) -> tuple[int, int]:
    """The processing size the pipeline will use, for the memory plan (a square guess where it cannot tell)."""
    from ..qil_core.model.pipeline.imaging import bucket_size

    if resolution == "custom" and not isinstance(max_side, int):
        return 640, 640  # the pipeline refuses it with a message naming max_side
    return bucket_size(max(1, width), max(1, height), resolution, max_side if resolution == "custom" else None)


def layer_images(stacks: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer of every stack as full-canvas RGBA frames and MASKs, stack by stack, each bottom first."""
    pairs = [stack_to_images(s, full_canvas=True) for s in stacks]
    return to_output(torch.cat([p[0] for p in pairs])), to_output(torch.cat([p[1] for p in pairs]))


def input_mask(mask: Any, image: torch.Tensor) -> torch.Tensor | None:
    """The MASK input; LoadImage's 64x64 all-zero stand-in for 'no alpha' is ignored when the sizes differ."""
    if mask is None:
        return None
    m = mask_batch(mask)
    if m.shape[-2:] != image.shape[1:3] and not bool(m.any()):
        return None
    return m
