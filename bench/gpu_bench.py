"""Transformer step time, throughput and peak memory on one GPU, against diffusers on the same weights and inputs.

One prepared script for a lent H100/H200 (well under 8 minutes with the defaults). It builds the real-size
Qwen-Image-Layered transformer (60 blocks, width 3072) with random weights directly on the GPU in bf16, and
times denoising steps with true CFG (a positive and a negative forward, ~150 text tokens each) at 640²/N=4 and
1024²/N=8 for:
  ours-bf16            our transformer, sequential CFG (two forwards per step, as the reference pipeline)
  ours-bf16-batched    our transformer, both CFG branches in one batch-2 forward
  diffusers-bf16       diffusers' QwenImageTransformer2DModel holding the same tensors (no second copy)
  ours-fp8             every block Linear quantised to e4m3fn with per-tensor scales, dequantised per layer
  ours-fp8-mm          the same with fp8 x fp8 `torch._scaled_mm` (compute capability 8.9+ only)
  ours-fp8-swap        fp8 + block swap with the resident blocks a 24 GB card allows (memory_plan), rest
                       streamed from pinned RAM with side-stream prefetch
  ours-int8-convrot-ck block Linears quantised to INT8 ConvRot (group 256, as ComfyUI's int8_convrot files),
                       comfy-kitchen's W8A8 int8 matmul (quant_kernels.py; the bf16 weights are rebuilt first)
  ours-nvfp4-ck        block Linears in NVFP4 with comfy-kitchen's FP4 matmul (Blackwell; elsewhere its layers
                       fall back to per-layer dequantisation, which the notes then say)
and a real-size RGBA-VAE (encode + per-layer decode) for the end-to-end projection, and the auto-caption step
(bench/gpu_caption.py: ms per new token of our Qwen2.5-VL captioner, 2 LM layers projected to 28; memory).
Printed per variant: s/step,
achieved TFLOP/s from the cost model (one forward = 13.59 GFLOP*L + 0.737 MFLOP*L^2, L = text + image tokens,
image tokens = (N+2)(H/16)(W/16)), peak memory (torch.cuda.max_memory_allocated), ratios ours/diffusers, the
projected 50-step end-to-end time, and the fp8 velocity error against bf16. Results also go to --out as JSON.

    python bench/gpu_bench.py [--quick] [--blocks K] [--out FILE.json] [--attention auto|sdpa|flash_attn|...]
                              [--sdpa default|cudnn|flash|efficient] [--compile] [--budget-s 420]
    python bench/gpu_bench.py --dry-run      # tiny model on the CPU in seconds (run by tests/bench/test_gpu_bench.py)

--blocks K builds K blocks and scales the times by 60/K (block work is 99.8% of a forward); peaks are
projected by adding the missing blocks' bytes. Variants that would start after --budget-s are skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import speed  # noqa: E402
from bench.gpu_caption import run_caption  # noqa: E402
from qil_core.model.arch.config import TransformerConfig  # noqa: E402
from qil_core.model.arch.transformer import build_transformer  # noqa: E402
from qil_core.model.arch.vae import RGBAVAE, VAEConfig  # noqa: E402
from qil_core.model.runtime import memory_plan as mp  # noqa: E402
from qil_core.model.runtime.offload import BlockSwapPlacement  # noqa: E402
from qil_core.model.weights.quant import TRANSFORMER_FP8_SKIP, QuantLinear, quantize_module_fp8  # noqa: E402
from qil_core.model.weights.quant_kernels import enable_quant_kernels  # noqa: E402

REAL_BLOCKS = 60
GFLOP_L, MFLOP_L2 = 13.59e9, 0.737e6  # performance.md cost model, 60 blocks
CARD_24GB_FREE = int(23.5e9)  # free memory of a 24 GB card with a CUDA context, for the block-swap plan
DIFFUSERS_BACKENDS = {"flash_attn": "flash", "flash_attn3": "_flash_3", "sageattention": "sage"}
TINY = TransformerConfig(
    num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(8, 12, 12)
)


@dataclass(frozen=True)
class Setting:
    """One benchmark case: size, layer count and text lengths of the positive and negative prompts."""

    name: str
    width: int
    height: int
    layers: int
    text: int
    neg_text: int

    @property
    def img_tokens(self) -> int:
        """(N+2) frames of (H/16)(W/16) tokens: N layers, the composite, the condition image."""
        return mp.image_tokens(self.width, self.height, self.layers)


def forward_flops(tokens: int, blocks: int) -> float:
    """Cost-model FLOPs of one forward over `tokens` tokens with `blocks` of the 60 blocks."""
    return (GFLOP_L * tokens + MFLOP_L2 * tokens**2) * blocks / REAL_BLOCKS


class Bench:
    """Runs the variants, keeps the results and the time budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.dtype = torch.bfloat16
        self.cfg = TINY if self.dry else TransformerConfig(num_layers=args.blocks)
        self.blocks = self.cfg.num_layers
        self.scale = 1.0 if self.dry else REAL_BLOCKS / self.blocks
        self.start = time.perf_counter()
        self.results: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.accuracy: dict[str, Any] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def log(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def time_variant(
        self, variant: str, setting: Setting, step: Callable[[], object], flops: float, extra_peak: int = 0, **info: Any
    ) -> dict[str, Any] | None:
        """Warm up once, time `steps` steps; record s/step, TFLOP/s and peak memory."""
        if self.elapsed() > self.args.budget_s:
            self.notes.append(f"{variant} @ {setting.name}: skipped, time budget of {self.args.budget_s:.0f}s spent")
            self.log(self.notes[-1])
            return None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        resident = torch.cuda.memory_allocated() if self.device.type == "cuda" else None
        try:
            with torch.inference_mode():
                step()
                self.sync()
                t0 = time.perf_counter()
                for _ in range(self.args.steps):
                    step()
                self.sync()
        except torch.cuda.OutOfMemoryError as e:
            self.notes.append(f"{variant} @ {setting.name}: out of memory ({str(e).splitlines()[0]})")
            self.log(self.notes[-1])
            return None
        dt = (time.perf_counter() - t0) / self.args.steps
        peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None
        row: dict[str, Any] = {
            "variant": variant, "setting": setting.name, "blocks": self.blocks, "s_per_step": dt,
            "s_per_step_60": dt * self.scale, "tflops": flops / dt / 1e12,
            "steps_timed": self.args.steps, "peak_bytes": peak, "resident_bytes": resident,
            "projected_peak_bytes": None if peak is None else peak + extra_peak, **info,
        }  # fmt: skip
        self.results.append(row)
        mem = (
            ""
            if peak is None
            else f", peak {peak / 1e9:.2f} GB"
            + (f" (projected to 60 blocks {(peak + extra_peak) / 1e9:.2f} GB)" if extra_peak else "")
        )
        self.log(
            f"{variant:18s} {setting.name:9s} {dt * self.scale:7.3f} s/step (60 blocks), "
            f"{row['tflops']:7.1f} TFLOP/s{mem}"
        )
        return row


def build_ours(b: Bench) -> torch.nn.Module:
    """Our transformer with N(0, 0.02) weights (norms 1) built straight on the device in bf16."""
    # cast on the meta device first: materialising fp32 would need 81.7 GB before the cast
    model = build_transformer(b.cfg, "meta").to(b.dtype).to_empty(device=b.device)
    gen = torch.Generator(device=b.device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "norm_out" not in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.requires_grad_(False).eval()


def build_diffusers(b: Bench, ours: torch.nn.Module) -> torch.nn.Module | None:
    """diffusers' transformer holding our tensors (assign=True: no copy), or None when diffusers is missing."""
    try:
        from diffusers import QwenImageTransformer2DModel
    except ImportError as e:
        b.notes.append(f"diffusers not importable ({e}): ours only")
        return None
    c = b.cfg
    with torch.device("meta"):
        ref = QwenImageTransformer2DModel(
            patch_size=c.patch_size, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.num_layers,
            attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
            joint_attention_dim=c.joint_attention_dim, axes_dims_rope=tuple(c.axes_dims_rope),
            use_additional_t_cond=True, use_layer3d_rope=True,
        )  # fmt: skip
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    # the RoPE tables are plain attributes (not in the state dict): rebuild them off the meta device
    ref.pos_embed = type(ref.pos_embed)(theta=10000, axes_dim=list(c.axes_dims_rope), scale_rope=True)
    ref.eval()
    backend = DIFFUSERS_BACKENDS.get(b.args.attention_resolved)
    if backend is not None:
        try:
            ref.set_attention_backend(backend)
        except (ValueError, ImportError, RuntimeError) as e:
            b.notes.append(f"diffusers attention backend {backend!r} unavailable ({e}); it uses SDPA")
    return ref


def make_inputs(b: Bench, s: Setting) -> dict[str, Any]:
    """Packed latents, both prompts' embeddings, sigma, img_shapes for one setting (random, on the device)."""
    gen = torch.Generator(device=b.device).manual_seed(1)
    hp, wp = s.height // 16, s.width // 16

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=b.device, dtype=torch.float32).to(b.dtype)

    return {
        "x": rnd(1, s.img_tokens, b.cfg.in_channels),
        "pos": rnd(1, s.text, b.cfg.joint_attention_dim),
        "neg": rnd(1, s.neg_text, b.cfg.joint_attention_dim),
        "sigma": torch.tensor([0.75], device=b.device),
        "shapes": [(1, hp, wp)] * (s.layers + 2),
        "t_cond": torch.zeros(1, dtype=torch.long, device=b.device),
    }


def ours_step(model: torch.nn.Module, inp: dict[str, Any], batched: bool) -> Callable[[], object]:
    """One denoising step's transformer work with true CFG: two forwards, or one batch-2 forward."""
    if not batched:

        def step() -> object:
            model(inp["x"], inp["pos"], None, inp["sigma"], inp["shapes"], inp["t_cond"])
            return model(inp["x"], inp["neg"], None, inp["sigma"], inp["shapes"], inp["t_cond"])

        return step
    pos, neg = inp["pos"], inp["neg"]
    length = max(pos.shape[1], neg.shape[1])
    txt = torch.zeros(2, length, pos.shape[2], dtype=pos.dtype, device=pos.device)
    txt[0, : pos.shape[1]], txt[1, : neg.shape[1]] = pos[0], neg[0]
    mask = None
    if pos.shape[1] != neg.shape[1]:
        mask = torch.zeros(2, length, dtype=torch.long, device=pos.device)
        mask[0, : pos.shape[1]], mask[1, : neg.shape[1]] = 1, 1
    x2, t2 = inp["x"].expand(2, -1, -1), inp["t_cond"].expand(2)

    def step2() -> object:
        return model(x2, txt, mask, inp["sigma"].expand(2), inp["shapes"], t2)

    return step2


def diffusers_step(ref: torch.nn.Module, inp: dict[str, Any]) -> Callable[[], object]:
    """The reference pipeline's CFG step: two transformer calls (masks None for unpadded prompts, as it does)."""
    shapes = [inp["shapes"]]

    def call(txt: torch.Tensor) -> torch.Tensor:
        return ref(
            hidden_states=inp["x"],
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=None,
            timestep=inp["sigma"],
            img_shapes=shapes,
            additional_t_cond=inp["t_cond"],
            return_dict=False,
        )[0]

    def step() -> object:
        call(inp["pos"])
        return call(inp["neg"])

    return step


def cfg_flops(b: Bench, s: Setting) -> float:
    return forward_flops(s.img_tokens + s.text, b.blocks) + forward_flops(s.img_tokens + s.neg_text, b.blocks)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


def run_vae(b: Bench, s: Setting) -> dict[str, Any]:
    """Real-size RGBA-VAE (random weights, bf16): one encode and N single-layer decodes at the setting's size."""
    cfg = VAEConfig(base_dim=4, num_res_blocks=1) if b.dry else VAEConfig()
    vae = RGBAVAE(cfg).to(b.device)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.02)
    vae = vae.to(b.dtype).eval()
    x = torch.rand(1, 4, s.height, s.width, device=b.device, dtype=b.dtype) * 2 - 1
    if b.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        z = vae.encode(x)
        vae.decode(z)  # warm-up
        b.sync()
        t0 = time.perf_counter()
        z = vae.encode(x)
        b.sync()
        t1 = time.perf_counter()
        for _ in range(s.layers):
            vae.decode(z)
        b.sync()
        t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() if b.device.type == "cuda" else None
    row = {
        "setting": s.name,
        "encode_s": t1 - t0,
        "decode_per_layer_s": (t2 - t1) / s.layers,
        "total_s": (t2 - t0),
        "peak_bytes": peak,
        "model_decode_bytes": mp.estimate_vae_decode_bytes(s.width, s.height, dtype=b.dtype),
    }
    b.log(
        f"VAE {s.name}: encode {row['encode_s']:.3f} s, decode {row['decode_per_layer_s']:.3f} s/layer"
        + (
            ""
            if peak is None
            else f", peak {peak / 1e9:.2f} GB (model estimate {row['model_decode_bytes'] / 1e9:.2f} GB + weights)"
        )
    )
    del vae
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU (seconds); checks the script")
    parser.add_argument("--quick", action="store_true", help="640²/N=4 only")
    parser.add_argument("--blocks", type=int, default=REAL_BLOCKS, help="build K blocks and scale times by 60/K")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--text", type=int, default=150, help="positive prompt tokens")
    parser.add_argument("--neg-text", type=int, default=150, help="negative prompt tokens")
    parser.add_argument("--attention", default="auto", help="our attention backend (speed.BACKENDS)")
    parser.add_argument(
        "--sdpa",
        default="default",
        choices=["default", "cudnn", "flash", "efficient"],
        help="SDPA kernel priority for both models",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks (bf16)")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip variants starting after this")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.blocks, args.steps, args.text, args.neg_text = TINY.num_layers, 1, 16, 16
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run on a machine without a GPU")
    if not 1 <= args.blocks <= REAL_BLOCKS:
        parser.error(f"--blocks must be 1..{REAL_BLOCKS}")
    b = Bench(args)
    if args.dry_run:
        b.notes.append("dry run: tiny model on the CPU; TFLOP/s use the real model's cost model and mean nothing")
    settings = [
        Setting("640/N4", 640, 640, 4, args.text, args.neg_text),
        Setting("1024/N8", 1024, 1024, 8, args.text, args.neg_text),
    ]
    if args.dry_run:
        settings = [Setting("64/N2", 64, 64, 2, 16, 16), Setting("96/N3", 96, 96, 3, 16, 12)]
    if args.quick:
        settings = settings[:1]
    sdpa_ctx = _sdpa_context(args.sdpa)
    with sdpa_ctx:
        report = _run(b, settings)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
        b.log(f"wrote {args.out}")
    return report


