"""Peak memory of a decomposition in each memory mode, and of per-layer vs batched vs tiled VAE decoding (CPU).

Every measurement runs in its own spawn-started process, so peaks never mix. On the CPU the "device" is RAM,
so the meaningful figure is the process's anonymous memory (RssAnon, sampled every 2 ms): the weights a mode
materialises plus working memory. The checkpoints are loaded the product's way (`load_transformer` /
`load_vae`, memory-mapped, zero-copy), so their pages are file-backed page cache the kernel can drop at any
time, the CPU analogue of "on the host, not on the device"; VmHWM (peak total RSS, file pages included) is
printed alongside. Resident mode first copies every weight into anonymous memory, which is what a GPU holds.

Part 1 (transformer): a synthetic transformer at the real width (3072) with --blocks blocks (default 3: 2.1 GB
bf16) plus a real-size RGBA-VAE, saved as safetensors (bf16, and fp8 e4m3fn with per-tensor scales), runs one
full `decompose` (N=2 layers, 64x64 px, true CFG, --steps steps) in each mode; outputs are compared for
bit-identity against the resident run of the same weights.
Part 2 (VAE): a real-size RGBA-VAE (random weights, fp32) decodes --vae-layers layers at --vae-size px: all in
one batch (as diffusers does), one layer at a time (ours), and one layer at a time in 128 px tiles.

    python bench/bench_memory.py [--part all|transformer|vae] [--blocks 3] [--steps 1] [--vae-size 256]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 1e6


def _status() -> dict[str, int]:
    """RssAnon, RssFile and VmHWM of this process in bytes (Linux /proc)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


