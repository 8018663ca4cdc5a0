"""LoRA cost at the real width on the CPU: time per forward with 0, 1 and 3 LoRAs, on the fly vs merged, memory.

The transformer has the real width (3072, 24 heads, text 3584) and --blocks blocks with trained-like random
weights (bench_fp8.build). Each LoRA has rank --rank on every Linear of the blocks (attention, MLPs,
modulation) and changes the velocity by a few percent, like a real one. First, one MLP Linear alone, timed
round-robin (the branch's per-step cost with the least noise from other load on the machine). Then the block:
inputs N=2 layers on a 4x8 grid (4 frames, 128 image tokens) + 32 text tokens; baseline: the same model without
LoRA in the same run; times are the best of --runs.
Reported per configuration: seconds per forward and the ratio to the baseline, the extra bytes the LoRAs hold
(branch buffers, or merged copies while the originals are kept), the one-off apply time, and for the fp8
model the velocity error against the fp32 model with the same LoRA (relative RMS), on the fly vs merged.

    python bench/bench_lora.py [--blocks 1] [--rank 64] [--runs 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fp8 import build  # noqa: E402

from qil_core.model.weights.lora import LoraFile, LoraPatch  # noqa: E402
from qil_core.model.weights.lora_apply import BRANCH, LoraBranch, _add_branch, apply_lora, lora_stack, remove_loras  # noqa: E402
from qil_core.model.weights.quant import TRANSFORMER_FP8_SKIP, quantize_module_fp8  # noqa: E402


def make_lora(model: torch.nn.Module, rank: int, seed: int) -> LoraFile:
    """A random LoRA on every block Linear: delta = U D with |U D x| a few percent of |W x|."""
    gen = torch.Generator().manual_seed(seed)
    patches = {}
    for name, m in model.named_modules():
        if name.startswith("transformer_blocks.") and hasattr(m, "in_features") and "qil_lora" not in name:
            down = torch.randn(rank, m.in_features, generator=gen) * m.in_features**-0.5
            up = torch.randn(m.out_features, rank, generator=gen) * (0.03 / rank**0.5) * m.in_features**-0.5
            patches[name] = LoraPatch(down=down, up=up * m.in_features**0.5, scale=1.0)
    return LoraFile(f"bench{seed}", patches, "bench")


def timed(model: torch.nn.Module, inputs: dict, runs: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        out = model(**inputs)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            out = model(**inputs)
            times.append(time.perf_counter() - t0)
    return min(times), out  # best of: the least disturbed by other load on a shared machine


def layer_timings(rank: int, rounds: int) -> None:
    """One MLP Linear (3072 -> 12288, 160 tokens) plain / with 1 or 3 branches, timed round-robin (best of)."""
    gen = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(3072, 12288).requires_grad_(False)
    x = torch.randn(160, 3072, generator=gen)
    layers = {"plain (= merged)": base}
    for n in (1, 3):
        layer = torch.nn.Linear(3072, 12288, device="meta")
        layer.weight, layer.bias = base.weight, base.bias  # the same weights: only the branch differs
        down = torch.randn(n * rank, 3072, generator=gen) * 3072**-0.5
        layer.add_module(BRANCH, LoraBranch(down, torch.randn(12288, n * rank, generator=gen) * 0.01, None, None))
        layer.register_forward_hook(_add_branch)
        layers[f"{n} LoRA(s) on the fly"] = layer
    best = dict.fromkeys(layers, float("inf"))
    with torch.inference_mode():
        for _ in range(rounds):
            for name, layer in layers.items():
                t0 = time.perf_counter()
                layer(x)
                best[name] = min(best[name], time.perf_counter() - t0)
    print(f"one Linear 3072->12288, 160 tokens, rank {rank}, best of {rounds} round-robin calls:")
    for name, t in best.items():
        print(f"  {name:20s} {t * 1e3:8.2f} ms  x{t / best['plain (= merged)']:.3f}")


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    layer_timings(args.rank, 30)
    model = build(args.blocks)
    gen = torch.Generator().manual_seed(1)
    layers, hp, wp, n_txt = 2, 4, 8, 32
    inputs = dict(
        hidden_states=torch.randn(1, (layers + 2) * hp * wp, 64, generator=gen),
        encoder_hidden_states=torch.randn(1, n_txt, 3584, generator=gen),
        encoder_hidden_states_mask=None,
        timestep=torch.tensor([0.75]),
        img_shapes=[(1, hp, wp)] * (layers + 2),
    )
    loras = [make_lora(model, args.rank, s) for s in range(3)]
    lora_mb = loras[0].nbytes / 1e6
    print(
        f"real width, {args.blocks} block(s), fp32 on {torch.get_num_threads()} CPU thread(s); LoRA rank "
        f"{args.rank} on {len(loras[0].patches)} Linears ({lora_mb:.0f} MB fp32 each)"
    )
    base_t, base_out = timed(model, inputs, args.runs)
    print(f"{'configuration':34s} {'s/forward':>9s} {'x base':>7s} {'extra MB':>9s} {'apply s':>8s}")
    print(f"{'no LoRA (baseline)':34s} {base_t:9.3f} {1.0:7.2f} {0:9.0f} {0:8.2f}")
    outs = {}
    for mode in ("fly", "merge"):
        for n in (1, 3):
            t0 = time.perf_counter()
            lora_stack(model).add_many([(lora, 1.0) for lora in loras[:n]], mode)
            apply_s = time.perf_counter() - t0
            extra = lora_stack(model).extra_bytes / 1e6
            t, out = timed(model, inputs, args.runs)
            outs[(mode, n)] = out
            remove_loras(model)
            print(f"{f'{n} LoRA(s), {mode}':34s} {t:9.3f} {t / base_t:7.2f} {extra:9.0f} {apply_s:8.2f}")
    print(
        f"LoRA effect: 1 LoRA changes the velocity by {rel_rms(outs[('fly', 1)], base_out):.3f} (relative RMS); "
        f"fly vs merged (fp32) differ by {rel_rms(outs[('fly', 3)], outs[('merge', 3)]):.1e}"
    )
    fp8 = copy.deepcopy(model)
    quantize_module_fp8(fp8, skip=TRANSFORMER_FP8_SKIP)
    fp8_t, fp8_base = timed(fp8, inputs, args.runs)
    print("\nfp8 e4m3fn blocks (dequantised per layer), 1 LoRA; error against the fp32 model with the same LoRA:")
    print(f"{'fp8, no LoRA':34s} {fp8_t:9.3f} {1.0:7.2f}   error of the base itself {rel_rms(fp8_base, base_out):.4f}")
    effect = outs[("fly", 1)] - base_out
    for mode in ("fly", "merge"):
        apply_lora(fp8, loras[0], 1.0, mode=mode)
        t, out = timed(fp8, inputs, args.runs)
        extra = lora_stack(fp8).extra_bytes / 1e6
        remove_loras(fp8)
        lora_err = rel_rms(out - fp8_base, effect)  # how much of the LoRA's own change survives
        print(
            f"{f'fp8 + 1 LoRA, {mode}':34s} {t:9.3f} {t / fp8_t:7.2f}   total error "
            f"{rel_rms(out, outs[('fly', 1)]):.4f}, error of the LoRA's change {lora_err:.3f}, extra {extra:.0f} MB"
        )


if __name__ == "__main__":
    main()
