"""Peak RSS while loading a multi-GB transformer checkpoint, against the tensor bytes it holds (target: <= 1.1x).

Writes a synthetic ComfyUI-style single file in the real key layout (width 3072, text width 3584, real block
shapes, fewer blocks: about 3.5 GB in bf16) into a temporary folder, then loads it in fresh processes
(multiprocessing spawn) and reports each child's peak RSS (getrusage RUSAGE_SELF ru_maxrss):

  same dtype   bf16 file -> bf16 model: tensors used straight from the memory map; then every weight is touched
               so the whole model is resident, as during inference.
  converting   bf16 file -> fp16 model: every tensor streamed through a 16 MB buffer into its own copy.
  baseline     the usual non-assign load: allocate the model in RAM (meta + to_empty), then
               load_state_dict(safetensors.torch.load_file(...)), i.e. the weights copied once into the model.

Ratios are printed against the tensor bytes, both for the raw peak and for the peak above the process's RSS
just before loading (Python + torch + the package). Run: python bench/bench_load.py [--blocks N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def write_checkpoint(path: Path, blocks: int) -> tuple[int, int]:
    """Stream a bf16 safetensors file with the real key layout and `blocks` blocks; return (bytes, tensors)."""
    import torch

    from qil_core.model.arch.config import TransformerConfig
    from qil_core.model.arch.transformer import expected_shapes

    shapes = expected_shapes(TransformerConfig(num_layers=blocks))
    header: dict[str, object] = {}
    offset = 0
    for key, shape in shapes.items():
        n = torch.Size(shape).numel() * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    # One random 8 MB block written over and over: finite values, no time spent generating 3.5 GB of noise.
    block = memoryview((torch.randn(1 << 22) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy())
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape in shapes.values():
            left = torch.Size(shape).numel() * 2
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
    return offset, len(shapes)


def _child(path: str, mode: str, queue: mp.Queue) -> None:
    import torch

    from qil_core.model.arch.transformer import build_transformer
    from qil_core.model.weights.loading import load_transformer

    before = _rss_now()
    t0 = time.perf_counter()
    if mode == "baseline":
        from safetensors.torch import load_file

        from qil_core.model.arch.config import TransformerConfig

        sd = load_file(path)
        cfg = TransformerConfig.from_shapes({k: tuple(v.shape) for k, v in sd.items()})
        model = build_transformer(cfg, "meta").to(torch.bfloat16).to_empty(device="cpu")
        model.load_state_dict(sd)
        del sd
    else:
        model = load_transformer(path, dtype=torch.bfloat16 if mode == "same" else torch.float16)
    load_s = time.perf_counter() - t0
    peak_load = _peak_rss()
    with torch.no_grad():  # touch every weight: the model as it is during inference
        checksum = sum(float(c.sum(dtype=torch.float32)) for p in model.parameters() for c in p.view(-1).split(1 << 22))
    tensor_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if checksum != checksum:
        raise RuntimeError(f"{mode}: the loaded weights hold NaN")
    queue.put(
        dict(
            mode=mode,
            before=before,
            peak_load=peak_load,
            peak_all=_peak_rss(),
            load_s=load_s,
            tensor_bytes=tensor_bytes,
        )
    )


def run(path: Path, mode: str) -> dict:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(str(path), mode, queue))
    proc.start()
    result = queue.get(timeout=600)
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{mode} child exited with {proc.exitcode}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=5, help="transformer blocks (680 MB each in bf16)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary checkpoint")
    args = parser.parse_args()
    gb = 1e9
    size_estimate = args.blocks * 679_662_592 + 81_058_944
    tmp = Path(tempfile.mkdtemp(prefix="qil_bench_load_"))
    free_disk = shutil.disk_usage(tmp).free
    from qil_core.model.runtime.memory import available_ram

    free_ram = available_ram() or 0
    if free_disk < 1.5 * size_estimate or free_ram < 2.5 * size_estimate:
        raise SystemExit(
            f"not enough room: {size_estimate / gb:.2f} GB checkpoint, {free_disk / gb:.1f} GB disk and "
            f"{free_ram / gb:.1f} GB RAM free; use --blocks with a smaller number"
        )
    path = tmp / "qwen_image_layered_synthetic_bf16.safetensors"
    try:
        t0 = time.perf_counter()
        nbytes, ntensors = write_checkpoint(path, args.blocks)
        print(
            f"checkpoint: {args.blocks} real-width blocks, {ntensors} tensors, {nbytes / gb:.2f} GB bf16, "
            f"written in {time.perf_counter() - t0:.1f} s ({path})"
        )
        print(
            f"{'case':<34}{'load s':>8}{'tensors GB':>12}{'peak GB':>10}{'peak/tensors':>14}"
            f"{'(peak-start)/tensors':>22}"
        )
        rows = [
            ("same dtype (bf16 -> bf16, mmap)", "same"),
            ("converting (bf16 -> fp16, streamed)", "convert"),
            ("baseline: allocate + load_state_dict", "baseline"),
        ]
        for label, mode in rows:
            r = run(path, mode)
            tb = r["tensor_bytes"]
            print(
                f"{label:<34}{r['load_s']:>8.2f}{tb / gb:>12.2f}{r['peak_all'] / gb:>10.2f}"
                f"{r['peak_all'] / tb:>13.2f}x{(r['peak_all'] - r['before']) / tb:>21.2f}x"
            )
            print(
                f"{'':<34}  right after loading: peak {r['peak_load'] / gb:.2f} GB, process before loading "
                f"{r['before'] / gb:.2f} GB"
            )
        print("target: peak <= 1.1x the tensor bytes of the component (performance.md, Loading)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
