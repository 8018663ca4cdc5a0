"""Flatten a `LayerStack` into one straight-RGBA canvas, touching only each layer's bounding box.

The canvas is kept premultiplied, as four separate float32 planes, while layers are added bottom first (W3C
source-over with the layer's blend function, blend.py), then un-premultiplied into the interleaved result
once, only where some layer landed. Work per layer is linear in its own pixel count and runs in row bands
small enough to stay in cache, on a few threads (numpy releases the GIL), so a sparse 4096² stack costs
about what its layers weigh; memory is two canvases plus a few bands (linear in N, no per-layer canvases).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import InputError
from ..resources import check_allocation
from .blend import blend_function
from .stack import MAX_CANVAS_SIDE, Layer, LayerStack

logger = logging.getLogger(__name__)

Rect = tuple[int, int, int, int]  # (left, top, right, bottom), canvas pixels, right/bottom exclusive

# Pixels per working band: 64 Ki px x 4 ch x 4 B = 1 MiB per temporary, which stays in L2/L3.
_BAND_PIXELS = 1 << 16


def check_canvas(
    width: int, height: int, *, what: str = "canvas", channels: int = 4, count: int = 1, memory_limit: int | None = None
) -> int:
    """Refuse a canvas over MAX_CANVAS_SIDE or over the memory estimate before allocating; returns its bytes."""
    if width < 1 or height < 1:
        raise InputError(f"{what} must be at least 1x1 px, got {width}x{height}")
    if width > MAX_CANVAS_SIDE or height > MAX_CANVAS_SIDE:
        raise InputError(
            f"{what} of {width}x{height} px is over the {MAX_CANVAS_SIDE} px per side limit; "
            "scale the layers down or crop the canvas first"
        )
    need = int(width) * int(height) * channels * 4 * count
    check_allocation(
        need,
        f"a {what} of {width}x{height} px (float32, x{count})",
        available=memory_limit,  # None: the RAM available now
        hint="use a smaller canvas or free memory",
    )
    return need


def _validate_background(background: Sequence[float] | None) -> np.ndarray | None:
    if background is None:
        return None
    bg = np.asarray(background, dtype=np.float64).reshape(-1)
    if bg.shape != (4,) or not np.isfinite(bg).all() or (bg < 0).any() or (bg > 1).any():
        raise InputError(f"background must be (r, g, b, a) with each value in 0..1, got {background!r}")
    return bg.astype(np.float32)


def _clip_rect(a: Rect, b: Rect) -> Rect | None:
    """Intersection of two rectangles, or None when it is empty."""
    l, t, r, bt = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (l, t, r, bt) if l < r and t < bt else None


def _workers() -> int:
    """Threads for band work: the CPU count, capped at 8 (memory bandwidth saturates beyond)."""
    return max(1, min(8, os.cpu_count() or 1))


def _parallel_rows(
    work: Callable[[int, int, dict], None], rows: int, row_pixels: int, pool: ThreadPoolExecutor | None
) -> None:
    """Run `work(start, stop, workspace)` over row bands, one contiguous run of bands per pool thread.

    numpy releases the GIL inside ufunc loops, so threads scale; each run keeps its own `workspace` dict so
    band temporaries are allocated once per run, not once per band (fresh 1 MiB blocks are mmap'd and
    page-faulted by glibc, which costs more than the arithmetic).
    """
    step = max(1, _BAND_PIXELS // max(1, row_pixels))
    nbands = -(-rows // step)
    workers = 1 if pool is None else min(_workers(), nbands)
    per = -(-nbands // workers) * step

    def run(start: int, stop: int) -> None:
        workspace: dict = {}
        for i in range(start, stop, step):
            work(i, min(stop, i + step), workspace)

    runs = [(i, min(rows, i + per)) for i in range(0, rows, per)]
    if pool is None or workers == 1:
        run(0, rows)
        return
    for future in [pool.submit(run, i, j) for i, j in runs]:
        future.result()


def _scratch(workspace: dict, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 scratch array of `shape`, reused across bands (a view of a buffer sized for the first band)."""
    arr = workspace.get(name)
    if arr is None or arr.shape[0] < shape[0] or arr.shape[1:] != shape[1:]:
        arr = workspace[name] = np.empty(shape, np.float32)
    return arr[: shape[0]]


