"""RAM and device-memory checks made before allocating, so a too-large job fails with a message (robustness L9).

The probes, the byte parsing and formatting and the `QIL_ASSUME_FREE_RAM` / `QIL_ASSUME_FREE_VRAM` overrides live
in `qil_core.resources` (re-exported here for the model code); this module adds the checks for loading weights,
which keep a reserve for the OS and the host. Tests can also pass the free amount as `available`.
"""

from __future__ import annotations

import logging

import torch

from ...errors import ResourceError
from ...resources import (  # noqa: F401 (ENV_*, parse_bytes: re-exported for the model code and tests)
    ENV_FREE_RAM,
    ENV_FREE_VRAM,
    available_device_bytes,
    available_ram_bytes,
    check_allocation,
    format_bytes,
    parse_bytes,
)

logger = logging.getLogger(__name__)

# Headroom left for the OS, the host and activations when judging whether a load fits.
RAM_RESERVE_BYTES = 512 * 2**20


# The model code's names for the probes in qil_core.resources (one implementation: the RAM for "cpu").
available_ram = available_ram_bytes
available_device_memory = available_device_bytes


def check_ram(bytes_needed: int, what: str, *, available: int | None = None) -> None:
    """Raise ResourceError when `bytes_needed` (+ a reserve) exceeds the free RAM; do nothing if unknown."""
    check_allocation(
        bytes_needed,
        what,
        available=available,
        reserve=RAM_RESERVE_BYTES,
        hint="close other programs or unload other models, use a smaller file (the fp8 checkpoint "
        "halves the transformer), or load straight to the GPU",
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
