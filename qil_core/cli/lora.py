"""Command-line options for LoRAs (`--lora FILE[:STRENGTH]`, repeatable) and the sampler schedule.

Shared by every model command: `add_lora_options` / `add_sampler_options` declare the flags, `apply_loras`
applies the LoRAs right after the model is loaded, `sampler_options` builds the pipelines' `sampler` argument.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

from ..errors import InputError

logger = logging.getLogger(__name__)


def parse_lora(text: str) -> tuple[Path, float]:
    """'FILE' or 'FILE:STRENGTH' -> (path, strength); a ':' inside a Windows drive letter is not a separator."""
    path, sep, tail = text.rpartition(":")
    if sep and path and not (len(path) == 1 and path.isalpha()):
        try:
            strength = float(tail)
        except ValueError:
            path, strength = text, 1.0
        else:
            if not math.isfinite(strength):
                raise argparse.ArgumentTypeError(f"LoRA strength must be a finite number, got {tail!r}")
    else:
        path, strength = text, 1.0
    return Path(path), strength


def add_lora_options(p: argparse.ArgumentParser) -> None:
    """--lora (repeatable) and --lora-mode."""
    g = p.add_argument_group("LoRA")
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        type=parse_lora,
        metavar="FILE[:STRENGTH]",
        help="apply a LoRA .safetensors to the transformer (strength default 1.0); repeat to stack",
    )
    g.add_argument(
        "--lora-mode",
        choices=("auto", "fly", "merge"),
        default="auto",
        help="fly/auto: low-rank branch (exact, little memory, fp8-safe); merge: folded into the weights",
    )


def add_sampler_options(p: argparse.ArgumentParser) -> None:
    """--shift, --time-shift, --sigmas (defaults: the reference schedule)."""
    g = p.add_argument_group("schedule (for LoRAs trained for another schedule; defaults = the reference)")
    g.add_argument(
        "--shift",
        type=float,
        metavar="MU",
        help="fixed mu instead of sqrt(tokens/256); Lightning LoRAs: --time-shift exponential --shift 1.0986 (ln 3)",
    )
    g.add_argument(
        "--time-shift",
        choices=("linear", "exponential"),
        default="linear",
        help="how mu shifts the noise levels (default linear, the reference)",
    )
    g.add_argument(
        "--sigmas",
        metavar="LIST",
        help="custom noise levels, one per step, e.g. '1,0.8,0.5,0.2' (overrides --steps and the shift)",
    )


def apply_loras(model: Any, args: argparse.Namespace) -> None:
    """Apply every --lora to the loaded model, in order."""
    from ..model.weights.lora_apply import load_lora

    for path, strength in getattr(args, "lora", []) or []:  # the files were checked by check_lora_files
        handle = load_lora(model, path, strength, mode=args.lora_mode)
        logger.info("applied LoRA %s at strength %g (%s)", path.name, strength, handle.entry.mode)


def check_lora_files(args: argparse.Namespace) -> None:
    """Every --lora names an existing file (checked before the model loads)."""
    for path, _ in getattr(args, "lora", []) or []:
        if not path.is_file():
            raise InputError(f"--lora {path}: file not found")


def sampler_options(args: argparse.Namespace) -> Any:
    """The pipelines' `sampler` argument from the flags (None for the reference schedule)."""
    from ..model.pipeline.sampler_options import SamplerOptions, parse_sigmas

    sigmas = parse_sigmas(args.sigmas) if getattr(args, "sigmas", None) else None
    options = SamplerOptions(
        shift=getattr(args, "shift", None), time_shift=getattr(args, "time_shift", "linear"), sigmas=sigmas
    )
    return None if options.is_reference else options


__all__ = ["add_lora_options", "add_sampler_options", "apply_loras", "parse_lora", "sampler_options"]
