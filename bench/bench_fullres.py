"""Full-resolution layers: guided alpha upsampling vs today's premultiplied Lanczos, on a scene with known layers.

A layered scene is rendered at SIZE² with analytically antialiased edges (an opaque textured background, a
disc with a colour gradient, thin bars like lettering, a soft translucent glow). Its composite, quantised to
8 bits, is the "original". A stand-in decomposer returns the true layers area-averaged to the 640² bucket
(what a perfect model would give at that size). Both methods map those back to SIZE²:
- baseline: `resize_stack(..., "lanczos")` (premultiplied Lanczos, what output_size="original" did);
- guided: `fullres.upsample_stack(stack, original)` (guided alpha + colour from the original where a layer is
  the only visible contributor).
Figures, in 8-bit steps: alpha error (mean absolute, RMS) in each layer's edge band (pixels within BAND px of
a place where its true alpha is strictly between 0 and 1 or changes), and the composite's colour error
in the union of the bands (no exact recomposition applied), then the cost and result of exact recomposition.
Times: the whole stack and per layer, best of --repeats runs, both methods in the same run; wall time and
process CPU time (on a shared machine the CPU time is the fair figure).

Run: python bench/bench_fullres.py [--size 4096] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qil_core.layers import Layer, LayerStack, composite, resize_stack  # noqa: E402
from qil_core.layers.composite import paste_layer  # noqa: E402
from qil_core.layers.fullres import box_mean, upsample_stack  # noqa: E402
from qil_core.layers.recompose import recompose_exact  # noqa: E402
from qil_core.layers.resample import premultiply, resample_box, unpremultiply  # noqa: E402

BUCKET = 640
BAND = 8


def _aa(dist: np.ndarray) -> np.ndarray:
    """Coverage of a pixel whose centre is `dist` px inside (+) an edge: a one-pixel linear ramp."""
    return np.clip(dist + 0.5, 0, 1).astype(np.float32)


def scene(n: int) -> LayerStack:
    """Four true layers on an n x n canvas, bottom first."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    u, v = xx / n, yy / n
    bg = np.empty((n, n, 4), np.float32)
    bg[..., 0] = 0.25 + 0.2 * u + 0.05 * np.sin(u * 90)
    bg[..., 1] = 0.45 + 0.15 * v + 0.05 * np.sin(v * 70 + u * 30)
    bg[..., 2] = 0.6 - 0.2 * u * v
    bg[..., 3] = 1
    disc = np.empty_like(bg)
    r = np.hypot(u - 0.42, v - 0.5) * n
    disc[..., 3] = _aa(0.3 * n - r)
    disc[..., 0], disc[..., 1], disc[..., 2] = 0.95, 0.35 + 0.4 * v, 0.15
    bars = np.zeros_like(bg)
    stripe = np.zeros((n, n), np.float32)
    for k in range(6):  # vertical strokes 0.012 n wide (about 8 px at 640), like big lettering
        cx = (0.56 + 0.06 * k) * n
        inside = np.minimum(0.006 * n - np.abs(xx - cx), np.minimum(yy - 0.15 * n, 0.45 * n - yy))
        stripe = np.maximum(stripe, _aa(inside))
    bars[..., 3] = stripe
    bars[..., 0], bars[..., 1], bars[..., 2] = 0.05, 0.1, 0.3 + 0.3 * u
    glow = np.zeros_like(bg)
    g = np.exp(-(((u - 0.7) / 0.12) ** 2 + ((v - 0.75) / 0.08) ** 2))
    glow[..., 3] = 0.6 * g
    glow[..., 0], glow[..., 1], glow[..., 2] = 1.0, 0.95, 0.7
    glow[..., 3][glow[..., 3] < 0.5 / 255] = 0
    names = ["Background", "Disc", "Bars", "Glow"]
    return LayerStack(n, n, [Layer.from_canvas(px, name=nm) for px, nm in zip((bg, disc, bars, glow), names)])