def blend_layer_into(
    planes: np.ndarray, origin: tuple[int, int], layer: Layer, pool: ThreadPoolExecutor | None = None
) -> Rect | None:
    """Add one layer onto a premultiplied planar (4, H, W) canvas whose pixel [0, 0] sits at canvas `origin`.

    Returns the canvas rectangle touched, or None when the layer is hidden, empty or outside the canvas.
    """
    if not layer.visible or layer.opacity <= 0 or layer.pixels.size == 0:
        return None
    ox, oy = origin
    rect = _clip_rect(layer.bbox(), (ox, oy, ox + planes.shape[2], oy + planes.shape[1]))
    if rect is None:
        return None
    l, t, r, b = rect
    src = layer.pixels[t - layer.y : b - layer.y, l - layer.x : r - layer.x]  # (h, w, 4) straight, interleaved
    dst = planes[:, t - oy : b - oy, l - ox : r - ox]  # (4, h, w) premultiplied planes (views)
    opacity = np.float32(layer.opacity)
    fn = None if layer.blend_mode == "normal" else blend_function(layer.blend_mode)

    def band(i: int, j: int, ws: dict) -> None:
        s, d = src[i:j], dst[:, i:j]
        shape = (j - i, r - l)
        a = _scratch(ws, "a", shape)
        np.multiply(s[..., 3], opacity, out=a)  # source alpha after opacity, applied exactly once
        if fn is None:
            colour = s  # (n, w, 4): straight Cs in channels 0..2
        else:
            ab = d[3]
            cb = np.stack([d[0], d[1], d[2]], -1)  # (n, w, 3) premultiplied backdrop
            np.divide(cb, ab[..., None], out=cb, where=ab[..., None] > 0)
            cs = s[..., :3]
            colour = cs + ab[..., None] * (fn(cb, cs) - cs)  # Cs' = (1 - ab)·Cs + ab·B(Cb, Cs)
        tmp = _scratch(ws, "tmp", shape)
        # Source-over per plane as d += a·(Cs' - d) (colour) and d += a·(1 - d) (alpha): on separate planes
        # every operation is a flat loop over a row, about twice as fast as interleaved RGBA in numpy.
        for c in range(3):
            np.subtract(colour[..., c], d[c], out=tmp)
            tmp *= a
            d[c] += tmp
        np.subtract(1, d[3], out=tmp)
        tmp *= a
        d[3] += tmp

    _parallel_rows(band, b - t, r - l, pool)
    return rect


def _disjoint_cover(rects: Iterable[Rect]) -> list[Rect]:
    """Split the union of rectangles into disjoint rectangles (row bands of merged column spans)."""
    rects = list(rects)
    ys = sorted({y for r in rects for y in (r[1], r[3])})
    out: list[Rect] = []
    for y0, y1 in zip(ys[:-1], ys[1:]):
        spans = sorted((r[0], r[2]) for r in rects if r[1] <= y0 and r[3] >= y1)
        merged: list[list[int]] = []
        for x0, x1 in spans:
            if merged and x0 <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], x1)
            else:
                merged.append([x0, x1])
        out.extend((x0, y0, x1, y1) for x0, x1 in merged)
    return out


