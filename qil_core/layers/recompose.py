"""Exact recomposition: fold the difference between a target picture and a stack's composite into layer colours.

The model regenerates the picture while it separates it, so its layers recompose to something close to the
input, not to the input. `fold_residual` changes layer *colours* (never alpha) so that the composite's colour
equals the target's wherever the composite is visible.

The maths (straight alpha, "normal" source-over, layer i with alpha a_i and opacity o_i, bottom first): the
composite's premultiplied colour is P = sum_i w_i c_i with the effective weights w_i = o_i a_i prod_{j>i}(1 - o_j a_j),
and its alpha is A = sum_i w_i; the straight colour shown is P / A. Changing colours c_i (not alpha) moves P
anywhere in [0, A] per channel, so any target colour t in [0, 1] is reachable wherever A > 0: the residual
r = A t - P is handed out top layer first, each layer taking what keeps its colour in 0..1
(delta_i = clip(r, -w_i c_i, w_i (1 - c_i)), c_i += delta_i / w_i), and what a top layer cannot carry (its
weight is too small, or its colour is at 0 or 1) goes down the stack. Layers whose weight is under half an
8-bit step are skipped in a first pass (their colour cannot be seen) and used only if something is left.

Honest limits, reported instead of hidden:
- Alpha is never changed, so the composite's alpha stays the model's. Where the target is visible but no
  layer is (A = 0), nothing can be corrected ("uncovered"); where the layers are visible but the target is
  fully transparent, there is no colour to match and the layers are left as they are ("extra"). The alpha
  difference is measured and reported.
- Only layers in "normal" mode can be folded (what the model produces); a visible layer in another blend mode
  raises InputError, since its contribution is not a weighted colour.

Exactness in 8-bit: with alpha on the 8-bit grid (`snap_alpha`; an 8-bit PSD or PNG stores it so anyway), the
composite of the folded layers after rounding their colours to 8 bits differs from the target by at most half
a step before its own rounding, so the 8-bit composite is within 1/255 of an 8-bit target.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError
from .image_file import picture_rgba
from .stack import Layer, LayerStack

logger = logging.getLogger(__name__)

RECOMPOSE_MODES: tuple[str, ...] = ("exact", "model")
STEP = 1 / 255  # one 8-bit step
_MIN_WEIGHT = 0.5 / 255  # weights below this are invisible in 8-bit: skipped in the first pass
_BAND_PIXELS = 1 << 16  # canvas pixels per working band (temporaries ~ layers x 1 MiB)


@dataclass(frozen=True)
class RecomposeReport:
    """How far the layers' composite was from the target before folding (8-bit steps, 0..255) and after.

    pixels: where both are visible (colour compared); corrected: of those, pixels off by more than half a step;
    mean/max: the colour residual there (largest channel per pixel); uncovered: target visible, no layer
    visible (not correctable without alpha); extra: layers visible where the target is transparent (left as is);
    alpha_mean/alpha_max: |target alpha - composite alpha| over pixels where either is visible;
    remaining_max: largest colour difference left after folding (float, before any 8-bit rounding).
    """

    pixels: int
    corrected: int
    mean: float
    max: float
    uncovered: int
    extra: int
    alpha_mean: float
    alpha_max: float
    remaining_max: float

    @property
    def corrected_share(self) -> float:
        """Share (0..1) of the compared pixels that needed a correction."""
        return self.corrected / self.pixels if self.pixels else 0.0

    def as_dict(self) -> dict[str, float | int]:
        """Plain values for a document's metadata (JSON-friendly)."""
        out: dict[str, float | int] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        out["corrected_share"] = round(self.corrected_share, 6)
        return out

    def describe(self) -> str:
        """One log line."""
        text = (
            f"residual before folding: mean {self.mean:.2f}, max {self.max:.1f} (8-bit steps); "
            f"{100 * self.corrected_share:.1f}% of {self.pixels} px corrected; after: max {self.remaining_max:.3f}"
        )
        if self.uncovered:
            text += f"; {self.uncovered} px visible in the input but transparent in every layer (not correctable)"
        if self.extra:
            text += f"; {self.extra} px painted by the layers where the input is transparent (left as is)"
        if self.alpha_max > 0.5:
            text += f"; alpha differs from the input's by {self.alpha_mean:.2f} on average, {self.alpha_max:.0f} max"
        return text