def _sdpa_context(choice: str):  # -> AbstractContextManager
    import contextlib

    if choice == "default" or not torch.cuda.is_available():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[choice]
    order = [first] + [
        k
        for k in (
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH,
        )
        if k != first
    ]
    return sdpa_kernel(order, set_priority=True)


def _run(b: Bench, settings: list[Setting]) -> dict[str, Any]:
    args = b.args
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(b.device),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if b.device.type == "cuda" else None,
        "capability": torch.cuda.get_device_capability() if b.device.type == "cuda" else None,
    }
    b.log(
        f"env {env}; {b.blocks} blocks x width {b.cfg.inner_dim}; settings "
        + ", ".join(f"{s.name} ({s.img_tokens}+{s.text}/{s.neg_text} tokens)" for s in settings)
    )
    ours = build_ours(b)
    weights = mp.module_bytes(ours)
    block_bytes = mp.module_bytes(ours.transformer_blocks[0])
    missing = (REAL_BLOCKS - b.blocks) * block_bytes if not b.dry else 0
    args.attention_resolved = speed.set_attention_backend(ours, args.attention)
    b.log(
        f"ours built: {weights / 1e9:.2f} GB bf16 ({block_bytes / 1e6:.0f} MB per block), "
        f"attention {args.attention_resolved}"
    )
    inputs = {s.name: make_inputs(b, s) for s in settings}

    # --- bf16: ours, ours batched, diffusers on the same tensors ---------------------------------------------
    first = settings[0]
    with torch.inference_mode():
        v_bf16 = ours_step(ours, inputs[first.name], False)()
    for s in settings:
        rows = [b.time_variant("ours-bf16", s, ours_step(ours, inputs[s.name], False), cfg_flops(b, s), missing)]
        b.time_variant("ours-bf16-batched", s, ours_step(ours, inputs[s.name], True), cfg_flops(b, s), missing)
        if rows[0] is not None and rows[0]["peak_bytes"] is not None:
            tokens = s.img_tokens + max(s.text, s.neg_text)
            act = rows[0]["peak_bytes"] - rows[0]["resident_bytes"]
            rows[0]["activation_bytes_per_token"] = act / tokens
            rows[0]["model_activation_bytes"] = mp.estimate_activation_bytes(tokens, width=b.cfg.inner_dim)
            b.log(
                f"  measured working memory {act / tokens / 1e3:.1f} KB/token "
                f"(memory_plan assumes {rows[0]['model_activation_bytes'] / tokens / 1e3:.1f} KB/token)"
            )
    if args.compile:
        speed.compile_blocks(ours)
        for s in settings:
            b.time_variant("ours-bf16-compiled", s, ours_step(ours, inputs[s.name], False), cfg_flops(b, s), missing)
        speed.uncompile_blocks(ours)
    ref = None if args.no_diffusers else build_diffusers(b, ours)
    if ref is not None:
        with torch.inference_mode():
            v_ref = diffusers_step(ref, inputs[first.name])()
        b.accuracy["ours_vs_diffusers_bf16_rel_l2"] = rel_err(v_bf16, v_ref)
        b.log(f"ours vs diffusers (bf16, negative branch, {first.name}): rel L2 {rel_err(v_bf16, v_ref):.2e}")
        for s in settings:
            b.time_variant("diffusers-bf16", s, diffusers_step(ref, inputs[s.name]), cfg_flops(b, s), missing)
        del ref, v_ref
    gc.collect()

    # --- fp8: quantise in place (bf16 layers freed one by one), dequant path, fp8 x fp8, block swap ------------
    quantize_module_fp8(ours, skip=TRANSFORMER_FP8_SKIP)
    fp8_weights, fp8_block = mp.module_bytes(ours), mp.module_bytes(ours.transformer_blocks[0])
    missing8 = (REAL_BLOCKS - b.blocks) * fp8_block if not b.dry else 0
    b.log(f"quantised to fp8: {fp8_weights / 1e9:.2f} GB ({fp8_block / 1e6:.0f} MB per block)")
    with torch.inference_mode():
        b.accuracy["fp8_vs_bf16_rel_l2"] = rel_err(ours_step(ours, inputs[first.name], False)(), v_bf16)
    for s in settings:
        b.time_variant("ours-fp8", s, ours_step(ours, inputs[s.name], False), cfg_flops(b, s), missing8)
    if b.dry or speed.fp8_matmul_supported(b.device):
        speed.enable_fp8_matmul(ours, force=b.dry)
        with torch.inference_mode():
            b.accuracy["fp8mm_vs_bf16_rel_l2"] = rel_err(ours_step(ours, inputs[first.name], False)(), v_bf16)
        for s in settings:
            b.time_variant("ours-fp8-mm", s, ours_step(ours, inputs[s.name], False), cfg_flops(b, s), missing8)
        speed.enable_fp8_matmul(ours, False)
    else:
        b.notes.append("fp8 x fp8 matmul not supported on this GPU (needs compute capability 8.9+)")
    b.log("fp8 velocity error vs bf16: " + ", ".join(f"{k} {v:.3%}" for k, v in b.accuracy.items() if "fp8" in k))
    for s in settings:
        _block_swap(b, ours, s, inputs[s.name], fp8_block)
    del ours
    gc.collect()
    for fmt in ("int8-convrot", "nvfp4"):
        _kitchen_variant(b, fmt, settings, inputs, v_bf16)

    vae = [run_vae(b, s) for s in settings[: 1 if b.dry else None]] if b.elapsed() < args.budget_s else []
    report = _report(b, env, settings, vae)
    report["caption"] = run_caption(b.device, b.dry, log=b.log) if b.elapsed() < args.budget_s else None
    return report


