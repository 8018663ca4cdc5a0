"""The mechanics under the pipelines: seeded noise, the flow-matching loop with true CFG, frame-wise VAE I/O.

Follows diffusers 0.42.1 `QwenImageLayeredPipeline.__call__` (model_spec §3.4-§3.8): noise drawn as
(B, N+1, 16, h, w) in the embeddings' dtype and packed; condition tokens appended after the noisy tokens;
the timestep double-rounded through the state dtype; v = v_neg + s (v_pos - v_neg), optionally rescaled per
token to |v_pos|; Euler in fp32; frame 0 (the composite) dropped before decoding. Unlike the reference, each
image runs on its own (so batches group correctly and memory stays bounded) and every layer is decoded as its
own single frame.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..arch.rope import FrameShape
from ..arch.transformer import QwenImageLayeredTransformer
from ..arch.vae import RGBAVAE
from ..runtime import vae_tiling
from ..runtime.memory import available_device_memory
from ..runtime.memory_plan import cfg_batch_fits, dequant_transient_bytes
from .imaging import from_model_pixels, pack_latents, to_model_pixels
from .scheduler import euler_step, timesteps_for_model

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16
VAE_SCALE = 8


@dataclass
class TextCond:
    """One text condition: embeddings (1, L, D) and a {1, 0} mask (1, L) or None when nothing is padded."""

    embeds: Tensor
    mask: Tensor | None = None

    def to(self, device: torch.device) -> TextCond:
        """The same condition on `device`."""
        return TextCond(self.embeds.to(device), None if self.mask is None else self.mask.to(device))


@dataclass
class Guidance:
    """True classifier-free guidance: the negative condition, the scale s > 1 and per-token rescaling."""

    negative: TextCond
    scale: float
    normalize: bool = True


def latent_grid(width: int, height: int) -> tuple[int, int]:
    """Latent (h, w) of a processing size: pixels / 8, both even (the size is a multiple of 16)."""
    return height // VAE_SCALE, width // VAE_SCALE


def draw_noise(
    shapes: Sequence[tuple[int, int, int]], seed: int, dtype: torch.dtype, generator_device: torch.device | str = "cpu"
) -> list[Tensor]:
    """Initial noise (1, F, 16, h, w) per image for shapes (F, h, w), from one generator seeded with `seed`.

    Equal shapes are drawn as one (B, F, 16, h, w) tensor exactly like the reference's `randn_tensor`, so image b
    of a batch gets the reference's slice b; unequal shapes are drawn one after the other from the same generator.
    """
    gen = torch.Generator(device=generator_device).manual_seed(seed)
    dev = gen.device
    if len(set(shapes)) == 1:
        f, h, w = shapes[0]
        batch = torch.randn((len(shapes), f, LATENT_CHANNELS, h, w), generator=gen, device=dev, dtype=dtype)
        return [batch[i : i + 1] for i in range(len(shapes))]
    return [torch.randn((1, f, LATENT_CHANNELS, h, w), generator=gen, device=dev, dtype=dtype) for f, h, w in shapes]


def encode_condition(
    vae: RGBAVAE, rgba: np.ndarray, dtype: torch.dtype, device: torch.device, tile: int | None = None
) -> Tensor:
    """Processing-size RGBA uint8 (H, W, 4) -> normalised, packed condition tokens (1, (H/16)(W/16), 64).

    `tile` (pixels) encodes in overlapping tiles (vae_tiling) to bound memory on large images.
    """
    x = to_model_pixels(rgba, vae.dtype, device)  # (1, 4, H, W) in [-1, 1]
    z = vae.normalize_latents(vae_tiling.encode(vae, x, tile))  # (1, 16, h, w)
    return pack_latents(z[:, None]).to(dtype)  # (1, 1, 16, h, w) -> (1, hp*wp, 64)


def decode_frames(vae: RGBAVAE, latents: Tensor, frames: Sequence[int], tile: int | None = None) -> list[np.ndarray]:
    """Normalised latents (F, 16, h, w) -> straight RGBA float32 (H, W, 4) for each frame in `frames`, one at a time.

    `tile` (pixels) decodes each frame in overlapping tiles (vae_tiling) to bound memory on large outputs.
    """
    z = vae.denormalize_latents(latents.to(vae.dtype))  # (F, 16, h, w), the reference's z / (1/std) + mean
    out = []
    for k in frames:
        out.append(from_model_pixels(vae_tiling.decode(vae, z[k : k + 1], tile))[0])  # (1, 4, H, W) -> (H, W, 4)
    return out


def guided_velocity(v_pos: Tensor, v_neg: Tensor, scale: float, normalize: bool) -> Tensor:
    """True CFG v_neg + s (v_pos - v_neg); with `normalize`, rescaled per token to |v_pos| (no epsilon).

    A token whose guided velocity is exactly zero would give 0/0 in the reference; it stays zero here (the only
    case where the guard acts, so every other value is the reference's).
    """
    comb = v_neg + scale * (v_pos - v_neg)
    if not normalize:
        return comb
    cond_norm = torch.linalg.vector_norm(v_pos, dim=-1, keepdim=True)  # (B, S, 1)
    comb_norm = torch.linalg.vector_norm(comb, dim=-1, keepdim=True)
    ratio = cond_norm / comb_norm
    ratio = torch.where(comb_norm == 0, torch.zeros_like(ratio), ratio)
    return comb * ratio


def batch_text(a: TextCond, b: TextCond) -> TextCond:
    """Stack two conditions (1, La, D) and (1, Lb, D) into (2, L, D), padding the shorter with a masked zero tail."""
    length = max(a.embeds.shape[1], b.embeds.shape[1])
    rows, masks = [], []
    for c in (a, b):
        n = c.embeds.shape[1]
        pad = c.embeds.new_zeros((1, length - n, c.embeds.shape[2]))
        rows.append(torch.cat([c.embeds, pad], dim=1))
        valid = (
            c.mask.to(torch.long)
            if c.mask is not None
            else torch.ones((1, n), dtype=torch.long, device=c.embeds.device)
        )
        masks.append(torch.cat([valid, valid.new_zeros((1, length - n))], dim=1))
    mask = torch.cat(masks, dim=0)  # (2, L)
    return TextCond(torch.cat(rows, dim=0), None if bool(mask.all()) else mask)


def choose_cfg_batch(
    cfg_batch: bool | str, dit: QwenImageLayeredTransformer, tokens: int, dtype: torch.dtype, device: torch.device
) -> bool:
    """Resolve cfg_batch: True/False as given; "auto" batches when the device has room for a second sample."""
    if cfg_batch != "auto":
        return bool(cfg_batch)
    free = available_device_memory(device)
    # Quantised layers (any format) are dequantised one at a time: the largest one's temporaries come on top.
    use = cfg_batch_fits(
        tokens,
        free_device_bytes=free,
        width=dit.config.inner_dim,
        dtype=dtype,
        transient_bytes=dequant_transient_bytes(dit, dtype),
    )
    logger.debug("cfg_batch auto: %s (free %s, %d tokens)", use, free, tokens)
    return use


def denoise(
    dit: QwenImageLayeredTransformer,
    noise: Tensor,
    condition: Tensor | None,
    img_shapes: Sequence[FrameShape],
    text: TextCond,
    guidance: Guidance | None,
    sigmas: Tensor,
    *,
    cfg_batch: bool = False,
    on_step: Callable[[], None] | None = None,
) -> Tensor:
    """Run the flow-matching loop on packed noise (1, S_noisy, 64); returns the final packed latents, same shape.

    `condition` (1, S_cond, 64) is appended after the noisy tokens (None for text-to-layers); `img_shapes` lists
    (1, hp, wp) per noisy frame, then the condition's. `on_step()` runs after every step and may raise to cancel.
    """
    x = noise
    n = x.shape[1]
    device = x.device
    has_cond = condition is not None
    pair = batch_text(text, guidance.negative) if guidance is not None and cfg_batch else None
    for i in range(len(sigmas) - 1):
        inp = x if condition is None else torch.cat([x, condition], dim=1)  # (1, S_img, 64)
        if pair is not None:
            t = timesteps_for_model(sigmas[i], x.dtype, 2, device)
            # additional_t_cond None = zeros ("is_rgb" 0), as the reference always passes
            out = dit(inp.expand(2, -1, -1), pair.embeds, pair.mask, t, img_shapes, None, has_cond)[:, :n]
            v = guided_velocity(out[0:1], out[1:2], guidance.scale, guidance.normalize)  # type: ignore[union-attr]
        else:
            t = timesteps_for_model(sigmas[i], x.dtype, 1, device)
            v = dit(inp, text.embeds, text.mask, t, img_shapes, None, has_cond)[:, :n]
            if guidance is not None:
                neg = guidance.negative
                v_neg = dit(inp, neg.embeds, neg.mask, t, img_shapes, None, has_cond)[:, :n]
                v = guided_velocity(v, v_neg, guidance.scale, guidance.normalize)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        if on_step is not None:
            on_step()
    return x
