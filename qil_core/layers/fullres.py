"""Full-resolution layers: edge-aware alpha upsampling guided by the original picture (a fast guided filter).

The model works at a 640² or 1024² bucket. Resampling its layers to a 4K original with Lanczos gives soft,
ringing edges: the edge is only as sharp as the bucket. The original picture still holds the sharp edge, so
each layer's alpha is upsampled with the guided filter of He, Sun and Tang (2010) in its fast form (He and
Sun 2015): at the bucket size, fit the layer's alpha p as a local linear function of the picture's colour I
(premultiplied RGB) in every (2r+1)² window, p ~ A·I + b (a 3x3 solve per pixel, regularised by eps), average
the slopes A over the windows, upsample A and p bilinearly, and evaluate the detail-transfer form
q = up(p) + A·(I - up(I_low)) on the full-resolution picture (equal to A·I + b where p is linear in I).
Where the alpha is flat, A = 0 and q is the smooth upsampled alpha; at an edge q follows the picture's own
edge. q is clipped to 0..1; values under half an 8-bit step become 0.

Colour: the layer's straight colour at the bucket size is extended into its transparent pixels (push-pull,
so no dark fringe bleeds in) and upsampled bilinearly. Where a layer is the only visible contributor at a
pixel (every other layer's weight there is under half an 8-bit step) its colour is taken from the original
pixels, which are exactly what the viewer sees there, at full sharpness.

Cost: the per-layer work at full resolution is seven bilinear plane upsamples and a few array passes, limited
to the layer's bounding box (plus the filter's reach); bench/bench_fullres.py measures it at 4096².
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import InputError
from .composite import paste_layer
from .resample import ALPHA_EPS
from .stack import Layer, LayerStack

logger = logging.getLogger(__name__)

RADIUS = 2  # window radius at the bucket size: (2r+1)² = 25 samples per fit
_TILE = 256  # full-resolution tile side: tiles run on threads, flat tiles are filled without upsampling
EPS = 1e-3  # regularisation of the fit (colour variance units): larger = smoother, closer to plain upsampling


def _mean1(x: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Mean over a window of 2r+1 along `axis` (shrunk at the borders): a sum of shifted slices (small r)."""
    n = x.shape[axis]

    def at(lo: int, hi: int) -> tuple:
        return (slice(None),) * (axis % x.ndim) + (slice(lo, hi),)

    out = x.copy()
    count = np.ones(n, x.dtype)
    for d in range(1, min(r, n - 1) + 1):
        out[at(0, n - d)] += x[at(d, n)]
        out[at(d, n)] += x[at(0, n - d)]
        count[: n - d] += 1
        count[d:] += 1
    view = [1] * x.ndim
    view[axis] = n
    out /= count.reshape(view)
    return out