def snap_alpha(stack: LayerStack) -> LayerStack:
    """A copy with every layer's alpha rounded to the 8-bit grid (k / 255), as an 8-bit PSD or PNG stores it."""
    out = []
    for layer in stack.layers:
        px = layer.pixels.copy()
        px[..., 3] = np.round(px[..., 3] * 255) / np.float32(255)
        out.append(layer.replace(pixels=px))
    return stack.replace(layers=out)


def _target(target: np.ndarray, stack: LayerStack) -> np.ndarray:
    arr = np.asarray(target)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[:2] != (stack.height, stack.width):
        raise InputError(
            f"target must be an RGB(A) picture of the canvas size {stack.width}x{stack.height}, got shape {arr.shape}"
        )
    return picture_rgba(arr, "target")


def fold_residual(stack: LayerStack, target: np.ndarray, *, copy: bool = True) -> tuple[LayerStack, RecomposeReport]:
    """Change visible layers' colours so the composite's colour equals `target` (H, W, 3|4) wherever both are visible.

    `target` is straight RGB(A), float 0..1 or uint8/uint16, the canvas size. Alpha, offsets and every other
    property are untouched; layers are copied and the input stack is not modified, unless `copy=False` (for a
    stack the caller has just copied itself). Returns the new stack and the report (see the module docstring).
    """
    tgt = _target(target, stack)
    index = [i for i, layer in enumerate(stack.layers) if layer.visible and layer.opacity > 0 and layer.pixels.size]
    for i in index:
        if stack.layers[i].blend_mode != "normal":
            raise InputError(
                f"layer {i} ({stack.layers[i].name!r}) uses blend mode "
                f"{stack.layers[i].blend_mode!r}; exact recomposition folds colours into 'normal' "
                "layers only (set it to normal, or hide it, first)"
            )
    pixels = {i: stack.layers[i].pixels.copy() if copy else stack.layers[i].pixels for i in index}
    width = stack.width
    step = max(1, _BAND_PIXELS // width)

    def band(y0: int) -> tuple[np.ndarray, int]:
        tally = np.zeros(9, np.float64)  # pixels, corrected, sum, max, uncovered, extra, alpha sum/max, remaining
        y1 = min(stack.height, y0 + step)
        return tally, _fold_band(stack, index, pixels, tgt[y0:y1], y0, tally)

    starts = range(0, stack.height, step)
    workers = max(1, min(8, os.cpu_count() or 1, len(starts)))
    if workers == 1:
        results = [band(y0) for y0 in starts]
    else:  # bands write disjoint rows of the layers; numpy releases the GIL
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(band, starts))
    tallies = np.stack([r[0] for r in results]) if results else np.zeros((1, 9))
    tally = tallies.sum(axis=0)
    tally[[3, 7, 8]] = tallies[:, [3, 7, 8]].max(axis=0)
    alpha_px = sum(r[1] for r in results)
    out = list(stack.layers)
    for i in index:
        out[i] = stack.layers[i].replace(pixels=pixels[i])
    n = int(tally[0])
    report = RecomposeReport(
        pixels=n,
        corrected=int(tally[1]),
        mean=float(tally[2] / n) if n else 0.0,
        max=float(tally[3]),
        uncovered=int(tally[4]),
        extra=int(tally[5]),
        alpha_mean=float(tally[6] / alpha_px) if alpha_px else 0.0,
        alpha_max=float(tally[7]),
        remaining_max=float(tally[8]),
    )
    return stack.replace(layers=out), report


def _slices(layer: Layer, y0: int, y1: int, width: int) -> tuple[slice, slice, slice, slice] | None:
    """(band rows, band cols, layer rows, layer cols) of a layer's overlap with canvas rows y0..y1, or None."""
    t, b = max(layer.y, y0), min(layer.y + layer.height, y1)
    left, r = max(layer.x, 0), min(layer.x + layer.width, width)
    if t >= b or left >= r:
        return None
    return (slice(t - y0, b - y0), slice(left, r), slice(t - layer.y, b - layer.y), slice(left - layer.x, r - layer.x))