class AnonPeak:
    """Samples RssAnon every `interval` s on a thread; `peak` is the largest value seen while running."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = _status()["RssAnon"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status()["RssAnon"])
            time.sleep(self.interval)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status()["RssAnon"])


def _materialize(module: torch.nn.Module) -> None:
    """Copy every weight into anonymous memory (what a device would hold), dropping the memory map."""
    for sub in module.modules():
        for p in sub._parameters.values():
            if p is not None:
                p.data = p.data.clone()
        for name, buf in sub._buffers.items():
            if buf is not None:
                sub._buffers[name] = buf.clone()


def _digest(stacks: list) -> str:
    h = hashlib.sha256()
    for stack in stacks:
        for layer in stack.layers:
            h.update(f"{layer.x},{layer.y},{layer.pixels.shape}".encode())
            h.update(layer.pixels.tobytes())
    return h.hexdigest()[:16]


# --- part 1: decomposition in each memory mode -----------------------------------------------------------------
def _decompose_child(mode: str, transformer_file: str, vae_file: str, steps: int) -> dict[str, Any]:
    """Load, place and run one decomposition; return anonymous-memory figures and an output digest."""
    torch.set_num_threads(2)
    import numpy as np

    from qil_core.model.loader import QwenLayeredModel
    from qil_core.model.pipeline.decompose import decompose
    from qil_core.model.runtime.offload import BlockSwapPlacement, OffloadPlacement
    from qil_core.model.runtime.placement import ResidentPlacement
    from qil_core.model.weights.loading import load_transformer, load_vae

    start = _status()["RssAnon"]
    dit = load_transformer(transformer_file, dtype=torch.bfloat16)
    vae = load_vae(vae_file, dtype=torch.bfloat16)
    kind, _, k = mode.partition(":")
    if kind.endswith("resident"):
        _materialize(dit)
        _materialize(vae)
        placement: Any = ResidentPlacement("cpu")
    elif kind == "offload":
        placement = OffloadPlacement("cpu")
    elif kind == "swap-prefetch":
        placement = BlockSwapPlacement(
            "cpu", int(k), prefetch=True, keep_resident=False, others=OffloadPlacement("cpu")
        )
    else:
        placement = BlockSwapPlacement(
            "cpu", int(k), prefetch=False, keep_resident=False, others=OffloadPlacement("cpu")
        )
    model = QwenLayeredModel(dit, vae, dtype=torch.bfloat16, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    image = (np.random.default_rng(0).random((64, 64, 4)) * 255).astype(np.uint8)
    pos = torch.randn(1, 16, 3584, generator=gen).to(torch.bfloat16)
    neg = torch.randn(1, 12, 3584, generator=gen).to(torch.bfloat16)
    loaded = _status()["RssAnon"]
    t0 = time.perf_counter()
    with AnonPeak() as peak:
        stacks = decompose(
            model,
            image,
            prompt_embeds=pos,
            negative_embeds=neg,
            layers=2,
            steps=steps,
            cfg=4.0,
            resolution="custom",
            max_side=64,
            placement=placement,
            cfg_batch=False,
            seed=1,
        )
    return {
        "mode": mode,
        "start": start,
        "loaded": loaded,
        "peak": peak.peak,
        "hwm": _status()["VmHWM"],
        "seconds": time.perf_counter() - t0,
        "digest": _digest(stacks),
    }


def _write_checkpoints(folder: Path, blocks: int) -> dict[str, Any]:
    """A real-width transformer (bf16 and fp8 files) and a real-size RGBA-VAE (bf16), random weights."""
    from safetensors.torch import save_file

    from qil_core.model.arch.config import TransformerConfig
    from qil_core.model.arch.transformer import build_transformer
    from qil_core.model.arch.vae import RGBAVAE
    from qil_core.model.runtime.memory_plan import module_bytes
    from qil_core.model.weights.quant import TRANSFORMER_FP8_SKIP, quantize_module_fp8

    model = build_transformer(TransformerConfig(num_layers=blocks), "meta").to(torch.bfloat16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    first = model.transformer_blocks[0]
    with torch.no_grad():  # random weights outside the blocks and in block 0; the other blocks copy block 0
        for name, p in [
            *((n, p) for n, p in model.named_parameters() if not n.startswith("transformer_blocks.")),
            *first.named_parameters(),
        ]:
            if "norm" in name and "norm_out" not in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for block in model.transformer_blocks[1:]:
            for p, src in zip(block.parameters(), first.parameters(), strict=True):
                p.copy_(src)
    sizes = {
        "rest_bf16": module_bytes(model) - module_bytes(model.transformer_blocks),
        "block_bf16": module_bytes(model.transformer_blocks[0]),
        "transformer_bf16": module_bytes(model),
    }
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "transformer_bf16.safetensors")
    quantize_module_fp8(model, skip=TRANSFORMER_FP8_SKIP)
    sizes.update(
        block_fp8=module_bytes(model.transformer_blocks[0]),
        transformer_fp8=module_bytes(model),
        rest_fp8=module_bytes(model) - module_bytes(model.transformer_blocks),
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "transformer_fp8.safetensors")
    del model
    vae = RGBAVAE()
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    vae = vae.to(torch.bfloat16)
    sizes["vae_bf16"] = module_bytes(vae)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, folder / "vae_bf16.safetensors")
    del vae
    gc.collect()
    return sizes


def part_transformer(blocks: int, steps: int) -> None:
    modes = [
        ("bf16", "resident"),
        ("bf16", "offload"),
        ("bf16", "swap:1"),
        ("bf16", "swap-prefetch:0"),
        ("bf16", "swap:0"),
        ("fp8", "fp8-resident"),
        ("fp8", "swap:0"),
    ]
    with tempfile.TemporaryDirectory(prefix="qil_bench_memory_") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        sizes = _write_checkpoints(folder, blocks)
        print(
            f"checkpoints: transformer {blocks} blocks x width 3072 = {sizes['transformer_bf16'] / MB:.0f} MB bf16 "
            f"({sizes['block_bf16'] / MB:.0f} MB per block, {sizes['rest_bf16'] / MB:.0f} MB outside blocks), "
            f"{sizes['transformer_fp8'] / MB:.0f} MB fp8 ({sizes['block_fp8'] / MB:.0f} MB per block); VAE "
            f"{sizes['vae_bf16'] / MB:.0f} MB bf16; written in {time.perf_counter() - t0:.1f} s"
        )
        rows = []
        for precision, mode in modes:
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                row = pool.submit(
                    _decompose_child,
                    mode,
                    str(folder / f"transformer_{precision}.safetensors"),
                    str(folder / "vae_bf16.safetensors"),
                    steps,
                ).result()
            row["precision"] = precision
            rows.append(row)
            print(f"  {precision} {mode:16s} done in {row['seconds']:.1f} s", flush=True)
    base = {r["precision"]: r for r in rows if r["mode"].endswith("resident")}
    expected = _expected(sizes)
    print(
        f"\ndecomposition (N=2, 64x64, {steps} step(s), true CFG), anonymous memory above the process baseline;"
        " ratio against the resident run of the same precision"
    )
    print(
        f"{'precision':9s} {'mode':16s} {'RssAnon peak':>12s} {'above base':>11s} {'of it weights':>14s} "
        f"{'ratio':>7s} {'VmHWM':>7s} {'s':>6s}  output bit-identical"
    )
    for r in rows:
        used = r["peak"] - r["start"]
        ref = base[r["precision"]]
        ratio = used / (ref["peak"] - ref["start"])
        same = "yes" if r["digest"] == ref["digest"] else "NO"
        print(
            f"{r['precision']:9s} {r['mode']:16s} {r['peak'] / MB:9.0f} MB {used / MB:8.0f} MB "
            f"{expected[(r['precision'], r['mode'])] / MB:11.0f} MB {ratio:7.3f} {r['hwm'] / MB:7.0f} "
            f"{r['seconds']:6.1f}  {same}"
        )
    print(
        "(modes: resident = weights copied into RAM; offload = each component copied in for its phase; swap:k = "
        "k blocks resident, the rest copied in one at a time; swap-prefetch:k adds the look-ahead block. 'of it "
        "weights' is what the mode must hold in the denoising phase; the remainder is activations, the fp8 "
        "dequantisation temporaries (2 x 75 MB) and allocator slack. VmHWM also counts the memory-mapped file "
        "pages the OS can drop.)"
    )


def _expected(s: dict[str, Any]) -> dict[tuple[str, str], int]:
    """Weights each mode must hold at its peak (the transformer phase), from the checkpoint sizes."""
    vae = s["vae_bf16"]
    return {
        ("bf16", "resident"): s["transformer_bf16"] + vae,
        ("bf16", "offload"): s["transformer_bf16"],
        ("bf16", "swap:1"): s["rest_bf16"] + 2 * s["block_bf16"],
        ("bf16", "swap-prefetch:0"): s["rest_bf16"] + 2 * s["block_bf16"],
        ("bf16", "swap:0"): s["rest_bf16"] + s["block_bf16"],
        ("fp8", "fp8-resident"): s["transformer_fp8"] + vae,
        ("fp8", "swap:0"): s["rest_fp8"] + s["block_fp8"],
    }


# --- part 2: VAE decoding ----------------------------------------------------------------------------------------
def _vae_child(mode: str, size: int, layers: int) -> dict[str, Any]:
    torch.set_num_threads(2)
    from qil_core.model.arch.vae import RGBAVAE
    from qil_core.model.runtime.vae_tiling import tiled_decode

    vae = RGBAVAE()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    vae.eval()
    z = torch.randn(layers, 16, size // 8, size // 8, generator=gen)
    start = _status()["RssAnon"]
    t0 = time.perf_counter()
    with torch.inference_mode(), AnonPeak() as peak:
        if mode == "batched":
            out = [vae.decode(z)]
        elif mode == "per-layer":
            out = [vae.decode(z[i : i + 1]) for i in range(layers)]
        else:
            out = [tiled_decode(vae, z[i : i + 1], tile=128, overlap=32) for i in range(layers)]
    return {
        "mode": mode,
        "work": peak.peak - start,
        "seconds": time.perf_counter() - t0,
        "hwm": _status()["VmHWM"],
        "pixels": torch.cat(out),
    }


def part_vae(size: int, layers: int) -> None:
    from qil_core.model.runtime.memory_plan import estimate_vae_decode_bytes

    rows = []
    for mode in ("batched", "per-layer", "tiled-128"):
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            rows.append(pool.submit(_vae_child, mode, size, layers).result())
        print(f"  VAE {mode:10s} done in {rows[-1]['seconds']:.1f} s", flush=True)
    base = rows[0]
    mp_ = size * size / 1e6
    model = estimate_vae_decode_bytes(size, size, dtype=torch.float32)
    print(
        f"\nVAE decode of {layers} layers at {size}x{size} (real-size RGBA-VAE, fp32, random weights): working "
        f"memory above the loaded model (baseline: batched, diffusers' way)"
    )
    for r in rows:
        diff = float((r["pixels"] - base["pixels"]).abs().max())
        print(
            f"  {r['mode']:10s} {r['work'] / MB:8.0f} MB  ratio {r['work'] / base['work']:.3f}  "
            f"{r['work'] / 1e9 / mp_ / (layers if r['mode'] == 'batched' else 1):5.2f} GB/MP per frame in "
            f"flight  VmHWM {r['hwm'] / MB:5.0f} MB  {r['seconds']:6.1f} s  max |diff| vs batched {diff:.1e}"
        )
    print(
        f"  memory_plan's estimate: {model / MB:.0f} MB per layer in fp32 ({model / 1e9 / mp_:.1f} GB/MP, from "
        "performance.md's 4.2 GB/MP in bf16; deliberately high for the frame-wise 2D VAE)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "transformer", "vae"], default="all")
    parser.add_argument("--blocks", type=int, default=3, help="transformer blocks at width 3072 (680 MB each)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--vae-size", type=int, default=256)
    parser.add_argument("--vae-layers", type=int, default=4)
    args = parser.parse_args()
    # Children inherit this: every allocation above 1 MB is its own mapping, returned to the OS when freed, so
    # RssAnon follows the live tensors instead of glibc's retained heap (whose size depends on timing).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    t0 = time.perf_counter()
    if args.part in ("all", "transformer"):
        part_transformer(args.blocks, args.steps)
    if args.part in ("all", "vae"):
        part_vae(args.vae_size, args.vae_layers)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
