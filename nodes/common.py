"""Helpers shared by the node families: categories, number checks, and the LAYERS / IMAGE / MASK boundary."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..qil_core.checks import check_int, check_number
from ..qil_core.errors import InputError
from ..qil_core.layers import LayerStack
from ..qil_core.layers.document import stack_from_document, stack_to_document
from ..qil_core.layers.ops import layer_indices, parse_layer_keys
from . import host

CATEGORY = "Qwen-Image-Layered"
CATEGORY_LAYERS = f"{CATEGORY}/layers"
CATEGORY_IO = f"{CATEGORY}/io"

LAYERS_TIP = "A layer document (LAYERS), bottom layer first: from Decompose Image, Images to Layers or Load PSD."
SELECT_TIP = (
    "Which layers: 'all', an index (0 = bottom, -1 = top), an exact layer name, or a list such as "
    "'0, 2, sky' or a range '1-3'."
)


def number(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    """`value` as a finite float within lo..hi, else InputError naming the widget (linked values skip its limits)."""
    return check_number(f"input {name!r}", value, lo, hi)


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int within lo..hi (a whole float is accepted), else InputError naming the widget."""
    return check_int(f"input {name!r}", value, lo, hi, allow_float=True)


def to_stack(layers: Any, name: str = "layers") -> LayerStack:
    """Convert an incoming LAYERS document to a LayerStack, with a clear error when nothing is connected."""
    if layers is None:
        raise InputError(
            f"input {name!r} is empty: connect a LAYERS output (Decompose Image, Images to Layers, Load PSD)"
        )
    if isinstance(layers, LayerStack):
        return layers
    return stack_from_document(layers)


def to_document(stack: LayerStack) -> dict:
    """The outgoing LAYERS document of a LayerStack (tensors on ComfyUI's intermediate device)."""
    doc = stack_to_document(stack)
    device = host.intermediate_device()
    for item in doc["layers"]:
        for key in ("image", "mask"):
            if isinstance(item.get(key), torch.Tensor):
                item[key] = item[key].to(device)
    return doc


def layers_input() -> tuple[str, dict[str, Any]]:
    """The LAYERS input of the nodes that take a layer document."""
    return ("LAYERS", {"tooltip": LAYERS_TIP})


def layer_choice(default: str) -> tuple[str, dict[str, Any]]:
    """The 'layer' selection widget (see SELECT_TIP), read by `selected`."""
    return ("STRING", {"default": default, "tooltip": SELECT_TIP})


def selected(layers: Any, layer: str) -> tuple[LayerStack, list[int]]:
    """The incoming LAYERS document as a LayerStack and the indices its 'layer' selection chooses."""
    stack = to_stack(layers)
    return stack, select(stack, layer)


def select(stack: LayerStack, spec: str, name: str = "layer") -> list[int]:
    """Indices chosen by a selection string ('all', '0', '-1', 'sky', '0, 2', '1-3') in the order given, no repeats."""
    text = str(spec).strip()
    if text.lower() in ("all", "*"):
        if not stack.layers:
            raise InputError(f"input {name!r}: the layer stack is empty, nothing to select")
        return list(range(len(stack.layers)))
    if not text:
        raise InputError(f"input {name!r} is empty; {SELECT_TIP}")
    return layer_indices(stack, parse_layer_keys(text))


def image_batch(image: Any, name: str = "image") -> torch.Tensor:
    """An IMAGE as float32 [B, H, W, C] with C in 1, 3, 4 (a missing batch dimension is added)."""
    if not isinstance(image, torch.Tensor):
        raise InputError(f"input {name!r} must be an IMAGE tensor, got {type(image).__name__}")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:3]) < 1:
        raise InputError(f"input {name!r}: expected IMAGE [B, H, W, C] with C = 1, 3 or 4, got {tuple(image.shape)}")
    return image.detach().to("cpu", torch.float32)


def mask_batch(mask: Any, name: str = "mask") -> torch.Tensor:
    """A MASK as float32 [B, H, W] (1 = transparent); a squeezed [H, W] mask gets its batch dimension back."""
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"input {name!r} must be a MASK tensor, got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3 or min(mask.shape) < 1:
        raise InputError(f"input {name!r}: expected MASK [B, H, W], got {tuple(mask.shape)}")
    return mask.detach().to("cpu", torch.float32)


def to_output(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float32 tensor for a node output, on ComfyUI's intermediate device."""
    t = torch.from_numpy(np.ascontiguousarray(array, np.float32)) if isinstance(array, np.ndarray) else array
    return t.to(host.intermediate_device(), torch.float32)


def checkerboard(height: int, width: int, cell: int = 16) -> np.ndarray:
    """A light grey checkerboard (H, W, 3) float32, the usual backdrop that shows transparency."""
    yy, xx = np.indices((height, width))
    dark = ((yy // cell + xx // cell) % 2).astype(bool)
    board = np.where(dark, np.float32(0.8), np.float32(1.0))
    return np.repeat(board[..., None], 3, axis=2).astype(np.float32)