def box_mean(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over (2r+1)² windows on the last two axes, normalised by the pixels inside at the borders."""
    return _mean1(_mean1(x, r, x.ndim - 2), r, x.ndim - 1)


class GuideStats:
    """The low-resolution guide and its per-window statistics, shared by every layer of one picture."""

    def __init__(self, guide_lo: np.ndarray, radius: int, eps: float) -> None:
        self.radius = radius
        self.guide = guide_lo  # (3, h, w) float32 premultiplied RGB
        self.mean = box_mean(guide_lo, radius)
        pairs = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
        cov = {p: box_mean(guide_lo[p[0]] * guide_lo[p[1]], radius) - self.mean[p[0]] * self.mean[p[1]] for p in pairs}
        for k in range(3):
            cov[(k, k)] = cov[(k, k)] + eps
        a, b, c, d, e, f = (cov[p] for p in pairs)  # [[a b c] [b d e] [c e f]]
        inv = np.stack([d * f - e * e, c * e - b * f, b * e - c * d, a * f - c * c, b * c - a * e, a * d - b * b])
        det = a * inv[0] + b * inv[1] + c * inv[2]
        self.inv = inv / det  # symmetric inverse: (00, 01, 02, 11, 12, 22)

    def coefficients(self, p: np.ndarray) -> np.ndarray:
        """(A_r, A_g, A_b, p), shape (4, h, w) float32: the window-averaged slopes of the fit p ~ A·I + b, and p
        itself (the detail-transfer form samples p, not the averaged b)."""
        r, mean_i = self.radius, self.mean
        mean_p = box_mean(p, r)
        cov_ip = box_mean(self.guide * p, r) - mean_i * mean_p
        s = self.inv
        a = np.stack(
            [
                s[0] * cov_ip[0] + s[1] * cov_ip[1] + s[2] * cov_ip[2],
                s[1] * cov_ip[0] + s[3] * cov_ip[1] + s[4] * cov_ip[2],
                s[2] * cov_ip[0] + s[4] * cov_ip[1] + s[5] * cov_ip[2],
            ]
        )
        return np.concatenate([box_mean(a, r), p[None]]).astype(np.float32)


def _flat(p: np.ndarray, reach: int) -> np.ndarray:
    """(h, w) bool: p is constant within `reach` pixels (a square window), where the guided fit is that constant."""
    hi, lo = p, p
    for axis in (0, 1):
        hi, lo = _spread(hi, reach, axis, np.maximum), _spread(lo, reach, axis, np.minimum)
    return hi == lo


def _spread(x: np.ndarray, reach: int, axis: int, op: np.ufunc) -> np.ndarray:
    """Running max/min over a window of 2·reach + 1 along `axis` (clipped at the borders)."""
    out = x.copy()
    n = x.shape[axis]
    for d in range(1, min(reach, n - 1) + 1):
        fwd = [slice(None)] * x.ndim
        bwd = [slice(None)] * x.ndim
        fwd[axis], bwd[axis] = slice(0, n - d), slice(d, n)
        op(out[tuple(fwd)], x[tuple(bwd)], out=out[tuple(fwd)])
        op(out[tuple(bwd)], x[tuple(fwd)], out=out[tuple(bwd)])
    return out


def fill_colour(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight colour (3, h, w) extended into pixels where alpha is 0 (push-pull over a 2x pyramid)."""
    weight = (alpha > 0).astype(np.float32)
    if weight.all() or not weight.any():
        return colour
    levels: list[tuple[np.ndarray, np.ndarray]] = []
    c, wgt = colour * weight, weight
    while True:
        levels.append((c, wgt))
        h, w = wgt.shape
        if h == 1 and w == 1:
            break
        ph, pw = h + h % 2, w + w % 2
        c = np.pad(c, ((0, 0), (0, ph - h), (0, pw - w))).reshape(3, ph // 2, 2, pw // 2, 2).sum(axis=(2, 4))
        wgt = np.pad(wgt, ((0, ph - h), (0, pw - w))).reshape(ph // 2, 2, pw // 2, 2).sum(axis=(1, 3))
    c, wgt = levels[-1]
    filled = np.divide(c, wgt, out=np.zeros_like(c), where=wgt > 0)
    for c, wgt in reversed(levels[:-1]):
        h, w = wgt.shape
        up = np.repeat(np.repeat(filled, 2, axis=1), 2, axis=2)[:, :h, :w]
        filled = np.where(wgt > 0, np.divide(c, wgt, out=np.zeros_like(c), where=wgt > 0), up)
    return np.where(weight > 0, colour, filled).astype(np.float32)


def _guide_planes(guide: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(premultiplied RGB planes (3, H, W), straight RGB planes (3, H, W), alpha (H, W)), float32 0..1."""
    arr = np.asarray(guide)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"guide must be an RGB(A) picture (H, W, 3|4), got shape {arr.shape}")
    scale = np.float32(255 if arr.dtype == np.uint8 else 65535 if arr.dtype == np.uint16 else 1)
    straight = np.empty((3,) + arr.shape[:2], np.float32)
    for k in range(3):
        np.divide(arr[..., k], scale, out=straight[k], casting="unsafe")
    alpha = arr[..., 3].astype(np.float32) / scale if arr.shape[2] == 4 else np.ones(arr.shape[:2], np.float32)
    return straight * alpha, straight, alpha


def _downsample(planes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average (box) downsample of (C, H, W) planes to size (w, h) -> (C, h, w) float32."""
    out = [
        np.asarray(Image.fromarray(np.ascontiguousarray(p), mode="F").resize(size, Image.Resampling.BOX))
        for p in planes
    ]
    return np.stack(out).astype(np.float32)


def _rect(alpha: np.ndarray, reach: int, scale: tuple[float, float], size: tuple[int, int]) -> tuple[int, ...] | None:
    """High-res rectangle covering the low-res pixels with alpha > 0, grown by `reach` low-res pixels."""
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if not rows.size:
        return None
    h, w = alpha.shape
    lx0, lx1 = max(0, cols[0] - reach), min(w, cols[-1] + 1 + reach)
    ly0, ly1 = max(0, rows[0] - reach), min(h, rows[-1] + 1 + reach)
    sx, sy = scale
    return (
        max(0, math.floor(lx0 * sx)),
        max(0, math.floor(ly0 * sy)),
        min(size[0], math.ceil(lx1 * sx)),
        min(size[1], math.ceil(ly1 * sy)),
    )


@dataclass
class _Plan:
    """One layer's low-res data and its full-resolution output block."""

    layer: Layer
    rect: tuple[int, int, int, int]
    coef: np.ndarray  # (4, h, w): A_r, A_g, A_b (window-averaged fit), p (the alpha)
    flat: np.ndarray  # (h, w) bool: p constant nearby, A == 0 (alpha is p alone)
    colour: np.ndarray  # (3, h, w) straight colour, filled under alpha 0
    px: np.ndarray  # (H_rect, W_rect, 4) output
    images: list = field(default_factory=list)  # PIL "F" images of coef (4) and colour (3)


class _Upsampler:
    """Tile-wise evaluation of every layer's alpha and colour at full resolution (tiles run on threads)."""

    def __init__(
        self, plans: list[_Plan], prem: np.ndarray, straight: np.ndarray, alpha: np.ndarray, scale: tuple[float, float]
    ) -> None:
        self.plans, self.prem, self.straight, self.alpha, self.scale = plans, prem, straight, alpha, scale
        self.small = plans[0].coef.shape[1:] if plans else (0, 0)
        self.guide_lo: np.ndarray | None = None  # (3, h, w) the low-res guide, set by upsample_stack
        self.guide_images: list[Image.Image] = []

    def _window(self, t: tuple[int, int, int, int]) -> tuple[tuple[float, float, float, float], tuple[slice, slice]]:
        """Low-res box of a high-res rectangle, and the low-res pixels its bilinear samples read."""
        x0, y0, x1, y1 = t
        sx, sy = self.scale
        h, w = self.small
        box = (x0 / sx, y0 / sy, x1 / sx, y1 / sy)
        rows = slice(max(0, math.floor(box[1] - 1)), min(h, math.ceil(box[3] + 1)))
        cols = slice(max(0, math.floor(box[0] - 1)), min(w, math.ceil(box[2] + 1)))
        return box, (rows, cols)

    @staticmethod
    def _sample(
        img: Image.Image,
        plane: np.ndarray,
        box: tuple[float, float, float, float],
        size: tuple[int, int],
        where: tuple[slice, slice],
    ) -> np.ndarray | float:
        """A plane sampled on a tile: a float when it is constant there, else a (h, w) array."""
        part = plane[where]
        lo, hi = float(part.min()), float(part.max())
        if lo == hi:
            return lo
        return np.array(img.resize(size, Image.Resampling.BILINEAR, box=box), np.float32)

    def tile(self, t: tuple[int, int, int, int]) -> None:
        """Alpha, weights and colour of every layer on one canvas tile."""
        tx0, ty0, tx1, ty1 = t
        trans = np.ones((ty1 - ty0, tx1 - tx0), np.float32)
        weights: list[tuple[_Plan, tuple[int, int, int, int], np.ndarray | None]] = []
        detail: list[np.ndarray] = []  # the guide's detail missing at the bucket size: I - up(I_lo), on the tile
        for plan in reversed(self.plans):  # top down
            x0, y0, x1, y1 = plan.rect
            part = (max(tx0, x0), max(ty0, y0), min(tx1, x1), min(ty1, y1))
            if part[0] >= part[2] or part[1] >= part[3]:
                continue
            q = self._alpha(plan, part, t, detail)
            if q is None:
                continue
            weight = None
            if plan.layer.visible and plan.layer.opacity > 0:
                a = q * np.float32(plan.layer.opacity)
                sub = trans[part[1] - ty0 : part[3] - ty0, part[0] - tx0 : part[2] - tx0]
                weight = a * sub
                sub *= 1 - a
            weights.append((plan, part, weight))
        total = 1 - trans
        for plan, part, weight in weights:
            self._colour(plan, part, weight, total[part[1] - ty0 : part[3] - ty0, part[0] - tx0 : part[2] - tx0])

    def _detail(self, t: tuple[int, int, int, int], detail: list[np.ndarray]) -> list[np.ndarray]:
        if not detail and self.guide_lo is not None:
            x0, y0, x1, y1 = t
            box, where = self._window(t)
            for k in range(3):
                up = self._sample(self.guide_images[k], self.guide_lo[k], box, (x1 - x0, y1 - y0), where)
                detail.append(self.prem[k, y0:y1, x0:x1] - up)
        return detail

    def _alpha(
        self, plan: _Plan, part: tuple[int, int, int, int], t: tuple[int, int, int, int], detail: list[np.ndarray]
    ) -> np.ndarray | None:
        """q = up(p) + A·(I - up(I_lo)): the plain upsampled alpha plus the guide's missing detail, scaled by
        the local fit (equal to the fast guided filter's A·I + b where p is linear in I, and no blurrier than
        p itself where the guide is flat)."""
        x0, y0, x1, y1 = part
        size = (x1 - x0, y1 - y0)
        box, where = self._window(part)
        b = self._sample(plan.images[3], plan.coef[3], box, size, where)
        if plan.flat[where].all():
            if isinstance(b, float):
                if b < ALPHA_EPS:
                    return None
                q = np.full((size[1], size[0]), min(b, 1.0), np.float32)
            else:
                q = b
        else:
            q = np.array(np.broadcast_to(np.float32(b), (size[1], size[0])), np.float32)
            d = self._detail(t, detail)
            rows, cols = slice(y0 - t[1], y1 - t[1]), slice(x0 - t[0], x1 - t[0])
            for k in range(3):
                q += self._sample(plan.images[k], plan.coef[k], box, size, where) * d[k][rows, cols]
        q[q < ALPHA_EPS] = 0
        np.minimum(q, 1, out=q)
        rx, ry = plan.rect[0], plan.rect[1]
        plan.px[y0 - ry : y1 - ry, x0 - rx : x1 - rx, 3] = q
        return q

    def _colour(
        self, plan: _Plan, part: tuple[int, int, int, int], weight: np.ndarray | None, total: np.ndarray
    ) -> None:
        x0, y0, x1, y1 = part
        dst = plan.px[y0 - plan.rect[1] : y1 - plan.rect[1], x0 - plan.rect[0] : x1 - plan.rect[0]]
        sole = None
        if weight is not None:
            sole = (weight > 0) & (total - weight < 0.5 / 255) & (self.alpha[y0:y1, x0:x1] > 0)
            if np.array_equal(sole, dst[..., 3] > 0):  # the original colour wherever this layer shows
                for k in range(3):
                    dst[..., k] = self.straight[k, y0:y1, x0:x1]
                return
        box, where = self._window(part)
        for k in range(3):
            dst[..., k] = self._sample(plan.images[4 + k], plan.colour[k], box, (x1 - x0, y1 - y0), where)
            if sole is not None and sole.any():
                np.copyto(dst[..., k], self.straight[k, y0:y1, x0:x1], where=sole)


def upsample_stack(
    stack: LayerStack, guide: np.ndarray, *, radius: int = RADIUS, eps: float = EPS, workers: int | None = None
) -> LayerStack:
    """Map a bucket-size stack onto the canvas of `guide` (the original picture, (H, W, 3|4), float or uint8).

    Every layer's alpha is upsampled with the fast guided filter, its colour as described in the module
    docstring; names, opacity, blend mode and visibility are kept, offsets scale with the canvas. Tiles of
    the canvas run on `workers` threads (default: the CPU count, at most 8).
    """
    prem_hi, straight_hi, alpha_hi = _guide_planes(guide)
    big = (prem_hi.shape[2], prem_hi.shape[1])
    small = stack.size
    scale = (big[0] / small[0], big[1] / small[1])
    stats = GuideStats(_downsample(prem_hi, small), radius, eps)
    plans: list[_Plan] = []
    placed: list[_Plan | Layer] = []
    for layer in stack.layers:
        low = paste_layer(np.zeros((small[1], small[0], 4), np.float32), layer)
        rect = _rect(low[..., 3] > 0, 2 * radius + 2, scale, big)
        if rect is None:
            placed.append(
                layer.replace(
                    pixels=np.zeros((0, 0, 4), np.float32),
                    x=math.floor(layer.x * scale[0]),
                    y=math.floor(layer.y * scale[1]),
                )
            )
            continue
        coef = stats.coefficients(low[..., 3])
        flat = _flat(low[..., 3], 2 * radius)
        coef[:3, flat] = 0  # exactly: the fit there is the constant alpha (rounding would leave ~1e-16)
        colour = fill_colour(np.ascontiguousarray(np.moveaxis(low[..., :3], -1, 0)), low[..., 3])
        px = np.zeros((rect[3] - rect[1], rect[2] - rect[0], 4), np.float32)
        plan = _Plan(layer, rect, coef, flat, colour, px)  # type: ignore[arg-type]
        plan.images = [Image.fromarray(np.ascontiguousarray(p), mode="F") for p in (*coef, *colour)]
        plans.append(plan)
        placed.append(plan)
    tiles = [
        (x, y, min(big[0], x + _TILE), min(big[1], y + _TILE))
        for y in range(0, big[1], _TILE)
        for x in range(0, big[0], _TILE)
    ]
    runner = _Upsampler(plans, prem_hi, straight_hi, alpha_hi, scale)
    runner.guide_lo = stats.guide
    runner.guide_images = [Image.fromarray(np.ascontiguousarray(p, np.float32), mode="F") for p in stats.guide]
    n = max(1, min(8, workers or os.cpu_count() or 1))
    if n == 1:
        for t in tiles:
            runner.tile(t)
    else:
        with ThreadPoolExecutor(n) as pool:
            for _ in pool.map(runner.tile, tiles):
                pass
    out = [
        item
        if isinstance(item, Layer)
        else item.layer.replace(pixels=item.px, x=item.rect[0], y=item.rect[1]).cropped()
        for item in placed
    ]
    return LayerStack(big[0], big[1], out, metadata=stack.metadata)
