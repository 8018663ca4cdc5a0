"""Sampler options for LoRAs and fine-tunes trained for another noise schedule (the default is the reference).

The reference schedule shifts the grid s = 1, 1 - 1/S, ..., 1/S with mu = sqrt(condition tokens / 256):
linear: sigma = mu / (mu + (1/s - 1)). Options, all off by default (then `scheduler.get_sigmas` runs unchanged):
- `shift`: a fixed mu instead of sqrt(L/256) (e.g. 3.0 keeps the schedule independent of the image size);
- `time_shift="exponential"`: sigma = e^mu / (e^mu + (1/s - 1)), diffusers' `time_shift_type="exponential"`,
  which few-step distillations use; lightx2v's Qwen-Image-Lightning config is exponential with mu = ln 3;
- `sigmas`: the noise levels themselves, one per step (a trailing 0 is allowed and is the end), used as given;
- cfg 1 is simply `cfg=1` on the pipelines: no negative prompt is encoded and no negative pass runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import InputError
from .scheduler import calculate_mu, get_sigmas

TIME_SHIFTS = ("linear", "exponential")
LIGHTNING_SHIFT = math.log(3.0)  # lightx2v Qwen-Image-Lightning: exponential time shift with base/max shift ln 3


@dataclass(frozen=True)
class SamplerOptions:
    """How the noise levels are chosen; `SamplerOptions()` is the reference schedule."""

    shift: float | None = None  # fixed mu; None = sqrt(condition tokens / 256)
    time_shift: str = "linear"
    sigmas: tuple[float, ...] | None = None  # custom noise levels (not shifted), one per step

    def __post_init__(self) -> None:
        if self.time_shift not in TIME_SHIFTS:
            raise InputError(f"time_shift must be one of {', '.join(TIME_SHIFTS)}, got {self.time_shift!r}")
        if self.shift is not None:
            number = isinstance(self.shift, (int, float)) and not isinstance(self.shift, bool)
            if not number or not math.isfinite(self.shift):
                raise InputError(f"shift must be a finite number or None (automatic), got {self.shift!r}")
            if self.time_shift == "linear" and self.shift <= 0:
                raise InputError(f"shift (mu) must be > 0 with the linear time shift, got {self.shift}")
        if self.sigmas is not None:
            object.__setattr__(self, "sigmas", check_sigmas(self.sigmas))

    @property
    def is_reference(self) -> bool:
        """True when these options give the reference schedule."""
        return self.shift is None and self.time_shift == "linear" and self.sigmas is None

    def resolve_steps(self, steps: int) -> int:
        """The step count: that of custom sigmas when given, else `steps`."""
        return len(self.sigmas) if self.sigmas is not None else steps

    def schedule(self, steps: int, cond_tokens: int) -> torch.Tensor:
        """fp32 noise levels [steps + 1] ending in 0 for an image of `cond_tokens` latent tokens per frame."""
        if self.sigmas is not None:
            return torch.tensor([*self.sigmas, 0.0], dtype=torch.float32)
        mu = calculate_mu(cond_tokens) if self.shift is None else float(self.shift)
        # exponential: sigma = e^mu / (e^mu + (1/s - 1)), which is the linear shift's formula with mu := e^mu
        return get_sigmas(steps, mu if self.time_shift == "linear" else math.exp(mu))

    def describe(self) -> str:
        """One line for logs."""
        if self.is_reference:
            return "reference schedule"
        if self.sigmas is not None:
            return f"custom sigmas ({len(self.sigmas)} steps)"
        mu = "sqrt(L/256)" if self.shift is None else f"{self.shift:g}"
        return f"{self.time_shift} time shift, mu {mu}"


def check_sigmas(values: Any) -> tuple[float, ...]:
    """Custom sigmas: numbers in (0, 1], strictly decreasing, optionally ending in one 0 (dropped here)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().reshape(-1).tolist()
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise InputError(f"sigmas must be a list of numbers, got {type(values).__name__}")
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise InputError(f"sigmas must be numbers, got {list(values)!r}") from e
    if out and out[-1] == 0:
        out = out[:-1]
    if not out:
        raise InputError("sigmas is empty: give one noise level per step, e.g. '1.0, 0.75, 0.5, 0.25'")
    if not all(math.isfinite(v) and 0 < v <= 1 for v in out):
        raise InputError(f"sigmas must lie in (0, 1] (a final 0 is allowed), got {out}")
    if any(b >= a for a, b in zip(out, out[1:])):
        raise InputError(f"sigmas must be strictly decreasing, got {out}")
    return tuple(out)


def parse_sigmas(text: str) -> tuple[float, ...] | None:
    """'1, 0.9, 0.6, 0.3' (commas or spaces) -> checked sigmas; an empty string -> None (the schedule decides)."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        return None
    try:
        values = [float(p) for p in parts]
    except ValueError as e:
        raise InputError(f"sigmas must be numbers separated by commas, got {text!r}") from e
    return check_sigmas(values)


def schedule_for(options: SamplerOptions | None, steps: int, cond_tokens: int) -> torch.Tensor:
    """The pipelines' noise levels: the reference `get_sigmas(steps, calculate_mu(L))` unless options say else."""
    if options is None or options.is_reference:
        return get_sigmas(steps, calculate_mu(cond_tokens))
    return options.schedule(steps, cond_tokens)


def check_options(options: Any) -> SamplerOptions | None:
    """The `sampler` argument of the pipelines: None or a SamplerOptions."""
    if options is not None and not isinstance(options, SamplerOptions):
        raise InputError(f"sampler must be a SamplerOptions or None, got {type(options).__name__}")
    return options


__all__ = ["LIGHTNING_SHIFT", "TIME_SHIFTS", "SamplerOptions", "check_sigmas", "parse_sigmas", "schedule_for"]
