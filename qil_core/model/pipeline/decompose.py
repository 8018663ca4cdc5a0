"""Qwen-Image-Layered pipelines as pure functions: `decompose`, `text_to_layers` (`decompose_layer` builds on
`run_decompose` in layer_split.py).

Each takes a loaded `QwenLayeredModel`, validates every parameter before any work (robustness D1-D14), and
returns `LayerStack`s (layers bottom first, each cropped to its content). `callback(step, total)` is called
after every denoising step (total = steps x images); it may raise (e.g. the host's interrupt) to cancel, and
then nothing is returned. `placement` decides where components live (default: all resident on model.device).

Semantics, documented once:
- Layer names: "Background" for the bottom layer, then "Layer 1" .. "Layer N-1" upward. Fully transparent
  layers are kept as empty (0x0) layers so the count is always N.
- Frame 0 (the model's re-prediction of the whole image) is dropped; `keep_composite=True` adds it on top as a
  hidden layer named "Composite (model)".
- Prompts: one string for all images, or embeddings (B = 1, or one row per image) instead. A prompt that is
  None, "" or " " is replaced per image by the Qwen2.5-VL caption of the resized input (auto_caption, as the
  reference; `metadata["caption"]`); with auto_caption off, or another blank, the blank is encoded with a warning.
- True CFG runs only when cfg > 1 and a negative (string or embeddings) is given, as in the reference.
- Seeds are taken modulo 2**64. A batch of images of one processing size draws its noise as one
  (B, N+1, 16, h, w) tensor like the reference, so image b gets the reference's noise slice b; images of
  different sizes draw from the same generator one after the other. Each image then runs on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
import torch

from ...errors import InputError
from ...layers.fullres import upsample_stack
from ...layers.recompose import recompose_exact
from ...layers.stack import Layer, LayerStack
from ...options import Options, specs
from ..arch.text_encoder import Qwen25TextEncoder
from ..arch.transformer import QwenImageLayeredTransformer
from ..arch.vae import RGBAVAE
from ..loader import QwenLayeredModel
from ..runtime.placement import Placement, ResidentPlacement
from . import checks as chk
from .auto_caption import caption_images, wants_caption
from .denoise import (
    LATENT_CHANNELS,
    Guidance,
    TextCond,
    choose_cfg_batch,
    decode_frames,
    denoise,
    draw_noise,
    encode_condition,
    latent_grid,
)
from .imaging import (
    bucket_size,
    check_image_size,
    check_output_size,
    image_sizes,
    pack_latents,
    prepare_images,
    resize_rgba,
    unpack_latents,
)
from .options import (
    T2L_MULTIPLE,
    DecomposeOptions,
    SamplingOptions,
    TextToLayersOptions,
    check_size_mode,
)
from .prompt import encode_prompts
from .sampler_options import SamplerOptions, check_options, schedule_for

logger = logging.getLogger(__name__)

Callback = Callable[[int, int], None]
O = TypeVar("O", bound=Options)
COMPOSITE_NAME = "Composite (model)"
EXTRACTED_NAME = "Extracted layer"  # decompose(extract=True): the one frame of a single-layer extraction fine-tune


def layer_names(n: int) -> list[str]:
    """Default names bottom first: "Background", "Layer 1", ..., "Layer n-1"."""
    return ["Background"] + [f"Layer {i}" for i in range(1, n)]


def _conditions(
    model: QwenLayeredModel, job: _Job, count: int, opts: SamplingOptions, captions: Sequence[str] | None = None
) -> tuple[list[TextCond], list[TextCond] | None]:
    """Positive condition per image and, when true CFG is on, the negative per image (on placement.device).

    `captions` (one per image, from auto-captioning) replace the prompt; every string is encoded once, in one use
    of the text encoder."""
    width = model.transformer.config.joint_attention_dim
    placement, cfg, given = job.placement, opts.cfg, job.inputs
    prompt, negative_prompt, embeds, neg_embeds = (
        opts.prompt,
        opts.negative_prompt,
        given.prompt_embeds,
        given.negative_embeds,
    )
    if prompt is not None and embeds is not None:
        raise InputError("pass either prompt or prompt_embeds, not both")
    has_negative = negative_prompt is not None or neg_embeds is not None
    guided = cfg > 1 and has_negative
    if cfg > 1 and not has_negative:
        logger.warning("cfg is %g but no negative prompt or embeddings were given: guidance is off", cfg)
    strings: list[str] = []
    if captions is None and embeds is None and (prompt is None or not prompt.strip()):
        logger.warning(
            "no prompt given: encoding %r as the prompt. The model works best with a caption of the whole "
            "image (auto_caption writes one with the model's Qwen2.5-VL)",
            prompt or "",
        )
        prompt = prompt or ""
    if captions is not None:
        strings += captions
    elif embeds is None:
        strings.append(prompt or "")
    if guided and neg_embeds is None:
        strings.append(negative_prompt or "")  # not None here: a negative was given
    encoded = _encode_strings(model, placement, strings, opts.max_sequence_length) if strings else {}
    if captions is not None:
        pos = [_rows(encoded[c], 1, placement.device)[0] for c in captions]
    else:
        pos = _rows(
            encoded[prompt]
            if embeds is None
            else chk.check_embeds("prompt_embeds", embeds, given.prompt_mask, width, count),
            count,
            placement.device,
        )
    if not guided:
        return pos, None
    neg = _rows(
        encoded[negative_prompt]
        if neg_embeds is None
        else chk.check_embeds("negative_embeds", neg_embeds, given.negative_mask, width, count),
        count,
        placement.device,
    )
    return pos, neg


def _encode_strings(model: QwenLayeredModel, placement: Placement, strings: list[str], max_len: int) -> dict:
    """Encode each distinct prompt on its own (batch 1, exactly the reference's encode_prompt per call)."""
    if not model.can_encode_prompts:
        raise InputError(
            "this model has no text encoder, so prompt strings cannot be encoded: load the Qwen2.5-VL text encoder "
            "with the model, or pass prompt_embeds (and negative_embeds, or negative_prompt=None to turn CFG off)"
        )
    text_encoder, tokenizer = model.text_encoder, model.tokenizer
    if text_encoder is None or tokenizer is None:  # can_encode_prompts said both are there
        raise InputError("this model has no text encoder or tokenizer; load them with the model")
    out = {}
    with placement.use("text_encoder", text_encoder) as te:
        for s in dict.fromkeys(strings):
            out[s] = encode_prompts(cast(Qwen25TextEncoder, te), tokenizer, s, max_sequence_length=max_len)
    placement.release("text_encoder", text_encoder)
    return out


def _rows(pair: tuple[torch.Tensor, torch.Tensor | None], count: int, device: torch.device) -> list[TextCond]:
    """(B, L, D) embeddings + mask, B in {1, count} -> one TextCond (1, L, D) per image on `device`."""
    e, m = pair
    out = []
    for b in range(count):
        i = b if e.shape[0] > 1 else 0
        row_mask = None if m is None or bool(m[i].all()) else m[i : i + 1]
        out.append(TextCond(e[i : i + 1], row_mask).to(device))
    return out


def _noise(
    noise: Any, shapes: list[tuple[int, int, int]], seed: int, dtype: torch.dtype, generator_device: torch.device
) -> list[torch.Tensor]:
    """Initial noise per image: the given tensor(s) (B or per-image (1, F, 16, h, w)), or drawn from `seed`."""
    if noise is None:
        return draw_noise(shapes, seed, dtype, generator_device)
    items = list(noise) if isinstance(noise, (list, tuple)) else [noise[i : i + 1] for i in range(noise.shape[0])]
    want = [(1, f, LATENT_CHANNELS, h, w) for f, h, w in shapes]
    got = [tuple(t.shape) for t in items]
    if got != want:
        raise InputError(f"noise must hold one (1, N+1, 16, h, w) tensor per image, {want}; got {got}")
    return [t.to(dtype) for t in items]


def _progress(callback: Callback | None, total: int) -> Callable[[], None]:
    """A step hook that counts steps and reports (done, total) to the callback."""
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if callback is not None:
            callback(done, total)

    return step


def _run(
    model: QwenLayeredModel,
    job: _Job,
    opts: SamplingOptions,
    inputs: list[np.ndarray | None],
    sizes: list[tuple[int, int]],
    text: tuple,
    keep_composite: bool,
) -> list[list[np.ndarray]]:
    """Sample and decode every image; returns per image the RGBA float frames 1..N (+ frame 0 last if kept).

    `inputs[b]` is the processing-size RGBA uint8 condition image, or None for text-to-layers.
    """
    pos, neg = text
    placement, layers, steps, vae_tile = job.placement, opts.layers, job_steps(job, opts), opts.vae_tile
    if keep_composite and getattr(opts, "extract", False):
        layers = 0  # extraction: frame 0 is the only frame
    device = placement.device
    dtype = pos[0].embeds.dtype  # the reference runs the state in the embeddings' dtype
    grids = [latent_grid(w, h) for w, h in sizes]
    noises = _noise(job.inputs.noise, [(layers + 1, h, w) for h, w in grids], opts.seed, dtype, job.generator_device)
    step = _progress(job.inputs.callback, steps * len(sizes))
    finals = []
    with torch.inference_mode():
        conds: list[torch.Tensor | None] = [None] * len(inputs)
        if any(im is not None for im in inputs):
            with placement.use("vae", model.vae) as used:
                vae = cast(RGBAVAE, used)
                conds = [None if im is None else encode_condition(vae, im, dtype, device, vae_tile) for im in inputs]
        with placement.use("transformer", model.transformer) as used:
            dit = cast(QwenImageLayeredTransformer, used)
            for b, (h, w) in enumerate(grids):
                hp, wp = h // 2, w // 2
                shapes = [(1, hp, wp)] * (layers + 1) + ([(1, hp, wp)] if conds[b] is not None else [])
                sigmas = schedule_for(job.inputs.sampler, steps, hp * wp)
                guidance = None if neg is None else Guidance(neg[b], opts.cfg, opts.cfg_normalize)
                tokens = sum(f * y * x for f, y, x in shapes) + pos[b].embeds.shape[1]
                batched = guidance is not None and choose_cfg_batch(opts.cfg_batch, dit, tokens, dtype, device)
                x = pack_latents(noises[b].to(device))  # (1, (N+1)*hp*wp, 64)
                finals.append(
                    denoise(dit, x, conds[b], shapes, pos[b], guidance, sigmas, cfg_batch=batched, on_step=step)
                )
        placement.release("transformer", model.transformer)
        frames = list(range(1, layers + 1)) + ([0] if keep_composite else [])
        out = []
        with placement.use("vae", model.vae) as used:
            vae = cast(RGBAVAE, used)
            for b, (h, w) in enumerate(grids):
                z = unpack_latents(finals[b], layers + 1, h, w)[0]  # (N+1, 16, h, w)
                out.append(decode_frames(vae, z, frames, vae_tile))
        placement.release("vae", model.vae)
    return out


def _stack(frames: list[np.ndarray], size: tuple[int, int], layers: int, names: Sequence[str]) -> LayerStack:
    """Decoded frames (layers bottom first, then the optional composite) -> a LayerStack of cropped layers."""
    out = [Layer.from_canvas(px, name=name) for px, name in zip(frames[:layers], names, strict=True)]
    if len(frames) > layers:
        out.append(Layer.from_canvas(frames[layers], name=COMPOSITE_NAME, visible=False))
    return LayerStack(size[0], size[1], out)


@dataclass(frozen=True)
class JobInputs:
    """What a job takes besides its options: prompt embeddings instead of strings, fixed noise, and the hooks.

    `placement` decides where components live (default: all resident on model.device); `callback(step, total)`
    is called after every denoising step; `caption_callback(token, total)` after every auto-caption token (both
    may raise to cancel); `noise` overrides the seeded noise; `generator_device` draws it.
    """

    prompt_embeds: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    negative_embeds: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None
    noise: torch.Tensor | Sequence[torch.Tensor] | None = None
    placement: Placement | None = None
    callback: Callback | None = None
    generator_device: torch.device | str = "cpu"
    sampler: SamplerOptions | None = None  # the noise schedule for LoRAs/fine-tunes trained for another one
    caption_callback: Callback | None = None


@dataclass(frozen=True)
class _Job:
    """The checked run state every pipeline shares."""

    inputs: JobInputs
    placement: Placement
    generator_device: torch.device


def _job(model: QwenLayeredModel, inputs: JobInputs) -> _Job:
    check_options(inputs.sampler)
    placement = inputs.placement if inputs.placement is not None else ResidentPlacement(model.device, model.dtype)
    return _Job(inputs, placement, chk.check_device(inputs.generator_device))


def job_steps(job: _Job, opts: SamplingOptions) -> int:
    """The number of denoising steps: that of custom sigmas when the sampler options give them, else opts.steps."""
    return job.inputs.sampler.resolve_steps(opts.steps) if job.inputs.sampler is not None else opts.steps


def split_options(cls: type[O], options: O | None, kw: dict[str, Any]) -> tuple[O, JobInputs]:
    """Keyword arguments -> (options of `cls`, JobInputs): option names go to the options (over `options` when
    given), the rest to JobInputs (an unknown name is a TypeError, as for any Python call)."""
    names = {f.name for f, _ in specs(cls)}
    given = {k: kw.pop(k) for k in list(kw) if k in names}
    if options is None:
        opts = cls(**given)
    elif not isinstance(options, cls):
        raise InputError(f"options must be a {cls.__name__}, got {type(options).__name__}")
    else:
        opts = options.changed(**given) if given else options
    return opts, JobInputs(**kw)


def decompose(
    model: QwenLayeredModel, image: Any, *, mask: Any = None, options: DecomposeOptions | None = None, **kw: Any
) -> list[LayerStack]:
    """Decompose each image (IMAGE [B,H,W,C], array, PIL or a list) into N RGBA layers; one LayerStack per image.

    Keywords: any `DecomposeOptions` field (layers, steps, cfg, seed, resolution, max_side, output_size, ...),
    applied over `options` when both are given, and any `JobInputs` field (prompt_embeds, noise, placement,
    callback, ...). Images are resized to the resolution bucket (640/1024 area, or "custom" with max_side) as the
    reference does; `output_size="original"` maps the layers back to each input's size, alpha upsampled
    edge-aware guided by the input (layers.fullres). `mask` (ComfyUI MASK, 1 = transparent) replaces the input
    alpha. `recompose` "exact" folds the difference between the input and the layers' composite into the layers'
    colours (alpha unchanged; layers.recompose), "model" keeps the model's colours; "auto" (default): exact for
    output_size "original", model for "processing" (the model's own output, comparable with the reference). The
    residual report goes to the log and to `stack.metadata["recompose"]`.
    """
    model = chk.check_model(model)
    opts, given = split_options(DecomposeOptions, options, kw)
    return run_decompose(model, image, opts, given, mask=mask)


def run_decompose(
    model: QwenLayeredModel, image: Any, opts: DecomposeOptions, given: JobInputs, mask: Any = None
) -> list[LayerStack]:
    """`decompose` with its options object and inputs already split."""
    model = chk.check_model(model)
    job = _job(model, given)
    layers, keep = opts.layers, opts.keep_composite
    if opts.extract:
        layers, keep = 0, True  # one frame, returned as the extracted layer
    mode, max_side = check_size_mode(opts.resolution, opts.max_side)
    recompose = "model" if opts.extract else opts.recompose_mode()  # one extracted layer is not the picture
    images = prepare_images(image, mask)
    originals = image_sizes(images)
    for i, (w, h) in enumerate(originals):
        check_image_size(w, h, f"image {i}" if len(images) > 1 else "image")
    sizes = [bucket_size(w, h, mode, max_side) for w, h in originals]
    if opts.output_size == "original":
        big = max(originals, key=lambda s: s[0] * s[1])
        check_output_size(layers + keep, big[0], big[1], len(images))
    inputs: list[np.ndarray | None] = [resize_rgba(im, s) for im, s in zip(images, sizes, strict=True)]
    captions = (
        caption_images(
            model,
            job.placement,
            [x for x in inputs if x is not None],
            language=opts.caption_language,
            on_token=given.caption_callback,
        )
        if wants_caption(opts.prompt, given.prompt_embeds, opts.auto_caption)
        else None
    )
    text = _conditions(model, job, len(images), opts, captions)
    if opts.output_size != "original":
        del images  # the full-size inputs are no longer needed
    logger.info(
        "decomposing %d image(s) into %d layers at %s, %d steps, cfg %g%s, seed %d",
        len(inputs),
        layers,
        ", ".join(f"{w}x{h}" for w, h in sizes),
        opts.steps,
        opts.cfg,
        " (normalized)" if opts.cfg_normalize else "",
        opts.seed,
    )
    frames = _run(model, job, opts, inputs, sizes, text, keep)
    stacks = []
    for b, (f, size, orig) in enumerate(zip(frames, sizes, originals, strict=True)):
        stack = (
            LayerStack(size[0], size[1], [Layer.from_canvas(f[0], name=EXTRACTED_NAME)])
            if opts.extract
            else _stack(f, size, layers, layer_names(layers))
        )
        target = images[b] if opts.output_size == "original" else inputs[b]
        assert target is not None  # decompose always has an input image
        if opts.output_size == "original" and orig != size:
            stack = upsample_stack(stack, images[b])
        if recompose == "exact":
            stack, report = recompose_exact(stack, target, f"image {b}" if len(frames) > 1 else "the image")
            stack.metadata["recompose"] = report.as_dict()
        if captions is not None:
            stack.metadata["caption"] = captions[b]
        stacks.append(stack)
    return stacks


def text_to_layers(
    model: QwenLayeredModel, prompt: str | None = None, *, options: TextToLayersOptions | None = None, **kw: Any
) -> LayerStack:
    """Generate N RGBA layers (plus the composite frame, dropped unless kept) from a prompt, with no input image.

    Keywords: any `TextToLayersOptions` field (width, height, layers, steps, ...) and any `JobInputs` field.
    The noisy frames 0..N are the only image tokens (no condition segment, as ComfyUI's text-to-layers graph
    without a ReferenceLatent); RoPE frame ids are 0..N and the text starts at max(hp/2, wp/2, N+1), the
    decomposition's rule with the condition left out (equal to ComfyUI's floor(max(hp, wp)/2) unless N+1 is
    larger). mu uses the tokens of one frame. Sides are rounded to multiples of 16 (64..4096 px).
    """
    model = chk.check_model(model)
    if prompt is not None:
        kw["prompt"] = prompt
    opts, given = split_options(TextToLayersOptions, options, kw)
    return run_text_to_layers(model, opts, given)


def run_text_to_layers(model: QwenLayeredModel, opts: TextToLayersOptions, given: JobInputs) -> LayerStack:
    """`text_to_layers` with its options object and inputs already split."""
    model = chk.check_model(model)
    job = _job(model, given)
    w0, h0 = opts.width, opts.height
    size = (max(16, round(w0 / T2L_MULTIPLE) * T2L_MULTIPLE), max(16, round(h0 / T2L_MULTIPLE) * T2L_MULTIPLE))
    if size != (w0, h0):
        logger.info("text_to_layers: size %dx%d rounded to %dx%d (multiples of 16)", w0, h0, *size)
    text = _conditions(model, job, 1, opts)
    frames = _run(model, job, opts, [None], [size], text, opts.keep_composite)
    return _stack(frames[0], size, opts.layers, layer_names(opts.layers))
