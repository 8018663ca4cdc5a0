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
from PIL import Image

from ..demo.job import check_psd
from ..errors import InputError, OutputPathError
from ..fsutil import check_free, write_group
from ..layers.composite import composite
from ..layers.export import layer_file_names, png_items
from ..layers.image_file import open_image
from ..layers.psd import write_psd
from ..layers.stack import Layer, LayerStack
from ..model.pipeline.options import CUSTOM, DecomposeOptions, SamplingOptions, TextToLayersOptions
from ..model.policy import LoadPolicy
from ..options import spec_of
from .common import check_suffix, check_writable, existing_input, log_written
from .lora import add_lora_options, add_sampler_options, apply_loras, check_lora_files, sampler_options
from .options import O, add_options, from_args

logger = logging.getLogger(__name__)

POLICY_FLAGS = ["dtype", "device", "memory", "fp8", "quant", "quant_kernels"]  # LoadPolicy fields shown as flags
SAMPLING_FLAGS = ["prompt", "negative_prompt", "layers", "steps", "cfg", "cfg_normalize", "seed", "keep_composite"]
SIZE_FLAGS = ["resolution", "max_side", "output_size", "recompose"]
CAPTION_FLAGS = ["caption_language", "auto_caption"]  # auto-caption when no prompt is given (as the reference)
PROMPT_FLAGS = ["prompt", "negative_prompt"]  # read with their files (--prompt-file), after the other checks
CANVAS_FLAGS = ["width", "height"]
DEMO_SETTINGS: dict[str, Any] = dict(layers=4, steps=4, resolution="custom", max_side=256, seed=0)  # seconds on a CPU


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Weights, dtype, device and memory options shared by the model commands (generated from LoadPolicy)."""
    g = p.add_argument_group("model files (a diffusers folder, or single files in ComfyUI's or diffusers' layout)")
    g.add_argument("--model-dir", type=Path, metavar="DIR", help="diffusers Qwen-Image-Layered folder")
    g.add_argument("--transformer", type=Path, metavar="F", help="transformer .safetensors (or its folder)")
    g.add_argument("--vae", type=Path, metavar="F", help="RGBA VAE .safetensors (or its folder)")
    g.add_argument("--text-encoder", type=Path, metavar="F", help="Qwen2.5-VL text encoder .safetensors or folder")
    g.add_argument(
        "--tokenizer",
        type=Path,
        metavar="DIR",
        help="tokenizer folder (default: next to the text encoder, in the model folder or in ComfyUI)",
    )
    add_options(g, LoadPolicy, POLICY_FLAGS)
    add_options(g, SamplingOptions, ["vae_tile"])
    add_lora_options(p)


def add_sampling_options(p: argparse.ArgumentParser, cls: type, flags: list[str] = SAMPLING_FLAGS) -> None:
    """Sampling options shared by the model commands (generated from the job's options class), plus the prompt
    files. --negative-prompt defaults to None here so that giving it and its file is refused."""
    g = p.add_argument_group("sampling")
    add_options(g, cls, flags, defaults={"negative_prompt": None})
    g.add_argument(
        "--prompt-file",
        type=Path,
        metavar="F",
        help="read the prompt from a UTF-8 text file (for prompts longer than a command line allows)",
    )
    g.add_argument("--negative-prompt-file", type=Path, metavar="F", help="read the negative prompt from a UTF-8 file")
    add_sampler_options(p)


def add_output_options(p: argparse.ArgumentParser) -> None:
    """Where results go."""
    p.add_argument("--out", required=True, type=Path, metavar="OUT.psd", help="layered PSD to write")
    p.add_argument("--png-dir", type=Path, metavar="DIR", help="also write the layers as PNGs into DIR")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `decompose` and `text-to-layers` (the `demo` command, model part included, is cli/demo.py's)."""
    p = subparsers.add_parser(
        "decompose",
        help="split an image into RGBA layers with Qwen-Image-Layered",
        description="Decompose IMAGE into N RGBA layers (bottom first) and write them as a layered PSD. The image "
        "is resized to the 640 or 1024 area bucket (or --resolution custom --max-side N) as the "
        "reference pipeline does; --output-size original maps the layers back to the input's size.",
    )
    p.add_argument("image", metavar="IMAGE", help="input image (PNG, JPEG, WebP, TIFF; alpha is kept)")
    add_output_options(p)
    add_model_options(p)
    add_sampling_options(p, DecomposeOptions)
    # --resolution has no default here: --max-side alone means custom, neither means the option's default (640)
    add_options(p.add_argument_group("size"), DecomposeOptions, SIZE_FLAGS, defaults={"resolution": None})
    add_options(p.add_argument_group("auto-caption (when no prompt is given)"), DecomposeOptions, CAPTION_FLAGS)
    p.set_defaults(handler=run_decompose)

    p = subparsers.add_parser(
        "text-to-layers",
        help="generate RGBA layers from a prompt (no input image)",
        description="Generate N RGBA layers from PROMPT and write them as a layered PSD. The released weights are "
        "tuned for decomposition, so quality is limited.",
    )
    p.add_argument("text", metavar="PROMPT", nargs="?", help="description of the whole picture (or give --prompt-file)")
    add_output_options(p)
    add_model_options(p)
    add_sampling_options(p, TextToLayersOptions)
    add_options(p.add_argument_group("size"), TextToLayersOptions, CANVAS_FLAGS)
    p.set_defaults(handler=run_text_to_layers)


def policy_from_args(args: argparse.Namespace) -> LoadPolicy:
    """The loading policy of the command line (checked before any work, errors naming the flags)."""
    if args.model_dir is None and (args.transformer is None or args.vae is None):
        raise InputError("give --model-dir DIR, or --transformer F and --vae F (plus --text-encoder F for prompts)")
    return from_args(LoadPolicy, args, POLICY_FLAGS)


def load_from_args(args: argparse.Namespace) -> Any:
    """Load the model named by the command line options, with its --lora files applied."""
    policy = policy_from_args(args)
    model = policy.load(
        check_device(policy),
        model_dir=args.model_dir,
        transformer=args.transformer,
        vae=args.vae,
        text_encoder=args.text_encoder,
        tokenizer=args.tokenizer,
    )
    apply_loras(model, args)
    return model


def plan_placement(args: argparse.Namespace, model: Any, width: int, height: int, layers: int) -> Any:
    """The memory plan's placement for this run (resident on CPU; planned from free memory on a GPU)."""
    from ..model.runtime.memory_plan import plan_for_model

    # plan_for_model logs the plan's description itself (once).
    plan = plan_for_model(model, width=width, height=height, layers=layers, mode=args.memory, device=model.device)
    return plan.placement(model.dtype)


def progress_logger(label: str, unit: str = "step") -> Any:
    """A pipeline callback `(done, total)` logging about ten progress lines with the time per `unit` (denoising
    steps, or caption tokens: a caption that ends early stops logging before its total)."""
    t0 = time.perf_counter()

    def callback(step: int, total: int) -> None:
        every = max(1, total // 10)
        if step % every == 0 or step == total:
            rate = (time.perf_counter() - t0) / step
            logger.info("%s: %s %d/%d (%.2f s/%s)", label, unit, step, total, rate, unit)

    return callback


def result_names(layers: int, keep_composite: bool) -> list[str]:
    """The layer names of a decomposition into `layers` layers (known before sampling)."""
    from ..model.pipeline.decompose import COMPOSITE_NAME, layer_names

    return layer_names(layers) + ([COMPOSITE_NAME] if keep_composite else [])


def _planned_names(names: list[str], prefix: str) -> list[str]:
    """The PNG names export_pngs will use for a result whose layers are called `names`."""
    stub = LayerStack(1, 1, [Layer(np.zeros((0, 0, 4), np.float32), name=n) for n in names])
    return layer_file_names(stub, prefix)


def check_device(policy: LoadPolicy) -> Any:
    """The torch device of --device (the policy's best one when not given), checked before any loading: it must
    be present on this machine."""
    import torch

    dev = policy.torch_device()
    if policy.device is None:
        return dev
    text = policy.device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise InputError(
                f"--device {text}: CUDA is not available here (this PyTorch is {build}, and no usable "
                "NVIDIA GPU was found); use --device cpu or install a CUDA build of PyTorch"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"--device {text}: there are only {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {text}: Apple MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        backend = getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise InputError(f"--device {text}: the {dev.type!r} backend is not available here; use cpu or cuda")
    return dev


def _read_text(path: Path, option: str) -> str:
    """The UTF-8 text of a prompt file (a trailing newline dropped); InputError naming the file otherwise."""
    p = existing_input(path, option)
    try:
        return p.read_text(encoding="utf-8-sig").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{option} {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise InputError(f"{option} {str(path)!r} cannot be read: {err.strerror or err}") from None


def read_prompts(args: argparse.Namespace, prompt: str | None) -> tuple[str | None, Any]:
    """(prompt, negative prompt) from the options or their files; giving both forms of one is refused."""
    if args.prompt_file is not None:
        if prompt is not None:
            raise InputError("give the prompt either as text or with --prompt-file, not both")
        prompt = _read_text(args.prompt_file, "--prompt-file")
    negative = args.negative_prompt
    if args.negative_prompt_file is not None:
        if negative is not None:
            raise InputError(
                "give the negative prompt either with --negative-prompt or --negative-prompt-file, not both"
            )
        negative = _read_text(args.negative_prompt_file, "--negative-prompt-file")
    return prompt, spec_of(SamplingOptions, "negative_prompt")[0].default if negative is None else negative


def check_targets(args: argparse.Namespace, names: list[str]) -> None:
    """Check every argument and every file the command will write before any work (device, suffix, safe names, no
    collisions, an existing writable folder for --out): loading and sampling take minutes. `names` are the result's
    layer names (for the PNGs of --png-dir). The options (numbers, sizes, tile) are checked already, by their
    dataclasses."""
    check_device(policy_from_args(args))
    check_lora_files(args)
    check_suffix(args.out, (".psd",), "output")
    folder = args.out.parent
    if not folder.is_dir():
        what = (
            "is a file, not a folder; choose another folder" if folder.exists() else "does not exist; create it first"
        )
        raise OutputPathError(f"cannot write {str(args.out)!r}: the folder {str(folder)!r} {what}")
    check_writable(folder)
    paths = [args.out]
    if args.png_dir is not None:
        if args.png_dir.exists() and not args.png_dir.is_dir():
            raise OutputPathError(f"--png-dir {str(args.png_dir)!r} is a file; give a folder (created if missing)")
        check_writable(args.png_dir)
        paths += [args.png_dir / n for n in _planned_names(names, args.out.stem)]
    check_free(paths, overwrite=args.overwrite)


def write_outputs(stack: LayerStack, args: argparse.Namespace) -> list[Path]:
    """Write the PSD (with its composite) and, when asked, the layer PNGs as one group (all or none); returns the
    written paths."""
    return write_result(stack, args.out, args.png_dir, prefix=args.out.stem, overwrite=args.overwrite)


def result_items(
    stack: LayerStack, psd: Path, png_dir: Path | None, *, prefix: str, check: Any = None
) -> list[tuple[Path, Any]]:
    """`(path, write)` items of the PSD and (optionally) its layer PNGs for `fsutil.write_group`, which publishes
    them together, so a failure leaves no part behind. `check(staged_psd)` inspects the PSD before publishing."""

    def write_the_psd(staged: Path) -> None:
        write_psd(stack, staged, merged=composite(stack))
        if check is not None:
            check(staged)

    items: list[tuple[Path, Any]] = [(psd, write_the_psd)]
    if png_dir is not None:
        items += png_items(stack, png_dir, prefix=prefix)
    return items


def write_result(stack: LayerStack, psd: Path, png_dir: Path | None, *, prefix: str, overwrite: bool) -> list[Path]:
    """Write the PSD and its layer PNGs as one group (all or nothing); returns the written paths."""
    return write_group(
        result_items(stack, psd, png_dir, prefix=prefix), overwrite=overwrite, make_dirs=png_dir is not None
    )


def _read_image(path: Path) -> Image.Image:
    """Open an image file (first frame) for decomposition, turned upright by its EXIF orientation (as viewers and
    ComfyUI's Load Image show it; phone photos are often stored sideways with an orientation tag). The header is
    checked (size, decompression-bomb limit, RAM) before decoding."""
    return open_image(existing_input(path, "image"), f"image {str(path)!r}", upright=True)


def sized_options(cls: type[O], args: argparse.Namespace, flags: list[str]) -> O:
    """The job's options from the command line, prompts left out (they come with their files, after the other
    checks): --max-side alone means --resolution custom; neither flag leaves the option's default (640)."""
    resolution = args.resolution or (CUSTOM if args.max_side is not None else None)
    names = [n for n in flags if n not in PROMPT_FLAGS + ["resolution"]]
    opts: Any = from_args(cls, args, names, extra={"resolution": resolution} if resolution else None)
    if args.max_side is not None and opts.resolution != CUSTOM:
        raise InputError(
            f"--max-side applies only to --resolution custom, not --resolution {opts.resolution}; drop one of them"
        )
    return opts


def run_decompose(args: argparse.Namespace) -> int:
    """Handler of `decompose`."""
    from ..model.pipeline.decompose import decompose
    from ..model.pipeline.imaging import bucket_size, check_image_size

    opts = sized_options(DecomposeOptions, args, SAMPLING_FLAGS + SIZE_FLAGS + CAPTION_FLAGS + ["vae_tile"])
    check_targets(args, result_names(opts.layers, opts.keep_composite))
    sampler = sampler_options(args)  # checked before the model loads
    prompt, negative = read_prompts(args, args.prompt)
    opts = opts.changed(prompt=prompt, negative_prompt=negative)
    image = _read_image(Path(args.image))
    check_image_size(image.width, image.height, f"image {args.image!r}")
    work_w, work_h = bucket_size(image.width, image.height, opts.resolution, opts.max_side)
    model = load_from_args(args)
    t0 = time.perf_counter()
    stack = decompose(
        model,
        image,
        options=opts,
        placement=plan_placement(args, model, work_w, work_h, opts.layers),
        callback=progress_logger("decompose"),
        caption_callback=progress_logger("auto-caption", "token"),
        sampler=sampler,
    )[0]
    logger.info(
        "decompose: %d layers on %dx%d in %.1f s", len(stack), stack.width, stack.height, time.perf_counter() - t0
    )
    log_written(write_outputs(stack, args))
    return 0


def run_text_to_layers(args: argparse.Namespace) -> int:
    """Handler of `text-to-layers`."""
    from ..model.pipeline.decompose import text_to_layers

    names = [n for n in SAMPLING_FLAGS if n not in PROMPT_FLAGS] + CANVAS_FLAGS + ["vae_tile"]
    opts = from_args(TextToLayersOptions, args, names)
    check_targets(args, result_names(opts.layers, opts.keep_composite))
    sampler = sampler_options(args)  # checked before the model loads
    if args.text is not None and args.prompt is not None:
        raise InputError("give the prompt once: as PROMPT or with --prompt, not both")
    prompt, negative = read_prompts(args, args.text if args.text is not None else args.prompt)
    if not prompt:
        raise InputError("text-to-layers needs a prompt: give PROMPT or --prompt-file F")
    opts = opts.changed(prompt=prompt, negative_prompt=negative)
    model = load_from_args(args)
    t0 = time.perf_counter()
    stack = text_to_layers(
        model,
        options=opts,
        placement=plan_placement(args, model, opts.width, opts.height, opts.layers),
        callback=progress_logger("text-to-layers"),
        sampler=sampler,
    )
    logger.info(
        "text-to-layers: %d layers on %dx%d in %.1f s", len(stack), stack.width, stack.height, time.perf_counter() - t0
    )
    log_written(write_outputs(stack, args))
    return 0


def demo_targets(out_dir: Path, overwrite: bool) -> tuple[Path, Path]:
    """The demo's model outputs (PSD, PNG folder), checked for safe names and collisions before any work."""
    psd, layer_dir = out_dir / "decomposed.psd", out_dir / "decomposed_layers"
    pngs = _planned_names(result_names(int(DEMO_SETTINGS["layers"]), False), "decomposed")
    check_free([psd, *(layer_dir / n for n in pngs)], overwrite=overwrite)
    return psd, layer_dir


def decompose_demo(
    out_dir: Path, *, image: Path | None = None, overwrite: bool = False, size: tuple[int, int] | None = None
) -> tuple[LayerStack, list[tuple[Path, Any]], float]:
    """Decompose the sample scene (or `image`) with a tiny RANDOM model; returns the stack, the `(path, write)`
    items of OUT/decomposed.psd and its layer PNGs (for one `write_group` with the rest of the demo) and the
    seconds it took."""
    import torch

    from ..demo.scene import DEFAULT_SIZE, sample_image
    from ..model.loader import load_model
    from ..model.pipeline.decompose import decompose
    from ..model.weights.tiny import write_tiny_model

    psd, layer_dir = demo_targets(out_dir, overwrite)
    picture = _read_image(image) if image is not None else sample_image(size or DEFAULT_SIZE)
    t0 = time.perf_counter()
    logger.warning(
        "demo: decomposing with a tiny model of RANDOM weights, written to a temporary folder. It "
        "shows the pipeline end to end; its layers are noise. Use 'decompose' with the "
        "Qwen-Image-Layered weights for real results."
    )
    with tempfile.TemporaryDirectory(prefix="qil_tiny_") as tmp:
        paths = write_tiny_model(tmp, layout="comfyui")
        model = load_model(
            transformer=paths["transformer"],
            vae=paths["vae"],
            text_encoder=paths["text_encoder"],
            dtype=torch.float32,
            device="cpu",
        )
        stack = decompose(
            model,
            picture,
            prompt="a layered scene with sky, sun, hills, a house and a logo",
            output_size="original",
            callback=progress_logger("demo decompose"),
            **DEMO_SETTINGS,
        )[0]
    items = result_items(stack, psd, layer_dir, prefix="decomposed", check=lambda staged: check_psd(staged, stack))
    return stack, items, time.perf_counter() - t0