def _kitchen_variant(b: Bench, fmt: str, settings: list[Setting], inputs: dict[str, Any], v_bf16: torch.Tensor) -> None:
    """Rebuild the bf16 weights, quantise the block Linears to `fmt`, time comfy-kitchen's quantised matmuls."""
    if b.device.type == "cuda":
        torch.cuda.empty_cache()
    ours = build_ours(b)
    speed.set_attention_backend(ours, b.args.attention)
    quantize_module_fp8(ours, skip=TRANSFORMER_FP8_SKIP, fmt=fmt)
    weights, block = mp.module_bytes(ours), mp.module_bytes(ours.transformer_blocks[0])
    missing = (REAL_BLOCKS - b.blocks) * block if not b.dry else 0
    enable_quant_kernels(ours, "comfy-kitchen")
    b.log(f"quantised to {fmt}: {weights / 1e9:.2f} GB ({block / 1e6:.0f} MB per block)")
    name = f"ours-{fmt}-ck"
    with torch.inference_mode():
        b.accuracy[f"{fmt}_ck_vs_bf16_rel_l2"] = rel_err(ours_step(ours, inputs[settings[0].name], False)(), v_bf16)
    layers = [m for m in ours.modules() if isinstance(m, QuantLinear)]
    fast = sum(m.kernel == "comfy-kitchen" for m in layers)
    if fast < len(layers):
        b.notes.append(
            f"{name}: {len(layers) - fast} of {len(layers)} layers ran the portable path (comfy-kitchen "
            "missing or its kernel unsupported here)"
        )
    for s in settings:
        b.time_variant(name, s, ours_step(ours, inputs[s.name], False), cfg_flops(b, s), missing)
    b.log(f"{fmt} (comfy-kitchen) velocity error vs bf16: {b.accuracy[f'{fmt}_ck_vs_bf16_rel_l2']:.3%}")
    del ours
    gc.collect()


