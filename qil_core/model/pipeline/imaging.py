"""Pipeline inputs and outputs in pixel and latent space (model_spec §2.1, §2.4, §3.1).

Every input (torch tensor, numpy array, PIL image, or a list of them) becomes straight-alpha RGBA uint8
(H, W, 4): grey is expanded to RGB, a missing alpha is padded with 255 (opaque, as ComfyUI pads it), NaN/inf
and out-of-range values are repaired with a warning (robustness D7). Tensors and arrays are channel-last
(ComfyUI's IMAGE [B, H, W, C] or [H, W, C]); floats are 0..1, uint8 0..255, uint16 0..65535.

Resizing to the processing size goes through Pillow's Lanczos on uint8 RGBA, exactly the reference's
`VaeImageProcessor.resize` (Pillow premultiplies RGBA internally: RGBA -> RGBa -> resize -> RGBA, checked in
tests), so an 8-bit input gives the reference's pixels bit for bit. Float inputs are rounded to 8 bit first,
which is exact for images that came from 8-bit files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...errors import InputError
from ...layers.document import mask_to_alpha
from ...layers.image_file import pil_array
from ...layers.stack import MAX_CANVAS_SIDE
from ..runtime.memory import available_ram, format_bytes
from .options import CUSTOM, SIDE_MULTIPLE, check_size_mode

logger = logging.getLogger(__name__)

MIN_INPUT_SIDE = 32  # below this an image carries too little to decompose (robustness D4)
MAX_ASPECT = 8.0  # beyond 8:1 the buckets give slivers; at ~1600:1 the reference rounds a side to 0 (D5)
_CHUNK_PIXELS = 1 << 22  # rows converted per chunk: bounds temporaries of huge inputs to ~64 MB
_CONSTANT_SPREAD = 3 / 255  # D9: a 1..99 percentile spread below this is "almost constant"


# --- any image -> RGBA uint8 ------------------------------------------------------------------------------


def prepare_images(image: Any, mask: Any = None) -> list[np.ndarray]:
    """Images (tensor/array [B,H,W,C] or [H,W,C] or [H,W], PIL, or a list) -> list of RGBA uint8 (H, W, 4).

    `mask` (ComfyUI MASK, [B,H,W] or [H,W], 1 = transparent) replaces the alpha: alpha = 1 - mask.
    """
    if image is None:
        raise InputError("image is None; connect an IMAGE (or pass a tensor, array or PIL image)")
    if isinstance(image, (list, tuple)):
        if not image:
            raise InputError("image list is empty; pass at least one image")
        images = [im for item in image for im in _as_batch(item)]
    else:
        images = _as_batch(image)
    if mask is not None:
        alphas = _mask_alphas(mask, len(images))
        for i, (im, a) in enumerate(zip(images, alphas, strict=True)):
            if a.shape != im.shape[:2]:
                raise InputError(
                    f"mask {i} is {a.shape[1]}x{a.shape[0]} but image {i} is {im.shape[1]}x{im.shape[0]}; "
                    "resize the mask to the image first"
                )
            im[..., 3] = a
    for i, im in enumerate(images):
        warn_if_constant(im, f"image {i}")
    return images


def _as_batch(image: Any) -> list[np.ndarray]:
    """One input (PIL, tensor or array, with or without a batch axis) -> list of RGBA uint8 images."""
    if isinstance(image, Image.Image):
        return [_from_pil(image)]
    arr = _to_numpy(image)
    if arr.ndim == 2:
        arr = arr[None, :, :, None]  # (H, W) grey
    elif arr.ndim == 3:
        arr = arr[None]  # (H, W, C): add the batch axis
    if arr.ndim != 4 or arr.shape[-1] not in (1, 2, 3, 4):
        raise InputError(
            f"expected an image [B, H, W, C] or [H, W, C] with C in 1..4 (channel-last, like ComfyUI's IMAGE), "
            f"got shape {tuple(arr.shape)}"
        )
    if arr.shape[0] == 0:
        raise InputError("image batch is empty (batch size 0)")
    return [_to_rgba8(arr[b], f"image {b}") for b in range(arr.shape[0])]


def _to_numpy(value: Any) -> np.ndarray:
    """A tensor (any device or dtype, moved to the CPU explicitly) or array-like as a numpy array."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.dtype in (torch.float16, torch.bfloat16, torch.float64):
            t = t.float()
        return t.cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise InputError(f"unsupported image type {type(value).__name__}; pass a torch tensor, numpy array or PIL image")


def _from_pil(im: Image.Image) -> np.ndarray:
    """A PIL image -> RGBA uint8; 16-bit and float modes are scaled, not clipped (the LoadImage pitfall, D9).

    The mode handling is the layer library's (`layers.image_file.pil_array`), shared with every file reader."""
    arr = pil_array(im)
    return arr if arr.dtype == np.uint8 else _to_rgba8(arr, "image")


