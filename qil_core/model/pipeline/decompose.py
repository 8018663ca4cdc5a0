"""Qwen-Image-Layered pipelines as pure functions: `decompose`, `text_to_layers`, `decompose_layer`.

Each takes a loaded `QwenLayeredModel`, validates every parameter before any work (robustness D1-D14), and
returns `LayerStack`s (layers bottom first, each cropped to its content). `callback(step, total)` is called
after every denoising step (total = steps x images); it may raise (e.g. the host's interrupt) to cancel, and
then nothing is returned. `placement` decides where components live (default: all resident on model.device).

Semantics, documented once:
- Layer names: "Background" for the bottom layer, then "Layer 1" .. "Layer N-1" upward. Fully transparent
  layers are kept as empty (0x0) layers so the count is always N.
- Frame 0 (the model's re-prediction of the whole image) is dropped; `keep_composite=True` adds it on top as a
  hidden layer named "Composite (model)".
- Prompts: one string for all images, or embeddings (B = 1, or one row per image) instead. No prompt (None,
  "" or blank) encodes the empty/blank prompt with a warning: the reference would auto-caption, which needs
  the vision tower this pack does not run.
- True CFG runs only when cfg > 1 and a negative (string or embeddings) is given, as in the reference.
- Seeds are taken modulo 2**64. A batch of images of one processing size draws its noise as one
  (B, N+1, 16, h, w) tensor like the reference, so image b gets the reference's noise slice b; images of
  different sizes draw from the same generator one after the other. Each image then runs on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ...errors import InputError
from ...layers.composite import paste_layer
from ...layers.fullres import upsample_stack
from ...layers.recompose import check_recompose, recompose_exact, snap_alpha
from ...layers.stack import Layer, LayerStack
from ..loader import QwenLayeredModel
from ..runtime import vae_tiling
from ..runtime.placement import Placement, ResidentPlacement
from . import checks as chk
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
    check_resolution,
    image_sizes,
    pack_latents,
    prepare_images,
    resize_rgba,
    unpack_latents,
)
from .prompt import DEFAULT_MAX_SEQUENCE_LENGTH, encode_prompts
from .scheduler import calculate_mu, get_sigmas

logger = logging.getLogger(__name__)

Callback = Callable[[int, int], None]
COMPOSITE_NAME = "Composite (model)"


def layer_names(n: int) -> list[str]:
    """Default names bottom first: "Background", "Layer 1", ..., "Layer n-1"."""
    return ["Background"] + [f"Layer {i}" for i in range(1, n)]


def _conditions(
    model: QwenLayeredModel, placement: Placement, count: int, prompt: Any, negative_prompt: Any, embeds: Any,
    mask: Any, neg_embeds: Any, neg_mask: Any, cfg: float, max_len: int,
) -> tuple[list[TextCond], list[TextCond] | None]:
    """Positive condition per image and, when true CFG is on, the negative per image (on placement.device)."""
    width = model.transformer.config.joint_attention_dim
    prompt = chk.check_prompt("prompt", prompt)
    negative_prompt = chk.check_prompt("negative_prompt", negative_prompt)
    if prompt is not None and embeds is not None:
        raise InputError("pass either prompt or prompt_embeds, not both")
    has_negative = negative_prompt is not None or neg_embeds is not None
    guided = cfg > 1 and has_negative
    if cfg > 1 and not has_negative:
        logger.warning("cfg is %g but no negative prompt or embeddings were given: guidance is off", cfg)
    strings = []
    if embeds is None and (prompt is None or not prompt.strip()):
        logger.warning("no prompt given: encoding %r as the prompt. The model works best with a caption of the whole "
                       "image (the reference would auto-caption; that needs the vision tower, not run here)",
                       prompt or "")
        prompt = prompt or ""
    if embeds is None:
        strings.append(prompt)
    if guided and neg_embeds is None:
        strings.append(negative_prompt)
    encoded = _encode_strings(model, placement, strings, max_len) if strings else {}
    pos = _rows(encoded[prompt] if embeds is None else chk.check_embeds("prompt_embeds", embeds, mask, width, count),
                count, placement.device)
    if not guided:
        return pos, None
    neg = _rows(encoded[negative_prompt] if neg_embeds is None else
                chk.check_embeds("negative_embeds", neg_embeds, neg_mask, width, count), count, placement.device)
    return pos, neg


def _encode_strings(model: QwenLayeredModel, placement: Placement, strings: list[str], max_len: int) -> dict:
    """Encode each distinct prompt on its own (batch 1, exactly the reference's encode_prompt per call)."""
    if not model.can_encode_prompts:
        raise InputError(
            "this model has no text encoder, so prompt strings cannot be encoded: load the Qwen2.5-VL text encoder "
            "with the model, or pass prompt_embeds (and negative_embeds, or negative_prompt=None to turn CFG off)"
        )
    out = {}
    with placement.use("text_encoder", model.text_encoder) as te:  # type: ignore[arg-type]
        for s in dict.fromkeys(strings):
            out[s] = encode_prompts(te, model.tokenizer, s, max_sequence_length=max_len)  # type: ignore[arg-type]
    placement.release("text_encoder", model.text_encoder)  # type: ignore[arg-type]
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


def _noise(noise: Any, shapes: list[tuple[int, int, int]], seed: int, dtype: torch.dtype,
           generator_device: torch.device) -> list[torch.Tensor]:
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
    model: QwenLayeredModel, placement: Placement, inputs: list[np.ndarray | None], sizes: list[tuple[int, int]],
    layers: int, steps: int, cfg: float, cfg_normalize: bool, seed: int, cfg_batch: bool | str,
    callback: Callback | None, generator_device: torch.device, noise: Any, text: tuple, keep_composite: bool,
    vae_tile: int | None = None,
) -> list[list[np.ndarray]]:
    """Sample and decode every image; returns per image the RGBA float frames 1..N (+ frame 0 last if kept).

    `inputs[b]` is the processing-size RGBA uint8 condition image, or None for text-to-layers.
    """
    pos, neg = text
    device = placement.device
    dtype = pos[0].embeds.dtype  # the reference runs the state in the embeddings' dtype
    grids = [latent_grid(w, h) for w, h in sizes]
    noises = _noise(noise, [(layers + 1, h, w) for h, w in grids], seed, dtype, generator_device)
    step = _progress(callback, steps * len(sizes))
    finals = []
    with torch.inference_mode():
        conds: list[torch.Tensor | None] = [None] * len(inputs)
        if any(im is not None for im in inputs):
            with placement.use("vae", model.vae) as vae:
                conds = [None if im is None else encode_condition(vae, im, dtype, device, vae_tile)
                         for im in inputs]
        with placement.use("transformer", model.transformer) as dit:
            for b, (h, w) in enumerate(grids):
                hp, wp = h // 2, w // 2
                shapes = [(1, hp, wp)] * (layers + 1) + ([(1, hp, wp)] if conds[b] is not None else [])
                sigmas = get_sigmas(steps, calculate_mu(hp * wp))
                guidance = None if neg is None else Guidance(neg[b], cfg, cfg_normalize)
                tokens = sum(f * y * x for f, y, x in shapes) + pos[b].embeds.shape[1]
                batched = guidance is not None and choose_cfg_batch(cfg_batch, dit, tokens, dtype, device)
                x = pack_latents(noises[b].to(device))  # (1, (N+1)*hp*wp, 64)
                finals.append(denoise(dit, x, conds[b], shapes, pos[b], guidance, sigmas, cfg_batch=batched,
                                      on_step=step))
        placement.release("transformer", model.transformer)
        frames = list(range(1, layers + 1)) + ([0] if keep_composite else [])
        out = []
        with placement.use("vae", model.vae) as vae:
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


