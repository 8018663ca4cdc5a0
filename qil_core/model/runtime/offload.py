"""Placements that keep weights off the compute device: whole components between uses, or transformer blocks.

Both implement the `Placement` protocol of `placement.py`. The weights are never converted: a module's tensors
are swapped (`param.data = ...`, buffers replaced) between a host copy on the CPU and a device copy made with
`copy_`, so fp8 weights stream as fp8 and the device copy is bit-identical to the host copy (every mode gives
the resident mode's outputs exactly). Inference never changes weights, so going back to the host is just
re-pointing at the host copy: no device-to-host traffic.

- `OffloadPlacement`: a component is copied to the device when a pipeline `use`s it and dropped afterwards,
  unless its name is in `keep` (then it stays until `unload`). `keep=("transformer", "vae")` is the
  "text encoder released after encoding" mode.
- `BlockSwapPlacement`: the transformer's non-block weights and its first `resident_blocks` blocks stay on the
  device; every other block is copied in just before it runs and dropped right after, while the next one is
  copied on a side CUDA stream (ordered with events), so the transfer hides behind the current block's compute.
  Peak device weights: rest + (resident_blocks + 2) blocks. On the CPU (or without prefetch) the same hooks
  run synchronously, which is how the tests prove it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...errors import InputError
from .placement import Placement, ResidentPlacement
from .weight_swap import ModuleStore, default_pin, normalize_device

logger = logging.getLogger(__name__)

# Components a BlockSwapPlacement streams block by block; everything else goes to its `others` placement.
SWAPPED = ("transformer",)


class OffloadPlacement:
    """Components live on the CPU and are copied to `device` for each `use`; names in `keep` stay there.

    With `budget_bytes`, kept components stay only while they fit: before a component comes in, idle kept ones
    are evicted (released ones first, then the least recently used) until its weights plus its working memory
    (`work_bytes[name]`) fit the budget. That is how a 48 GB card keeps the transformer between runs yet makes
    room for the text encoder when a new prompt must be encoded.
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        keep: Collection[str] = (),
        pin_memory: bool | None = None,
        budget_bytes: int | None = None,
        work_bytes: Mapping[str, int] | None = None,
    ) -> None:
        self.device = normalize_device(device)
        self.dtype = dtype
        self.keep = frozenset(keep)
        self.pin_memory = default_pin(self.device) if pin_memory is None else pin_memory
        self.budget_bytes = budget_bytes
        self.work_bytes = dict(work_bytes or {})
        self.evictions = 0
        self._stores: dict[int, ModuleStore] = {}
        self._active: dict[int, int] = {}
        self._last_use: dict[int, int] = {}  # module id -> use counter; released components get -1
        self._clock = 0

    def _store(self, name: str, module: nn.Module) -> ModuleStore:
        store = self._stores.get(id(module))
        if store is None or store.module is not module:
            store = self._stores[id(module)] = ModuleStore(module, name, pin=self.pin_memory, reuse_on=self.device)
        return store

    def _make_room(self, name: str, incoming: ModuleStore) -> None:
        if self.budget_bytes is None:
            return
        need = incoming.nbytes + self.work_bytes.get(name, 0)
        idle = [k for k, s in self._stores.items() if s.on_device and s is not incoming and not self._active.get(k)]
        for key in sorted(idle, key=lambda k: self._last_use.get(k, -1)):
            if self.device_bytes() + need <= self.budget_bytes:
                return
            logger.debug("offload: evicting %s to make room for %s", self._stores[key].name, name)
            self._stores[key].detach()
            self.evictions += 1
        if self.device_bytes() + need > self.budget_bytes:
            logger.warning(
                "offload: %s needs %.2f GB but only %.2f GB of the %.2f GB budget are free",
                name,
                need / 1e9,
                (self.budget_bytes - self.device_bytes()) / 1e9,
                self.budget_bytes / 1e9,
            )

    @contextlib.contextmanager
    def _use(self, name: str, module: nn.Module) -> Iterator[nn.Module]:
        store = self._store(name, module)
        key = id(module)
        if not store.on_device:
            self._make_room(name, store)
            logger.debug("offload: %s to %s (%.1f MB)", name, self.device, store.nbytes / 1e6)
            store.attach(store.copies(self.device))
        self._active[key] = self._active.get(key, 0) + 1
        self._clock += 1
        self._last_use[key] = self._clock
        try:
            yield module
        finally:
            self._active[key] -= 1
            if not self._active[key] and name not in self.keep:
                store.detach()

    def use(self, name: str, module: nn.Module) -> AbstractContextManager[nn.Module]:
        """Context manager yielding `module` with its weights on `self.device` (dropped on exit unless kept)."""
        return self._use(name, module)

    def release(self, name: str, module: nn.Module) -> None:
        """Mark a kept component as the first to evict; others already left the device when their use ended."""
        if id(module) in self._last_use:
            self._last_use[id(module)] = -1

    def unload(self) -> None:
        """Drop every device copy, kept components included (their weights stay on the CPU)."""
        for store in self._stores.values():
            store.detach()

    def device_bytes(self) -> int:
        """Bytes of weights this placement holds on the device now."""
        return sum(s.nbytes for s in self._stores.values() if s.on_device)

    def __repr__(self) -> str:
        budget = "" if self.budget_bytes is None else f", budget={self.budget_bytes / 1e9:.2f} GB"
        return f"OffloadPlacement(device={self.device}, keep={sorted(self.keep)}, pin_memory={self.pin_memory}{budget})"


