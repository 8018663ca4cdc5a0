"""Model commands: `decompose IMAGE --out OUT.psd`, `text-to-layers PROMPT --out OUT.psd`, and the model part of `demo`.

Weights come from `--model-dir DIR` (a diffusers Qwen-Image-Layered folder) or from single files in either
layout (`--transformer F --vae F [--text-encoder F] [--tokenizer DIR]`), any single file overriding the folder.
Every output name is checked before the (long) sampling starts and written atomically afterwards, so Ctrl+C
or an error never leaves a half-written file. `decompose_demo` is the model part of the `demo` command, which
cli/demo.py defines and runs: it decomposes the sample image with a tiny RANDOM model.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..demo.job import check_psd
from ..errors import InputError, OutputPathError
from ..fsutil import check_free
from ..layers.composite import composite
from ..layers.export import export_pngs, layer_file_names
from ..layers.psd import write_psd
from ..layers.stack import Layer, LayerStack
from ..model.pipeline.options import DecomposeOptions, SamplingOptions, TextToLayersOptions, check_size_mode
from ..model.policy import LoadPolicy
from .common import check_suffix, existing_input, log_written
from .options import add_options, from_args

logger = logging.getLogger(__name__)

POLICY_FLAGS = ["dtype", "device", "memory", "fp8"]  # LoadPolicy fields shown as flags
SAMPLING_FLAGS = ["prompt", "negative_prompt", "layers", "steps", "cfg", "cfg_normalize", "seed", "keep_composite"]
SIZE_FLAGS = ["resolution", "max_side", "output_size"]
CANVAS_FLAGS = ["width", "height"]
DEMO_SETTINGS: dict[str, Any] = dict(layers=4, steps=4, resolution="custom", max_side=256, seed=0)  # seconds on a CPU


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Weights, dtype, device and memory options shared by the model commands (generated from LoadPolicy)."""
    g = p.add_argument_group("model files (a diffusers folder, or single files in ComfyUI's or diffusers' layout)")
    g.add_argument("--model-dir", type=Path, metavar="DIR", help="diffusers Qwen-Image-Layered folder")
    g.add_argument("--transformer", type=Path, metavar="F", help="transformer .safetensors (or its folder)")
    g.add_argument("--vae", type=Path, metavar="F", help="RGBA VAE .safetensors (or its folder)")
    g.add_argument("--text-encoder", type=Path, metavar="F", help="Qwen2.5-VL text encoder .safetensors or folder")
    g.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="tokenizer folder (default: next to the text encoder, in the model folder or in ComfyUI)")
    add_options(g, LoadPolicy, POLICY_FLAGS)
    add_options(g, SamplingOptions, ["vae_tile"])


