"""Validation of the pipeline inputs that are not options (robustness.md D14): the model, devices, embeddings.

The options themselves (layers, steps, cfg, seed, sizes...) are checked by their dataclasses in `options.py`.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import InputError

CONNECT_HINT = "connect a Load Qwen-Layered node (or pass the result of qil_core.model.loader.load_model)"


def check_model(model: Any) -> Any:
    """Refuse a missing or foreign model object with the hint to connect the loader (D14)."""
    from ..loader import QwenLayeredModel

    if model is None:
        raise InputError(f"no model: {CONNECT_HINT}")
    if not isinstance(model, QwenLayeredModel):
        raise InputError(f"model must be a QwenLayeredModel, got {type(model).__name__}; {CONNECT_HINT}")
    return model


def check_device(device: Any, name: str = "generator_device") -> torch.device:
    """A torch device from a string or device; InputError for anything else."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"{name} must be a torch device such as 'cpu' or 'cuda', got {device!r} ({e})") from None


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
