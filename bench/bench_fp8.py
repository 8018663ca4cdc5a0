"""fp8 weights at the real width on the CPU: velocity error against bf16 (and fp32), time per forward, weight bytes.

A transformer with the real width (3072, 24 heads, text width 3584) and --blocks blocks gets random weights
scaled like a trained network's (Linear N(0, 1/fan_in), small biases, norms near 1); the same weights run as
fp32, bf16, fp8 e4m3fn with per-tensor scales dequantised per layer (computed in bf16), and fp8 x fp8
(`torch._scaled_mm`, activations quantised per tensor too). Inputs: N=2 layers on an 8x16 token grid (4 frames,
512 image tokens) + 64 text tokens, sigma 0.75 (exact in bf16). Baseline: the bf16 model in the same run.

    python bench/bench_fp8.py [--blocks 2] [--runs 1]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.speed import enable_fp8_matmul  # noqa: E402
from qil_core.model.arch.config import TransformerConfig  # noqa: E402
from qil_core.model.arch.transformer import build_transformer  # noqa: E402
from qil_core.model.runtime.memory_plan import module_bytes  # noqa: E402
from qil_core.model.weights.quant import TRANSFORMER_FP8_SKIP, quantize_module_fp8  # noqa: E402


def build(blocks: int) -> torch.nn.Module:
    """Real-width transformer, fp32, trained-like random weights."""
    model = build_transformer(TransformerConfig(num_layers=blocks), "cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, m.in_features**-0.5, generator=gen)
                m.bias.normal_(0.0, 0.02, generator=gen)
        for name, p in model.named_parameters():
            if "norm" in name and "norm_out" not in name:
                p.normal_(1.0, 0.1, generator=gen)
            elif "addition_t" in name:
                p.normal_(0.0, 0.5, generator=gen)
    return model.requires_grad_(False).eval()


def bench_args(doc: str | None, blocks: int) -> argparse.Namespace:
    """The command line of the real-width benches: --blocks (default `blocks`) and --runs (timed forwards)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--blocks", type=int, default=blocks)
    parser.add_argument("--runs", type=int, default=1)
    return parser.parse_args()


N_TXT = 64  # text tokens of the bench inputs


def bench_inputs() -> tuple[dict, dict]:
    """The forward's inputs in fp32 and bf16: N=2 layers on an 8x16 token grid + N_TXT text tokens, sigma 0.75."""
    gen = torch.Generator().manual_seed(1)
    layers, hp, wp = 2, 8, 16
    inputs = dict(
        hidden_states=torch.randn(1, (layers + 2) * hp * wp, 64, generator=gen),
        encoder_hidden_states=torch.randn(1, N_TXT, 3584, generator=gen),
        encoder_hidden_states_mask=None,
        timestep=torch.tensor([0.75]),
        img_shapes=[(1, hp, wp)] * (layers + 2),
    )
    half = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    return inputs, half


def timed_forward(model: torch.nn.Module, x: dict, runs: int) -> tuple[torch.Tensor, float]:
    """The model's output (fp32) and the median seconds of `runs` forwards after one warm-up."""
    with torch.inference_mode():
        out = model(**x)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            out = model(**x)
            times.append(time.perf_counter() - t0)
    return out.float(), statistics.median(times)


def main() -> None:
    args = bench_args(__doc__, blocks=2)
    base = build(args.blocks)
    inputs, half = bench_inputs()
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    fp8 = copy.deepcopy(bf16)
    quantize_module_fp8(fp8, skip=TRANSFORMER_FP8_SKIP)
    print(
        f"width 3072, {args.blocks} blocks, {inputs['hidden_states'].shape[1]} image + {N_TXT} text tokens; "
        f"weights: fp32 {module_bytes(base) / 1e6:.0f} MB, bf16 {module_bytes(bf16) / 1e6:.0f} MB, "
        f"fp8 {module_bytes(fp8) / 1e6:.0f} MB ({module_bytes(fp8) / module_bytes(bf16):.3f}x bf16); "
        f"threads {torch.get_num_threads()}"
    )

    run = functools.partial(timed_forward, runs=args.runs)
    ref32, t32 = run(base, inputs)
    ref16, t16 = run(bf16, half)
    y8, t8 = run(fp8, half)
    enable_fp8_matmul(fp8, force=True)
    y88, t88 = run(fp8, half)

    def rel(y: torch.Tensor, r: torch.Tensor) -> float:
        return float((y - r).norm() / r.norm())

    def cos(y: torch.Tensor, r: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(y.flatten(), r.flatten(), dim=0))

    print(
        f"{'variant':22s} {'rel L2 vs bf16':>15s} {'rel L2 vs fp32':>15s} {'cosine vs bf16':>15s} "
        f"{'s/forward':>10s} {'time vs bf16':>13s}"
    )
    for name, y, t in (
        ("fp32", ref32, t32),
        ("bf16 (baseline)", ref16, t16),
        ("fp8 weights", y8, t8),
        ("fp8 x fp8 (_scaled_mm)", y88, t88),
    ):
        print(
            f"{name:22s} {rel(y, ref16):15.4%} {rel(y, ref32):15.4%} {cos(y, ref16):15.6f} {t:10.3f} {t / t16:12.2f}x"
        )
    print(
        "stated bound (tests/model/weights/test_fp8_accuracy.py): fp8 weights within 5% of bf16, fp8 x fp8 within 6.5%"
    )


if __name__ == "__main__":
    main()
