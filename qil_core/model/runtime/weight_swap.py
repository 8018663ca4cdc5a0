"""Swapping a module's weights between host copies and device copies without converting them.

A `ModuleStore` re-points a module's parameters (`param.data = ...`) and buffers between a host copy on the CPU
and a device copy made with `copy_`. Inference never changes weights, so leaving the device is only a
re-pointing at the host copy (no device-to-host traffic), and the device copy is bit-identical to the host
one: fp8 weights stay fp8, memory-mapped weights stay memory-mapped on the host. Used by `offload.py`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch
from torch import Tensor, nn

from ...errors import InputError

HOST = torch.device("cpu")


def normalize_device(device: torch.device | str | None) -> torch.device:
    """The device, with an index-less "cuda" pinned to the current CUDA device (so stream calls agree)."""
    dev = torch.device(device) if device is not None else HOST
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class ModuleStore:
    """The host copies of a module's parameters and buffers, and the swap between them and device copies.

    `skip` names direct children whose tensors are left alone (a BlockSwapPlacement stores blocks separately).
    Host copies are the module's own CPU tensors (memory-mapped weights stay memory-mapped) unless `pin` asks
    for page-locked copies. A module already on `reuse_on` keeps its tensors attached as the device copies and
    gets its host copies only when it is first detached (no RAM spent on parts that never leave the device).
    """

    def __init__(
        self,
        module: nn.Module,
        name: str,
        *,
        pin: bool = False,
        skip: Collection[str] = (),
        reuse_on: torch.device | None = None,
    ) -> None:
        self.module = module
        self.name = name
        self.pin = pin
        self.refs: list[tuple[nn.Module, str, bool]] = []  # (owner, attribute, is_parameter)
        originals: list[Tensor] = []
        seen: set[int] = set()
        for owner in _modules(module, skip):
            for attr, is_param, obj, t in _own_tensors(owner):
                if id(obj) in seen:
                    continue  # a tied parameter is one object: swapping its data once serves every owner
                seen.add(id(obj))
                if t.device.type == "meta":
                    raise InputError(
                        f"component {name!r} still has meta tensors ({type(owner).__name__}.{attr}); load its "
                        "weights before running it"
                    )
                self.refs.append((owner, attr, is_param))
                originals.append(t)
        self.nbytes = sum(t.numel() * t.element_size() for t in originals)
        self.attached: list[Tensor] | None = None  # device copies while on the device
        self._host: list[Tensor] | None = None
        if (
            reuse_on is not None
            and reuse_on.type != "cpu"
            and originals
            and all(_same(t.device, reuse_on) for t in originals)
        ):
            self.attached = originals  # loaded straight onto the device: keep using those tensors, copy nothing
        else:
            self._host = [_host_copy(t, pin) for t in originals]
            self._set(self._host)

    @property
    def host(self) -> list[Tensor]:
        """The host copies (made now from the attached tensors if the module started on the device)."""
        if self._host is None:
            self._host = [_host_copy(t, self.pin) for t in self.attached or ()]
        return self._host

    @property
    def on_device(self) -> bool:
        """True while device copies are attached."""
        return self.attached is not None

    def _set(self, tensors: list[Tensor]) -> None:
        for (owner, attr, is_param), t in zip(self.refs, tensors, strict=True):
            if is_param:
                owner._parameters[attr].data = t  # type: ignore[union-attr]
            else:
                owner._buffers[attr] = t

    def copies(self, device: torch.device, non_blocking: bool = False) -> list[Tensor]:
        """Fresh device copies of every host tensor (same dtype, bit-identical), allocated on the current stream."""
        out = []
        for h in self.host:
            d = torch.empty_like(h, device=device)
            d.copy_(h, non_blocking=non_blocking)
            out.append(d)
        return out

    def attach(self, tensors: list[Tensor]) -> None:
        """Point the module at `tensors` (device copies made by `copies`)."""
        self._set(tensors)
        self.attached = tensors

    def detach(self) -> None:
        """Point the module back at its host copies; the device copies are freed when nothing else holds them."""
        if self.attached is not None:
            self._set(self.host)
            self.attached = None


def _modules(module: nn.Module, skip: Collection[str]) -> Iterator[nn.Module]:
    """The module and its descendants, leaving out the direct children named in `skip` and their subtrees."""
    yield module
    for child_name, child in module.named_children():
        if child_name not in skip:
            yield from _modules(child, ())


def _own_tensors(owner: nn.Module) -> Iterator[tuple[str, bool, object, Tensor]]:
    """(attribute, is_parameter, the object that identifies it, its tensor) for the owner's direct tensors."""
    for attr, p in owner._parameters.items():
        if p is not None:
            yield attr, True, p, p.data
    for attr, b in owner._buffers.items():
        if b is not None:
            yield attr, False, b, b


def _host_copy(t: Tensor, pin: bool) -> Tensor:
    """`t` itself when it is a usable host tensor, else a CPU copy (page-locked when `pin`)."""
    if t.device.type == "cpu" and (not pin or t.is_pinned()):
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=HOST, pin_memory=pin)
    out.copy_(t)
    return out


def _same(a: torch.device, b: torch.device) -> bool:
    """Same device, an index-less device counting as index 0."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def default_pin(device: torch.device) -> bool:
    """Page-locked host copies by default only for CUDA devices (they make host-to-device copies asynchronous)."""
    return device.type == "cuda"


__all__ = ["HOST", "ModuleStore", "default_pin", "normalize_device"]
