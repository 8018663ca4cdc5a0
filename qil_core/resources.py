"""How much RAM is free, and byte counts as text: the one probe shared by the layer engine and the model code.

psutil is optional: without it the available RAM (which counts reclaimable page cache) is read from
/proc/meminfo. `QIL_ASSUME_FREE_RAM` (bytes, or with a K/M/G/T suffix, e.g. "512M") overrides the probe, so
tests and users can simulate a small machine. Nothing here imports torch, ComfyUI or the model package.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import InputError, ResourceError

ENV_FREE_RAM = "QIL_ASSUME_FREE_RAM"
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


def check_allocation(need: int, what: str, fix: str, *, available: int | None = None) -> None:
    """Raise ResourceError naming `what`, its size and the free RAM when `need` bytes do not fit; else nothing.

    `available` overrides the probe; an unknown amount of free RAM is not checked.
    """
    free = available if available is not None else available_ram()
    if free is not None and need > free:
        raise ResourceError(
            f"{what} needs {format_bytes(need)} of RAM, but only {format_bytes(free)} is available; {fix}"
        )
