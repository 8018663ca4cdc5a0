"""PSD write/read benchmark: 20 layers on a 4096² canvas, ours vs psd-tools' naive save() vs raw-write floor.

Run: python bench/bench_psd.py [--size 4096] [--layers 20] [--naive-layers 2]
Prints seconds and ratios for a sparse stack (each layer's content covers about 1/4 of the canvas, stored
cropped) and a dense one (every layer covers the whole canvas). psd-tools' naive save is the official app's
way: PSDImage.new + PixelLayer.frompil of full-canvas RGBA images + save(), measured on --naive-layers layers
and half as many, and extrapolated linearly (fixed + per-layer cost) to the full count (said in the output).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qil_core.layers import Layer, LayerStack  # noqa: E402
from qil_core.layers.psd import lint_psd, read_psd, write_psd  # noqa: E402

ANCHOR_S = 19.7  # psd-tools save() as the official app uses it, 20 layers at 4096² (performance.md)


def texture(size: int, seed: int = 0) -> np.ndarray:
    """A photograph-like RGB float32 texture (size, size, 3): smooth gradients plus VAE-like grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
    base = np.stack([0.5 + 0.4 * np.sin(6 * x + 2 * y), 0.5 + 0.4 * np.cos(5 * y - 3 * x), 0.4 + 0.3 * x * y], -1)
    base += rng.normal(0, 2.5 / 255, base.shape).astype(np.float32)
    return np.clip(base, 0, 1).astype(np.float32)


def blob_alpha(h: int, w: int) -> np.ndarray:
    """An ellipse with a 3 px soft edge filling an (h, w) box: alpha float32."""
    y, x = np.ogrid[0:h, 0:w]
    r = np.sqrt(((y - h / 2 + 0.5) / (h / 2)) ** 2 + ((x - w / 2 + 0.5) / (w / 2)) ** 2)
    return np.clip((1 - r) * min(h, w) / 6, 0, 1).astype(np.float32)