def planes_to_straight(planes: np.ndarray, out: np.ndarray, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Premultiplied planar (4, h, w) -> straight interleaved (h, w, 4) in `out`; RGB 0 under alpha 0, clipped."""
    w = planes.shape[2]

    def band(i: int, j: int, ws: dict) -> None:
        a = planes[3, i:j]
        o = out[i:j]
        inv = _scratch(ws, "inv", a.shape)
        inv[...] = 0
        np.divide(1, a, out=inv, where=a > 0)  # 0 under alpha 0 zeroes the RGB
        for c in range(3):
            np.multiply(planes[c, i:j], inv, out=o[..., c])
        o[..., 3] = a
        np.clip(o, 0, 1, out=o)

    _parallel_rows(band, planes.shape[1], w, pool)
    return out


def composite_layers(
    layers: Sequence[Layer], rect: Rect, *, background: Sequence[float] | None = None, memory_limit: int | None = None
) -> np.ndarray:
    """Flatten layers (bottom first) over canvas rectangle `rect`; returns straight RGBA (h, w, 4) float32."""
    l, t, r, b = (int(v) for v in rect)
    check_canvas(r - l, b - t, what="composite output", count=2, memory_limit=memory_limit)
    bg = _validate_background(background)
    # Work canvas (4, H, W) premultiplied planes and the (H, W, 4) result; zero pages are mapped lazily, so
    # a sparse stack only ever touches the pages under its layers.
    planes = np.zeros((4, b - t, r - l), np.float32)
    out = np.zeros((b - t, r - l, 4), np.float32)
    if bg is not None:
        planes[...] = np.concatenate([bg[:3] * bg[3], bg[3:]])[:, None, None]
        out[...] = bg if bg[3] > 0 else 0
    with ThreadPoolExecutor(_workers()) as pool:
        touched = [hit for layer in layers if (hit := blend_layer_into(planes, (l, t), layer, pool)) is not None]
        for x0, y0, x1, y1 in _disjoint_cover(touched):
            planes_to_straight(planes[:, y0 - t : y1 - t, x0 - l : x1 - l], out[y0 - t : y1 - t, x0 - l : x1 - l], pool)
    return out


def composite(
    stack: LayerStack,
    *,
    background: tuple[float, float, float, float] | None = None,
    canvas: tuple[int, int, int, int] | None = None,
    memory_limit: int | None = None,
) -> np.ndarray:
    """Flatten a stack to straight RGBA (H, W, 4) float32; `canvas` = (left, top, right, bottom), default the stack's.

    Hidden layers are skipped, opacity is applied once, parts outside `canvas` are clipped, and a stack with
    no visible layer gives a transparent (or `background`) canvas of the right size. `memory_limit` (bytes)
    overrides the available-RAM estimate used to refuse oversized outputs before allocating.
    """
    rect = (0, 0, stack.width, stack.height) if canvas is None else tuple(canvas)
    if len(rect) != 4 or not all(isinstance(v, (int, np.integer)) for v in rect):
        raise InputError(f"canvas must be 4 ints (left, top, right, bottom), got {canvas!r}")
    if not any(layer.visible for layer in stack.layers):
        logger.debug("composite: no visible layer, returning an empty canvas")
    return composite_layers(stack.layers, rect, background=background, memory_limit=memory_limit)


def paste_layer(dst: np.ndarray, layer: Layer, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Copy a layer's straight RGBA into (H, W, 4) `dst` whose pixel [0, 0] is canvas `origin` (no blending)."""
    ox, oy = origin
    rect = _clip_rect(layer.bbox(), (ox, oy, ox + dst.shape[1], oy + dst.shape[0]))
    if rect is not None and layer.pixels.size:
        l, t, r, b = rect
        dst[t - oy : b - oy, l - ox : r - ox] = layer.pixels[t - layer.y : b - layer.y, l - layer.x : r - layer.x]
    return dst


def union_bbox(layers: Iterable[Layer]) -> Rect | None:
    """Smallest canvas rectangle holding every non-empty layer's pixels, or None."""
    boxes = [layer.bbox() for layer in layers if layer.pixels.size]
    if not boxes:
        return None
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
