"""The options of the three model jobs, each written once: default, range, choices, help (robustness D10, D12).

`DecomposeOptions`, `TextToLayersOptions` and `DecomposeLayerOptions` are frozen dataclasses; making one checks
every value (NaN, wrong types, out of range) with the allowed range in the message. The CLI flags
(`qil_core/cli/model.py`) and the node widgets (`nodes/sample_inputs.py`) are generated from these fields, so
a limit, a default or a help text changes here and nowhere else. This module imports no torch.

A new option is one field here (in the shared `SamplingOptions` or one job's class), read where the
pipeline uses it, and named in the node's / command's field list to show it there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...checks import check_number
from ...errors import InputError
from ...layers.recompose import RECOMPOSE_MODES
from ...options import Options, option, retuned

MAX_LAYERS = 20  # the model was trained with up to 20 layers (paper §4.2)
MAX_STEPS = 1000  # the schedule has 1000 training timesteps; more steps only repeat them
MAX_CFG = 100.0
SEED_MODULUS = 2**64  # seeds are taken modulo 2**64 (ComfyUI's seed range is 0..2**64-1), so -1 == 2**64-1
RESOLUTIONS = (640, 1024)  # the reference's area buckets (640x640 and 1024x1024 pixels of area)
CUSTOM = "custom"  # longest side given by the caller, both sides multiples of 32
RESOLUTION_CHOICES = (*(str(r) for r in RESOLUTIONS), CUSTOM)  # as the CLI and the nodes show them
MIN_CUSTOM_SIDE, MAX_CUSTOM_SIDE = 64, 4096
SIDE_MULTIPLE = 32  # bucket sides are multiples of 32 (8x VAE x 2x2 patches x the reference's rounding)
OUTPUT_SIZES = ("processing", "original")
RECOMPOSE_AUTO = "auto"  # exact for output_size "original", model for "processing"
MIN_T2L_SIDE, MAX_T2L_SIDE, T2L_MULTIPLE = 64, 4096, 16
DEFAULT_MAX_SEQUENCE_LENGTH = 512
MAX_SEQUENCE_LENGTH_LIMIT = 1024  # diffusers refuses larger values in check_inputs


# --- checks of the options that are more than a number in a range -------------------------------------------


def check_seed(name: str, seed: Any) -> int:
    """A seed as an int in 0..2**64-1: ints (numpy too) and integral floats are taken modulo 2**64 (D12)."""
    if isinstance(seed, bool):
        raise InputError(f"{name} must be an integer, got {seed!r}")
    if isinstance(seed, (float, np.floating)):
        if not math.isfinite(seed) or not float(seed).is_integer():
            raise InputError(f"{name} must be an integer, got {seed!r}")
        seed = int(seed)
    if not isinstance(seed, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {seed!r} ({type(seed).__name__})")
    return int(seed) % SEED_MODULUS


CFG_HINT = "; 4.0 is the reference setting and 1 turns guidance off"


def check_cfg(name: str, cfg: Any) -> float:
    """True-CFG scale: a finite number in 1..100 (1 switches guidance off, like the reference's <= 1)."""
    if (
        isinstance(cfg, (int, float, np.number))
        and not isinstance(cfg, bool)
        and math.isfinite(cfg)
        and not 1.0 <= cfg <= MAX_CFG
    ):
        raise InputError(f"{name} must be a finite number in 1..{MAX_CFG:g}, got {cfg!r}{CFG_HINT}")
    return check_number(name, cfg, 1.0, MAX_CFG, CFG_HINT)


def check_prompt(name: str, prompt: Any) -> str | None:
    """A prompt is a str (None where allowed); bytes and other types are refused with how to fix them."""
    if prompt is None:
        return None
    if not isinstance(prompt, str):
        raise InputError(
            f"{name} must be a str, got {type(prompt).__name__}; decode bytes with .decode('utf-8', errors='replace')"
        )
    return prompt


def check_cfg_batch(name: str, cfg_batch: Any) -> bool | str:
    """True, False or 'auto'."""
    if cfg_batch is True or cfg_batch is False or (isinstance(cfg_batch, str) and cfg_batch == "auto"):
        return cfg_batch
    raise InputError(f"{name} must be True, False or 'auto', got {cfg_batch!r}")


def check_resolution(name: str, resolution: Any) -> int | str:
    """640, 1024 (ints or their text) or 'custom' (any case); the number as an int."""
    if isinstance(resolution, str) and resolution.strip().isdigit():
        resolution = int(resolution)
    if isinstance(resolution, str) and resolution.strip().lower() == CUSTOM:
        return CUSTOM
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution not in RESOLUTIONS:
        raise InputError(
            f"{name} must be 640, 1024 or 'custom' (with max_side), got {resolution!r}; 640 is what the model "
            "was tuned for, 1024 gives more detail"
        )
    return int(resolution)


def check_size_mode(resolution: Any, max_side: Any, shown: Any = lambda n: n) -> tuple[int | str, int | None]:
    """(resolution, max_side) checked together: 'custom' needs max_side in 64..4096, which is None otherwise."""
    mode = check_resolution(shown("resolution"), resolution)
    side = "max_side" if shown("max_side") == "max_side" else f"max_side ({shown('max_side')})"
    if mode != CUSTOM:
        return mode, None
    if (
        isinstance(max_side, bool)
        or not isinstance(max_side, (int, np.integer))
        or not MIN_CUSTOM_SIDE <= max_side <= MAX_CUSTOM_SIDE
    ):
        raise InputError(
            f"{shown('resolution')} 'custom' needs {side}, an int in {MIN_CUSTOM_SIDE}..{MAX_CUSTOM_SIDE} "
            f"(the longest side in pixels, rounded to a multiple of {SIDE_MULTIPLE}), got {max_side!r}"
        )
    return mode, int(max_side)


def check_vae_tile(name: str, tile: Any) -> int | None:
    """None or a tile size in pixels (the runtime's rule)."""
    from ..runtime.vae_tiling import check_tile

    return check_tile(tile, name)


# --- the jobs' options ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingOptions(Options):
    """What every job shares: the prompts, the layer count and the sampler settings."""

    prompt: str | None = option(
        None,
        "Describe the whole image (all of it, not one layer), e.g. 'a red car on a beach at sunset with the "
        "title SUMMER'. Empty works too.",
        kind=str,
        check=check_prompt,
        widget={"default": "", "multiline": True},
    )
    negative_prompt: str | None = option(
        " ",
        "What to steer away from; the reference uses a single space. Only used when cfg > 1.",
        check=check_prompt,
        widget={"multiline": True},
    )
    layers: int = option(
        4,
        "How many layers to make; 3-6 suits most pictures.",
        lo=1,
        hi=MAX_LAYERS,
        hint="; the model was trained with 1 to 20 layers (4 is typical)",
    )
    steps: int = option(
        50,
        "Denoising steps: 50 is the reference setting, 20-30 is faster with a little less detail.",
        lo=1,
        hi=MAX_STEPS,
        hint="; 50 is the reference setting, 20-30 is faster",
    )
    cfg: float = option(
        4.0,
        "True classifier-free guidance scale (4.0 reference); 1 turns it off and runs 2x faster.",
        lo=1.0,
        hi=MAX_CFG,
        check=check_cfg,
        widget={"step": 0.1, "round": 0.01},
    )
    cfg_normalize: bool = option(
        True,
        "Rescale the guided prediction to the norm of the conditional one (the "
        "reference does; keeps colours from burning at high cfg).",
    )
    seed: int = option(
        0,
        "Noise seed, taken modulo 2**64; the same seed, inputs and settings give the same layers.",
        check=check_seed,
        widget={"min": 0, "max": SEED_MODULUS - 1, "control_after_generate": True},
    )
    cfg_batch: bool | str = option(
        "auto",
        "Run the conditional and unconditional passes as one batch of 2: True, False or 'auto' (when it fits).",
        check=check_cfg_batch,
    )
    max_sequence_length: int = option(
        DEFAULT_MAX_SEQUENCE_LENGTH,
        "Prompt tokens kept after the template; longer prompts are cut with a warning.",
        lo=1,
        hi=MAX_SEQUENCE_LENGTH_LIMIT,
    )
    vae_tile: int | None = option(
        None,
        "Encode and decode the VAE in tiles of this many pixels (64 px overlap) to "
        "bound memory on large images; a multiple of 8, at least 64.",
        kind=int,
        check=check_vae_tile,
        metavar="PX",
    )


@dataclass(frozen=True)
class _Sizing(Options):
    """The processing size of an input image."""

    resolution: int | str = option(
        640,
        "Processing size: 640 or 1024 pixels of area at the image's aspect (640 is what the model was tuned "
        "for), or custom: longest side = max_side.",
        kind=str,
        choices=RESOLUTION_CHOICES,
        check=check_resolution,
    )
    max_side: int | None = option(
        None,
        "Longest side in pixels for resolution 'custom', rounded to a multiple of 32.",
        kind=int,
        lo=MIN_CUSTOM_SIDE,
        hi=MAX_CUSTOM_SIDE,
        check=lambda name, value: value,  # see check_together
        widget={"default": 1024, "step": SIDE_MULTIPLE},
    )

    def check_together(self, shown: Any) -> None:
        check_size_mode(self.resolution, self.max_side, shown)


@dataclass(frozen=True)
class _KeepComposite(Options):
    keep_composite: bool = option(False, "Also keep the model's own composite frame, as a hidden top layer.")


CAPTION_LANGUAGES = ("en", "zh")  # the reference's two annotator instructions (caption_inputs.CAPTION_PROMPTS)
REFERENCE_MAX_NEW_TOKENS = 512  # the reference's generate(max_new_tokens=512) for a caption


@dataclass(frozen=True)
class _AutoCaption(Options):
    auto_caption: bool = option(
        True,
        "With an empty prompt (None, '' or ' '), caption the image with the model's Qwen2.5-VL first, as the "
        "reference does (needs the text encoder's vision tower and lm_head).",
    )
    caption_language: str = option(
        "en", "Language of the auto-caption: en (the official app) or zh.", choices=CAPTION_LANGUAGES
    )


@dataclass(frozen=True)
class DecomposeOptions(_AutoCaption, _KeepComposite, _Sizing, SamplingOptions):
    """Options of `decompose`: sampling, the processing size and the size of the result."""

    output_size: str = option(
        "processing",
        "processing: layers at the size the model ran at. original: scaled back to the input image's size.",
        choices=OUTPUT_SIZES,
    )
    recompose: str = option(
        RECOMPOSE_AUTO,
        "exact: the layers' colours are corrected so that they recompose to the input within 1/255 (alpha never "
        "changes; the residual is logged and kept in the document's metadata). model: the colours as the model "
        "made them. auto: exact for output size original, model for processing.",
        choices=(RECOMPOSE_AUTO, *RECOMPOSE_MODES),
    )

    extract: bool = option(
        False,
        "Generate one frame only and return it as the single layer 'Extracted layer' (layers is then not used): "
        "the mode of fine-tunes that pull out the one layer the prompt names (DiffSynth-Studio's "
        "Qwen-Image-Layered-Control); with the released weights that frame is the composite.",
    )

    def recompose_mode(self) -> str:
        """'exact' or 'model', with auto resolved by the output size."""
        if self.recompose != RECOMPOSE_AUTO:
            return self.recompose
        return "exact" if self.output_size == "original" else "model"


@dataclass(frozen=True)
class TextToLayersOptions(_KeepComposite, SamplingOptions):
    """Options of `text_to_layers`: sampling and the canvas size (rounded to multiples of 16)."""

    prompt: str | None = retuned(SamplingOptions, "prompt", help="Describe the whole picture to generate.")
    width: int = option(
        640,
        "Canvas width in px, rounded to a multiple of 16.",
        lo=MIN_T2L_SIDE,
        hi=MAX_T2L_SIDE,
        widget={"step": T2L_MULTIPLE},
    )
    height: int = option(
        640,
        "Canvas height in px, rounded to a multiple of 16.",
        lo=MIN_T2L_SIDE,
        hi=MAX_T2L_SIDE,
        widget={"step": T2L_MULTIPLE},
    )


@dataclass(frozen=True)
class DecomposeLayerOptions(_AutoCaption, _Sizing, SamplingOptions):
    """Options of `decompose_layer`: sampling and the processing size; the result keeps the layer's own size."""

    prompt: str | None = retuned(SamplingOptions, "prompt", help="Describe the content of that layer.")
    layers: int = retuned(
        SamplingOptions, "layers", 2, help="How many sub-layers to split it into.", widget={"default": 3}
    )  # the node has always offered 3
    recompose: str = option(
        "exact",
        "exact: the sub-layers' colours are corrected so that, stacked normally, they give back the layer's pixels "
        "wherever they are visible (alpha never changes). model: the colours as the model made them.",
        choices=RECOMPOSE_MODES,
    )