def downsample(stack: LayerStack, size: int) -> LayerStack:
    """The stand-in decomposer: each true layer area-averaged (premultiplied) to size x size."""
    out = []
    for layer in stack.layers:
        canvas = paste_layer(np.zeros((stack.height, stack.width, 4), np.float32), layer)
        small = resample_box(premultiply(canvas), (0, 0, stack.width, stack.height), (size, size), "bilinear")
        out.append(Layer.from_canvas(unpremultiply(small), name=layer.name))
    return LayerStack(size, size, out)


def full(layer: Layer, n: int) -> np.ndarray:
    return paste_layer(np.zeros((n, n, 4), np.float32), layer)


def edge_band(alpha: np.ndarray) -> np.ndarray:
    edge = ((alpha > 0) & (alpha < 1)).astype(np.float32)
    edge[:, 1:] += np.abs(np.diff(alpha, axis=1)) > 0.01
    edge[1:, :] += np.abs(np.diff(alpha, axis=0)) > 0.01
    return box_mean(edge, BAND) > 0


def timed(fn, repeats: int):
    """(best wall seconds, best process CPU seconds (all threads), result) over `repeats` calls."""
    best, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        best, cpu = min(best, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return best, cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    n = args.size
    truth = scene(n)
    original = np.round(composite(truth) * 255).astype(np.uint8)
    low = downsample(truth, BUCKET)
    t_lz, c_lz, lanczos = timed(lambda: resize_stack(low, n, n, "lanczos"), args.repeats)
    t_gd, c_gd, guided = timed(lambda: upsample_stack(low, original), args.repeats)
    layers = len(truth.layers)
    print(f"scene {n}x{n}, {layers} layers, bucket {BUCKET}x{BUCKET}; errors in 8-bit steps (lower is better)")
    print(f"{'layer':<12}{'band px':>10}{'lanczos MAE':>13}{'guided MAE':>12}{'lanczos RMS':>13}{'guided RMS':>12}")
    union = np.zeros((n, n), bool)
    for i, layer in enumerate(truth.layers):
        a_true = full(layer, n)[..., 3]
        band = edge_band(a_true)
        union |= band
        if not band.any():
            continue
        errs = []
        for stack in (lanczos, guided):
            d = (full(stack.layers[i], n)[..., 3] - a_true)[band] * 255
            errs.append((float(np.abs(d).mean()), float(np.sqrt((d * d).mean()))))
        print(
            f"{layer.name:<12}{int(band.sum()):>10}{errs[0][0]:>13.2f}{errs[1][0]:>12.2f}{errs[0][1]:>13.2f}"
            f"{errs[1][1]:>12.2f}"
        )
    ref = original[..., :3].astype(np.float32)
    for label, stack in (("lanczos", lanczos), ("guided", guided)):
        c = composite(stack)[..., :3] * 255
        d = np.abs(c - ref)[union]
        print(f"composite colour error in the edge bands, {label}: mean {d.mean():.2f}, max {d.max():.1f}")
    for what, lz, gd in (("wall", t_lz, t_gd), ("CPU", c_lz, c_gd)):
        print(
            f"{what} time: lanczos {lz:.2f} s ({lz / layers:.2f} s/layer), guided {gd:.2f} s "
            f"({gd / layers:.2f} s/layer), ratio guided/lanczos {gd / lz:.2f}"
        )
    t_fold, c_fold, (folded, report) = timed(lambda: recompose_exact(guided, original), 1)
    err = np.abs(np.round(composite(folded)[..., :3] * 255) - ref).max()
    print(
        f"exact recomposition of the guided layers: {t_fold:.2f} s wall, {c_fold:.2f} s CPU; before: "
        f"{report.describe()}; after, 8-bit composite vs original: max {err:.0f}"
    )
    print(f"(CPU = process time summed over threads; {os.cpu_count()} CPUs, load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
