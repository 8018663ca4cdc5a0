"""Memory probes and the one memory check made before every allocation that scales with user input.

The Linux OOM killer would otherwise stop the CLI (or the whole ComfyUI server) without a word. The available
RAM counts reclaimable page cache (psutil's `available`, else MemAvailable from /proc/meminfo). Tests and users
can simulate or override the free amounts with `QIL_ASSUME_FREE_RAM` / `QIL_ASSUME_FREE_VRAM` (bytes, or with a
K/M/G/T suffix, e.g. "512M"). Byte counts are parsed and formatted here, and only here.

This module imports no torch at module level (the layer library uses it without the model).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from .errors import InputError, ResourceError

logger = logging.getLogger(__name__)

ENV_FREE_RAM = "QIL_ASSUME_FREE_RAM"
ENV_FREE_VRAM = "QIL_ASSUME_FREE_VRAM"
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    """'1073741824', '512M', '1.5G', '2GiB' -> bytes; raise InputError on anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(text).upper())
    if m is None:
        raise InputError(f"cannot read a byte count from {text!r}; use e.g. 1073741824, 512M or 1.5G")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_bytes(n: float) -> str:
    """Bytes as a short human string, e.g. '40.86 GB' (decimal units, as disk and card makers count)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable (free + reclaimable page cache) from /proc/meminfo, or None."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the value is in kB
    return None


def available_ram_bytes() -> int | None:
    """Bytes of RAM the OS can give us now, page cache included (override: QIL_ASSUME_FREE_RAM); None if unknown."""
    forced = os.environ.get(ENV_FREE_RAM)
    if forced:
        return parse_bytes(forced)
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    found = _meminfo_available()
    if found is None and hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    return found


def available_device_bytes(device: Any) -> int | None:
    """Free bytes on a torch device (override: QIL_ASSUME_FREE_VRAM); the RAM for "cpu"; None when unknown."""
    import torch  # lazily: the layer library never needs it

    dev = torch.device(device)
    if dev.type == "cpu":
        return available_ram_bytes()
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


def check_allocation(
    nbytes: int,
    what: str,
    *,
    available: int | None = None,
    reserve: int = 0,
    hint: str = "use a smaller size or free memory",
) -> int:
    """Raise ResourceError, before allocating, when `nbytes` (+ `reserve`) exceed the available RAM.

    The message names what needed the memory, how much, and the limit. Returns `nbytes`; does nothing when
    the available RAM cannot be told.
    """
    need = int(nbytes)
    free = available if available is not None else available_ram_bytes()
    if free is None:
        logger.debug("free RAM unknown; not checking %s (%s)", what, format_bytes(need))
        return need
    if need + reserve > free:
        extra = f" plus {format_bytes(reserve)} headroom" if reserve else ""
        raise ResourceError(
            f"not enough RAM for {what}: it needs {format_bytes(need)}{extra}, but only "
            f"{format_bytes(free)} of RAM is available; {hint}"
        )
    return need
