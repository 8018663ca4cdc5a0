"""Where model components live while a pipeline runs: the `Placement` protocol and its resident default.

The pipelines never call `.to(device)` on a component themselves. They ask a placement to make a component
ready for a block of work (`with placement.use("transformer", model.transformer) as dit: ...`) and tell it
when a component is no longer needed for this run (`placement.release("text_encoder", te)`). That lets a
caller keep everything resident (`ResidentPlacement`, the default), stream blocks from CPU, or hand the
decision to a host's memory manager (ComfyUI's ModelPatcher) without the pipelines knowing which.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch
from torch import nn

logger = logging.getLogger(__name__)


@runtime_checkable
class Placement(Protocol):
    """Decides where each model component sits while a pipeline uses it."""

    device: torch.device
    dtype: torch.dtype | None

    def use(self, name: str, module: nn.Module) -> AbstractContextManager[nn.Module]:
        """Context manager: `module` ready on `device` for the duration of the block; yields the module to call."""
        ...

    def release(self, name: str, module: nn.Module) -> None:
        """Say that `module` is not needed again in this run (e.g. the text encoder after encoding)."""
        ...


def _module_device(module: nn.Module) -> torch.device | None:
    """Device of the module's first parameter or buffer; None for a module without tensors."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Compare devices, treating an index-less 'cuda' as the current CUDA device."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return a.index == b.index or a.index is None or b.index is None
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


class ResidentPlacement:
    """Move each component to `device` the first time it is used and keep it there (no offloading)."""

    def __init__(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self._placed: set[int] = set()

    @contextlib.contextmanager
    def _use(self, name: str, module: nn.Module) -> Iterator[nn.Module]:
        if id(module) not in self._placed:
            current = _module_device(module)
            if current is not None and current.type == "meta":
                raise RuntimeError(f"component {name!r} still has meta tensors; load its weights before running")
            if current is not None and not _same_device(current, self.device):
                logger.debug("moving %s from %s to %s", name, current, self.device)
                module.to(self.device)
            self._placed.add(id(module))
        yield module

    def use(self, name: str, module: nn.Module) -> AbstractContextManager[nn.Module]:
        """Context manager yielding `module` on `self.device` (moved once, left there afterwards)."""
        return self._use(name, module)

    def release(self, name: str, module: nn.Module) -> None:
        """Resident placement keeps everything loaded; releasing only forgets the bookkeeping."""
        self._placed.discard(id(module))

    def __repr__(self) -> str:
        return f"ResidentPlacement(device={self.device}, dtype={self.dtype})"
