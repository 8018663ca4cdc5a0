"""The QIL_MODEL value and where its weights live while a node runs (ComfyUI's memory management or streaming).

Memory modes (chosen on the loader):
- resident: each component is handed to ComfyUI (`load_models_gpu`) when the pipeline uses it; ComfyUI keeps
  it on the GPU between runs and unloads it (or our other components) when something else needs the room.
- offload: components are copied to the GPU when used and kept only while they fit (memory_plan's budget),
  all dropped when the run ends; little VRAM, more transfers.
- block_swap: the transformer's blocks stream from the CPU, as many kept resident as fit (BlockSwapPlacement).
- auto: qil_core.model.runtime.memory_plan decides on the first run of a loaded model: resident when every phase fits
  on the device (ComfyUI evicting between phases as needed), else block_swap with as many blocks as fit.
In offload, block_swap and the auto decision ComfyUI is first asked to free the room (unloading other models).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..qil_core.errors import InputError
from . import host

log = logging.getLogger(__name__)

MODEL_TYPE = "QIL_MODEL"
CONNECT_HINT = "connect a Load Qwen-Layered node to 'model'"
TEXT_TOKENS = 512  # a generous prompt length for the working-memory estimate


class Component(torch.nn.Module):
    """Holds one component for a ModelPatcher, which sets attributes (device, ...) on the module it wraps."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner


# One holder class per component, so ComfyUI's log says "Requested to load QwenLayeredTransformer".
HOLDERS: dict[str, type[Component]] = {
    name: type(f"QwenLayered{label}", (Component,), {"__doc__": f"Holds the {name} for a ModelPatcher."})
    for name, label in (("transformer", "Transformer"), ("vae", "VAE"), ("text_encoder", "TextEncoder"))
}


@dataclass(eq=False)
class QILModel:
    """A QIL_MODEL: the loaded model, one ModelPatcher per component, the memory mode and the files' key."""

    model: Any  # qil_core.model.loader.QwenLayeredModel
    patchers: dict[str, Any]
    memory_mode: str
    load_device: torch.device
    key: tuple = ()
    files: dict[str, str] = field(default_factory=dict)
    resolved_mode: str | None = None  # what "auto" chose on the first run
    loras: tuple = ()  # (qil_core LoraFile, strength) pairs, applied for each run by run_placement (lora_nodes)
    sampler: Any = None  # qil_core SamplerOptions or None (the reference schedule), from Sampler Settings


def check_model(model: Any) -> QILModel:
    """The QIL_MODEL input, or InputError saying what to connect (robustness D14)."""
    if model is None:
        raise InputError(f"input 'model' is empty: {CONNECT_HINT}")
    if not isinstance(model, QILModel):
        raise InputError(f"input 'model' must be a QIL_MODEL, got {type(model).__name__}: {CONNECT_HINT}")
    return model


def work_bytes(handle: QILModel, width: int, height: int, layers: int) -> int:
    """Estimated transformer working memory of one step at (width, height) px with `layers` layers (cost model)."""
    from ..qil_core.model.runtime.memory_plan import estimate_activation_bytes, image_tokens

    dit = handle.model.transformer
    return estimate_activation_bytes(
        image_tokens(width, height, layers) + TEXT_TOKENS, width=dit.config.inner_dim, dtype=handle.model.dtype
    )


class HostPlacement:
    """Placement that gives each component to ComfyUI's model management when a pipeline uses it."""

    def __init__(self, handle: QILModel, memory_required: int = 0) -> None:
        self.device = handle.load_device
        self.dtype = handle.model.dtype
        self._patchers = handle.patchers
        self._memory_required = memory_required

    @contextlib.contextmanager
    def _use(self, name: str, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        # force_full_load: a plain torch module cannot run with part of its weights left on the CPU
        host.load_models_gpu([self._patchers[name]], memory_required=self._memory_required, force_full_load=True)
        yield module

    def use(self, name: str, module: torch.nn.Module) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """Context manager: ComfyUI loads the component (evicting other models if needed); yields it."""
        return self._use(name, module)

    def release(self, name: str, module: torch.nn.Module) -> None:
        """Nothing to do: ComfyUI unloads the component when another model needs the room."""


def _plan(handle: QILModel, mode: str, width: int, height: int, layers: int) -> Any:
    """memory_plan's choice for this run, after asking ComfyUI to make room (it unloads other models)."""
    from ..qil_core.model.runtime.memory_plan import module_bytes, plan_for_model

    model, device = handle.model, handle.load_device
    if device.type != "cpu":
        weights = sum(module_bytes(m) for m in (model.transformer, model.vae, model.text_encoder) if m is not None)
        host.free_memory(weights + work_bytes(handle, width, height, layers), device)
    return plan_for_model(model, width=width, height=height, layers=layers, mode=mode, device=device)


@contextlib.contextmanager
def run_placement(handle: QILModel, width: int, height: int, layers: int) -> Iterator[Any]:
    """The handle's LoRAs applied for the run (taken off after it, on Cancel too), and its placement."""
    from ..qil_core.model.weights.lora_apply import loras_applied

    with loras_applied(handle.model, handle.loras), _placement_for(handle, width, height, layers) as placement:
        yield placement


def caption_placement(handle: QILModel, width: int, height: int) -> contextlib.AbstractContextManager[Any]:
    """The placement for a captioning run at the (width, height) processing size: only the text encoder runs, so
    the handle's LoRAs (on the transformer) are not applied."""
    return _placement_for(handle, width, height, 1)


@contextlib.contextmanager
def _placement_for(handle: QILModel, width: int, height: int, layers: int) -> Iterator[Any]:
    """The Placement for one run at (width, height) px with `layers` layers, in the handle's memory mode.

    Streaming placements drop their device copies when the run ends, on Cancel too, so between runs ComfyUI
    alone decides what stays on the GPU.
    """
    mode = handle.memory_mode
    if mode == "auto":
        if handle.resolved_mode is None:  # decided once: resident (ComfyUI evicts as needed) or block swap
            chosen = _plan(handle, "auto", width, height, layers).mode
            handle.resolved_mode = "block_swap" if chosen == "block_swap" else "resident"
        mode = handle.resolved_mode
    if mode == "resident":
        yield HostPlacement(handle, work_bytes(handle, width, height, layers))
        return
    plan = _plan(handle, mode, width, height, layers)  # offload or block_swap: memory_plan's own names
    placement = plan.placement(handle.model.dtype)
    log.info("memory mode %s: %s; %r", mode, plan.describe(), placement)
    try:
        yield placement
    finally:
        placement.unload()
