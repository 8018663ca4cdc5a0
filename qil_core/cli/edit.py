"""The `edit` command: per-layer transform / recolor / property edits and stack edits, applied left to right."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..errors import InputError
from ..fsutil import check_free
from ..layers.composite import composite
from ..layers.edit_steps import LayerEdit, StackEdit, Step, apply_edits
from ..layers.export import write_png
from ..layers.psd import write_psd
from ..layers.replace import ALPHA_POLICIES
from ..layers.resample import INTERPOLATIONS
from ..layers.stack import BLEND_MODES
from ..layers.transform import GROUP_PIVOTS
from .common import (
    argtype,
    check_suffix,
    color_arg,
    finite_float,
    log_written,
    pair_arg,
    read_stack,
    scale_float,
    size_arg,
    unit_float,
)

logger = logging.getLogger(__name__)

EDIT_HELP = """\
How addressing works:
  Layers are counted bottom first (0 = bottom, -1 = top) or named exactly ("Sun"). KEYS may list several:
  "0,2", "1-3", "Sun,House" (whatever --layer accepts, --delete/--keep accept too).
  Negative values are fine: --layer -1, --move -10,5, --move-to -1:0, --hue -40.
  --layer KEYS starts a group; every per-layer option after it, up to the next --layer or stack edit,
  applies to those layers (like ffmpeg's per-stream options). Within a group the order is fixed:
  recolor, then transform (one resample for move+scale+rotate+flip), then opacity/blend/rename/visibility.
  The layers of one group are transformed together: --scale, --rotate and --flip-h/-v turn them about the
  centre of their common box (--pivot group, the default), so they move as one; --pivot layer transforms
  each about its own centre, --pivot canvas about the canvas centre, --pivot X,Y about that point.
  Groups and stack edits run left to right, each on the stack as the previous step left it; a stack edit
  ends the current group, so put --layer again after it. Names stay valid while indices shift.

examples:
  python -m qil_core edit in.psd --out out.psd --layer 2 --move 10,-5 --scale 1.5 --layer Sky --hue 40 --saturation 0.2
  python -m qil_core edit in.psd --out out.psd --layer -1 --rotate 30 --opacity 0.5 --delete 0 \\
      --move-to 2:0 --preview p.png
  python -m qil_core edit in.psd --out out.psd --layer Logo --replace-color "#1f244c:#802020:0.2" --blend multiply
  python -m qil_core edit in.psd --out out.psd --layer "Sun,Sun glow" --flip-h --rotate 15 --pivot canvas
  python -m qil_core edit in.psd --out out.psd --replace-pixels Logo=logo_edited.png --replace-alpha keep
"""


def _steps(namespace: argparse.Namespace) -> list[Step]:
    """The ordered step list on the namespace (created per parse: a shared default list would leak)."""
    if getattr(namespace, "steps", None) is None:
        namespace.steps = []
    return namespace.steps


class _LayerAction(argparse.Action):
    """`--layer KEYS`: start a new group."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        _steps(namespace).append(LayerEdit(str(values)))


class _LayerOption(argparse.Action):
    """A per-layer option: recorded in the most recent group, refused without one or when repeated."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        steps = _steps(namespace)
        if not steps or not isinstance(steps[-1], LayerEdit):
            after = "a stack edit" if steps else "nothing"
            parser.error(f"{option_string} edits one layer: put --layer INDEX|NAME before it (it came after {after})")
        group = steps[-1]
        value = self.const if self.nargs == 0 else values
        if self.dest in group.options:
            parser.error(f"{option_string} conflicts with an earlier option for --layer {group.keys}")
        group.options[self.dest] = value


class _StackOption(argparse.Action):
    """A stack edit: appended as its own step."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        _steps(namespace).append(StackEdit(self.dest, self.const if self.nargs == 0 else values))


def _replace_arg(text: str) -> tuple[tuple[float, float, float], tuple[float, float, float], float | None]:
    """'FROM:TO[:TOL]' -> (from RGB, to RGB, tolerance or None)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(
            f"replace-color: {text!r} is not FROM:TO[:TOLERANCE] (e.g. #00ff00:#0000ff:0.2)"
        )
    tol = unit_float(parts[2]) if len(parts) == 3 else None
    return color_arg(parts[0]), color_arg(parts[1]), tol


def _tint_arg(text: str) -> tuple[tuple[float, float, float], float]:
    """'COLOR[:STRENGTH]' -> (RGB, strength); strength defaults to 0.5."""
    colour, _, strength = text.partition(":")
    return color_arg(colour), unit_float(strength) if strength else 0.5


def _replace_pixels_arg(text: str) -> tuple[str, str]:
    """'LAYER=FILE' -> (layer key, picture path)."""
    key, sep, path = text.partition("=")
    if not sep or not key or not path:
        raise argparse.ArgumentTypeError(f"replace-pixels: {text!r} is not LAYER=FILE (e.g. Logo=logo_edited.png)")
    return key, path


def _pivot(text: str) -> str | tuple[float, float]:
    """'group' | 'layer' | 'canvas' | 'X,Y' -> the pivot of a group transform."""
    if text in GROUP_PIVOTS:
        return text
    parts = text.split(",")
    if len(parts) != 2:
        raise InputError(f"{text!r} is not {', '.join(GROUP_PIVOTS)} or X,Y canvas coordinates (for example 120,80)")
    return finite_float(parts[0].strip()), finite_float(parts[1].strip())


pivot_arg = argtype(_pivot, "pivot")


def _move_to_arg(text: str) -> tuple[str, int]:
    """'FROM:TO' -> (layer key, target index)."""
    key, sep, to = text.rpartition(":")
    if not sep or not key or not to.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"move-to: {text!r} is not FROM:TO (e.g. 2:0 moves layer 2 to the bottom)")
    return key, int(to)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `edit` command."""
    p = subparsers.add_parser(
        "edit",
        help="transform, recolor and restack layers of a PSD",
        description=EDIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="IN", help="one .psd, or layer images bottom first (or one ZIP)")
    p.add_argument("--out", required=True, type=Path, metavar="OUT.psd", help="edited PSD to write")
    p.add_argument("--preview", type=Path, metavar="OUT.png", help="also write the flattened result as PNG")
    p.add_argument("--depth", type=int, choices=(8, 16), default=8, help="bits per channel of the PSD (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(handler=run_edit, steps=None)

    g = p.add_argument_group("layer selection")
    g.add_argument("--layer", action=_LayerAction, metavar="KEYS", help="start a group: index, name, or list")

    g = p.add_argument_group("transform (per --layer)")
    lo = {"action": _LayerOption}
    g.add_argument("--move", **lo, type=pair_arg, metavar="DX,DY", help="move by DX,DY px (y down)")
    g.add_argument("--scale", **lo, type=scale_float, metavar="S", help="scale both axes about the pivot")
    g.add_argument("--scale-x", **lo, type=scale_float, metavar="SX", help="horizontal scale")
    g.add_argument("--scale-y", **lo, type=scale_float, metavar="SY", help="vertical scale")
    g.add_argument(
        "--rotate",
        **lo,
        dest="rotation",
        type=finite_float,
        metavar="DEG",
        help="rotate clockwise in degrees; the layer grows to fit",
    )
    g.add_argument("--flip-h", **lo, nargs=0, const=True, help="mirror left-right")
    g.add_argument("--flip-v", **lo, nargs=0, const=True, help="mirror top-bottom")
    g.add_argument("--interpolation", **lo, choices=INTERPOLATIONS, help="resampling filter (default lanczos)")
    g.add_argument(
        "--pivot",
        **lo,
        type=pivot_arg,
        metavar="P",
        help="centre of scale, rotation and flips for the group's layers: group (their common box, "
        "default), layer (each its own), canvas, or X,Y",
    )

    g = p.add_argument_group("recolor (per --layer; alpha never changes)")
    g.add_argument("--hue", **lo, dest="hue_shift", type=finite_float, metavar="DEG", help="hue shift in degrees")
    for flag, what in (
        ("saturation", "-1 grey .. 1 double, relative"),
        ("lightness", "-1 black .. 1 white"),
        ("brightness", "-1..1 added to every channel"),
        ("contrast", "-1 flat .. 1 threshold"),
    ):
        g.add_argument(f"--{flag}", **lo, type=finite_float, metavar="V", help=what)
    g.add_argument(
        "--tint",
        **lo,
        type=_tint_arg,
        metavar="COLOR[:S]",
        help="tint towards COLOR with strength S in 0..1 (default 0.5), e.g. '#ff0000:0.5'",
    )
    g.add_argument(
        "--replace-color",
        **lo,
        dest="replace",
        type=_replace_arg,
        metavar="FROM:TO[:TOL]",
        help="replace colour FROM by TO within tolerance TOL in 0..1 (default 0.1)",
    )
    g.add_argument("--invert", **lo, nargs=0, const=True, help="invert RGB")

    g = p.add_argument_group("layer properties (per --layer)")
    g.add_argument("--opacity", **lo, type=unit_float, metavar="A", help="set the layer opacity, 0..1")
    g.add_argument(
        "--blend",
        **lo,
        dest="blend_mode",
        choices=BLEND_MODES,
        metavar="MODE",
        help=f"set the blend mode: {', '.join(BLEND_MODES)}",
    )
    g.add_argument("--rename", **lo, metavar="NAME", help="set the layer name")
    g.add_argument("--hide", **lo, dest="visible", nargs=0, const=False, help="make the layer invisible")
    g.add_argument("--show", **lo, dest="visible", nargs=0, const=True, help="make the layer visible")

    g = p.add_argument_group("stack edits (each is one step; indices as the stack is at that point)")
    so = {"action": _StackOption}
    g.add_argument("--delete", **so, metavar="KEYS", help="delete layers")
    g.add_argument(
        "--keep", **so, metavar="KEYS", help="keep only these layers, in the order listed (so it can also reorder)"
    )
    g.add_argument(
        "--move-to",
        **so,
        dest="move_to",
        type=_move_to_arg,
        metavar="FROM:TO",
        help="move layer FROM to index TO (2:0 sends layer 2 to the bottom)",
    )
    g.add_argument("--merge-down", **so, dest="merge_down", metavar="KEY", help="merge a layer into the one below")
    g.add_argument("--duplicate", **so, metavar="KEY", help="copy a layer; the copy goes right above it")
    g.add_argument("--drop-empty", **so, dest="drop_empty", nargs=0, const=True, help="remove fully transparent layers")
    g.add_argument("--resize", **so, type=size_arg, metavar="WxH", help="scale the whole document to WxH")
    g.add_argument(
        "--replace-pixels",
        **so,
        dest="replace_pixels",
        type=_replace_pixels_arg,
        metavar="LAYER=FILE",
        help="replace a layer's pixels with an edited picture (any size: scaled back to the canvas or "
        "the layer's box, whichever it shows); the alpha follows --replace-alpha",
    )
    p.add_argument(
        "--replace-alpha",
        choices=ALPHA_POLICIES,
        default="keep",
        help="alpha for --replace-pixels: keep the layer's (default), take the picture's (RGBA), or "
        "re-matte by difference against the unedited layer",
    )


def run_edit(args: argparse.Namespace) -> int:
    """Handler of `edit`: read, apply the steps, write the PSD (and the preview PNG)."""
    steps: list[Step] = args.steps or []
    if not steps:
        raise InputError("edit: no edit given; add e.g. --layer 0 --hue 30, or --delete 1 (see edit --help)")
    check_suffix(args.out, (".psd",), "edit output")
    outs = [args.out]
    if args.preview is not None:
        check_suffix(args.preview, (".png",), "preview")
        outs.append(args.preview)
    check_free(outs, overwrite=args.overwrite)
    for step in steps:
        if isinstance(step, StackEdit) and step.op == "replace_pixels":
            step.value = (*step.value[:2], args.replace_alpha)
    t0 = time.perf_counter()
    stack = read_stack(args.inputs)
    edited = apply_edits(stack, steps)
    flat = composite(edited)
    written = [write_psd(edited, args.out, depth=args.depth, overwrite=args.overwrite, merged=flat)]
    if args.preview is not None:
        written.append(write_png(flat, args.preview, overwrite=args.overwrite))
    log_written(written)
    logger.info(
        "edit: %d steps, %d -> %d layers in %.2f s", len(steps), len(stack), len(edited), time.perf_counter() - t0
    )
    return 0
