"""Conversion commands: `compose`, `layers-to-psd`, `psd-to-layers` and `info` (layers bottom first)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..fsutil import atomic_write_bytes, check_free, safe_name, write_group
from ..layers.composite import composite
from ..layers.export import export_zip, layer_file_names, png_items, write_png
from ..layers.psd import read_psd_merged, write_psd
from ..layers.stack import LayerStack
from .common import (
    PSD_SUFFIXES,
    add_psd_options,
    check_prefix,
    check_suffix,
    color_arg,
    log_written,
    read_stack,
    size_arg,
)

logger = logging.getLogger(__name__)

INPUTS_HELP = "one .psd, or layer images (.png, bottom first; or one ZIP from psd-to-layers --zip)"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `compose`, `layers-to-psd`, `psd-to-layers` and `info`."""
    p = subparsers.add_parser(
        "compose",
        help="flatten a PSD or layer PNGs into one PNG",
        description="Flatten with our compositor (all 26 blend modes, opacity, visibility).",
    )
    p.add_argument("inputs", nargs="+", metavar="IN", help=INPUTS_HELP)
    p.add_argument("--out", required=True, type=Path, metavar="OUT.png", help="PNG to write")
    p.add_argument(
        "--background",
        type=color_arg,
        metavar="COLOR",
        help="fill under the layers, e.g. '#ffffff' (default: transparent)",
    )
    p.add_argument(
        "--use-merged",
        action="store_true",
        help="for a PSD: write Photoshop's stored merged image instead of compositing the layers (use "
        "it when the reader warns about effects or adjustments it cannot draw)",
    )
    add_psd_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(handler=run_compose)

    p = subparsers.add_parser(
        "layers-to-psd",
        help="stack layer PNGs (bottom first) into a layered PSD",
        description="Stack images into a PSD, first file at the bottom. Names come from the file stems (or the "
        "layer record psd-to-layers stores in each PNG); layers are cropped to their content. Images "
        "without a record are placed at the top-left of a canvas as large as the largest image.",
    )
    p.add_argument("inputs", nargs="+", metavar="LAYER.png", help="layer images, bottom first (or one ZIP)")
    p.add_argument("--out", required=True, type=Path, metavar="OUT.psd", help="PSD to write")
    p.add_argument("--names", nargs="+", metavar="NAME", help="layer names, one per input, bottom first")
    p.add_argument("--canvas", type=size_arg, metavar="WxH", help="canvas size (default: the largest input)")
    p.add_argument("--depth", type=int, choices=(8, 16), default=8, help="bits per channel (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(handler=run_layers_to_psd)

    p = subparsers.add_parser(
        "psd-to-layers",
        help="export every layer of a PSD as a PNG (plus a manifest)",
        description="Write one RGBA PNG per layer, named PREFIX_INDEX_NAME.png bottom first with zero-padded "
        "indices, and PREFIX_manifest.json (canvas, names, offsets, opacity, blend, visibility). "
        "Each PNG also carries its layer record, so layers-to-psd restores the document.",
    )
    p.add_argument("input", metavar="IN", help=INPUTS_HELP)
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write into (created)")
    p.add_argument("--prefix", help="file name prefix (default: the input's stem)")
    p.add_argument(
        "--cropped",
        action="store_true",
        help="store each layer cropped to its content, offsets in the manifest (default: full-canvas "
        "PNGs, which cut off any part of a layer lying outside the canvas; --cropped keeps it)",
    )
    p.add_argument("--zip", action="store_true", help="write one ZIP (PNGs + manifest.json) instead of loose files")
    add_psd_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(handler=run_psd_to_layers)

    p = subparsers.add_parser(
        "info",
        help="list the layers of a PSD or layer PNGs",
        description="Print canvas size and one row per layer, bottom first.",
    )
    p.add_argument("inputs", nargs="+", metavar="IN", help=INPUTS_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_psd_options(p)
    p.set_defaults(handler=run_info)


def run_compose(args: argparse.Namespace) -> int:
    """Handler of `compose`."""
    check_suffix(args.out, (".png",), "compose output")
    check_free([args.out], overwrite=args.overwrite)
    t0 = time.perf_counter()
    bg = None if args.background is None else (*args.background, 1.0)
    if args.use_merged:
        if len(args.inputs) != 1 or Path(args.inputs[0]).suffix.lower() not in PSD_SUFFIXES:
            raise InputError("--use-merged takes one .psd/.psb input (its stored merged image)")
        flat = read_psd_merged(args.inputs[0])
        if bg is not None:
            a = flat[..., 3:]
            flat[..., :3] = flat[..., :3] * a + np.asarray(bg[:3], np.float32) * (1 - a)
            flat[..., 3] = 1.0
        log_written([write_png(flat, args.out, overwrite=args.overwrite)])
        logger.info(
            "compose: stored merged image %dx%d in %.2f s", flat.shape[1], flat.shape[0], time.perf_counter() - t0
        )
        return 0
    stack = read_stack(args.inputs, groups=args.groups)
    flat = composite(stack, background=bg)
    log_written([write_png(flat, args.out, overwrite=args.overwrite)])
    logger.info(
        "compose: %d layers on %dx%d in %.2f s", len(stack), stack.width, stack.height, time.perf_counter() - t0
    )
    return 0


def run_layers_to_psd(args: argparse.Namespace) -> int:
    """Handler of `layers-to-psd`."""
    check_suffix(args.out, (".psd",), "layers-to-psd output")
    check_free([args.out], overwrite=args.overwrite)
    if any(Path(p).suffix.lower() in PSD_SUFFIXES for p in args.inputs):
        raise InputError("layers-to-psd takes layer images; to re-save or edit a PSD use 'edit'")
    t0 = time.perf_counter()
    stack = read_stack(args.inputs)
    if args.names is not None:
        if len(args.names) != len(stack):
            raise InputError(f"--names gives {len(args.names)} names for {len(stack)} layers; give one per input")
        stack = stack.replace(layers=[layer.replace(name=n) for layer, n in zip(stack.layers, args.names)])
    if args.canvas is not None:
        stack = LayerStack(args.canvas[0], args.canvas[1], stack.layers)
    path = write_psd(stack, args.out, depth=args.depth, overwrite=args.overwrite)
    log_written([path])
    logger.info(
        "layers-to-psd: %d layers, canvas %dx%d, %d-bit, in %.2f s",
        len(stack),
        stack.width,
        stack.height,
        args.depth,
        time.perf_counter() - t0,
    )
    return 0


def manifest(stack: LayerStack, *, source: str, files: list[str] | None = None) -> dict:
    """A JSON-ready description of a stack: canvas, order and one record per layer (file when exported)."""
    records = []
    for i, layer in enumerate(stack.layers):
        rec: dict[str, object] = {
            "index": i,
            "name": layer.name,
            "x": layer.x,
            "y": layer.y,
            "width": layer.width,
            "height": layer.height,
            "opacity": layer.opacity,
            "blend_mode": layer.blend_mode,
            "visible": layer.visible,
        }
        if files is not None:
            rec["file"] = files[i]
        records.append(rec)
    return {
        "version": 1,
        "source": source,
        "canvas": [stack.width, stack.height],
        "order": "bottom first",
        "layers": records,
    }


def run_psd_to_layers(args: argparse.Namespace) -> int:
    """Handler of `psd-to-layers`."""
    out_dir: Path = args.out
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {os.fspath(out_dir)!r} is a file; give a folder (it is created if missing)")
    if args.prefix is not None:
        check_prefix(args.prefix)
    t0 = time.perf_counter()
    stack = read_stack([args.input], groups=args.groups)
    prefix = args.prefix if args.prefix is not None else safe_name(Path(args.input).stem, fallback="layer")
    full = not args.cropped
    if args.zip:
        target = out_dir / f"{prefix}.zip"
        check_free([target], overwrite=args.overwrite)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [export_zip(stack, target, full_canvas=full, prefix=prefix, overwrite=args.overwrite)]
    else:
        names = layer_file_names(stack, prefix)
        manifest_path = out_dir / f"{prefix}_manifest.json"
        check_free([out_dir / n for n in names] + [manifest_path], overwrite=args.overwrite)
        doc = {**manifest(stack, source=Path(args.input).name, files=names), "full_canvas": full}
        data = json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")

        def write_manifest(staged: Path) -> Path:
            return atomic_write_bytes(staged, data)

        # The PNGs and their manifest are one group: all replaced together, or (on any failure) none changes.
        items = png_items(stack, out_dir, prefix=prefix, full_canvas=full) + [(manifest_path, write_manifest)]
        written = write_group(items, overwrite=args.overwrite, make_dirs=True)
    log_written(written)
    logger.info(
        "psd-to-layers: %d layers (%s) in %.2f s",
        len(stack),
        "cropped" if args.cropped else "full canvas",
        time.perf_counter() - t0,
    )
    return 0


def layer_table(stack: LayerStack) -> str:
    """A plain-text table of the stack: canvas line, then index, name, offset, size, opacity, blend, visible."""
    header = ("#", "name", "x", "y", "width", "height", "opacity", "blend", "visible")
    rows = [header] + [
        (
            str(i),
            layer.name,
            str(layer.x),
            str(layer.y),
            str(layer.width),
            str(layer.height),
            f"{layer.opacity:.3f}",
            layer.blend_mode,
            "yes" if layer.visible else "no",
        )
        for i, layer in enumerate(stack.layers)
    ]
    widths = [max(_display_width(r[c]) for r in rows) for c in range(len(header))]
    right = {0, 2, 3, 4, 5, 6}  # numbers align right
    lines = [f"canvas {stack.width}x{stack.height}, {len(stack)} layers, bottom first"]
    for r in rows:
        pads = [" " * (widths[c] - _display_width(r[c])) for c in range(len(header))]
        cells = [pads[c] + r[c] if c in right else r[c] + pads[c] for c in range(len(header))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _display_width(text: str) -> int:
    """Terminal columns of `text`: East Asian wide/fullwidth characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def run_info(args: argparse.Namespace) -> int:
    """Handler of `info`: the table (or JSON) goes to stdout, so it can be piped."""
    stack = read_stack(args.inputs, groups=args.groups)
    if args.json:
        doc = manifest(stack, source=", ".join(Path(p).name for p in args.inputs))
        sys.stdout.write(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    else:
        sys.stdout.write(layer_table(stack))
    return 0
