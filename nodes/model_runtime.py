"""The QIL_MODEL value and where its weights live while a node runs (ComfyUI's memory management or streaming).

Memory modes (chosen on the loader):
- resident: each component is handed to ComfyUI (`load_models_gpu`) when the pipeline uses it; ComfyUI keeps
  it on the GPU between runs and unloads it (or our other components) when something else needs the room.
- offload: a component is on the GPU only while it runs (our OffloadPlacement); least VRAM, more transfers.
- block swap: the transformer's blocks stream from the CPU, as many kept resident as fit (BlockSwapPlacement).
- auto: resident when the transformer plus its working memory fit on the device, else block swap (decided on
  the first run of a loaded model). In offload and block swap ComfyUI is first asked to free the room needed.
"""

from __future__ import annotations

import contextlib
import itertools
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

    model: Any  # qil_core.model.bundle.QwenLayeredModel
    patchers: dict[str, Any]
    memory_mode: str
    load_device: torch.device
    key: tuple = ()
    files: dict[str, str] = field(default_factory=dict)
    resolved_mode: str | None = None  # what "auto" chose on the first run


def check_model(model: Any) -> QILModel:
    """The QIL_MODEL input, or InputError saying what to connect (robustness D14)."""
    if model is None:
        raise InputError(f"input 'model' is empty: {CONNECT_HINT}")
    if not isinstance(model, QILModel):
        raise InputError(f"input 'model' must be a QIL_MODEL, got {type(model).__name__}: {CONNECT_HINT}")
    return model


def module_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of a module's parameters and buffers (0 for None)."""
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))


def work_bytes(handle: QILModel, width: int, height: int, layers: int) -> int:
    """Rough activation memory of one transformer step at (width, height) px with `layers` output layers."""
    tokens = (layers + 2) * (height // 16) * (width // 16) + 1024  # N+1 noisy frames, the condition, the text
    elem = torch.finfo(handle.model.dtype).bits // 8
    return tokens * handle.model.transformer.config.inner_dim * elem * 24  # qkv, MLP (4x), CFG pair, headroom


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


def _choose_mode(handle: QILModel, work: int) -> str:
    """auto: resident when the transformer and its working memory fit on the device, else block swap."""
    from ..qil_core.model.memory import available_device_memory, format_bytes

    device = handle.load_device
    if device.type == "cpu":
        return "resident"
    need = module_bytes(handle.model.transformer) + work
    host.free_memory(need, device)  # ComfyUI unloads other models to make the room if it can
    free = available_device_memory(device)
    mode = "resident" if free is None or free >= need else "block swap"
    log.info("memory mode auto -> %s (transformer + work %s, %s free on %s)", mode, format_bytes(need),
             "unknown" if free is None else format_bytes(free), device)
    return mode


def _resident_blocks(handle: QILModel, work: int) -> int:
    """How many transformer blocks stay on the device in block swap (the rest stream), from the free memory."""
    from ..qil_core.model.memory import available_device_memory

    dit = handle.model.transformer
    blocks = [module_bytes(b) for b in dit.transformer_blocks]
    rest = module_bytes(dit) - sum(blocks)
    host.free_memory(rest + 2 * max(blocks) + work, handle.load_device)
    free = available_device_memory(handle.load_device)
    if free is None:
        return 0
    return max(0, min(len(blocks), int((free - rest - work - 2 * max(blocks)) // max(blocks))))


@contextlib.contextmanager
def run_placement(handle: QILModel, work: int) -> Iterator[Any]:
    """The Placement for one run in the handle's memory mode; device copies are dropped afterwards (even on Cancel)."""
    mode = handle.memory_mode
    if mode == "auto":
        handle.resolved_mode = mode = handle.resolved_mode or _choose_mode(handle, work)
    if mode == "resident":
        yield HostPlacement(handle, work)
        return
    from ..qil_core.model.offload import BlockSwapPlacement, OffloadPlacement

    device, dtype = handle.load_device, handle.model.dtype
    placement: Any
    if mode == "offload":
        model = handle.model
        host.free_memory(max(module_bytes(m) for m in (model.transformer, model.vae, model.text_encoder)) + work,
                         device)
        placement = OffloadPlacement(device, dtype)
    else:
        placement = BlockSwapPlacement(device, _resident_blocks(handle, work), dtype)
    log.info("memory mode %s: %r", mode, placement)
    try:
        yield placement
    finally:
        placement.unload()
