"""Tiled RGBA-VAE decode and encode with linear-ramp blending, for outputs too large to convert in one piece.

The VAE's working memory grows with the area it converts at once (about 4.2 GB per megapixel per frame when
decoding in bf16, performance.md). Tiling bounds it by the tile area: the input is cut into overlapping tiles,
each converted on its own, and the results are blended with weights that ramp linearly across every overlap
(normalised by the summed weights), so there is no seam and image borders keep full weight. A tile's border
pixels, which saw zero padding instead of their neighbours, get the smallest weights. Not bit-exact: the mid
block's attention is global, so each tile sees only its own context (as with diffusers' and ComfyUI's tiling).
Defaults follow ComfyUI: 512 px tiles with 64 px overlap.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ...errors import InputError
from ..arch.vae import RGBAVAE

DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of `tile`-long tiles covering [0, length) with stride tile - overlap, the last flush with the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _ramp(size: int, fade_in: int, fade_out: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """1-D weights: linear from 1/(2f) up to 1 over the first `fade_in` samples, down over the last `fade_out`."""
    w = torch.ones(size, dtype=dtype, device=device)
    if fade_in:
        w[:fade_in] = (torch.arange(fade_in, dtype=dtype, device=device) + 0.5) / fade_in
    if fade_out:
        w[size - fade_out :] = torch.minimum(
            w[size - fade_out :], (torch.arange(fade_out, 0, -1, dtype=dtype, device=device) - 0.5) / fade_out
        )
    return w


def _check(tile: int, overlap: int, multiple: int, what: str) -> None:
    if not isinstance(tile, int) or not isinstance(overlap, int) or isinstance(tile, bool):
        raise InputError(f"{what}: tile and overlap must be ints (pixels), got {tile!r} and {overlap!r}")
    if tile % multiple or overlap % multiple or overlap < 0 or tile < 2 * max(overlap, multiple):
        raise InputError(
            f"{what}: tile {tile} px and overlap {overlap} px must be multiples of {multiple} px with "
            f"0 <= overlap <= tile / 2 and tile >= {2 * multiple}; e.g. tile=512, overlap=64"
        )


def _tiled(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tile: int,
    overlap: int,
    scale: float,
    out_channels: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """Apply a spatial map `fn` ((B, C, th, tw) -> (B, C', th*scale, tw*scale)) tile by tile and blend the results.

    `tile` and `overlap` are in input units; the output is accumulated in fp32 on x's device.
    """
    b, _, h, w = x.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out_h, out_w = round(h * scale), round(w * scale)
    acc = torch.zeros((b, out_channels, out_h, out_w), dtype=torch.float32, device=x.device)
    weight = torch.zeros((out_h, out_w), dtype=torch.float32, device=x.device)
    fade = round(overlap * scale)
    for y0 in ys:
        for x0 in xs:
            part = fn(x[:, :, y0 : y0 + tile, x0 : x0 + tile])  # (B, C', th*scale, tw*scale)
            th, tw = part.shape[-2:]
            oy, ox = round(y0 * scale), round(x0 * scale)
            wy = _ramp(th, fade if y0 > 0 else 0, fade if y0 + tile < h else 0, torch.float32, x.device)
            wx = _ramp(tw, fade if x0 > 0 else 0, fade if x0 + tile < w else 0, torch.float32, x.device)
            mask = wy[:, None] * wx[None, :]  # (th, tw)
            acc[:, :, oy : oy + th, ox : ox + tw].addcmul_(part.float(), mask)
            weight[oy : oy + th, ox : ox + tw] += mask
    return (acc / weight).to(out_dtype)


def tiled_decode(vae: RGBAVAE, z: Tensor, *, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> Tensor:
    """Latents (B, 16, h, w), not normalised -> pixels (B, 4, 8h, 8w) in [-1, 1], decoded in overlapping tiles.

    `tile` and `overlap` are output pixels (multiples of the VAE's 8x factor); one tile covers the whole image
    when it is no larger than `tile`, which then equals `vae.decode`.
    """
    f = vae.config.scale_factor
    _check(tile, overlap, f, "tiled_decode")
    if z.ndim != 4:
        raise InputError(f"tiled_decode expects latents (B, {vae.config.z_dim}, h, w), got {tuple(z.shape)}")
    if z.shape[-2] * f <= tile and z.shape[-1] * f <= tile:
        return vae.decode(z)
    out = _tiled(vae.decode, z, tile // f, overlap // f, f, vae.config.input_channels, vae.dtype)
    return out.clamp_(-1.0, 1.0)


def tiled_encode(vae: RGBAVAE, x: Tensor, *, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> Tensor:
    """Pixels (B, 4, H, W) in [-1, 1] -> latents (B, 16, H/8, W/8) (posterior mean), encoded in overlapping tiles.

    `tile` and `overlap` are input pixels, multiples of 8; H and W must be multiples of 8 as for `vae.encode`.
    """
    f = vae.config.scale_factor
    _check(tile, overlap, f, "tiled_encode")
    if x.ndim != 4 or x.shape[-1] % f or x.shape[-2] % f:
        raise InputError(f"tiled_encode expects pixels (B, 4, H, W) with H, W multiples of {f}, got {tuple(x.shape)}")
    if x.shape[-2] <= tile and x.shape[-1] <= tile:
        return vae.encode(x)
    return _tiled(vae.encode, x, tile, overlap, 1 / f, vae.config.z_dim, vae.dtype)


MIN_TILE = 64


def check_tile(tile: object, name: str = "vae_tile") -> int | None:
    """Validate a pipeline's tile option: None (no tiling) or pixels, a multiple of 8 of at least 64."""
    if tile is None:
        return None
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < MIN_TILE or tile % 8:
        raise InputError(
            f"{name} must be None (decode whole frames) or a tile size in pixels, a multiple of 8 and at least "
            f"{MIN_TILE} (e.g. 512), got {tile!r}"
        )
    return tile


def overlap_for(tile: int) -> int:
    """The overlap used with a tile size: 64 px, or a quarter of smaller tiles (rounded down to 8 px)."""
    return min(DEFAULT_OVERLAP, tile // 4 // 8 * 8)


def decode(vae: RGBAVAE, z: Tensor, tile: int | None = None) -> Tensor:
    """`vae.decode(z)` when `tile` is None, else `tiled_decode` with that tile size (the pipelines' switch)."""
    return vae.decode(z) if tile is None else tiled_decode(vae, z, tile=tile, overlap=overlap_for(tile))


def encode(vae: RGBAVAE, x: Tensor, tile: int | None = None) -> Tensor:
    """`vae.encode(x)` when `tile` is None, else `tiled_encode` with that tile size (the pipelines' switch)."""
    return vae.encode(x) if tile is None else tiled_encode(vae, x, tile=tile, overlap=overlap_for(tile))


__all__ = [
    "DEFAULT_OVERLAP", "DEFAULT_TILE", "check_tile", "decode", "encode", "overlap_for", "tile_starts", "tiled_decode",
    "tiled_encode",
]  # fmt: skip
