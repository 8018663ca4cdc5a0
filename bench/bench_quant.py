"""Every quantised format at the real width on the CPU: output error and cosine against bf16, time per forward.

A transformer with the real width (3072, 24 heads, text width 3584) and --blocks blocks gets trained-like random
weights (bench_fp8.build); the same weights run in bf16 (the baseline, in the same run), and with the block
Linear layers quantised on load as ComfyUI's quantiser does: fp8 e4m3fn per tensor, int8 per row, INT8 ConvRot
(group 256), mxfp8 and nvfp4. All of them run the portable path (each layer dequantised to bf16 when it runs);
with comfy-kitchen installed, INT8 ConvRot also runs its W8A8 int8 matmul (eager backend on the CPU: an
accuracy check of the kernel path, not a speed figure; the CUDA kernels are timed by gpu_bench.py). Inputs:
N=2 layers on an 8x16 token grid (512 image tokens) + 64 text tokens, sigma 0.75.

    python bench/bench_quant.py [--blocks 1] [--runs 1]
"""

from __future__ import annotations

import copy
import functools
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fp8 import N_TXT, bench_args, bench_inputs, build, timed_forward  # noqa: E402

from qil_core.model.runtime.memory_plan import module_bytes  # noqa: E402
from qil_core.model.weights.quant import QUANT_CHOICES, TRANSFORMER_FP8_SKIP, QuantLinear, quantize_module_fp8  # noqa: E402
from qil_core.model.weights.quant_kernels import enable_quant_kernels, load_kitchen  # noqa: E402

VARIANTS = ("fp8", "int8", "int8-convrot", "mxfp8", "nvfp4")


def rel(y: torch.Tensor, r: torch.Tensor) -> float:
    """Relative L2 error of y against r."""
    return float((y.float() - r.float()).norm() / r.float().norm())


def cos(y: torch.Tensor, r: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors."""
    return float(torch.nn.functional.cosine_similarity(y.float().flatten(), r.float().flatten(), dim=0))


def weight_error(model: torch.nn.Module, bf16: torch.nn.Module) -> float:
    """Relative L2 error of the dequantised block weights against the bf16 ones, over all quantised layers."""
    num = den = 0.0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            w = bf16.get_submodule(name).weight.float()
            num += float((m.dequantized_weight(torch.float32) - w).norm() ** 2)
            den += float(w.norm() ** 2)
    return (num / den) ** 0.5


def main() -> None:
    args = bench_args(__doc__, blocks=1)
    base = build(args.blocks)
    inputs, half = bench_inputs()
    bf16 = copy.deepcopy(base).to(torch.bfloat16)

    run = functools.partial(timed_forward, runs=args.runs)
    with torch.inference_mode():
        ref32 = base(**inputs).float()
    del base
    gc.collect()
    ref16, t16 = run(bf16, half)
    print(
        f"width 3072, {args.blocks} block(s), {half['hidden_states'].shape[1]} image + {N_TXT} text tokens, "
        f"threads {torch.get_num_threads()}; baseline bf16 {module_bytes(bf16) / 1e6:.0f} MB, {t16:.3f} s/forward"
    )
    print(
        f"{'variant':30s} {'MB':>6s} {'weights rel L2':>15s} {'out rel L2':>11s} {'out cosine':>11s} "
        f"{'rel L2 vs fp32':>15s} {'s/forward':>10s} {'vs bf16':>8s}"
    )
    print(
        f"{'bf16 (baseline)':30s} {module_bytes(bf16) / 1e6:6.0f} {0:15.4%} {0:11.4%} {1:11.6f} "
        f"{rel(ref16, ref32):15.4%} {t16:10.3f} {1:7.2f}x"
    )
    for name in VARIANTS:
        model = copy.deepcopy(bf16)
        quantize_module_fp8(model, skip=TRANSFORMER_FP8_SKIP, fmt=QUANT_CHOICES[name])
        y, t = run(model, half)
        werr = weight_error(model, bf16)
        print(
            f"{name + ' (portable)':30s} {module_bytes(model) / 1e6:6.0f} {werr:15.4%} {rel(y, ref16):11.4%} "
            f"{cos(y, ref16):11.6f} {rel(y, ref32):15.4%} {t:10.3f} {t / t16:7.2f}x"
        )
        if name == "int8-convrot" and load_kitchen() is not None:
            enable_quant_kernels(model, "comfy-kitchen")
            y, t = run(model, half)
            print(
                f"{'int8-convrot W8A8 (ck eager)':30s} {module_bytes(model) / 1e6:6.0f} {werr:15.4%} "
                f"{rel(y, ref16):11.4%} {cos(y, ref16):11.6f} {rel(y, ref32):15.4%} {t:10.3f} {t / t16:7.2f}x"
            )
        del model
        gc.collect()


if __name__ == "__main__":
    main()
