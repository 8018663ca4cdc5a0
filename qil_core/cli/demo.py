"""The `demo` command: the layer job on the embedded sample scene, then a tiny-model decomposition of it.

This module alone defines the command (parser and handler). The layer part is `qil_core.demo.job.run_demo`;
the model part is `cli.model.decompose_demo` (a tiny RANDOM model, so it needs no weights). `--no-model`
skips the model part.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..demo.job import DemoReport, run_demo
from ..demo.scene import DEFAULT_SIZE
from ..layers.stack import LayerStack
from . import model as cli_model
from .common import size_arg

logger = logging.getLogger(__name__)

DEFAULT_OUT = "qil_demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` command."""
    p = subparsers.add_parser(
        "demo",
        help="run the layer pipeline on a built-in sample scene",
        description="Draw a layered sample scene (sky, sun, hills, house, logo; blend modes and opacity), recolor "
        "one layer and move/scale another, and write into DIR: sample.png and sample.psd (original), "
        "sample_edited.png and sample_edited.psd, and layers/sample_NN_NAME.png. Every PSD is "
        "checked structurally and read back. Needs no model weights."
        " Then it decomposes the sample scene (or --image) with a tiny model of RANDOM weights, written "
        "to a temporary folder, into decomposed.psd and decomposed_layers/: the layers are noise, the "
        "run shows the model pipeline end to end in seconds. --no-model skips it.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_OUT),
        metavar="DIR",
        help=f"folder to write into, created if missing (default ./{DEFAULT_OUT})",
    )
    p.add_argument(
        "--size",
        type=size_arg,
        default=DEFAULT_SIZE,
        metavar="WxH",
        help=f"canvas size (default {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace files of an earlier demo run")
    g = p.add_argument_group("model part (decomposes with a tiny RANDOM model: shows the pipeline, not quality)")
    g.add_argument("--image", type=Path, metavar="IMAGE", help="decompose this image instead of the sample scene")
    g.add_argument("--no-model", dest="model", action="store_false", help="skip the model decomposition")
    p.set_defaults(handler=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    """Handler of `demo`: the layer demo and (unless --no-model) the tiny-model decomposition, published together
    as one group of files (a failure, a full disk included, leaves none of them); logs the summary."""
    decomposed: list[LayerStack] = []
    model_items: list[tuple[Path, Any]] = []

    def model_part(report: DemoReport) -> list[tuple[Path, Any]]:
        stack, items, seconds = cli_model.decompose_demo(
            args.out, image=args.image, overwrite=args.overwrite, size=args.size
        )
        report.timings["decompose (tiny random model)"] = seconds
        decomposed.append(stack)
        model_items.extend(items)
        return items

    if args.model:
        cli_model.demo_targets(args.out, args.overwrite)  # refuse before the layer demo computes anything
    report = run_demo(args.out, size=args.size, overwrite=args.overwrite, more=model_part if args.model else None)
    if decomposed:
        report.files["decomposed psd"] = model_items[0][0]
        for i, (path, _) in enumerate(model_items[1:]):
            report.files[f"decomposed layer {i}"] = path
        logger.info(
            "demo: decomposed into %d layers (%s) with RANDOM weights",
            len(decomposed[0]),
            ", ".join(layer.name for layer in decomposed[0]),
        )
    for line in report.summary_lines():
        logger.info("%s", line)
    return 0
