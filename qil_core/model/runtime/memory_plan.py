"""Choose where the weights live from the free memory: resident, offloaded, or transformer block swap.

The estimates follow the cost model in docs/performance.md: transformer activations are linear in the
token count, about 86 KB per token in bf16 at the real width (14 values of the model width per token, the peak
inside one block call; blocks do not accumulate activations in inference); VAE decoding needs about 4.2 GB per
megapixel per decoded frame in bf16. A run has three phases (text encoding, denoising, VAE) and a plan fits when
every phase fits: the weights kept on the device, plus the phase's own component, plus its working memory,
within the free device memory minus a reserve. Preference, fastest first: everything resident; then "offload"
(components kept while they fit and evicted on demand, so the text encoder pushes the transformer out only when
a prompt must be encoded); then block swap with as many resident blocks as fit. A forced mode that does not
fit falls back to the next one with a warning instead of over-subscribing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import InputError, ResourceError
from . import MEMORY_MODES
from .memory import available_device_memory, available_ram, format_bytes
from .offload import BlockSwapPlacement, OffloadPlacement
from .placement import Placement, ResidentPlacement

logger = logging.getLogger(__name__)

MODES = MEMORY_MODES
# Peak activation values per token, in units of the model width, inside one block (performance.md: 86 KB per
# token at width 3072 in bf16 = 14 x 3072 x 2 bytes).
ACTIVATION_WIDTHS_PER_TOKEN = 14
VAE_DECODE_BYTES_PER_PIXEL = 4200  # bf16, one frame (performance.md: 4.2 GB per megapixel per layer)
TEXT_ENCODE_BYTES = 1 << 30  # working memory of encoding one prompt with the 7B text encoder (short prompts)
RESERVE_BYTES = 768 << 20  # allocator fragmentation, cuBLAS/cuDNN workspaces, kernels' scratch
RESERVE_FRACTION = 0.05
PHASES = ("text_encoder", "transformer", "vae")


def estimate_activation_bytes(
    tokens: int, *, width: int = 3072, dtype: torch.dtype = torch.bfloat16, batch: int = 1, fp8: bool = False
) -> int:
    """Peak transformer working memory of one forward over `tokens` (text + image) tokens for `batch` samples.

    With fp8 weights one Linear is dequantised at a time, through two temporaries of its size (the cast and the
    scaled copy, measured by bench/bench_memory.py): twice the largest (4 x width x width) weight is added.
    """
    if tokens < 0 or batch < 1:
        raise InputError(f"tokens must be >= 0 and batch >= 1, got tokens={tokens}, batch={batch}")
    item = torch.empty((), dtype=dtype).element_size()
    act = tokens * batch * ACTIVATION_WIDTHS_PER_TOKEN * width * item
    return act + (2 * 4 * width * width * item if fp8 else 0)


def estimate_vae_decode_bytes(width: int, height: int, *, frames: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Working memory of decoding `frames` frames of width x height pixels at once (per-layer decode: frames=1)."""
    scale = torch.empty((), dtype=dtype).element_size() / 2
    return int(width * height * frames * VAE_DECODE_BYTES_PER_PIXEL * scale)


