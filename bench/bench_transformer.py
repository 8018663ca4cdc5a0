"""CPU forward time of our transformer vs diffusers' QwenImageTransformer2DModel, real width, 2 blocks, ~2k tokens.

Both models share the same random weights (ours is assigned diffusers' tensors, no copy) and get the same inputs:
N=2 layers at a 16x32 token grid = 4 frames x 512 = 2048 image tokens, 64 text tokens. Runs alternate between the
two models (median of --runs after one warm-up each) so background load hits both alike; wall and process CPU
time are both reported, the latter being robust to other processes competing for the cores.

    python bench/bench_transformer.py [--dtype fp32|bf16] [--runs 3] [--padded]

--padded appends 64 masked padding tokens to the text (the batched-prompt case): diffusers runs a masked SDPA,
we drop the padding first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qil_core.model.arch.config import TransformerConfig  # noqa: E402
from qil_core.model.arch.transformer import build_transformer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_reference(cfg: TransformerConfig, dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' transformer with the given config and random N(0, 0.02) weights (norm weights 1)."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(
            num_layers=cfg.num_layers, use_additional_t_cond=True, use_layer3d_rope=True
        )
    model = model.to_empty(device="cpu").to(dtype).eval()
    # the RoPE tables are plain attributes (not buffers): rebuild them off the meta device
    model.pos_embed = type(model.pos_embed)(theta=10000, axes_dim=list(cfg.axes_dims_rope), scale_rope=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "norm_out" not in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of fn."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(name: str, runs: list[tuple[float, float]]) -> tuple[float, float]:
    """Print and return (median wall, median CPU) seconds of the runs."""
    wall = [r[0] for r in runs]
    cpu = [r[1] for r in runs]
    print(
        f"{name:10s}: wall median {statistics.median(wall):7.3f} s (min {min(wall):.3f})   "
        f"CPU median {statistics.median(cpu):7.3f} s (min {min(cpu):.3f})"
    )
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--padded", action="store_true", help="add 64 masked padding tokens to the text")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]

    cfg = TransformerConfig(num_layers=2)
    reference = make_reference(cfg, dtype)
    ours = build_transformer(cfg, "meta")
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)  # shares the tensors
    ours.eval()

    layers, hp, wp, n_txt = 2, 16, 32, 64
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, (layers + 2) * hp * wp, 64, generator=gen).to(dtype)
    txt = torch.randn(1, n_txt, 3584, generator=gen).to(dtype)
    mask = None
    if args.padded:
        txt = torch.cat([txt, torch.zeros(1, 64, 3584, dtype=dtype)], dim=1)
        mask = torch.tensor([[1] * n_txt + [0] * 64])
    sigma = torch.tensor([0.75], dtype=dtype)
    shapes = [[(1, hp, wp)] * (layers + 2)]
    t_cond = torch.zeros(1, dtype=torch.long)

    def run_ours() -> torch.Tensor:
        return ours(x, txt, mask, sigma, shapes, t_cond)

    def run_reference() -> torch.Tensor:
        return reference(
            hidden_states=x,
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=mask,
            timestep=sigma,
            img_shapes=shapes,
            additional_t_cond=t_cond,
            return_dict=False,
        )[0]

    print(
        f"config: width {cfg.inner_dim} ({cfg.num_attention_heads}x{cfg.attention_head_dim}), {cfg.num_layers} "
        f"blocks, text dim {cfg.joint_attention_dim}; tokens: {x.shape[1]} image + {n_txt} text"
        f"{' + 64 padding' if args.padded else ''}; dtype {args.dtype}; threads {torch.get_num_threads()}"
    )
    with torch.inference_mode():
        a, b = run_ours(), run_reference()  # warm-up
        diff = (a.float() - b.float()).abs().max().item()
        ours_t, ref_t = [], []
        for _ in range(args.runs):
            ours_t.append(timed(run_ours))
            ref_t.append(timed(run_reference))
    print(f"max |ours - diffusers| = {diff:.3e} (output max {b.float().abs().max().item():.3f})")
    ours_wall, ours_cpu = summary("ours", ours_t)
    ref_wall, ref_cpu = summary("diffusers", ref_t)
    print(
        f"ratio ours/diffusers = {ours_wall / ref_wall:.3f}x wall, {ours_cpu / ref_cpu:.3f}x CPU time "
        "(target <= 1.0x; on a shared machine trust the CPU-time ratio)"
    )


if __name__ == "__main__":
    main()