def _common(model: Any, layers: Any, steps: Any, cfg: Any, seed: Any, cfg_batch: Any, generator_device: Any,
            placement: Placement | None) -> tuple:
    """Validate the parameters every pipeline shares."""
    model = chk.check_model(model)
    return (model, chk.check_layers(layers), chk.check_steps(steps), chk.check_cfg(cfg), chk.check_seed(seed),
            chk.check_cfg_batch(cfg_batch), chk.check_device(generator_device),
            placement if placement is not None else ResidentPlacement(model.device, model.dtype))


def decompose(
    model: QwenLayeredModel,
    image: Any,
    *,
    mask: Any = None,
    prompt: str | None = None,
    negative_prompt: str | None = " ",
    prompt_embeds: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    negative_embeds: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    layers: int = 4,
    steps: int = 50,
    cfg: float = 4.0,
    cfg_normalize: bool = True,
    seed: int = 0,
    resolution: int | str = 640,
    max_side: int | None = None,
    output_size: str = "processing",
    cfg_batch: bool | str = "auto",
    placement: Placement | None = None,
    callback: Callback | None = None,
    generator_device: torch.device | str = "cpu",
    noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    keep_composite: bool = False,
    vae_tile: int | None = None,
    recompose: str | None = None,
) -> list[LayerStack]:
    """Decompose each image (IMAGE [B,H,W,C], array, PIL or a list) into N RGBA layers; one LayerStack per image.

    Images are resized to the resolution bucket (640/1024 area, or "custom" with max_side) as the reference
    does; `output_size="original"` maps the layers back to each input's size, alpha upsampled edge-aware guided
    by the input (layers.fullres). `mask` (ComfyUI MASK, 1 = transparent) replaces the input alpha; `noise`
    overrides the seeded noise. `vae_tile` (pixels, e.g. 512) encodes and decodes in overlapping tiles to bound
    VAE memory on large images. `recompose` "exact" folds the difference between the input and the layers'
    composite into the layers' colours (alpha unchanged; layers.recompose), "model" keeps the model's colours;
    default: exact for output_size "original", model for "processing" (the model's own output, comparable
    with the reference). The residual report goes to the log and to `stack.metadata["recompose"]`.
    """
    model, layers, steps, cfg, seed, cfg_batch, gen_dev, placement = _common(
        model, layers, steps, cfg, seed, cfg_batch, generator_device, placement)
    vae_tile = vae_tiling.check_tile(vae_tile)
    mode = check_resolution(resolution, max_side)
    output_size = chk.check_output_mode(output_size)
    recompose = check_recompose(recompose or ("exact" if output_size == "original" else "model"))
    images = prepare_images(image, mask)
    originals = image_sizes(images)
    for i, (w, h) in enumerate(originals):
        check_image_size(w, h, f"image {i}" if len(images) > 1 else "image")
    sizes = [bucket_size(w, h, mode, max_side) for w, h in originals]
    if output_size == "original":
        big = max(originals, key=lambda s: s[0] * s[1])
        check_output_size(layers + keep_composite, big[0], big[1], len(images))
    text = _conditions(model, placement, len(images), prompt, negative_prompt, prompt_embeds, prompt_mask,
                       negative_embeds, negative_mask, cfg, max_sequence_length)
    inputs: list[np.ndarray | None] = [resize_rgba(im, s) for im, s in zip(images, sizes, strict=True)]
    if output_size != "original":
        del images  # the full-size inputs are no longer needed
    logger.info("decomposing %d image(s) into %d layers at %s, %d steps, cfg %g%s, seed %d", len(inputs), layers,
                ", ".join(f"{w}x{h}" for w, h in sizes), steps, cfg, " (normalized)" if cfg_normalize else "", seed)
    frames = _run(model, placement, inputs, sizes, layers, steps, cfg, cfg_normalize, seed, cfg_batch, callback,
                  gen_dev, noise, text, keep_composite, vae_tile)
    stacks = []
    for b, (f, size, orig) in enumerate(zip(frames, sizes, originals, strict=True)):
        stack = _stack(f, size, layers, layer_names(layers))
        target = images[b] if output_size == "original" else inputs[b]
        assert target is not None  # decompose always has an input image
        if output_size == "original" and orig != size:
            stack = upsample_stack(stack, images[b])
        if recompose == "exact":
            stack, report = recompose_exact(stack, target, f"image {b}" if len(frames) > 1 else "the image")
            stack.metadata["recompose"] = report.as_dict()
        stacks.append(stack)
    return stacks