def _add_sampling_options(p: argparse.ArgumentParser, cls: type) -> None:
    """Sampling options shared by decompose and text-to-layers (generated from the job's options class)."""
    add_options(p.add_argument_group("sampling"), cls, SAMPLING_FLAGS)


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """Where results go."""
    p.add_argument("--out", required=True, type=Path, metavar="OUT.psd", help="layered PSD to write")
    p.add_argument("--png-dir", type=Path, metavar="DIR", help="also write the layers as PNGs into DIR")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `decompose` and `text-to-layers` (the `demo` command, model part included, is cli/demo.py's)."""
    p = subparsers.add_parser(
        "decompose", help="split an image into RGBA layers with Qwen-Image-Layered",
        description="Decompose IMAGE into N RGBA layers (bottom first) and write them as a layered PSD. The image "
                    "is resized to the 640 or 1024 area bucket (or --resolution custom --max-side N) as the "
                    "reference pipeline does; --output-size original maps the layers back to the input's size.")
    p.add_argument("image", metavar="IMAGE", help="input image (PNG, JPEG, WebP, TIFF; alpha is kept)")
    _add_output_options(p)
    _add_model_options(p)
    _add_sampling_options(p, DecomposeOptions)
    add_options(p.add_argument_group("size"), DecomposeOptions, SIZE_FLAGS)
    p.set_defaults(handler=run_decompose)

    p = subparsers.add_parser(
        "text-to-layers", help="generate RGBA layers from a prompt (no input image)",
        description="Generate N RGBA layers from PROMPT and write them as a layered PSD. The released weights are "
                    "tuned for decomposition, so quality is limited.")
    p.add_argument("text", metavar="PROMPT", help="description of the whole picture")
    _add_output_options(p)
    _add_model_options(p)
    _add_sampling_options(p, TextToLayersOptions)
    add_options(p.add_argument_group("size"), TextToLayersOptions, CANVAS_FLAGS)
    p.set_defaults(handler=run_text_to_layers)


def _policy(args: argparse.Namespace) -> LoadPolicy:
    """The loading policy of the command line (checked before any work, errors naming the flags)."""
    if args.model_dir is None and (args.transformer is None or args.vae is None):
        raise InputError("give --model-dir DIR, or --transformer F and --vae F (plus --text-encoder F for prompts)")
    return from_args(LoadPolicy, args, POLICY_FLAGS)


def _load(args: argparse.Namespace) -> Any:
    """Load the model named by the command line options."""
    from ..model.loader import load_model

    policy = _policy(args)
    device = policy.torch_device()
    # Weights load memory-mapped on the CPU; the memory plan then decides what goes to the device and when.
    model = load_model(model_dir=args.model_dir, transformer=args.transformer, vae=args.vae,
                       text_encoder=args.text_encoder, tokenizer=args.tokenizer, dtype=policy.torch_dtype(device),
                       device="cpu")
    policy.after_load(model)
    model.device = device
    return model


def _placement(args: argparse.Namespace, model: Any, width: int, height: int, layers: int) -> Any:
    """The memory plan's placement for this run (resident on CPU; planned from free memory on a GPU)."""
    from ..model.runtime.memory_plan import plan_for_model

    # plan_for_model logs the plan's description itself (once).
    plan = plan_for_model(model, width=width, height=height, layers=layers, mode=args.memory, device=model.device)
    return plan.placement(model.dtype)


def _progress(label: str) -> Any:
    """A pipeline callback logging about ten progress lines with the time per step."""
    t0 = time.perf_counter()

    def callback(step: int, total: int) -> None:
        every = max(1, total // 10)
        if step % every == 0 or step == total:
            rate = (time.perf_counter() - t0) / step
            logger.info("%s: step %d/%d (%.2f s/step)", label, step, total, rate)

    return callback


def _planned_names(layers: int, keep_composite: bool, prefix: str) -> list[str]:
    """The PNG names export_pngs will use for a result of `layers` layers (names are known before sampling)."""
    from ..model.pipeline.decompose import COMPOSITE_NAME, layer_names

    names = layer_names(layers) + ([COMPOSITE_NAME] if keep_composite else [])
    stub = LayerStack(1, 1, [Layer(np.zeros((0, 0, 4), np.float32), name=n) for n in names])
    return layer_file_names(stub, prefix)


def _targets(args: argparse.Namespace, layers: int, keep_composite: bool) -> None:
    """Check every file the command will write before any work (suffix, safe names, no collisions, an existing
    folder for --out): loading and sampling take minutes with the real weights. The options are checked already."""
    check_suffix(args.out, (".psd",), "output")
    folder = args.out.parent
    if not folder.is_dir():
        what = ("is a file, not a folder; choose another folder" if folder.exists()
                else "does not exist; create it first")
        raise OutputPathError(f"cannot write {str(args.out)!r}: the folder {str(folder)!r} {what}")
    paths = [args.out]
    if args.png_dir is not None:
        paths += [args.png_dir / n for n in _planned_names(layers, keep_composite, args.out.stem)]
    check_free(paths, overwrite=args.overwrite)


def _write(stack: LayerStack, args: argparse.Namespace) -> list[Path]:
    """Write the PSD (with its composite) and, when asked, the layer PNGs; returns the written paths."""
    written = [write_psd(stack, args.out, overwrite=args.overwrite, merged=composite(stack))]
    if args.png_dir is not None:
        written += export_pngs(stack, args.png_dir, prefix=args.out.stem, overwrite=args.overwrite)
    return written


def _read_image(path: Path) -> Image.Image:
    """Open an image file (first frame) for decomposition, turned upright by its EXIF orientation (as viewers and
    ComfyUI's Load Image show it; phone photos are often stored sideways with an orientation tag)."""
    try:
        with Image.open(existing_input(path, "image")) as im:
            im.load()
            upright = ImageOps.exif_transpose(im)
            return upright if upright is not im else im.copy()
    except (UnidentifiedImageError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise InputError(f"cannot read image {str(path)!r}: {e}; give a PNG, JPEG, WebP or TIFF file") from None


def run_decompose(args: argparse.Namespace) -> int:
    """Handler of `decompose`."""
    from ..model.pipeline.decompose import JobInputs, run_decompose
    from ..model.pipeline.imaging import bucket_size, check_image_size

    opts = from_args(DecomposeOptions, args, SAMPLING_FLAGS + SIZE_FLAGS + ["vae_tile"])
    _policy(args)
    _targets(args, opts.layers, opts.keep_composite)
    image = _read_image(Path(args.image))
    check_image_size(image.width, image.height, f"image {args.image!r}")
    mode, max_side = check_size_mode(opts.resolution, opts.max_side)
    work_w, work_h = bucket_size(image.width, image.height, mode, max_side)
    model = _load(args)
    t0 = time.perf_counter()
    run = JobInputs(placement=_placement(args, model, work_w, work_h, opts.layers), callback=_progress("decompose"))
    stack = run_decompose(model, image, opts, run)[0]
    logger.info("decompose: %d layers on %dx%d in %.1f s", len(stack), stack.width, stack.height,
                time.perf_counter() - t0)
    log_written(_write(stack, args))
    return 0


def run_text_to_layers(args: argparse.Namespace) -> int:
    """Handler of `text-to-layers`."""
    from ..model.pipeline.decompose import JobInputs, run_text_to_layers

    names = [n for n in SAMPLING_FLAGS if n != "prompt"] + CANVAS_FLAGS + ["vae_tile"]
    opts = from_args(TextToLayersOptions, args, names, extra={"prompt": args.text})
    _policy(args)
    _targets(args, opts.layers, opts.keep_composite)
    model = _load(args)
    t0 = time.perf_counter()
    run = JobInputs(placement=_placement(args, model, opts.width, opts.height, opts.layers),
                    callback=_progress("text-to-layers"))
    stack = run_text_to_layers(model, opts, run)
    logger.info("text-to-layers: %d layers on %dx%d in %.1f s", len(stack), stack.width, stack.height,
                time.perf_counter() - t0)
    log_written(_write(stack, args))
    return 0


def demo_targets(out_dir: Path, overwrite: bool) -> tuple[Path, Path]:
    """The demo's model outputs (PSD, PNG folder), checked for safe names and collisions before any work."""
    psd, layer_dir = out_dir / "decomposed.psd", out_dir / "decomposed_layers"
    pngs = _planned_names(int(DEMO_SETTINGS["layers"]), False, "decomposed")
    check_free([psd, *(layer_dir / n for n in pngs)], overwrite=overwrite)
    return psd, layer_dir


def decompose_demo(out_dir: Path, *, image: Path | None = None, overwrite: bool = False,
                   size: tuple[int, int] | None = None) -> tuple[LayerStack, list[Path], float]:
    """Decompose the sample scene (or `image`) with a tiny RANDOM model into OUT/decomposed.psd (+ layer PNGs)."""
    import torch

    from ..demo.scene import DEFAULT_SIZE, sample_image
    from ..model.loader import load_model
    from ..model.pipeline.decompose import decompose
    from ..model.weights.tiny import write_tiny_model

    psd, layer_dir = demo_targets(out_dir, overwrite)
    picture = _read_image(image) if image is not None else sample_image(size or DEFAULT_SIZE)
    t0 = time.perf_counter()
    logger.warning("demo: decomposing with a tiny model of RANDOM weights, written to a temporary folder. It "
                   "shows the pipeline end to end; its layers are noise. Use 'decompose' with the "
                   "Qwen-Image-Layered weights for real results.")
    with tempfile.TemporaryDirectory(prefix="qil_tiny_") as tmp:
        paths = write_tiny_model(tmp, layout="comfyui")
        model = load_model(transformer=paths["transformer"], vae=paths["vae"], text_encoder=paths["text_encoder"],
                           dtype=torch.float32, device="cpu")
        stack = decompose(model, picture, prompt="a layered scene with sky, sun, hills, a house and a logo",
                          output_size="original", callback=_progress("demo decompose"), **DEMO_SETTINGS)[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_psd(stack, psd, overwrite=overwrite, merged=composite(stack))]
    written += export_pngs(stack, layer_dir, prefix="decomposed", overwrite=overwrite)
    check_psd(psd, stack)
    return stack, written, time.perf_counter() - t0
