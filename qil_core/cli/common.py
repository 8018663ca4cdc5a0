"""Helpers shared by the CLI command modules: argument types, reading layered inputs, writing PNG outputs."""

from __future__ import annotations

import argparse
import logging
import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ..checks import check_number
from ..errors import InputError, OutputPathError
from ..fsutil import STAGING_PREFIX, name_problem
from ..layers.export import read_layer_pngs
from ..layers.psd import read_psd
from ..layers.recolor import parse_color
from ..layers.stack import MAX_CANVAS_SIDE, LayerStack
from ..layers.transform import MAX_SCALE
from ..resources import format_bytes

logger = logging.getLogger(__name__)

PSD_SUFFIXES = (".psd", ".psb")
IMAGE_SUFFIXES = (".png", ".webp", ".tif", ".tiff", ".zip")  # .zip: one archive from export_zip
T = TypeVar("T")


def argtype(fn: Callable[[str], T], what: str) -> Callable[[str], T]:
    """Wrap a parser that raises InputError/ValueError into an argparse type named `what` (shown in usage errors)."""

    def parse(text: str) -> T:
        try:
            return fn(text)
        except ValueError as exc:  # InputError is a ValueError; plain ValueErrors come from int()/float()
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = what
    return parse


def _finite(text: str) -> float:
    """A finite float from text."""
    return check_number(repr(text), float(text))


def _unit(text: str) -> float:
    """A float in 0..1 from text."""
    return check_number(repr(text), float(text), 0.0, 1.0)


def _scale(text: str) -> float:
    """A scale factor in (0, MAX_SCALE] from text (the transform's own limit, named for the option)."""
    v = _finite(text)
    if not 0.0 < v <= MAX_SCALE:
        raise InputError(f"{text!r} is outside (0, {MAX_SCALE:g}]; 1 keeps the size, 0.5 halves, 2 doubles")
    return v


def _size(text: str) -> tuple[int, int]:
    """'WxH' -> (width, height), each 1..MAX_CANVAS_SIDE."""
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InputError(f"{text!r} is not WIDTHxHEIGHT (for example 512x384)")
    w, h = (int(p) for p in parts)
    if not (1 <= w <= MAX_CANVAS_SIDE and 1 <= h <= MAX_CANVAS_SIDE):
        raise InputError(f"{text!r}: each side must be 1..{MAX_CANVAS_SIDE} px")
    return w, h


def _pair(text: str) -> tuple[float, float]:
    """'DX,DY' -> (dx, dy) finite floats (negative allowed)."""
    parts = text.split(",")
    if len(parts) != 2:
        raise InputError(f"{text!r} is not DX,DY (for example 10,-5)")
    return _finite(parts[0].strip()), _finite(parts[1].strip())


finite_float = argtype(_finite, "number")
unit_float = argtype(_unit, "value in 0..1")
scale_float = argtype(_scale, "scale factor")
size_arg = argtype(_size, "size")
pair_arg = argtype(_pair, "offset")
color_arg = argtype(parse_color, "colour")  # '#RRGGBB', '#RGB', a CSS name, 'r,g,b' -> RGB in 0..1


def existing_input(path: str | os.PathLike[str], what: str = "input") -> Path:
    """`path` as a Path after checking it is an existing regular file; InputError naming it otherwise."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} file not found: {os.fspath(p)!r}; check the path")
    if not p.is_file():
        raise InputError(f"{what} {os.fspath(p)!r} is not a regular file (a folder?); give a file")
    return p


def read_stack(paths: Sequence[str | os.PathLike[str]], *, groups: str = "keep") -> LayerStack:
    """Read one PSD/PSB, or several layer images (bottom first), into a LayerStack.

    `groups` ("keep" or "flatten") is how a PSD's groups are read; the reader's warnings go to stderr.
    """
    files = [existing_input(p) for p in paths]
    if not files:
        raise InputError("no input given; pass a .psd file or layer .png files (bottom first)")
    psd = [f for f in files if f.suffix.lower() in PSD_SUFFIXES]
    if psd:
        if len(files) != 1:
            raise InputError(
                f"got {len(files)} inputs including a PSD ({psd[0].name}); pass either one PSD or layer images"
            )
        return _read_psd(files[0], groups=groups)
    bad = [f.name for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
    if bad:
        raise InputError(
            f"unsupported input type {', '.join(bad)}; expected .psd/.psb or layer images ({', '.join(IMAGE_SUFFIXES)})"
        )
    return read_layer_pngs(files)


# What a damaged PSD may raise inside a parser (beyond its typed errors): shown as one line, never a traceback.
_PARSER_ERRORS = (
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    AttributeError,
    ZeroDivisionError,
    OverflowError,
    EOFError,
    UnicodeDecodeError,
    RecursionError,
    AssertionError,
)


def _read_psd(path: Path, *, groups: str = "keep") -> LayerStack:
    """read_psd with a damaged file's stray parser errors turned into one InputError naming the file."""
    try:
        return read_psd(path, groups=groups)
    except _PARSER_ERRORS as err:
        raise InputError(
            f"cannot read PSD {os.fspath(path)!r}: the file is damaged or uses an unsupported "
            f"structure ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
        ) from err


def check_prefix(prefix: str, option: str = "--prefix") -> str:
    """Refuse a file-name prefix that is a path (it would lead outside the output folder) or otherwise unsafe."""
    if "/" in prefix or "\\" in prefix or prefix in (".", ".."):
        raise OutputPathError(
            f"{option} {prefix!r} is a path, and files named with it would land outside the "
            "output folder; give a plain name (choose the folder with --out)"
        )
    reason = name_problem(f"{prefix}_00_layer.png")
    if reason is not None:
        raise OutputPathError(f"{option} {prefix!r} is not allowed: {reason}; give a plain name")
    return prefix


def check_writable(folder: Path) -> None:
    """Fail before any work when `folder` (or, while it does not exist, its nearest existing parent) is not
    writable: a read-only disk or a folder of another user would otherwise be found after minutes of work."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return  # a path through a file: the writers report it with its own message
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"cannot write into {os.fspath(probe)!r}: the folder is read-only or not writable by "
            "this user; choose a writable output folder"
        )
    try:  # named like a staging folder, so a run killed right here leaves nothing the sweep would not remove
        os.rmdir(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=probe))
    except OSError as err:
        raise OutputPathError(
            f"cannot write into {os.fspath(probe)!r}: {err.strerror or err}; choose a writable output folder"
        ) from None


def add_psd_options(p: argparse.ArgumentParser) -> None:
    """The PSD reading options shared by the commands that read a PSD."""
    p.add_argument(
        "--groups",
        choices=("keep", "flatten"),
        default="keep",
        help="PSD groups: 'keep' keeps the layers of pass-through groups and reads other groups (blend "
        "mode, opacity, mask) as one layer each; 'flatten' reads every group as one layer",
    )


def check_suffix(path: Path, suffixes: Sequence[str], what: str) -> None:
    """Refuse an output whose extension does not match its format (a .png that holds a PSD misleads readers)."""
    if path.suffix.lower() not in suffixes:
        raise OutputPathError(f"{what} {os.fspath(path)!r} must end with {' or '.join(suffixes)}")


def log_written(paths: Sequence[Path], *, level: int = logging.INFO) -> None:
    """Log each written file with its size."""
    for p in paths:
        logger.log(level, "wrote %s (%s)", os.fspath(p), format_bytes(p.stat().st_size))