def text_to_layers(
    model: QwenLayeredModel,
    prompt: str | None = None,
    *,
    width: int = 640,
    height: int = 640,
    negative_prompt: str | None = " ",
    prompt_embeds: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    negative_embeds: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    layers: int = 4,
    steps: int = 50,
    cfg: float = 4.0,
    cfg_normalize: bool = True,
    seed: int = 0,
    cfg_batch: bool | str = "auto",
    placement: Placement | None = None,
    callback: Callback | None = None,
    generator_device: torch.device | str = "cpu",
    noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    keep_composite: bool = False,
    vae_tile: int | None = None,
) -> LayerStack:
    """Generate N RGBA layers (plus the composite frame, dropped unless kept) from a prompt, with no input image.

    The noisy frames 0..N are the only image tokens (no condition segment, as ComfyUI's text-to-layers graph
    without a ReferenceLatent); RoPE frame ids are 0..N and the text starts at max(hp/2, wp/2, N+1), the
    decomposition's rule with the condition left out (equal to ComfyUI's floor(max(hp, wp)/2) unless N+1 is
    larger). mu uses the tokens of one frame. Sides are rounded to multiples of 16 (64..4096 px).
    """
    model, layers, steps, cfg, seed, cfg_batch, gen_dev, placement = _common(
        model, layers, steps, cfg, seed, cfg_batch, generator_device, placement)
    vae_tile = vae_tiling.check_tile(vae_tile)
    w0 = chk.check_int("width", width, 64, 4096)
    h0 = chk.check_int("height", height, 64, 4096)
    size = (max(16, round(w0 / 16) * 16), max(16, round(h0 / 16) * 16))
    if size != (w0, h0):
        logger.info("text_to_layers: size %dx%d rounded to %dx%d (multiples of 16)", w0, h0, *size)
    text = _conditions(model, placement, 1, prompt, negative_prompt, prompt_embeds, prompt_mask, negative_embeds,
                       negative_mask, cfg, max_sequence_length)
    frames = _run(model, placement, [None], [size], layers, steps, cfg, cfg_normalize, seed, cfg_batch, callback,
                  gen_dev, noise, text, keep_composite, vae_tile)
    return _stack(frames[0], size, layers, layer_names(layers))


