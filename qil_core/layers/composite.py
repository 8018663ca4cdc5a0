"""Flatten a `LayerStack` into one straight-RGBA canvas, touching only each layer's bounding box.

The canvas is kept premultiplied while layers are added bottom first (W3C source-over with the layer's blend
function, blend.py), then un-premultiplied once, only where some layer landed. Work per layer is linear in its
own pixel count and is done in row bands small enough to stay in cache, so a sparse 4096² stack costs about
what its layers weigh, and memory is the canvas plus one band (linear in N, no per-layer canvases).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import InputError, ResourceError
from .blend import blend_function
from .stack import MAX_CANVAS_SIDE, Layer, LayerStack

logger = logging.getLogger(__name__)

Rect = tuple[int, int, int, int]  # (left, top, right, bottom), canvas pixels, right/bottom exclusive

# Pixels per working band: 64 Ki px x 4 ch x 4 B = 1 MiB per temporary, which stays in L2/L3.
_BAND_PIXELS = 1 << 16


def available_memory_bytes() -> int | None:
    """Bytes of RAM the OS says are available now, or None where it cannot tell."""
    try:
        import psutil  # optional: only used for this estimate
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    return None


def check_canvas(width: int, height: int, *, what: str = "canvas", channels: int = 4, count: int = 1,
                 memory_limit: int | None = None) -> int:
    """Refuse a canvas over MAX_CANVAS_SIDE or over the memory estimate before allocating; returns its bytes."""
    if width < 1 or height < 1:
        raise InputError(f"{what} must be at least 1x1 px, got {width}x{height}")
    if width > MAX_CANVAS_SIDE or height > MAX_CANVAS_SIDE:
        raise InputError(
            f"{what} of {width}x{height} px is over the {MAX_CANVAS_SIDE} px per side limit; "
            "scale the layers down or crop the canvas first"
        )
    need = int(width) * int(height) * channels * 4 * count
    limit = memory_limit if memory_limit is not None else available_memory_bytes()
    if limit is not None and need > limit:
        raise ResourceError(
            f"{what} of {width}x{height} px needs {need / 2**30:.2f} GiB of float32 RGBA "
            f"but only {limit / 2**30:.2f} GiB is available; use a smaller canvas or free memory"
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


def _parallel_rows(work: Callable[[int, int, dict], None], rows: int, row_pixels: int,
                   pool: ThreadPoolExecutor | None) -> None:
    """Run `work(start, stop, workspace)` over row bands, one contiguous run of bands per pool thread.

    numpy releases the GIL inside ufunc loops, so threads scale; each run keeps its own `workspace` dict so
    band temporaries are allocated once per run, not once per band (fresh 1 MiB blocks are mmap'd and
    page-faulted by glibc, which costs more than the arithmetic).
    """
    step = max(1, _BAND_PIXELS // max(1, row_pixels))
    nbands = -(-rows // step)
    workers = 1 if pool is None else min(pool._max_workers, nbands)
    per = -(-nbands // workers) * step

    def run(start: int, stop: int) -> None:
        workspace: dict = {}
        for i in range(start, stop, step):
            work(i, min(stop, i + step), workspace)

    runs = [(i, min(rows, i + per)) for i in range(0, rows, per)]
    if workers == 1:
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


def blend_layer_into(buf: np.ndarray, origin: tuple[int, int], layer: Layer,
                     pool: ThreadPoolExecutor | None = None) -> Rect | None:
    """Add one layer onto a premultiplied (H, W, 4) buffer whose pixel [0, 0] sits at canvas `origin`.

    Returns the canvas rectangle touched, or None when the layer is hidden, empty or outside the buffer.
    """
    if not layer.visible or layer.opacity <= 0 or layer.pixels.size == 0:
        return None
    ox, oy = origin
    rect = _clip_rect(layer.bbox(), (ox, oy, ox + buf.shape[1], oy + buf.shape[0]))
    if rect is None:
        return None
    l, t, r, b = rect
    src = layer.pixels[t - layer.y:b - layer.y, l - layer.x:r - layer.x]  # (h, w, 4) straight
    dst = buf[t - oy:b - oy, l - ox:r - ox]  # (h, w, 4) premultiplied view
    opacity = np.float32(layer.opacity)
    w = r - l

    def normal_band(i: int, j: int, ws: dict) -> None:
        s, d = src[i:j], dst[i:j]
        n = j - i
        # Source-over as d += a·(s' - d) with s' = (Cs, 1): rgb -> a·Cs + (1 - a)·cb, alpha -> a + (1 - a)·ab.
        df = _scratch(ws, "diff", (n, w, 4))
        np.subtract(s, d, out=df)
        np.subtract(1, d[..., 3], out=df[..., 3])
        # The alpha is repeated 4x so the multiply is one flat contiguous loop: numpy runs a broadcast over
        # a size-4 last axis 4 elements at a time, 2-3x slower than these four strided copies plus the loop.
        rep = _scratch(ws, "rep", (n, w, 4))
        np.multiply(s[..., 3], opacity, out=rep[..., 0])
        for c in (1, 2, 3):
            rep[..., c] = rep[..., 0]
        df *= rep
        d += df

    fn = blend_function(layer.blend_mode)

    def blend_band(i: int, j: int, ws: dict) -> None:
        s, d = src[i:j], dst[i:j]
        a = (s[..., 3] * opacity)[..., None]  # (h, w, 1) source alpha after opacity, applied exactly once
        ab = d[..., 3:4].copy()
        cb = np.divide(d[..., :3], ab, out=np.zeros_like(d[..., :3]), where=ab > 0)
        cs = s[..., :3]
        mixed = cs + ab * (fn(cb, cs) - cs)  # (1 - ab)·Cs + ab·B(Cb, Cs)
        d[..., :3] = a * mixed + (1 - a) * d[..., :3]
        d[..., 3:4] = a + ab * (1 - a)

    _parallel_rows(normal_band if layer.blend_mode == "normal" else blend_band, b - t, w, pool)
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


def unpremultiply_(buf: np.ndarray, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """In place: premultiplied (h, w, 4) -> straight, RGB 0 where alpha <= 0, everything clipped to 0..1."""

    w = buf.shape[1]

    def band(i: int, j: int, ws: dict) -> None:
        d = buf[i:j]
        n = j - i
        a = d[..., 3]
        rep = _scratch(ws, "rep", (n, w, 4))
        inv = rep[..., 0]
        inv[...] = 0
        np.divide(1, a, out=inv, where=a > 0)  # 0 under alpha 0 zeroes the RGB
        rep[..., 1] = inv
        rep[..., 2] = inv
        rep[..., 3] = 1
        d *= rep
        np.clip(d, 0, 1, out=d)

    _parallel_rows(band, buf.shape[0], buf.shape[1], pool)
    return buf


def composite_layers(layers: Sequence[Layer], rect: Rect, *, background: Sequence[float] | None = None,
                     memory_limit: int | None = None) -> np.ndarray:
    """Flatten layers (bottom first) over canvas rectangle `rect`; returns straight RGBA (h, w, 4) float32."""
    l, t, r, b = (int(v) for v in rect)
    check_canvas(r - l, b - t, what="composite output", memory_limit=memory_limit)
    bg = _validate_background(background)
    buf = np.zeros((b - t, r - l, 4), np.float32)  # (H, W, 4) premultiplied; zero pages are lazy
    if bg is not None:
        buf[...] = np.concatenate([bg[:3] * bg[3], bg[3:]])
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        touched = [hit for layer in layers if (hit := blend_layer_into(buf, (l, t), layer, pool)) is not None]
        if bg is not None and 0 < bg[3] < 1:
            return unpremultiply_(buf, pool)  # the untouched background is premultiplied too
        for x0, y0, x1, y1 in _disjoint_cover(touched):
            unpremultiply_(buf[y0 - t:y1 - t, x0 - l:x1 - l], pool)
    return buf


def composite(stack: LayerStack, *, background: tuple[float, float, float, float] | None = None,
              canvas: tuple[int, int, int, int] | None = None, memory_limit: int | None = None) -> np.ndarray:
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
        dst[t - oy:b - oy, l - ox:r - ox] = layer.pixels[t - layer.y:b - layer.y, l - layer.x:r - layer.x]
    return dst


def union_bbox(layers: Iterable[Layer]) -> Rect | None:
    """Smallest canvas rectangle holding every non-empty layer's pixels, or None."""
    boxes = [layer.bbox() for layer in layers if layer.pixels.size]
    if not boxes:
        return None
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