@dataclass
class SwapStats:
    """What a BlockSwapPlacement did: block uploads, bytes copied, and the most streamed blocks held at once."""

    uploads: int = 0
    bytes_uploaded: int = 0
    peak_streamed_blocks: int = 0


class _Copy:
    """A block's device copies, possibly still being written on the side stream until `event` completes."""

    def __init__(self, tensors: list[Tensor], event: torch.cuda.Event | None) -> None:
        self.tensors = tensors
        self.event = event


class BlockSwapPlacement:
    """Stream the transformer's blocks from the CPU, keeping `resident_blocks` of them on the device.

    The transformer's other weights and blocks 0..resident_blocks-1 are copied once and stay until `unload`
    (or until `release` when keep_resident=False); the rest are streamed on every forward. Components other
    than the transformer go to `others` (default: an OffloadPlacement that keeps the VAE).
    """

    def __init__(
        self,
        device: torch.device | str | None = None,
        resident_blocks: int = 0,
        dtype: torch.dtype | None = None,
        *,
        others: Placement | None = None,
        blocks_attr: str = "transformer_blocks",
        prefetch: bool | None = None,
        pin_memory: bool | None = None,
        keep_resident: bool = True,
    ) -> None:
        if not isinstance(resident_blocks, int) or isinstance(resident_blocks, bool) or resident_blocks < 0:
            raise InputError(f"resident_blocks must be an int >= 0, got {resident_blocks!r}")
        self.device = normalize_device(device)
        self.dtype = dtype
        self.resident_blocks = resident_blocks
        self.blocks_attr = blocks_attr
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self.pin_memory = default_pin(self.device) if pin_memory is None else pin_memory
        self.keep_resident = keep_resident
        self.others: Placement = (
            others
            if others is not None
            else OffloadPlacement(self.device, dtype, keep=("vae",), pin_memory=self.pin_memory)
        )
        self.stats = SwapStats()
        self._rest: dict[int, ModuleStore] = {}
        self._blocks: dict[int, list[ModuleStore]] = {}
        self._stream: torch.cuda.Stream | None = None
        self._active: set[int] = set()
        self._pending: dict[int, dict[int, _Copy]] = {}  # module id -> block index -> copy in flight

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def _block_list(self, module: nn.Module) -> nn.ModuleList:
        blocks = getattr(module, self.blocks_attr, None)
        if not isinstance(blocks, nn.ModuleList):
            raise InputError(
                f"block swap needs the transformer's blocks in an nn.ModuleList named {self.blocks_attr!r}; "
                f"{type(module).__name__} has none. Use OffloadPlacement for this model"
            )
        return blocks

    def _stores(self, name: str, module: nn.Module) -> tuple[ModuleStore, list[ModuleStore]]:
        key = id(module)
        rest = self._rest.get(key)
        if rest is None or rest.module is not module:
            blocks = self._block_list(module)
            k = min(self.resident_blocks, len(blocks))
            rest = self._rest[key] = ModuleStore(module, name, skip=(self.blocks_attr,), reuse_on=self.device)
            self._blocks[key] = [
                ModuleStore(
                    b,
                    f"{name}.{self.blocks_attr}.{i}",
                    pin=self.pin_memory and i >= k,
                    reuse_on=self.device if i < k else None,
                )
                for i, b in enumerate(blocks)
            ]
        return rest, self._blocks[key]

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _start_copy(self, store: ModuleStore) -> _Copy:
        """Begin copying a block to the device: on the side stream for CUDA with prefetch, else right now."""
        self.stats.uploads += 1
        self.stats.bytes_uploaded += store.nbytes
        if self.device.type != "cuda" or not self.prefetch:
            return _Copy(store.copies(self.device), None)
        main = torch.cuda.current_stream(self.device)
        side = self._side_stream()
        # Allocated on the main stream (which frees them later); the side stream must first wait for every
        # kernel already queued there, since this memory may have held the block that just finished.
        tensors = [torch.empty_like(h, device=self.device) for h in store.host]
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for d, h in zip(tensors, store.host, strict=True):
                d.copy_(h, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        return _Copy(tensors, event)

    def _finish_copy(self, store: ModuleStore, copy: _Copy) -> None:
        if copy.event is not None:
            torch.cuda.current_stream(self.device).wait_event(copy.event)
        store.attach(copy.tensors)

    # -- the protocol --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _use_transformer(self, name: str, module: nn.Module) -> Iterator[nn.Module]:
        if id(module) in self._active:  # nested use: the hooks are already installed
            yield module
            return
        rest, stores = self._stores(name, module)
        blocks = self._block_list(module)
        k = min(self.resident_blocks, len(stores))
        for store in [rest, *stores[:k]]:
            if not store.on_device:
                store.attach(store.copies(self.device))
        streamed = list(range(k, len(stores)))
        pending: dict[int, _Copy] = self._pending.setdefault(id(module), {})
        live: set[int] = set()

        def next_streamed(i: int) -> int | None:
            """The streamed block after block i, wrapping to the first one for the next forward."""
            later = [j for j in streamed if j > i]
            return later[0] if later else (streamed[0] if streamed else None)

        def before(block_index: int) -> None:
            """Pre-hook: the block's weights on the device (waiting for its prefetch); start the next copy."""
            store = stores[block_index]
            if not store.on_device:
                copy = pending.pop(block_index, None) or self._start_copy(store)
                self._finish_copy(store, copy)
                live.add(block_index)
            if self.prefetch:
                j = next_streamed(block_index)
                if j is not None and j != block_index and j not in pending and not stores[j].on_device:
                    pending[j] = self._start_copy(stores[j])
            self.stats.peak_streamed_blocks = max(self.stats.peak_streamed_blocks, len(live) + len(pending))

        def after(block_index: int) -> None:
            """Post-hook: drop the block's device copies."""
            stores[block_index].detach()
            live.discard(block_index)

        handles = []
        for i in streamed:
            handles.append(blocks[i].register_forward_pre_hook(lambda _m, _a, i=i: before(i)))
            handles.append(blocks[i].register_forward_hook(lambda _m, _a, _o, i=i: after(i)))
        if self.prefetch and streamed:
            pending[streamed[0]] = self._start_copy(stores[streamed[0]])
        self._active.add(id(module))
        try:
            yield module
        finally:
            self._active.discard(id(module))
            for h in handles:
                h.remove()
            for copy in pending.values():
                if copy.event is not None:  # the side stream may still write into memory about to be freed
                    torch.cuda.current_stream(self.device).wait_event(copy.event)
            pending.clear()
            for i in streamed:
                stores[i].detach()

    def use(self, name: str, module: nn.Module) -> AbstractContextManager[nn.Module]:
        """Context manager: the transformer with block streaming installed; other components via `others`."""
        if name in SWAPPED:
            return self._use_transformer(name, module)
        return self.others.use(name, module)

    def release(self, name: str, module: nn.Module) -> None:
        """Forward to `others`; for the transformer, drop its resident part unless keep_resident."""
        if name not in SWAPPED:
            self.others.release(name, module)
        elif not self.keep_resident:
            self._drop(id(module))

    def _drop(self, key: int) -> None:
        rest = self._rest.pop(key, None)
        if rest is not None:
            rest.detach()
        for store in self._blocks.pop(key, []):
            store.detach()

    def unload(self) -> None:
        """Drop every device copy held by this placement (and by `others` when it can unload)."""
        for key in list(self._rest):
            self._drop(key)
        unload = getattr(self.others, "unload", None)
        if callable(unload):
            unload()

    def device_bytes(self) -> int:
        """Bytes of transformer weights on the device now (plus `others`' when it reports them)."""
        total = sum(s.nbytes for s in self._rest.values() if s.on_device)
        total += sum(s.nbytes for stores in self._blocks.values() for s in stores if s.on_device)
        total += sum(self._blocks[key][i].nbytes for key, p in self._pending.items() for i in p)
        other = getattr(self.others, "device_bytes", None)
        return total + (other() if callable(other) else 0)

    def __repr__(self) -> str:
        return (
            f"BlockSwapPlacement(device={self.device}, resident_blocks={self.resident_blocks}, "
            f"prefetch={self.prefetch}, pin_memory={self.pin_memory}, others={self.others!r})"
        )


__all__ = ["BlockSwapPlacement", "ModuleStore", "OffloadPlacement", "ResidentPlacement", "SwapStats"]
