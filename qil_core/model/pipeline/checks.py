"""Validation of every pipeline parameter before any work starts (robustness.md D10, D12, D14).

Node inputs arrive through links unchecked (NaN passes ComfyUI's min/max test) and library callers pass
anything, so each value is checked here with its allowed range in the message; nothing relies on widget
limits or on `assert`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ...errors import InputError

MAX_LAYERS = 20  # the model was trained with up to 20 layers (paper §4.2)
MAX_STEPS = 1000  # the schedule has 1000 training timesteps; more steps only repeat them
MAX_CFG = 100.0
SEED_MODULUS = 2**64  # seeds are taken modulo 2**64 (ComfyUI's seed range is 0..2**64-1), so -1 == 2**64-1
OUTPUT_SIZES = ("processing", "original")
CONNECT_HINT = "connect a Load Qwen-Layered node (or pass the result of qil_core.model.loader.load_model)"


def check_model(model: Any) -> Any:
    """Refuse a missing or foreign model object with the hint to connect the loader (D14)."""
    from ..loader import QwenLayeredModel

    if model is None:
        raise InputError(f"no model: {CONNECT_HINT}")
    if not isinstance(model, QwenLayeredModel):
        raise InputError(f"model must be a QwenLayeredModel, got {type(model).__name__}; {CONNECT_HINT}")
    return model


def check_int(name: str, value: Any, lo: int, hi: int, hint: str = "") -> int:
    """An int (numpy ints too, never bool or float) in lo..hi; InputError naming the range otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer in {lo}..{hi}, got {value!r} ({type(value).__name__}){hint}")
    if not lo <= int(value) <= hi:
        raise InputError(f"{name} must be in {lo}..{hi}, got {value}{hint}")
    return int(value)


def check_layers(layers: Any) -> int:
    """Number of layers N in 1..20."""
    return check_int("layers", layers, 1, MAX_LAYERS, "; the model was trained with 1 to 20 layers (4 is typical)")


def check_steps(steps: Any) -> int:
    """Number of denoising steps in 1..1000."""
    return check_int("steps", steps, 1, MAX_STEPS, "; 50 is the reference setting, 20-30 is faster")


def check_cfg(cfg: Any) -> float:
    """True-CFG scale: a finite number in 1..100 (1 switches guidance off, like the reference's <= 1)."""
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float, np.integer, np.floating)):
        raise InputError(f"cfg must be a number in 1..{MAX_CFG:g}, got {cfg!r} ({type(cfg).__name__})")
    value = float(cfg)
    if not math.isfinite(value) or not 1.0 <= value <= MAX_CFG:
        raise InputError(
            f"cfg must be a finite number in 1..{MAX_CFG:g}, got {cfg!r}; 4.0 is the reference setting and 1 turns "
            "guidance off"
        )
    return value


def check_seed(seed: Any) -> int:
    """A seed as an int in 0..2**64-1: ints (numpy too) and integral floats are taken modulo 2**64 (D12)."""
    if isinstance(seed, bool):
        raise InputError(f"seed must be an integer, got {seed!r}")
    if isinstance(seed, (float, np.floating)):
        if not math.isfinite(seed) or not float(seed).is_integer():
            raise InputError(f"seed must be an integer, got {seed!r}")
        seed = int(seed)
    if not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an integer, got {seed!r} ({type(seed).__name__})")
    return int(seed) % SEED_MODULUS


def check_output_mode(output_size: Any) -> str:
    """'processing' (the bucket size the model ran at) or 'original' (mapped back to the input's size)."""
    if output_size not in OUTPUT_SIZES:
        raise InputError(f"output_size must be 'processing' or 'original', got {output_size!r}")
    return str(output_size)


def check_cfg_batch(cfg_batch: Any) -> bool | str:
    """True, False or 'auto'."""
    if cfg_batch is True or cfg_batch is False or (isinstance(cfg_batch, str) and cfg_batch == "auto"):
        return cfg_batch
    raise InputError(f"cfg_batch must be True, False or 'auto', got {cfg_batch!r}")


def check_device(device: Any, name: str = "generator_device") -> torch.device:
    """A torch device from a string or device; InputError for anything else."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"{name} must be a torch device such as 'cpu' or 'cuda', got {device!r} ({e})") from None


def check_prompt(name: str, prompt: Any, allow_none: bool = True) -> str | None:
    """A prompt is a str (or None where allowed); bytes and other types are refused with how to fix them."""
    if prompt is None and allow_none:
        return None
    if not isinstance(prompt, str):
        raise InputError(
            f"{name} must be a str, got {type(prompt).__name__}; decode bytes with .decode('utf-8', "
            "errors='replace')"
        )
    return prompt


def check_embeds(name: str, embeds: Any, mask: Any, width: int, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings (L, D) or (B, L, D) with B in {1, count}, D = width, finite; mask (B, L) or (L,) or None."""
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
        raise InputError(f"{name} must be a float tensor (B, L, {width}), got {type(embeds).__name__}")
    e = embeds[None] if embeds.ndim == 2 else embeds
    if e.ndim != 3 or e.shape[-1] != width or e.shape[1] == 0 or e.shape[0] not in (1, count):
        raise InputError(
            f"{name} must have shape (B, L, {width}) with B = 1 or {count} (one per image) and L >= 1, got "
            f"{tuple(embeds.shape)}; the width must equal the transformer's text width {width}"
        )
    if not bool(torch.isfinite(e).all()):
        raise InputError(f"{name} contains NaN or inf; re-encode the prompt")
    if mask is None:
        return e, None
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"{name} mask must be a tensor (B, L) of 1/0, got {type(mask).__name__}")
    m = mask[None] if mask.ndim == 1 else mask
    if tuple(m.shape) != tuple(e.shape[:2]):
        raise InputError(f"{name} mask must have shape {tuple(e.shape[:2])}, got {tuple(mask.shape)}")
    if not bool(((m == 0) | (m == 1)).all()) or not bool((m != 0).any(dim=1).all()):
        raise InputError(f"{name} mask must hold 1 (token) / 0 (padding) with at least one token per row")
    return e, m.to(torch.long)