def _block_swap(b: Bench, ours: torch.nn.Module, s: Setting, inp: dict[str, Any], block: int) -> None:
    """fp8 + block swap with the resident blocks the memory plan gives a 24 GB card at this setting."""
    rest = mp.module_bytes(ours) - sum(mp.module_bytes(x) for x in ours.transformer_blocks)
    tokens = s.img_tokens + max(s.text, s.neg_text)
    plan = mp.plan_memory(
        free_device_bytes=CARD_24GB_FREE, free_ram_bytes=None, device="cuda",
        component_bytes={"transformer": rest + REAL_BLOCKS * block, "vae": 254_000_000},
        block_bytes=[block] * REAL_BLOCKS, activation_bytes=mp.estimate_activation_bytes(tokens, fp8=True),
        vae_work_bytes=mp.estimate_vae_decode_bytes(s.width, s.height),
    )  # fmt: skip
    k_full = plan.resident_blocks if plan.mode == "block_swap" else REAL_BLOCKS
    streamed = REAL_BLOCKS - k_full
    k = max(0, b.blocks - streamed)  # with --blocks K keep the full run's number of streamed blocks
    if b.dry:
        k_full = k = b.blocks // 2  # the tiny model fits anywhere: stream half of it to exercise the hooks
    placement = BlockSwapPlacement(b.device, k, prefetch=True, keep_resident=False)
    with placement.use("transformer", ours) as dit:
        row = b.time_variant(
            "ours-fp8-swap",
            s,
            ours_step(dit, inp, False),
            cfg_flops(b, s),
            (k_full - k) * block,
            resident_blocks=k_full,
            plan_peak_bytes=plan.peak_bytes,
        )
    placement.release("transformer", ours)
    placement.unload()
    if row is not None:
        row["uploaded_gb_per_step"] = placement.stats.bytes_uploaded / (b.args.steps + 1) / 1e9


