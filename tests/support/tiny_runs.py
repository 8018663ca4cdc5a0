"""Fast settings for decompositions with the tiny random model on a CPU (test-only): CLI flags and node inputs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def fast_cli_args(prompt: str = "x", max_side: int = 64) -> list[str]:
    """The CLI flags of a fast run: 2 layers, 2 steps, fp32 on the CPU, a custom resolution of `max_side`."""
    return [
        *("--layers", "2", "--steps", "2", "--dtype", "fp32", "--device", "cpu", "--prompt", prompt),
        *("--resolution", "custom", "--max-side", str(max_side)),
    ]


def fast_node_settings(**changes: Any) -> dict[str, Any]:
    """Decompose Image's inputs for a fast run (2 layers, 2 steps, 64 px), with `changes` applied."""
    settings: dict[str, Any] = dict(
        prompt="a red box",
        negative_prompt=" ",
        layers=2,
        steps=2,
        cfg=4.0,
        cfg_normalize=True,
        seed=7,
        resolution="custom",
        max_side=64,
        output_size="processing",
    )
    return {**settings, **changes}


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread: tiny models gain nothing from threads, and two threads on a loaded 2-core runner make
    convolutions 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