def make_stack(size: int, n: int, dense: bool) -> LayerStack:
    """`n` layers on a size² canvas; sparse: an ellipse over ~1/4 of the canvas each; dense: full-canvas layers."""
    tex = texture(size)
    rng = np.random.default_rng(1)
    layers = []
    if dense:
        px = np.empty((size, size, 4), np.float32)
        px[..., :3] = tex
        px[..., 3] = 0.5 + 0.5 * blob_alpha(size, size)  # covers everything: half transparent corners
        for i in range(n):  # one shared array: the writer's work is the same, memory stays at one canvas
            layers.append(Layer(px, 0, 0, name=f"dense {i}"))
        return LayerStack(size, size, layers)
    side = size // 2
    alpha = blob_alpha(side, side)
    for i in range(n):
        x, y = (int(v) for v in rng.integers(0, size - side, 2))
        px = np.empty((side, side, 4), np.float32)
        px[..., :3] = tex[y : y + side, x : x + side]
        px[..., 3] = alpha
        layers.append(Layer(px, x, y, name=f"レイヤー {i}"))
    return LayerStack(size, size, layers)


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of `repeat` calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def raw_floor(path: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` uncompressed bytes from memory to a new file and fsync it."""
    buf = np.ones(min(nbytes, 64 << 20), np.uint8)

    def run() -> None:
        with open(path, "wb") as f:
            left = nbytes
            while left > 0:
                f.write(buf[: min(left, buf.size)])
                left -= buf.size
            f.flush()
            os.fsync(f.fileno())
        path.unlink()

    return timed(run, 2)


def naive_psd_tools(stack: LayerStack, path: Path, k: int) -> float:
    """Seconds for the official app's way on the first `k` layers: full-canvas PIL layers, PSDImage, save()."""
    from PIL import Image
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer

    canvases = []
    for layer in stack.layers[:k]:
        full = np.zeros((stack.height, stack.width, 4), np.uint8)
        full[layer.y : layer.y + layer.height, layer.x : layer.x + layer.width] = np.round(layer.pixels * 255)
        canvases.append(Image.fromarray(full, "RGBA"))
    t0 = time.perf_counter()
    psd = PSDImage.new("RGBA", (stack.width, stack.height))
    for i, img in enumerate(canvases):
        psd.append(PixelLayer.frompil(img, psd, f"Layer {i}"))
    psd.save(path)
    return time.perf_counter() - t0


def bench(kind: str, stack: LayerStack, folder: Path, naive_layers: int) -> None:
    """Run and print one variant."""
    from qil_core.layers.composite import composite

    n = len(stack.layers)
    t0 = time.perf_counter()
    merged = composite(stack)
    t_comp = time.perf_counter() - t0
    counter = iter(range(1000))

    def ours() -> None:
        write_psd(stack, folder / f"ours_{kind}_{next(counter)}.psd", merged=merged)

    t_ours = timed(ours, 2)
    t0 = time.thread_time()
    write_psd(stack, folder / f"ours_{kind}_cpu.psd", merged=merged, workers=1)
    t_cpu = time.thread_time() - t0
    t0 = time.perf_counter()
    path = write_psd(stack, folder / f"ours_{kind}_full.psd")
    t_full = time.perf_counter() - t0
    size = path.stat().st_size
    raw_bytes = sum(layer.pixels.shape[0] * layer.pixels.shape[1] * 4 for layer in stack.layers)
    raw_bytes += stack.width * stack.height * 4
    t_floor = raw_floor(folder / "floor.bin", raw_bytes)
    problems = lint_psd(path, decode=False)
    k = min(n, naive_layers)
    t_naive_k = naive_psd_tools(stack, folder / f"naive_{kind}_k.psd", k)
    if k == n:
        t_naive, how = t_naive_k, ""
    else:  # fixed cost + per-layer cost, from k and k // 2 layers
        k0 = max(1, k // 2)
        t_naive_k0 = naive_psd_tools(stack, folder / f"naive_{kind}_k0.psd", k0)
        per_layer = (t_naive_k - t_naive_k0) / (k - k0)
        if per_layer > 0:
            t_naive = t_naive_k + per_layer * (n - k)
            how = (
                f" (extrapolated: {k0} layers {t_naive_k0:.1f} s, {k} layers {t_naive_k:.1f} s, "
                f"{per_layer:.1f} s per layer)"
            )
        else:
            t_naive, how = t_naive_k * n / k, f" (measured on {k} layers: {t_naive_k:.1f} s, scaled x{n / k:.1f})"
    t0 = time.perf_counter()
    back = read_psd(path)
    t_read = time.perf_counter() - t0
    out_bytes = sum(layer.pixels.nbytes for layer in back.layers)
    dst = [np.empty_like(layer.pixels) for layer in back.layers]
    t_copy = timed(lambda: [np.copyto(d, layer.pixels) for d, layer in zip(dst, back.layers)], 2)
    t0 = time.thread_time()
    [np.copyto(d, layer.pixels) for d, layer in zip(dst, back.layers)]
    c_copy = time.thread_time() - t0
    dst = None
    t0 = time.perf_counter()
    fresh = [layer.pixels.copy() for layer in back.layers]  # the reader must allocate its output too
    t_copy_new = time.perf_counter() - t0
    del fresh
    back = None  # free the first read before timing the second
    t0 = time.thread_time()
    read_psd(path, workers=1)
    c_read = time.thread_time() - t0
    print(
        f"\n== {kind}: {n} layers on {stack.width}x{stack.height}, {raw_bytes / 2**20:.0f} MiB of 8-bit pixels, "
        f"file {size / 2**20:.0f} MiB, lint {'ok' if not problems else problems[:2]}"
    )
    print(f"  write_psd, merged given        {t_ours:7.2f} s   (target <= 1.5 s)")
    print(f"  write_psd, one thread, CPU     {t_cpu:7.2f} s   (CPU time of the calling thread; immune to load)")
    print(f"  write_psd + composite()        {t_full:7.2f} s   (composite alone {t_comp:.2f} s)")
    print(f"  raw file-write floor (fsync)   {t_floor:7.2f} s   -> ours / floor = {t_ours / t_floor:.1f}x")
    print(f"  psd-tools naive save()         {t_naive:7.2f} s{how}")
    print(
        f"     -> speed-up vs naive: {t_naive / t_ours:.1f}x writer alone, {t_naive / t_full:.1f}x with composite "
        f"(target >= 10x)"
    )
    if n == 20 and stack.width == 4096:
        print(
            f"     -> vs the published anchor (19.7 s, performance.md): {ANCHOR_S / t_ours:.1f}x writer alone, "
            f"{ANCHOR_S / t_full:.1f}x with composite"
        )
    print(
        f"  read_psd                       {t_read:7.2f} s   memory-copy floor {t_copy:.3f} s "
        f"({out_bytes / 2**20:.0f} MiB float32) -> {t_read / t_copy:.1f}x (target <= 4x)"
    )
    print(
        f"  allocating-copy floor          {t_copy_new:7.3f} s   -> read_psd / floor = {t_read / t_copy_new:.1f}x "
        f"(new memory, page faults included)"
    )
    print(f"  read_psd, one thread, CPU      {c_read:7.2f} s   copy floor CPU {c_copy:.3f} s -> {c_read / c_copy:.1f}x")


def main() -> None:
    """Parse arguments and run both variants."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument(
        "--naive-layers",
        type=int,
        default=2,
        help="layers for psd-tools' naive save (also half as many; extrapolated to --layers)",
    )
    ap.add_argument("--dir", default=None, help="folder for the files (default: a temporary folder)")
    args = ap.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs, load average {load:.1f} at start (other processes slow every wall time)")
    # Touch the memory the dense run will need once, so first-touch page faults (expensive in VMs) are not
    # charged to whichever measurement happens to allocate first.
    warm = np.ones((args.layers + 2) * args.size * args.size * 4 * 4 // 8, np.float64)
    del warm
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for kind, dense in (("sparse", False), ("dense", True)):
            stack = make_stack(args.size, args.layers, dense)
            bench(kind, stack, Path(tmp), args.naive_layers)
            del stack


if __name__ == "__main__":
    main()
