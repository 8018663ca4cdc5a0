"""Composite speed: our compositor vs a PIL alpha_composite chain vs a memory-copy floor, same stacks, one run.

Sparse: 20 layers of 1024² content at random offsets on a 4096² canvas. Dense: 20 full-canvas layers on a
2048² canvas (4096² dense would hold 5.4 GB of float32 layers). Each figure is the best of REPEATS runs.

Baselines, measured here:
- PIL chain: what apps do (the official app included): every layer pasted on a full-canvas RGBA uint8 image,
  then `Image.alpha_composite(canvas, layer)` layer after layer (only normal mode; uint8 maths).
- PIL in place: `canvas.alpha_composite(layer, dest=(x, y))`, Pillow's region-only variant.
- Copy floor (the targets' baseline): `np.copyto` of every layer's float32 RGBA pixels into its place in a
  warm, preallocated canvas-sized float32 buffer, i.e. moving each input pixel once with no blending.
- Also printed: `np.copyto` of one whole canvas-sized float32 buffer (warm), the same copy into a fresh
  allocation (page faults included, which our composite pays for its new output), and the uint8 canvas.

Run: python bench/bench_composite.py
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qil_core.layers import Layer, LayerStack, composite  # noqa: E402

REPEATS = 3
N_LAYERS = 20


def best(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Best wall time of `repeats` calls (seconds)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def make_layer(rng: np.random.Generator, h: int, w: int, x: int, y: int, i: int) -> Layer:
    """A soft-edged disc of noisy colour, 8-bit values (so PIL and we composite the same numbers)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2))
    px = np.empty((h, w, 4), np.float32)
    px[..., :3] = rng.random(3, dtype=np.float32) * 0.7 + rng.random((h, w, 3), dtype=np.float32) * 0.3
    px[..., 3] = np.clip((1.0 - r) * 8, 0, 1) * (0.6 + 0.4 * (i % 2))
    px = np.round(px * 255) / 255
    return Layer(px.astype(np.float32), x=x, y=y, name=f"layer {i}")


def build(kind: str) -> LayerStack:
    rng = np.random.default_rng(0)
    if kind == "sparse":
        side, content = 4096, 1024
        layers = [
            make_layer(
                rng, content, content, int(rng.integers(0, side - content)), int(rng.integers(0, side - content)), i
            )
            for i in range(N_LAYERS)
        ]
    else:
        side = 2048
        layers = [make_layer(rng, side, side, 0, 0, i) for i in range(N_LAYERS)]
    return LayerStack(side, side, layers)


def to_pil_full(stack: LayerStack) -> list[Image.Image]:
    """Each layer pasted on a full transparent canvas, uint8 RGBA (how apps hand layers to PIL)."""
    out = []
    for layer in stack.layers:
        full = np.zeros((stack.height, stack.width, 4), np.uint8)
        full[layer.y : layer.y + layer.height, layer.x : layer.x + layer.width] = np.round(layer.pixels * 255)
        out.append(Image.fromarray(full, "RGBA"))
    return out


def run(kind: str) -> dict[str, float]:
    stack = build(kind)
    h, w = stack.height, stack.width
    composite(stack)  # warm up: the first touch of fresh memory is slow on some VMs
    t_ours = best(lambda: composite(stack))

    full_layers = to_pil_full(stack)
    region_layers = [
        (Image.fromarray(np.round(layer.pixels * 255).astype(np.uint8), "RGBA"), (layer.x, layer.y))
        for layer in stack.layers
    ]

    def pil_chain() -> Image.Image:
        canvas = Image.new("RGBA", (w, h))
        for img in full_layers:
            canvas = Image.alpha_composite(canvas, img)
        return canvas

    def pil_in_place() -> Image.Image:
        canvas = Image.new("RGBA", (w, h))
        for img, dest in region_layers:
            canvas.alpha_composite(img, dest=dest)
        return canvas

    t_chain = best(pil_chain)
    t_inplace = best(pil_in_place)

    paste_dst = np.zeros((h, w, 4), np.float32)

    def paste_floor() -> None:
        for layer in stack.layers:
            np.copyto(paste_dst[layer.y : layer.y + layer.height, layer.x : layer.x + layer.width], layer.pixels)

    t_floor = best(paste_floor)
    src = np.ones((h, w, 4), np.float32)
    dst = np.zeros_like(src)
    t_canvas = best(lambda: np.copyto(dst, src))
    t_fresh = best(lambda: src.copy())
    src8, dst8 = np.ones((h, w, 4), np.uint8), np.zeros((h, w, 4), np.uint8)
    t_canvas8 = best(lambda: np.copyto(dst8, src8))

    # Sanity: same picture as PIL's chain (premultiplied, 8-bit rounding apart).
    ours = composite(stack)
    theirs = np.asarray(pil_chain(), np.float32) / 255
    diff = np.abs(ours[..., :3] * ours[..., 3:] - theirs[..., :3] * theirs[..., 3:]).max() * 255

    content = sum(layer.pixels.shape[0] * layer.pixels.shape[1] for layer in stack.layers) / 1e6
    print(
        f"\n{kind}: {N_LAYERS} layers, {content:.1f} MP of layer content on a {w}x{h} canvas "
        f"(max premultiplied difference to PIL's chain: {diff:.2f}/255)"
    )
    rows = [
        ("ours: qil_core.layers.composite (float32)", t_ours),
        ("PIL Image.alpha_composite chain (uint8, full-canvas layers)", t_chain),
        ("PIL canvas.alpha_composite(dest=) in place (uint8)", t_inplace),
        ("copy floor: np.copyto of every layer into a warm float32 canvas", t_floor),
        ("np.copyto of one float32 canvas, warm buffer", t_canvas),
        ("copy of one float32 canvas into a fresh allocation", t_fresh),
        ("np.copyto of one uint8 canvas, warm buffer", t_canvas8),
    ]
    for name, t in rows:
        print(f"  {name:<66s} {t:8.3f} s")
    print(f"  ours / copy floor:                    {t_ours / t_floor:6.1f}x")
    print(
        f"  ours / one float32 canvas copy:       {t_ours / t_canvas:6.1f}x "
        f"(into a fresh allocation: {t_ours / t_fresh:.1f}x)"
    )
    print(
        f"  PIL chain / ours:                     {t_chain / t_ours:6.2f}x (PIL chain / copy floor: "
        f"{t_chain / t_floor:.1f}x)"
    )
    print(f"  PIL in place / ours:                  {t_inplace / t_ours:6.2f}x")
    return {"ours": t_ours, "floor": t_floor}


def main() -> None:
    print(f"bench_composite: best of {REPEATS}, {os.cpu_count()} CPU cores, numpy {np.__version__}")
    sparse = run("sparse")
    dense = run("dense")
    print("\nTargets: within 10x the copy floor on sparse stacks, 25x on dense ones.")
    print(f"  sparse {sparse['ours'] / sparse['floor']:.1f}x, dense {dense['ours'] / dense['floor']:.1f}x")


if __name__ == "__main__":
    main()