def image_tokens(width: int, height: int, layers: int, *, condition: bool = True) -> int:
    """Image tokens of a decomposition: (N + 1 + condition) frames of (H/16)(W/16) tokens."""
    return (layers + 1 + int(condition)) * (height // 16) * (width // 16)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (fp8 weights count one byte per value)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def dequant_transient_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Peak extra bytes of dequantising `module`'s largest quantised Linear (quant.Fp8Linear, any format) to
    `dtype`: the layers say what their format needs (fp8 2 bytes per value in bf16, int8 6, INT8 ConvRot 10,
    mxfp8 6, nvfp4 7); 0 without quantised layers."""
    costs = [getattr(m, "dequant_transient_bytes", None) for m in module.modules()]
    return max((int(cost(dtype)) for cost in costs if callable(cost)), default=0)


def _reserve(free: int) -> int:
    return RESERVE_BYTES + int(RESERVE_FRACTION * free)


def cfg_batch_fits(
    tokens: int,
    *,
    free_device_bytes: int | None,
    width: int = 3072,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    transient_bytes: int = 0,
) -> bool:
    """True when one batched forward (positive + negative prompt) fits in the free device memory.

    `free_device_bytes` is measured with the weights already in place; `transient_bytes` is memory the forward
    itself allocates besides activations (e.g. block swap's streamed blocks). Unknown free memory: False
    (sequential CFG gives the same result and never needs more than one sample's activations).
    """
    if free_device_bytes is None:
        return False
    need = estimate_activation_bytes(tokens, width=width, dtype=dtype, batch=2, fp8=fp8) + transient_bytes
    return need + _reserve(free_device_bytes) <= free_device_bytes


@dataclass
class MemoryPlan:
    """Where each component lives during a run, and the estimated device memory each phase needs."""

    mode: str
    device: torch.device
    keep: tuple[str, ...] = ()  # components kept on the device between phases (evicted on demand in "offload")
    resident_blocks: int | None = None  # block swap: blocks kept on the device
    keep_resident: bool = True  # block swap: the transformer's resident part stays between runs
    pin_memory: bool = False
    phase_bytes: dict[str, int] = field(default_factory=dict)
    work_bytes: dict[str, int] = field(default_factory=dict)
    budget_bytes: int | None = None
    transformer_kept_bytes: int = 0  # block swap: what stays of the transformer outside its phase
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        """The largest phase's estimated device memory."""
        return max(self.phase_bytes.values(), default=0)

    @property
    def load_device(self) -> torch.device:
        """Where to load the weights: straight to the device when resident, else the CPU (copied in on use)."""
        return self.device if self.mode == "resident" else torch.device("cpu")

    def placement(self, dtype: torch.dtype | None = None) -> Placement:
        """Build the Placement this plan describes."""
        if self.mode == "resident":
            return ResidentPlacement(self.device, dtype)
        if self.mode == "offload":
            return OffloadPlacement(
                self.device,
                dtype,
                keep=self.keep,
                pin_memory=self.pin_memory,
                budget_bytes=self.budget_bytes,
                work_bytes=self.work_bytes,
            )
        budget = None if self.budget_bytes is None else self.budget_bytes - self.transformer_kept_bytes
        others = OffloadPlacement(
            self.device,
            dtype,
            keep=tuple(k for k in self.keep if k != "transformer"),
            pin_memory=self.pin_memory,
            budget_bytes=budget,
            work_bytes=self.work_bytes,
        )
        return BlockSwapPlacement(
            self.device,
            self.resident_blocks or 0,
            dtype,
            others=others,
            pin_memory=self.pin_memory,
            keep_resident=self.keep_resident,
        )

    def describe(self) -> str:
        """One line for logs."""
        parts = [f"memory plan: {self.mode}"]
        if self.resident_blocks is not None:
            parts.append(f"{self.resident_blocks} blocks resident" + ("" if self.keep_resident else " per run"))
        if self.keep:
            parts.append("kept on device: " + ", ".join(self.keep))
        parts.append("peak " + format_bytes(self.peak_bytes))
        if self.budget_bytes is not None:
            parts.append("of " + format_bytes(self.budget_bytes) + " usable")
        return "; ".join(parts) + "".join(f" ({n})" for n in self.notes)


def plan_memory(
    *,
    free_device_bytes: int | None,
    free_ram_bytes: int | None,
    component_bytes: Mapping[str, int],
    activation_bytes: int,
    mode: str = "auto",
    device: torch.device | str = "cuda",
    block_bytes: Sequence[int] | None = None,
    vae_work_bytes: int = 0,
    text_work_bytes: int = TEXT_ENCODE_BYTES,
    resident_blocks: int | None = None,
) -> MemoryPlan:
    """Choose the fastest placement whose every phase fits the free device memory (see the module docstring).

    `component_bytes` maps "transformer", "vae" and optionally "text_encoder" to their weight bytes;
    `block_bytes` lists the transformer's block sizes (default: 60 equal blocks holding 99.8% of it, the real
    model's split). `resident_blocks` fixes k for block swap. Raises ResourceError only when even block swap
    with no resident block cannot fit.
    """
    if mode not in MODES:
        raise InputError(f"memory mode must be one of {', '.join(MODES)}, got {mode!r}")
    for name in ("transformer", "vae"):
        if name not in component_bytes:
            raise InputError(f"component_bytes needs {name!r}, got {sorted(component_bytes)}")
    dev = torch.device(device)
    comp = dict(component_bytes)
    present = tuple(p for p in PHASES if p in comp)
    work = {"text_encoder": text_work_bytes, "transformer": activation_bytes, "vae": vae_work_bytes}
    work = {p: work[p] for p in present}
    if block_bytes is None:
        block_bytes = [int(comp["transformer"] * 0.998 / 60)] * 60
    n, block = len(block_bytes), max(block_bytes, default=0)
    rest = comp["transformer"] - sum(block_bytes)
    pin = dev.type == "cuda"
    if free_ram_bytes is not None:  # page-locking the host copies needs that much free RAM
        pin = pin and sum(comp.values()) + RESERVE_BYTES <= free_ram_bytes

    def resident() -> MemoryPlan:
        total = sum(comp.values())
        return MemoryPlan(
            "resident", dev, present, pin_memory=pin, work_bytes=work, phase_bytes={p: total + work[p] for p in present}
        )

    def offload() -> MemoryPlan:
        # kept components fill what the phase leaves free and are evicted on demand: each phase alone must fit
        return MemoryPlan(
            "offload",
            dev,
            present,
            pin_memory=pin,
            work_bytes=work,
            phase_bytes={p: comp[p] + work[p] for p in present},
        )

    def block_swap(k: int, keep_resident: bool) -> MemoryPlan:
        k = min(k, n)
        kept = rest + k * block if keep_resident else 0
        phase = {p: kept + comp[p] + work[p] for p in present}
        # denoising: the resident part, the running and the prefetched block, and the (kept) VAE
        phase["transformer"] = rest + (k + (0 if k == n else 2)) * block + work["transformer"] + comp["vae"]
        return MemoryPlan(
            "block_swap",
            dev,
            ("vae",),
            resident_blocks=k,
            keep_resident=keep_resident,
            pin_memory=pin,
            work_bytes=work,
            phase_bytes=phase,
            transformer_kept_bytes=kept,
        )

    if free_device_bytes is None or dev.type == "cpu":
        # Nothing to fit: on the CPU the loader memory-maps the weights and the OS pages them in and out.
        why = "free device memory unknown" if free_device_bytes is None else "CPU device"
        plan = {"block_swap": lambda: block_swap(resident_blocks or 0, True), "offload": offload}.get(mode, resident)()
        plan.notes.append(f"{why}: not checked against free memory")
        return plan
    budget = free_device_bytes - _reserve(free_device_bytes)
    ks = [resident_blocks] if resident_blocks is not None else list(range(n, -1, -1))
    swaps = [block_swap(k, keep) for k in ks for keep in (True, False)]  # most resident blocks first
    candidates = {
        "auto": [resident(), offload()],
        "resident": [resident(), offload()],
        "offload": [offload()],
        "block_swap": [],
    }[mode] + swaps
    for plan in candidates:
        plan.budget_bytes = budget
        if plan.peak_bytes <= budget:
            if mode != "auto" and plan.mode != mode:
                note = f"{mode} needs {format_bytes(candidates[0].peak_bytes)}, fell back to {plan.mode}"
                plan.notes.append(note)
                logger.warning("memory plan: %s (%s usable)", note, format_bytes(budget))
            return plan
    smallest = min(p.peak_bytes for p in candidates)
    raise ResourceError(
        f"not enough device memory on {dev}: even streaming every transformer block needs about "
        f"{format_bytes(smallest)} ({format_bytes(activation_bytes)} of it activations), {format_bytes(budget)} "
        f"usable of {format_bytes(free_device_bytes)} free. Use fewer layers or a smaller resolution, fp8 weights, "
        "or free memory held by other models"
    )


def transformer_block_bytes(transformer: nn.Module, blocks_attr: str = "transformer_blocks") -> list[int]:
    """Bytes of each transformer block as stored."""
    return [module_bytes(b) for b in getattr(transformer, blocks_attr)]


def plan_for_model(
    model: Any,  # a QwenLayeredModel (the loader sits above this room, so it is not imported here)
    *,
    width: int,
    height: int,
    layers: int,
    text_tokens: int = 200,
    cfg_batch: bool = False,
    mode: str = "auto",
    device: torch.device | str | None = None,
    free_device_bytes: int | None = None,
    free_ram_bytes: int | None = None,
) -> MemoryPlan:
    """Plan a decomposition of `model` (a QwenLayeredModel) at width x height with N layers on `device`.

    Free memory is measured (memory.available_device_memory / available_ram) unless given.
    """
    dit = model.transformer
    dev = torch.device(device) if device is not None else model.device
    comp = {"transformer": module_bytes(dit), "vae": module_bytes(model.vae)}
    te = getattr(model, "text_encoder", None)
    if te is not None:
        comp["text_encoder"] = module_bytes(te)
    cfg = dit.config
    tokens = image_tokens(width, height, layers) + text_tokens
    # Quantised weights (any format) are dequantised one layer at a time: that layer's temporaries come on top.
    act = estimate_activation_bytes(tokens, width=cfg.inner_dim, dtype=dit.dtype, batch=2 if cfg_batch else 1)
    act += dequant_transient_bytes(dit, dit.dtype)
    vae_work = estimate_vae_decode_bytes(width, height, dtype=model.vae.dtype)
    free_dev = free_device_bytes if free_device_bytes is not None else available_device_memory(dev)
    free_ram = free_ram_bytes if free_ram_bytes is not None else available_ram()
    plan = plan_memory(
        free_device_bytes=free_dev,
        free_ram_bytes=free_ram,
        component_bytes=comp,
        activation_bytes=act,
        mode=mode,
        device=dev,
        block_bytes=transformer_block_bytes(dit),
        vae_work_bytes=vae_work,
    )
    logger.info("%s", plan.describe())
    return plan


__all__ = [
    "MODES", "MemoryPlan", "cfg_batch_fits", "estimate_activation_bytes", "estimate_vae_decode_bytes",
    "image_tokens", "module_bytes", "plan_for_model", "plan_memory", "transformer_block_bytes",
    "dequant_transient_bytes",
]  # fmt: skip