def decompose_layer(
    model: QwenLayeredModel,
    stack: LayerStack,
    index: int | str,
    *,
    layers: int = 2,
    **options: Any,
) -> LayerStack:
    """Decompose one layer of `stack` into `layers` sub-layers and splice them in its place (bottom first).

    The layer's pixels (with its alpha) are the input; the result is mapped back to the layer's own size and
    offset. Each sub-layer's alpha is clipped to the parent's alpha (min): no sub-layer paints where the parent
    is transparent or more opaque than it (multiplying instead would fade the parent's soft edges twice, since
    the model already reproduces them). With recompose "exact" (the default) the sub-layers' colours are then
    folded so that, composited normally among themselves, they show the parent's colour wherever they are
    visible (report in `metadata["recompose_split"][parent name]`). Sub-layers inherit opacity, blend mode and
    visibility and are named "<parent> / 1" (bottom) .. "<parent> / N". Accepts decompose's keyword options
    except output_size.
    """
    if not isinstance(stack, LayerStack):
        raise InputError(f"stack must be a LayerStack, got {type(stack).__name__}")
    if {"output_size", "image", "mask", "keep_composite"} & set(options):
        raise InputError("decompose_layer takes the layer from the stack; do not pass image, mask, output_size or "
                         "keep_composite")
    chk.check_model(model)
    recompose = check_recompose(options.pop("recompose", None) or "exact")
    i = stack.index_of(index)
    parent = stack.layers[i]
    if parent.is_empty:
        raise InputError(f"layer {i} ({parent.name!r}) is fully transparent; there is nothing to decompose")
    parent = parent.cropped()
    block, (ox, oy) = _pad_block(parent.pixels)
    sub = decompose(model, block, layers=layers, output_size="original", recompose="model", **options)[0]
    if recompose == "exact":
        sub = snap_alpha(sub)  # before the clip below, so that no sub-layer ends up more opaque than the parent
    limit = np.zeros(block.shape[:2], np.float32)  # the parent's alpha on the padded block
    limit[oy : oy + parent.height, ox : ox + parent.width] = parent.alpha
    cuts = []
    for n, layer in enumerate(sub.layers, 1):
        px = paste_layer(np.zeros_like(block), layer)  # (H, W, 4) on the block
        px[..., 3] = np.minimum(px[..., 3], limit)
        cuts.append(Layer.from_canvas(px, name=f"{parent.name} / {n}", visible=parent.visible))
    out = stack.replace()
    if recompose == "exact":  # folded as a plain normal-mode group on the block, before the parent's properties
        group, report = recompose_exact(LayerStack(block.shape[1], block.shape[0], cuts), block,
                                        f"layer {i} ({parent.name!r})", snap=False)
        cuts = group.layers
        out.metadata["recompose_split"] = {**out.metadata.get("recompose_split", {}), parent.name: report.as_dict()}
    out.layers[i : i + 1] = [cut.replace(x=cut.x + parent.x - ox, y=cut.y + parent.y - oy, opacity=parent.opacity,
                                         blend_mode=parent.blend_mode) for cut in cuts]
    return out


def _pad_block(px: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad a layer's pixels (h, w, 4) float with transparency to >= 32 px per side and <= 8:1; returns offset."""
    from .imaging import MAX_ASPECT, MIN_INPUT_SIDE

    h, w = px.shape[:2]
    W = max(w, MIN_INPUT_SIDE, int(np.ceil(h / MAX_ASPECT)))
    H = max(h, MIN_INPUT_SIDE, int(np.ceil(W / MAX_ASPECT)))
    W = max(W, int(np.ceil(H / MAX_ASPECT)))
    if (W, H) == (w, h):
        return px, (0, 0)
    out = np.zeros((H, W, 4), np.float32)
    ox, oy = (W - w) // 2, (H - h) // 2
    out[oy : oy + h, ox : ox + w] = px
    return out, (ox, oy)
