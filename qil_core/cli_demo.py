"""The `demo` command: the main job on the embedded sample scene, no weights and no input files needed."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .cli_common import size_arg
from .demo import run_demo
from .sample import DEFAULT_SIZE

logger = logging.getLogger(__name__)

DEFAULT_OUT = "qil_demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` command."""
    p = subparsers.add_parser(
        "demo", help="run the layer pipeline on a built-in sample scene",
        description="Draw a layered sample scene (sky, sun, hills, house, logo; blend modes and opacity), recolor "
                    "one layer and move/scale another, and write into DIR: sample.png and sample.psd (original), "
                    "sample_edited.png and sample_edited.psd, and layers/sample_NN_NAME.png. Every PSD is "
                    "checked structurally and read back. Needs no model weights.",
    )
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), metavar="DIR",
                   help=f"folder to write into, created if missing (default ./{DEFAULT_OUT})")
    p.add_argument("--size", type=size_arg, default=DEFAULT_SIZE, metavar="WxH",
                   help=f"canvas size (default {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]})")
    p.add_argument("--overwrite", action="store_true", help="replace files of an earlier demo run")
    p.set_defaults(handler=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    """Handler of `demo`: run it and log the summary (files, sizes, timings)."""
    report = run_demo(args.out, size=args.size, overwrite=args.overwrite)
    for line in report.summary_lines():
        logger.info("%s", line)
    return 0
