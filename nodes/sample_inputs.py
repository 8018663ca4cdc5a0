"""Inputs and helpers the sampling nodes share: widget lists (generated from the options), semantics, outputs."""

from __future__ import annotations

from typing import Any

import torch

from ..qil_core.layers import stack_to_images
from . import host
from .common import mask_batch, to_output

SEMANTICS = (
    "Layers are bottom first: layer 0 ('Background') is at the bottom, the last layer on top, and stacking them in "
    "order rebuilds the picture. The prompt describes the WHOLE image (what is in it), not one layer; an "
    "empty one is captioned first by the model's Qwen2.5-VL (auto_caption), as the reference does. IMAGE outputs "
    "are RGBA on the full canvas; MASK outputs are 1 - alpha "
    "(ComfyUI's convention: 1 = transparent). 50 steps with true CFG 4.0 is the reference setting; 20-30 steps "
    "are faster. VRAM: the transformer is 40.9 GB in bf16 (20.5 GB as fp8mixed) and the text encoder 9.4 GB "
    "(fp8); the loader's memory mode keeps what fits on the GPU and streams the rest. Cancel stops after the "
    "current step (or caption token)."
)


PROMPTS = ["prompt", "negative_prompt"]
SAMPLING = ["layers", "steps", "cfg", "cfg_normalize", "seed"]
SIZE = ["resolution", "max_side"]
# Widget order per node, as saved workflows store the values (never reorder; append new widgets at the end).
DECOMPOSE_WIDGETS = [*PROMPTS, *SAMPLING, *SIZE, "output_size"]
TEXT_TO_LAYERS_WIDGETS = [*PROMPTS, "width", "height", *SAMPLING]
DECOMPOSE_LAYER_WIDGETS = [*PROMPTS, *SAMPLING, *SIZE]
DECOMPOSE_LAYER_RENAME = {"layers": "sub_layers"}  # the node's own LAYERS input is called "layers"
# Optional widgets added later (saved workflows without them keep their defaults).
DECOMPOSE_OPTIONAL = ["recompose", "auto_caption", "caption_language"]
DECOMPOSE_LAYER_OPTIONAL = ["recompose", "auto_caption", "caption_language"]
HIDDEN = {"unique_id": "UNIQUE_ID"}
PROMPT_TEXT = (
    "STRING",
    {
        "forceInput": True,
        "tooltip": "A prompt from another node (e.g. Caption Image); when connected it replaces the prompt widget.",
    },
)
CAPTION_TOOLTIP = "The prompt used: the auto-caption(s) when the prompt was empty (blank-line separated)."


def prompt_used(stacks: list, prompt: str) -> str:
    """The prompt a run used: its auto-caption(s), blank-line separated, or the prompt as given."""
    return "\n\n".join(s.metadata["caption"] for s in stacks if "caption" in s.metadata) or prompt


def processing_size(width: int, height: int, opts: Any) -> tuple[int, int]:
    """The processing size the pipeline will use for a (width, height) input, for the memory plan."""
    from ..qil_core.model.pipeline.imaging import bucket_size

    return bucket_size(max(1, width), max(1, height), opts.resolution, opts.max_side)


def job_inputs(
    placement: Any, steps: int, unique_id: str | None, label: str, sampler: Any = None, runs: int = 1
) -> Any:
    """The pipeline's JobInputs of a node run: the placement, the progress/cancel callback over `runs` x the steps
    (those of custom sigmas when the handle's Sampler Settings give them), the same for auto-caption tokens, and
    those sampler options."""
    from ..qil_core.model.pipeline.decompose import JobInputs

    total = (sampler.resolve_steps(steps) if sampler is not None else steps) * runs
    return JobInputs(
        placement=placement,
        callback=host.make_callback(total, node_id=unique_id, label=label),
        caption_callback=host.make_callback(1, node_id=unique_id, label=f"{label}: captioning"),
        sampler=sampler,
    )


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