def _fold_band(
    stack: LayerStack, index: list[int], pixels: dict[int, np.ndarray], tgt: np.ndarray, y0: int, tally: np.ndarray
) -> int:
    """Fold one band of canvas rows; updates `pixels` in place and the running tally. Returns the alpha px count."""
    bh, width = tgt.shape[:2]
    parts = []
    for i in index:
        where = _slices(stack.layers[i], y0, y0 + bh, width)
        if where is not None:
            parts.append((i, where))
    n = len(parts)
    a = np.zeros((n, bh, width), np.float32)
    c = np.zeros((n, 3, bh, width), np.float32)
    for k, (i, (br, bc, lr, lc)) in enumerate(parts):
        src = pixels[i][lr, lc]
        a[k][br, bc] = src[..., 3] * np.float32(stack.layers[i].opacity)
        c[k][:, br, bc] = np.moveaxis(src[..., :3], -1, 0)
    w = np.empty_like(a)
    trans = np.ones((bh, width), np.float32)
    for k in range(n - 1, -1, -1):  # effective weights, from the top down
        np.multiply(a[k], trans, out=w[k])
        trans *= 1 - a[k]
    total = w.sum(axis=0)
    prem = np.einsum("khw,kchw->chw", w, c)
    t_col, t_alpha = np.moveaxis(tgt[..., :3], -1, 0), tgt[..., 3]
    seen = total > 0
    valid = seen & (t_alpha > 0)
    shown = np.divide(prem, total, out=np.zeros_like(prem), where=seen)
    diff = np.abs(t_col - shown).max(axis=0) * 255
    d = diff[valid]
    union = seen | (t_alpha > 0)
    da = np.abs(t_alpha - total)[union] * 255
    tally[0] += d.size
    tally[1] += int((d > 0.5).sum())
    tally[2] += float(d.sum())
    tally[3] = max(tally[3], float(d.max()) if d.size else 0.0)
    tally[4] += int(((t_alpha > 0) & ~seen).sum())
    tally[5] += int((seen & (t_alpha <= 0)).sum())
    tally[6] += float(da.sum())
    tally[7] = max(tally[7], float(da.max()) if da.size else 0.0)
    resid = np.where(valid, t_col * total - prem, 0).astype(np.float32)  # (3, bh, W) premultiplied
    for min_weight in (_MIN_WEIGHT, 0.0):  # visible layers first, then anything with weight left
        for k in range(n - 1, -1, -1):
            wk = w[k]
            usable = wk > min_weight
            if not usable.any():
                continue
            lo, hi = -wk * c[k], wk * (1 - c[k])
            delta = np.where(usable, np.clip(resid, lo, hi), 0)
            c[k] += np.divide(delta, wk, out=np.zeros_like(delta), where=usable)
            resid -= delta
    np.clip(c, 0, 1, out=c)
    after = np.einsum("khw,kchw->chw", w, c)
    left = np.abs(np.divide(after, total, out=np.zeros_like(after), where=seen) - t_col).max(axis=0)[valid]
    tally[8] = max(tally[8], float(left.max()) * 255 if left.size else 0.0)
    for k, (i, (br, bc, lr, lc)) in enumerate(parts):
        dst = pixels[i][lr, lc]
        dst[..., :3] = np.moveaxis(c[k][:, br, bc], 0, -1)
    return int(union.sum())


def recompose_exact(
    stack: LayerStack, target: np.ndarray, what: str = "image", *, snap: bool = True
) -> tuple[LayerStack, RecomposeReport]:
    """`snap_alpha` (unless snap=False) then `fold_residual`, logging the report: the pipeline's recompose="exact"."""
    # snap_alpha already copied every layer: fold into those copies instead of copying them again
    out, report = fold_residual(snap_alpha(stack), target, copy=False) if snap else fold_residual(stack, target)
    logger.info("exact recomposition of %s: %s", what, report.describe())
    if report.uncovered:
        logger.warning(
            "%s: %d px are visible in the input but transparent in every layer; alpha is never changed, "
            "so they stay transparent",
            what,
            report.uncovered,
        )
    return out, report
