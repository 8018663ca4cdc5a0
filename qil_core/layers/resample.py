"""Premultiplied-alpha resampling: box-exact resizing through Pillow, and an affine warp for rotations.

Straight-alpha resampling mixes the (meaningless) colour under alpha 0 into the visible edge, which is the
colour fringe users report. Everything here takes and returns *premultiplied* RGBA (h, w, 4) float32, so a
transparent pixel contributes nothing whatever its stored RGB; `premultiply` / `unpremultiply` convert.
Coordinates are continuous pixel coordinates: pixel i covers [i, i + 1) and its centre is i + 0.5.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..errors import InputError

INTERPOLATIONS: tuple[str, ...] = ("lanczos", "bicubic", "bilinear", "nearest")

_PIL_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}

# Alpha below half an 8-bit step after resampling is ringing from the kernel's lobes, invisible in any
# 8-bit export; dropping it keeps re-cropped bounding boxes tight.
ALPHA_EPS = 0.5 / 255

# Output pixels per chunk of the affine warp: bounds its temporaries to a few tens of MiB.
_WARP_CHUNK = 1 << 17


def check_interpolation(interpolation: str) -> str:
    """Return the interpolation name, or raise InputError listing the allowed ones."""
    if interpolation not in _PIL_FILTERS:
        raise InputError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    return interpolation


def premultiply(px: np.ndarray) -> np.ndarray:
    """Straight RGBA (h, w, 4) -> premultiplied RGBA (h, w, 4) float32 (a new array)."""
    out = np.array(px, dtype=np.float32, copy=True)
    out[..., :3] *= out[..., 3:4]
    return out


def unpremultiply(prem: np.ndarray) -> np.ndarray:
    """Premultiplied RGBA (h, w, 4) -> straight RGBA float32; alpha < ALPHA_EPS becomes 0 with RGB 0.

    Kernel overshoot is clipped first (alpha to 0..1, colour to 0..alpha), so there is never a division
    by zero and never a colour brighter than its own coverage allows.
    """
    out = np.array(prem, dtype=np.float32, copy=True)
    a = np.clip(out[..., 3:4], 0, 1)
    a[a < ALPHA_EPS] = 0
    rgb = np.clip(out[..., :3], 0, a)
    np.divide(rgb, a, out=rgb, where=a > 0)
    rgb[np.broadcast_to(a <= 0, rgb.shape)] = 0
    out[..., :3] = np.clip(rgb, 0, 1)
    out[..., 3:4] = a
    return out


def resample_box(prem: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int],
                 interpolation: str = "lanczos") -> np.ndarray:
    """Resample the source rectangle `box` (x0, y0, x1, y1) of premultiplied (h, w, 4) to (H, W, 4), W, H = size.

    The box may reach outside the source (that part is transparent); downscaling is antialiased (Pillow
    widens the kernel by the scale factor), so this places pixels exactly, to a fraction of a pixel.
    """
    check_interpolation(interpolation)
    out_w, out_h = int(size[0]), int(size[1])
    h, w = prem.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    if out_w < 1 or out_h < 1 or not x1 > x0 or not y1 > y0:
        raise InputError(f"resample: empty box {box} or size {size}")
    # Pillow wants the box inside the image and treats its border as the end of the data (it renormalises
    # the kernel there: opaque edges stay opaque, as in any editor). Where a sub-pixel box overhangs the
    # source, pad with transparent pixels so the overhang is read as coverage < 1.
    pad_l, pad_t = math.ceil(max(0.0, -x0)), math.ceil(max(0.0, -y0))
    pad_r, pad_b = math.ceil(max(0.0, x1 - w)), math.ceil(max(0.0, y1 - h))
    src = prem
    if pad_l or pad_t or pad_r or pad_b:
        src = np.pad(prem, ((pad_t, pad_b), (pad_l, pad_r), (0, 0)))
    pil_box = (x0 + pad_l, y0 + pad_t, x1 + pad_l, y1 + pad_t)
    out = np.empty((out_h, out_w, 4), np.float32)
    for c in range(4):
        channel = Image.fromarray(np.ascontiguousarray(src[..., c]), mode="F")
        out[..., c] = np.asarray(channel.resize((out_w, out_h), _PIL_FILTERS[interpolation], box=pil_box))
    return out


def resize_plane(plane: np.ndarray, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """Resize one (h, w) float32 plane (a mask, say) to size (W, H) with Pillow; -> (H, W) float32."""
    check_interpolation(interpolation)
    img = Image.fromarray(np.ascontiguousarray(plane, np.float32), mode="F")
    return np.asarray(img.resize((int(size[0]), int(size[1])), _PIL_FILTERS[interpolation]), np.float32).copy()


def _kernel(interpolation: str) -> tuple[int, object]:
    """(radius, weight function) of a reconstruction kernel (Pillow's: Keys a = -0.5 cubic, Lanczos-3)."""
    if interpolation == "bilinear":
        return 1, lambda t: np.maximum(0, 1 - np.abs(t))

    if interpolation == "bicubic":
        def cubic(t: np.ndarray) -> np.ndarray:
            t = np.abs(t)
            a = -0.5
            near = ((a + 2) * t - (a + 3)) * t * t + 1
            far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
            return np.where(t < 1, near, np.where(t < 2, far, 0))
        return 2, cubic

    def lanczos(t: np.ndarray) -> np.ndarray:
        return np.where(np.abs(t) < 3, np.sinc(t) * np.sinc(t / 3), 0)
    return 3, lanczos


def warp_affine(prem: np.ndarray, inverse: np.ndarray, size: tuple[int, int],
                interpolation: str = "lanczos") -> np.ndarray:
    """Sample premultiplied (h, w, 4) at `inverse` @ (X + 0.5, Y + 0.5, 1) for every output pixel; -> (H, W, 4).

    `inverse` (2, 3) maps output pixel coordinates to source coordinates. Meant for rotations and
    magnification: it does not widen the kernel, so shrink with `resample_box` first.
    """
    check_interpolation(interpolation)
    out_w, out_h = int(size[0]), int(size[1])
    m = np.asarray(inverse, np.float64)
    radius, kern = (0, None) if interpolation == "nearest" else _kernel(interpolation)
    pad = radius + 1
    src = np.pad(prem, ((pad, pad), (pad, pad), (0, 0)))  # transparent border: outside samples read zero
    hp, wp = src.shape[:2]
    flat = src.reshape(-1, 4)
    out = np.zeros((out_h, out_w, 4), np.float32)
    xs = np.arange(out_w, dtype=np.float64) + 0.5
    rows = max(1, _WARP_CHUNK // max(1, out_w))
    for r0 in range(0, out_h, rows):
        ys = np.arange(r0, min(out_h, r0 + rows), dtype=np.float64)[:, None] + 0.5
        u = m[0, 0] * xs + m[0, 1] * ys + m[0, 2] + pad  # (rows, W) source x in padded coordinates
        v = m[1, 0] * xs + m[1, 1] * ys + m[1, 2] + pad
        chunk = out[r0:r0 + ys.shape[0]]
        if kern is None:
            ix = np.clip(np.floor(u), 0, wp - 1).astype(np.intp)
            iy = np.clip(np.floor(v), 0, hp - 1).astype(np.intp)
            chunk[...] = flat[iy * wp + ix]
            continue
        bx = np.floor(u - 0.5).astype(np.intp) - radius + 1  # first tap column
        by = np.floor(v - 0.5).astype(np.intp) - radius + 1
        taps = range(2 * radius)
        wx = np.stack([kern(u - 0.5 - (bx + k)) for k in taps]).astype(np.float32)  # (2R, rows, W)
        wy = np.stack([kern(v - 0.5 - (by + k)) for k in taps]).astype(np.float32)
        wx /= np.where(wx.sum(0) != 0, wx.sum(0), 1)  # normalise each axis so flat areas stay flat
        wy /= np.where(wy.sum(0) != 0, wy.sum(0), 1)
        for j in taps:
            iy = np.clip(by + j, 0, hp - 1) * wp
            for k in taps:
                weight = wy[j] * wx[k]
                chunk += flat[iy + np.clip(bx + k, 0, wp - 1)] * weight[..., None]
        if radius > 1:
            # Anti-ringing: keep each value within the range of the 2x2 source pixels around the sample.
            # Cubic and Lanczos lobes otherwise draw a faint ghost outline 2-3 px outside a rotated edge.
            x0 = np.clip(np.floor(u - 0.5).astype(np.intp), 0, wp - 2)
            y0 = np.clip(np.floor(v - 0.5).astype(np.intp), 0, hp - 2) * wp
            quad = np.stack([flat[y0 + x0], flat[y0 + x0 + 1], flat[y0 + wp + x0], flat[y0 + wp + x0 + 1]])
            np.clip(chunk, quad.min(0), quad.max(0), out=chunk)
    return out
