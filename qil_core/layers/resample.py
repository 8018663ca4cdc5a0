"""Premultiplied-alpha resampling: box-exact resizing through Pillow, and an affine warp for rotations.

Straight-alpha resampling mixes the (meaningless) colour under alpha 0 into the visible edge, which is the
colour fringe users report. Everything here takes and returns *premultiplied* RGBA (h, w, 4) float32, so a
transparent pixel contributes nothing whatever its stored RGB; `premultiply` / `unpremultiply` convert.
Coordinates are continuous pixel coordinates: pixel i covers [i, i + 1) and its centre is i + 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
    out = np.empty(prem.shape, np.float32)
    a = out[..., 3]
    np.clip(prem[..., 3], 0, 1, out=a)
    a[a < ALPHA_EPS] = 0
    inv = np.divide(1, a, out=np.zeros_like(a), where=a > 0)  # 0 under alpha 0 zeroes the colour
    for c in range(3):
        ch = out[..., c]
        np.clip(prem[..., c], 0, a, out=ch)
        ch *= inv
        np.minimum(ch, 1, out=ch)
    return out


def resample_box(
    prem: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int], interpolation: str = "lanczos"
) -> np.ndarray:
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


def _kernel(interpolation: str) -> tuple[int, Callable[[np.ndarray], np.ndarray]]:
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
        # sinc(t)·sinc(t/3) = 3·sin(πt)·sin(πt/3) / (πt)², 1 at t = 0, 0 outside |t| < 3.
        pt = np.float32(np.pi) * t.astype(np.float32)
        den = pt * pt
        val = np.divide(3 * np.sin(pt) * np.sin(pt / 3), den, out=np.ones_like(pt), where=den > 1e-12)
        return np.where(np.abs(pt) < 3 * np.float32(np.pi), val, np.float32(0))

    return 3, lanczos


def warp_affine(
    prem: np.ndarray, inverse: np.ndarray, size: tuple[int, int], interpolation: str = "lanczos"
) -> np.ndarray:
    """Sample premultiplied (h, w, 4) at `inverse` @ (X + 0.5, Y + 0.5, 1) for every output pixel; -> (H, W, 4).

    `inverse` (2, 3) maps output pixel coordinates to source coordinates. Meant for rotations and
    magnification: it does not widen the kernel, so shrink with `resample_box` first. Only output pixels whose
    kernel reaches the source are computed; the rest stay transparent.
    """
    check_interpolation(interpolation)
    out_w, out_h = int(size[0]), int(size[1])
    m = np.asarray(inverse, np.float64)
    h, w = prem.shape[:2]
    radius, kern = (0, None) if interpolation == "nearest" else _kernel(interpolation)
    pad = 2 * radius + 1  # every tap of a sample within `radius` of the source stays inside the padding
    wp = w + 2 * pad  # padded row length
    # Planar padded source: gathers and multiply-adds then run on flat float32 arrays (fast in numpy).
    planes = [np.pad(prem[..., c], pad).ravel() for c in range(4)]  # transparent border reads zero
    out = np.zeros((out_h * out_w, 4), np.float32)
    xs = np.arange(out_w, dtype=np.float64) + 0.5
    rows = max(1, _WARP_CHUNK // max(1, out_w))
    for r0 in range(0, out_h, rows):
        ys = np.arange(r0, min(out_h, r0 + rows), dtype=np.float64)[:, None] + 0.5
        u = (m[0, 0] * xs + m[0, 1] * ys + m[0, 2]).ravel()  # source x of each output pixel centre
        v = (m[1, 0] * xs + m[1, 1] * ys + m[1, 2]).ravel()
        reach = max(radius, 1)
        sel = np.flatnonzero((u > -reach) & (u < w + reach) & (v > -reach) & (v < h + reach))
        if sel.size == 0:
            continue
        u, v = u[sel] + pad, v[sel] + pad  # padded coordinates
        dest = out[r0 * out_w + sel]
        if kern is None:
            idx = np.floor(v).astype(np.intp) * wp + np.floor(u).astype(np.intp)
            for c in range(4):
                dest[:, c] = planes[c][idx]
            out[r0 * out_w + sel] = dest
            continue
        fx, fy = np.floor(u - 0.5), np.floor(v - 0.5)
        bx = fx.astype(np.intp) - radius + 1  # first tap column / row
        by = fy.astype(np.intp) - radius + 1
        taps = range(2 * radius)
        wx = np.stack([kern(u - 0.5 - (bx + k)) for k in taps]).astype(np.float32)  # (2R, n)
        wy = np.stack([kern(v - 0.5 - (by + k)) for k in taps]).astype(np.float32)
        wx /= np.where(wx.sum(0) != 0, wx.sum(0), 1)  # normalise each axis so flat areas stay flat
        wy /= np.where(wy.sum(0) != 0, wy.sum(0), 1)
        acc = np.zeros((4, sel.size), np.float32)
        for j in taps:
            row = (by + j) * wp
            for k in taps:
                idx = row + (bx + k)
                weight = wy[j] * wx[k]
                for c in range(4):
                    acc[c] += planes[c][idx] * weight
        # Anti-ringing: keep each value within the range of the 2x2 source pixels around the sample.
        # Cubic and Lanczos lobes otherwise draw a faint ghost outline 2-3 px outside a rotated edge.
        i00 = fy.astype(np.intp) * wp + fx.astype(np.intp)
        for c in range(4):
            quad = np.stack([planes[c][i00], planes[c][i00 + 1], planes[c][i00 + wp], planes[c][i00 + wp + 1]])
            dest[:, c] = np.clip(acc[c], quad.min(0), quad.max(0)) if radius > 1 else acc[c]
        out[r0 * out_w + sel] = dest
    return out.reshape(out_h, out_w, 4)
