"""`decompose-layer`: split one layer of a PSD (or of layer images) into sub-layers with the model, in place.

The command line of `qil_core.decompose_layer` (the Decompose Layer node): the layer's own pixels and alpha are the
input; the sub-layers take its place in the stack, bottom first, named "<layer> / 1" .. "<layer> / N", and the
rest of the document is unchanged. An empty prompt is auto-captioned from the layer, as for `decompose`.
"""

from __future__ import annotations

import argparse
import logging
import time

from ..layers.stack import LayerStack
from ..model.pipeline.options import DecomposeLayerOptions
from .common import add_psd_options, log_written, read_stack
from .lora import sampler_options
from .model import (
    CAPTION_FLAGS,
    add_model_options,
    add_output_options,
    add_sampling_options,
    check_targets,
    load_from_args,
    plan_placement,
    progress_logger,
    read_prompts,
    sized_options,
    write_outputs,
)
from .options import add_options

logger = logging.getLogger(__name__)

FLAGS = ["prompt", "negative_prompt", "layers", "steps", "cfg", "cfg_normalize", "seed"]
SIZE_FLAGS = ["resolution", "max_side", "recompose"]
EXAMPLES = """\
examples:
  python -m qil_core decompose-layer photo.psd --layer "Layer 3" --layers 3 --out photo_split.psd \\
      --model-dir Qwen-Image-Layered --prompt "a red bicycle with a basket"
  python -m qil_core decompose-layer photo.psd --layer -1 --out photo_split.psd --model-dir Qwen-Image-Layered
      (no --prompt: the layer is captioned first; --no-auto-caption encodes "" instead)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `decompose-layer`."""
    p = subparsers.add_parser(
        "decompose-layer",
        help="split one layer of a PSD into sub-layers with the model (recursive decomposition)",
        description="Decompose one layer of INPUT (a PSD, or layer images bottom first) into N sub-layers and\n"
        "write the document with the layer replaced by them, bottom first. The sub-layers keep the layer's\n"
        "position, opacity, blend mode and visibility, never paint outside its alpha, and (--recompose\n"
        "exact, the default) stack back to its pixels. The prompt describes that layer's content.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="a .psd/.psb, or layer images (bottom first)")
    p.add_argument(
        "--layer",
        required=True,
        metavar="INDEX|NAME",
        help="the one layer to split: an index (0 = bottom, -1 = top) or its exact name",
    )
    add_psd_options(p)
    add_output_options(p)
    add_model_options(p)
    add_sampling_options(p, DecomposeLayerOptions, FLAGS)
    add_options(p.add_argument_group("size"), DecomposeLayerOptions, SIZE_FLAGS, defaults={"resolution": None})
    add_options(p.add_argument_group("auto-caption (when no prompt is given)"), DecomposeLayerOptions, CAPTION_FLAGS)
    p.set_defaults(handler=run_decompose_layer)


def split_names(stack: LayerStack, index: int, count: int) -> list[str]:
    """The layer names of the result: the layer at `index` replaced by "<name> / 1" .. "<name> / count"."""
    names = [layer.name for layer in stack.layers]
    return names[:index] + [f"{names[index]} / {n}" for n in range(1, count + 1)] + names[index + 1 :]


def run_decompose_layer(args: argparse.Namespace) -> int:
    """Handler of `decompose-layer`: read, check every target, load, split, write."""
    from ..model.pipeline.layer_split import decompose_layer, split_size, split_target

    opts = sized_options(DecomposeLayerOptions, args, FLAGS + SIZE_FLAGS + CAPTION_FLAGS + ["vae_tile"])
    stack = read_stack(args.inputs, groups=args.groups)
    index = split_target(stack, args.layer)  # checked before the model loads
    parent = stack.layers[index]
    check_targets(args, split_names(stack, index, opts.layers))
    sampler = sampler_options(args)  # checked before the model loads
    prompt, negative = read_prompts(args, args.prompt)
    opts = opts.changed(prompt=prompt, negative_prompt=negative)
    work_w, work_h = split_size(stack, index, opts)
    model = load_from_args(args)
    t0 = time.perf_counter()
    out = decompose_layer(
        model,
        stack,
        index,
        options=opts,
        placement=plan_placement(args, model, work_w, work_h, opts.layers),
        callback=progress_logger("decompose-layer"),
        caption_callback=progress_logger("auto-caption", "token"),
        sampler=sampler,
    )
    logger.info(
        "decompose-layer: %r split into %d sub-layers (%d -> %d layers) in %.1f s",
        parent.name,
        opts.layers,
        len(stack),
        len(out),
        time.perf_counter() - t0,
    )
    log_written(write_outputs(out, args))
    return 0
