"""`caption`: write the Qwen2.5-VL caption of an image, as the reference does for an empty prompt.

Only the caption goes to stdout (logs go to stderr), so it can be piped or edited and passed back as --prompt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..layers.image_file import open_image
from ..model.pipeline.options import CAPTION_LANGUAGES, REFERENCE_MAX_NEW_TOKENS
from ..model.policy import LoadPolicy
from .common import existing_input
from .model import check_device, progress_logger
from .options import add_options, from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `caption` command."""
    p = subparsers.add_parser(
        "caption",
        help="print the Qwen2.5-VL caption of an image (what an empty prompt would use)",
        description="Caption IMAGE with the Qwen2.5-VL text encoder's vision tower and LM head, with the reference "
        "pipeline's annotator instruction. Prints only the caption on stdout.",
    )
    p.add_argument("image", metavar="IMAGE", help="input image (PNG, JPEG, WebP, TIFF; transparency on white)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-dir", type=Path, metavar="DIR", help="diffusers Qwen-Image-Layered folder")
    src.add_argument(
        "--text-encoder",
        type=Path,
        metavar="FILE",
        help="Qwen2.5-VL text encoder .safetensors or folder (with its vision tower and lm_head)",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        metavar="DIR",
        help="Qwen2.5 tokenizer folder (default: found "
        "next to the text encoder, in the model folder, in ComfyUI, or the bundled copy)",
    )
    p.add_argument("--language", choices=CAPTION_LANGUAGES, default="en", help="caption language (default en)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=REFERENCE_MAX_NEW_TOKENS,
        metavar="N",
        help=f"most tokens to generate (default {REFERENCE_MAX_NEW_TOKENS}, as the reference)",
    )
    add_options(p, LoadPolicy, ["dtype", "device"])
    p.set_defaults(handler=run_caption)


def run_caption(args: argparse.Namespace) -> int:
    """Handler of `caption`."""
    from ..model.pipeline.caption_job import caption_from_files

    policy = from_args(LoadPolicy, args, ["dtype", "device"])
    device = check_device(policy)
    image = open_image(existing_input(Path(args.image), "image"), f"image {args.image!r}", upright=True)
    text = caption_from_files(
        image,
        model_dir=args.model_dir,
        text_encoder=args.text_encoder,
        tokenizer=args.tokenizer,
        language=args.language,
        max_new_tokens=args.max_new_tokens,
        dtype=policy.torch_dtype(device),
        device=device,
        on_token=progress_logger("caption", "token"),
    )
    sys.stdout.write(text + "\n")
    return 0