def _to_rgba8(arr: np.ndarray, what: str) -> np.ndarray:
    """(H, W, C) of any supported dtype -> (H, W, 4) uint8, converted in row chunks to bound temporaries."""
    h, w, c = arr.shape
    if h == 0 or w == 0:
        raise InputError(f"{what} is empty ({w}x{h} px)")
    if arr.dtype == np.uint8:
        scale = None
    elif arr.dtype == np.uint16:
        scale = 1 / 65535.0
    elif arr.dtype == np.bool_:
        scale = 1.0
    elif np.issubdtype(arr.dtype, np.floating):
        scale = 1.0
    else:
        raise InputError(f"{what} has dtype {arr.dtype}; use float (0..1), uint8 (0..255) or uint16 (0..65535)")
    out = np.empty((h, w, 4), np.uint8)
    if c < 4:
        out[..., 3] = 255
    src = {1: [0, 0, 0], 2: [0, 0, 0, 1], 3: [0, 1, 2], 4: [0, 1, 2, 3]}[c]
    dst = [0, 1, 2, 3][: len(src)]
    bad = clipped = 0
    rows = max(1, _CHUNK_PIXELS // w)
    for r0 in range(0, h, rows):
        block = arr[r0 : r0 + rows][..., src]
        if scale is None:
            out[r0 : r0 + rows, :, dst] = block
            continue
        f = block.astype(np.float32) * np.float32(scale)
        finite = np.isfinite(f)
        if not finite.all():
            bad += int((~finite).sum())
            f = np.nan_to_num(f, nan=0.0, posinf=1.0, neginf=0.0)
        outside = (f < 0) | (f > 1)
        if outside.any():
            clipped += int(outside.sum())
            np.clip(f, 0, 1, out=f)
        out[r0 : r0 + rows, :, dst] = np.rint(f * 255)
    if bad:
        logger.warning("%s contains %d NaN/inf values; NaN became 0, +inf 1 and -inf 0", what, bad)
    if clipped:
        logger.warning("%s has %d values outside 0..1; they were clamped", what, clipped)
    return out


def _mask_alphas(mask: Any, count: int) -> list[np.ndarray]:
    """ComfyUI MASK ([B,H,W] or [H,W], 1 = transparent) -> per-image alpha uint8 (H, W), batch 1 broadcast."""
    m = _to_numpy(mask)
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim != 3:
        raise InputError(f"mask must be [B, H, W] or [H, W] (1 = transparent), got shape {tuple(m.shape)}")
    if m.shape[0] not in (1, count):
        raise InputError(f"mask batch is {m.shape[0]} but there are {count} images; pass 1 or {count} masks")
    out = []
    for b in range(count):
        alpha = mask_to_alpha(_to_numpy(m[min(b, m.shape[0] - 1)]).astype(np.float32))
        out.append(_to_rgba8(alpha[..., None], f"mask {b}")[..., 0])
    return out


def warn_if_constant(rgba: np.ndarray, what: str = "image") -> bool:
    """Log a warning (and return True) when an image is almost one flat colour (D9: clipped 16-bit PNGs)."""
    step = max(1, int(math.sqrt(rgba.shape[0] * rgba.shape[1] / 250_000)))
    sample = rgba[::step, ::step].reshape(-1, 4).astype(np.float32) / 255.0
    lo, hi = np.percentile(sample, [1, 99], axis=0)
    if float((hi - lo).max()) < _CONSTANT_SPREAD:
        logger.warning(
            "%s is almost constant (RGBA about %s); check that it loaded correctly - 16-bit PNGs through "
            "ComfyUI's LoadImage arrive clipped to white. The decomposition of a flat image is not meaningful.",
            what,
            tuple(round(float(v), 3) for v in (lo + hi) / 2),
        )
        return True
    return False


# --- sizes -------------------------------------------------------------------------------------------------


def check_image_size(width: int, height: int, what: str = "image") -> None:
    """Refuse images under MIN_INPUT_SIDE px or with an aspect ratio beyond MAX_ASPECT (robustness D4, D5)."""
    if min(width, height) < MIN_INPUT_SIDE:
        raise InputError(
            f"{what} is {width}x{height} px; the shorter side must be at least {MIN_INPUT_SIDE} px. Upscale or pad it "
            "first (a tiny image has nothing to decompose)"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT:
        raise InputError(
            f"{what} is {width}x{height} px, an aspect ratio of {ratio:.1f}:1; ratios beyond {MAX_ASPECT:g}:1 are not "
            "supported. Crop it, or pad it to a less extreme shape"
        )


def bucket_size(width: int, height: int, resolution: int | str = 640, max_side: int | None = None) -> tuple[int, int]:
    """Processing (width, height) for an input size, as the reference's `calculate_dimensions` rounds it.

    640/1024: width = round(sqrt(A * r) / 32) * 32, height = round(width_exact / r / 32) * 32 with A = res^2 and
    r = width / height (Python round: halves to even). "custom": the longest side is max_side rounded to a
    multiple of 32, the other side keeps the aspect, rounded the same way, at least 32.
    """
    mode, max_side = check_size_mode(resolution, max_side)
    ratio = width / height
    if mode == CUSTOM:
        long_side = max(SIDE_MULTIPLE, round(int(max_side) / SIDE_MULTIPLE) * SIDE_MULTIPLE)  # type: ignore[arg-type]
        short = long_side * min(width, height) / max(width, height)
        short_side = max(SIDE_MULTIPLE, round(short / SIDE_MULTIPLE) * SIDE_MULTIPLE)
        return (long_side, short_side) if width >= height else (short_side, long_side)
    area_side = int(mode)  # past the custom branch: an area bucket side (640 or 1024)
    w = math.sqrt(area_side * area_side * ratio)
    h = w / ratio
    w32, h32 = round(w / SIDE_MULTIPLE) * SIDE_MULTIPLE, round(h / SIDE_MULTIPLE) * SIDE_MULTIPLE
    # the reference then floors to multiples of 16 (vae scale x patch), a no-op on multiples of 32
    return max(SIDE_MULTIPLE, w32 // 16 * 16), max(SIDE_MULTIPLE, h32 // 16 * 16)


def estimate_output_bytes(layers: int, width: int, height: int, images: int = 1) -> int:
    """Upper bound of the float32 RGBA bytes of `images` x `layers` full-canvas layers (each may span it)."""
    return int(images) * int(layers) * int(width) * int(height) * 4 * 4


def check_output_size(layers: int, width: int, height: int, images: int = 1, *, available: int | None = None) -> None:
    """Refuse, before any sampling, an output mapping that would not fit in RAM or in a PSD (robustness D6)."""
    if max(width, height) > MAX_CANVAS_SIDE:
        raise InputError(
            f"output size {width}x{height} px is over the {MAX_CANVAS_SIDE} px per side limit of the layer "
            "documents; use output_size='processing' or downscale the image first"
        )
    need = estimate_output_bytes(layers, width, height, images)
    free = available if available is not None else available_ram()
    if free is not None and need > free // 2:
        raise InputError(
            f"mapping {images * layers} layers back to {width}x{height} px needs up to {format_bytes(need)} of float32 "
            f"RGBA, but only {format_bytes(free)} of RAM is free (at most half is used for this). Use "
            "output_size='processing', fewer layers, or downscale the image first"
        )


# --- pixels <-> model tensors ------------------------------------------------------------------------------


def resize_rgba(rgba: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGBA uint8 (H, W, 4) -> (height, width, 4) for size = (width, height), Pillow Lanczos (premultiplied)."""
    im = Image.fromarray(np.ascontiguousarray(rgba), "RGBA")
    return np.asarray(im.resize((int(size[0]), int(size[1])), Image.Resampling.LANCZOS))


def to_model_pixels(rgba: np.ndarray, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """RGBA uint8 (H, W, 4) -> (1, 4, H, W) in [-1, 1]: u8 / 255 in float32, then 2x - 1 (as the reference)."""
    x = torch.from_numpy(rgba.astype(np.float32) / np.float32(255.0))  # (H, W, 4)
    x = x.permute(2, 0, 1)[None]  # (1, 4, H, W)
    return (2.0 * x - 1.0).to(device=device, dtype=dtype)


def from_model_pixels(x: torch.Tensor) -> np.ndarray:
    """Decoder output (B, 4, H, W) in [-1, 1] -> straight RGBA float32 (B, H, W, 4) in [0, 1] (x/2 + 0.5, clamped).

    Computed in float32; the reference does it in the VAE's dtype, so with a bf16 VAE its 8-bit pixels can differ
    from these by one step (bf16 cannot hold every 1/255 near 1).
    """
    y = (x.float() * 0.5 + 0.5).clamp(0, 1)
    return y.permute(0, 2, 3, 1).cpu().numpy()


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """Latents (B, F, C, h, w) -> tokens (B, F*(h/2)*(w/2), 4C): frame-major, row, column; feature c*4+dy*2+dx."""
    b, f, c, h, w = z.shape
    if h % 2 or w % 2:
        raise InputError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    z = z.reshape(b, f, c, h // 2, 2, w // 2, 2)
    z = z.permute(0, 1, 3, 5, 2, 4, 6)  # (B, F, h/2, w/2, C, 2, 2)
    return z.reshape(b, f * (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, frames: int, h: int, w: int) -> torch.Tensor:
    """Tokens (B, F*(h/2)*(w/2), 4C) -> latents (B, F, C, h, w), the exact inverse of `pack_latents`."""
    b, n, d = tokens.shape
    if n != frames * (h // 2) * (w // 2) or d % 4:
        raise InputError(f"cannot unpack {tuple(tokens.shape)} tokens into {frames} frames of {h}x{w} latents")
    z = tokens.reshape(b, frames, h // 2, w // 2, d // 4, 2, 2)
    z = z.permute(0, 1, 4, 2, 5, 3, 6)  # (B, F, C, h/2, 2, w/2, 2)
    return z.reshape(b, frames, d // 4, h, w)


def image_sizes(images: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """(width, height) of each RGBA array."""
    return [(int(im.shape[1]), int(im.shape[0])) for im in images]
