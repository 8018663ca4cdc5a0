"""RAM and device-memory checks made before allocating, so a too-large job fails with a message (robustness L9).

The Linux OOM killer would otherwise take the whole ComfyUI server down. psutil is optional: without it the
available RAM is read from /proc/meminfo. Tests and users can simulate or override the free amounts with
`QIL_ASSUME_FREE_RAM` / `QIL_ASSUME_FREE_VRAM` (bytes, or with a K/M/G/T suffix, e.g. "512M") or with the
`available` argument.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from ...errors import InputError, ResourceError

logger = logging.getLogger(__name__)

ENV_FREE_RAM = "QIL_ASSUME_FREE_RAM"
ENV_FREE_VRAM = "QIL_ASSUME_FREE_VRAM"
# Headroom left for the OS, the host and activations when judging whether a load fits.
RAM_RESERVE_BYTES = 512 * 2**20
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    """'1073741824', '512M', '1.5G', '2GiB' -> bytes; raise InputError on anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if m is None:
        raise InputError(f"cannot read a byte count from {text!r}; use e.g. 1073741824, 512M or 1.5G")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_bytes(n: float) -> str:
    """Bytes as a short human string, e.g. '40.86 GB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the value is in kB
    return None


def available_ram() -> int | None:
    """Bytes of RAM the OS can give us now (override: QIL_ASSUME_FREE_RAM); None when it cannot be told."""
    forced = os.environ.get(ENV_FREE_RAM)
    if forced:
        return parse_bytes(forced)
    try:
        import psutil
    except ImportError:
        return _meminfo_available()
    return int(psutil.virtual_memory().available)


def available_device_memory(device: torch.device | str) -> int | None:
    """Free bytes on an accelerator (override: QIL_ASSUME_FREE_VRAM); RAM for "cpu"; None when unknown."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return available_ram()
    forced = os.environ.get(ENV_FREE_VRAM)
    if forced:
        return parse_bytes(forced)
    if dev.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(dev)
        # Blocks cached by PyTorch's allocator but unused are free for our tensors too.
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    if dev.type == "mps" and torch.backends.mps.is_available():
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return None


def check_ram(bytes_needed: int, what: str, *, available: int | None = None) -> None:
    """Raise ResourceError when `bytes_needed` (+ a reserve) exceeds the free RAM; do nothing if unknown."""
    free = available if available is not None else available_ram()
    if free is None:
        logger.debug("free RAM unknown; not checking %s (%s)", what, format_bytes(bytes_needed))
        return
    if bytes_needed + RAM_RESERVE_BYTES > free:
        raise ResourceError(
            f"not enough RAM for {what}: needs {format_bytes(bytes_needed)} plus {format_bytes(RAM_RESERVE_BYTES)} "
            f"headroom, {format_bytes(free)} available. Close other programs or unload other models, use a smaller "
            "file (the fp8 checkpoint halves the transformer), or load straight to the GPU."
        )


def check_device_memory(
    bytes_needed: int, device: torch.device | str, what: str, *, available: int | None = None
) -> None:
    """Raise ResourceError when `bytes_needed` exceeds the free memory of `device` (RAM for "cpu")."""
    dev = torch.device(device)
    if dev.type == "cpu":
        check_ram(bytes_needed, what, available=available)
        return
    free = available if available is not None else available_device_memory(dev)
    if free is None:
        logger.debug("free memory of %s unknown; not checking %s", dev, what)
        return
    if bytes_needed > free:
        raise ResourceError(
            f"not enough memory on {dev} for {what}: needs {format_bytes(bytes_needed)}, {format_bytes(free)} free. "
            "Unload other models, use the fp8 checkpoint, or load to the CPU and let the memory manager stream it."
        )