def _report(b: Bench, env: dict, settings: list[Setting], vae: list[dict]) -> dict[str, Any]:
    by = {(r["variant"], r["setting"]): r for r in b.results}
    ratios, projections = {}, {}
    targets = {"ours-bf16": 46e9, "ours-fp8": 26e9, "ours-fp8-swap": 23e9}  # 1024²/N=8 targets (performance.md)
    for s in settings:
        ours, ref = by.get(("ours-bf16", s.name)), by.get(("diffusers-bf16", s.name))
        if ours and ref:
            ratios[s.name] = {
                "time_ours_over_diffusers": ours["s_per_step"] / ref["s_per_step"],
                "speedup_vs_diffusers": ref["s_per_step"] / ours["s_per_step"],
            }
            if ours["peak_bytes"] and ref["peak_bytes"]:
                ratios[s.name]["peak_ours_over_diffusers"] = ours["peak_bytes"] / ref["peak_bytes"]
            fastest = min(
                (r for r in b.results if r["setting"] == s.name and r["variant"].startswith("ours-bf16")),
                key=lambda r: r["s_per_step"],
            )
            ratios[s.name]["best_bf16_variant"] = fastest["variant"]
            ratios[s.name]["best_bf16_speedup_vs_diffusers"] = ref["s_per_step"] / fastest["s_per_step"]
        v = next((x for x in vae if x["setting"] == s.name), None)
        vae_s = v["encode_s"] + s.layers * v["decode_per_layer_s"] if v else 0.0
        for r in b.results:
            if r["setting"] == s.name:
                projections[f"{r['variant']} @ {s.name}"] = 50 * r["s_per_step_60"] + vae_s
    checks = {}
    big = settings[-1].name
    for variant, limit in targets.items():
        r = by.get((variant, big))
        if r and r["projected_peak_bytes"] is not None and big == "1024/N8":
            checks[f"{variant} peak @ {big} < {limit / 1e9:.0f} GB"] = r["projected_peak_bytes"] < limit
    small = [(v, k) for k, v in projections.items() if k.startswith("ours-bf16") and k.endswith("@ 640/N4")]
    if small:
        best, name = min(small)
        checks[f"{name} 50 steps end to end < 28 s"] = best < 28.0
    for s in settings:
        if "best_bf16_speedup_vs_diffusers" in ratios.get(s.name, {}):
            checks[f"{ratios[s.name]['best_bf16_variant']} >= 1.5x diffusers @ {s.name}"] = (
                ratios[s.name]["best_bf16_speedup_vs_diffusers"] >= 1.5
            )
    print("\n=== summary ===")
    for s in settings:
        for r in [r for r in b.results if r["setting"] == s.name]:
            peak = "" if r["projected_peak_bytes"] is None else f"  peak {r['projected_peak_bytes'] / 1e9:6.2f} GB"
            total = projections[f"{r['variant']} @ {s.name}"]
            print(
                f"{s.name:8s} {r['variant']:18s} {r['s_per_step_60']:7.3f} s/step  {r['tflops']:7.1f} TFLOP/s"
                f"{peak}  50 steps + VAE: {total:.1f} s"
            )
        if s.name in ratios:
            print(
                f"{s.name:8s} ours/diffusers: "
                + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in ratios[s.name].items())
            )
    for k, v in b.accuracy.items():
        print(f"accuracy {k}: {v:.3e}")
    for k, v in checks.items():
        print(f"target {k}: {'met' if v else 'NOT met'}")
    for n in b.notes:
        print(f"note: {n}")
    print(f"total {b.elapsed():.1f} s")
    return {
        "env": env,
        "args": {k: v for k, v in vars(b.args).items() if k != "out"},
        "settings": [s.__dict__ | {"img_tokens": s.img_tokens} for s in settings],
        "results": b.results,
        "ratios": ratios,
        "projections_50_steps_s": projections,
        "vae": vae,
        "accuracy": b.accuracy,
        "targets": checks,
        "notes": b.notes,
        "elapsed_s": b.elapsed(),
    }


if __name__ == "__main__":
    main()
