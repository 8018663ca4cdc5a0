"""Layer masks and vector masks of a PSD layer as one coverage plane (1 = shown), to multiply into alpha.

- The pixel mask (channel -2) covers its own rectangle; outside it the mask's default colour (0 or 255)
  applies. A disabled mask is ignored.
- When Photoshop stored a "real" mask (channel -3, pixel and vector mask combined with their density and
  feather already applied), that one is used instead and nothing is applied again.
- Otherwise density d maps coverage m to d·m + (1 - d), and feather f (pixels) blurs the mask with a
  Gaussian of sigma f (three box blurs of matched widths) before density.
- A vector mask (path) is rasterised with psd-tools' path filler (area coverage per pixel) and multiplied
  in, with its own feather, then the vector density is applied to the product (as Photoshop's merged
  images show; a density set only for the path also applies to a pixel mask rendered from it);
  shape layers already carry their path in their pixels, so their
  vector mask is not applied a second time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .decode import SCALE, channel_label, decode_plane

Warn = Callable[[str, str], None]
Rect = tuple[int, int, int, int]  # (left, top, right, bottom) on the canvas


def _box_blur(a: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Mean over a window of 2r + 1 along `axis`, with edge values repeated (cumulative sums, O(n))."""
    if r <= 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r + 1, r)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float64)
    n = a.shape[axis]
    hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return ((hi - lo) / (2 * r + 1)).astype(np.float32)


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Approximate Gaussian blur of a 2-D plane: three box blurs per axis whose variances add up to sigma²."""
    if sigma <= 0 or a.size == 0:
        return a
    ideal = math.sqrt(12 * sigma * sigma / 3 + 1)  # widths wl (m boxes) and wl + 2 (3 - m boxes)
    wl = int(ideal) - (1 if int(ideal) % 2 == 0 else 0)
    m = round((12 * sigma * sigma - 3 * wl * wl - 12 * wl - 9) / (-4 * wl - 4))
    radii = [(wl - 1) // 2 if i < m else (wl + 1) // 2 for i in range(3)]
    out = a.astype(np.float32)
    for axis in (0, 1):
        for r in radii:
            out = _box_blur(out, r, axis)
    return out


def paste_plane(rect: Rect, src: np.ndarray | None, src_rect: Rect, fill: float) -> np.ndarray:
    """A (h, w) float32 plane over `rect`, `fill` everywhere except where `src` (placed at `src_rect`) overlaps."""
    l, t, r, b = rect
    out = np.full((b - t, r - l), fill, np.float32)
    if src is None:
        return out
    sl, st, sr, sb = src_rect
    x0, y0, x1, y1 = max(l, sl), max(t, st), min(r, sr), min(b, sb)
    if x0 < x1 and y0 < y1:
        out[y0 - t : y1 - t, x0 - l : x1 - l] = src[y0 - st : y1 - st, x0 - sl : x1 - sl]
    return out


def _soften(
    plane_at: Callable[[Rect], np.ndarray], rect: Rect, feather: float | None, density: int | None
) -> np.ndarray:
    """plane_at(rect) with feather (blurred on a margin, then cropped) and density applied."""
    if feather and feather > 0:
        m = int(math.ceil(3 * feather))
        l, t, r, b = rect
        plane = gaussian_blur(plane_at((l - m, t - m, r + m, b + m)), float(feather))[m : m + b - t, m : m + r - l]
    else:
        plane = plane_at(rect)
    if density is not None and density < 255:
        d = density / 255.0
        plane = plane * np.float32(d) + np.float32(1 - d)
    return plane


def _pixel_mask(item, rect: Rect, depth: int, version: int, name: str, warn: Warn) -> np.ndarray | None:
    """The pixel (or real) mask over `rect`, or None when the layer has none or it is disabled."""
    mask = item.mask
    if mask is None or mask.disabled:
        return None
    real = mask.has_real()
    cid = -3 if real else -2
    channels = {info.id: data for info, data in zip(item._record.channel_info, item._channels)}
    mrect = (mask.left, mask.top, mask.right, mask.bottom)
    mw, mh = mrect[2] - mrect[0], mrect[3] - mrect[1]
    src = None
    if cid in channels and mw > 0 and mh > 0:
        raw = decode_plane(channels[cid], depth, version, mw, mh, channel_label(name, cid), warn)
        src = np.clip(raw.astype(np.float32) / np.float32(SCALE[depth]), 0, 1)
    fill = float(mask.background_color) / 255.0

    def plane_at(r: Rect) -> np.ndarray:
        return paste_plane(r, src, mrect, fill)

    params = mask.parameters
    if real or params is None:
        return plane_at(rect)
    # Photoshop files that set only the vector mask's density apply it to the pixel mask too (a pixel mask
    # "rendered" from the path): psd-tools reads them so and matches Photoshop's merged images.
    density = params.user_mask_density if params.user_mask_density is not None else params.vector_mask_density
    return _soften(plane_at, rect, params.user_mask_feather, density)


def _vector_density(item) -> int | None:
    """The vector mask density, or None."""
    params = item.mask.parameters if item.mask is not None else None
    return params.vector_mask_density if params is not None else None


def _vector_mask(item, rect: Rect, warn: Warn) -> np.ndarray | None:
    """The rasterised vector mask over `rect`, or None when there is none, it is disabled or already applied."""
    vmask = item.vector_mask
    if vmask is None or vmask.disabled or item.kind == "shape":
        return None
    if item.mask is not None and not item.mask.disabled and item.mask.has_real():
        return None  # the real mask already holds the path
    from psd_tools.composite.vector import draw_vector_mask

    params = item.mask.parameters if item.mask is not None else None

    def plane_at(r: Rect) -> np.ndarray:
        return np.asarray(draw_vector_mask(item, r), np.float32).reshape(r[3] - r[1], r[2] - r[0])

    try:
        return _soften(plane_at, rect, params.vector_mask_feather if params else None, None)
    except (ValueError, TypeError, IndexError, AttributeError) as err:
        warn("vector mask", f"layer {item.name!r}: its vector mask cannot be drawn ({type(err).__name__}); ignored")
        return None


def mask_coverage(item, rect: Rect, depth: int, version: int, warn: Warn) -> np.ndarray | None:
    """Coverage (h, w) float32 in 0..1 over canvas `rect` from the layer's masks, or None when none applies.

    pixel mask (its density) x path, then the vector density over both, as Photoshop's merged images show.
    """
    if rect[2] <= rect[0] or rect[3] <= rect[1]:
        return None
    pixel = _pixel_mask(item, rect, depth, version, item.name, warn)
    vector = _vector_mask(item, rect, warn)
    if vector is None:
        return None if pixel is None else np.clip(pixel, 0, 1)
    out = vector if pixel is None else pixel * vector
    density = _vector_density(item)
    if density is not None and density < 255:
        d = density / 255.0
        out = out * np.float32(d) + np.float32(1 - d)
    return np.clip(out, 0, 1)
