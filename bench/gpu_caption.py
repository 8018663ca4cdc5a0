"""The caption step of bench/gpu_bench.py: our Qwen2.5-VL captioner's time per new token and peak memory.

The LM is built at the 7B width (3584, 28/4 heads, MLP 18944, 152064-row vocabulary and LM head) with `layers`
decoder layers, the vision tower at its real width (1280) with `vision_depth` blocks, random bf16 weights on the
device. A 448x448 image (256 merged patches) with the English annotator prompt is prefilled, then `tokens` new
tokens are generated greedily with the KV cache. Time per token = (t(N) - t(1)) / (N - 1); the 28-layer figure is
projected by scaling the decoder share (LM head and embedding stay). Dry run: a tiny model on the CPU.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from PIL import Image

from qil_core.model.arch.text_encoder import Qwen25TextEncoder, TextEncoderConfig
from qil_core.model.arch.vision import VisionConfig, VisionTower
from qil_core.model.arch.vl_decoder import CaptionModel
from qil_core.model.pipeline.caption import GenerationSettings, generate_ids
from qil_core.model.pipeline.caption_inputs import ImageProcessorConfig, image_patches, prompt_ids
from qil_core.model.weights.tokenizer import load_tokenizer

REAL_LM_LAYERS = 28


def _build(dry: bool, layers: int, vision_depth: int, device: torch.device, dtype: torch.dtype) -> CaptionModel:
    if dry:
        text = TextEncoderConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=layers,
            num_attention_heads=1,
            num_key_value_heads=1,
        )
        vision = VisionConfig(
            depth=vision_depth,
            hidden_size=80,
            intermediate_size=96,
            num_heads=1,
            out_hidden_size=128,
            fullatt_block_indexes=(vision_depth - 1,),
        )
    else:
        text = TextEncoderConfig(num_hidden_layers=layers)
        vision = VisionConfig(depth=vision_depth, fullatt_block_indexes=(vision_depth - 1,))
    with torch.device("meta"):
        decoder, tower = Qwen25TextEncoder(text), VisionTower(vision)
        head = torch.nn.Linear(text.hidden_size, text.vocab_size, bias=False)
    model = CaptionModel(decoder, head, tower, (16, 24, 24))
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                torch.ones_like(p) + 0.1 * torch.randn_like(p)
                if "norm" in name or "ln_q" in name
                else 0.02 * torch.randn_like(p)
            )
    return model.eval()


def run_caption(
    device: torch.device, dry: bool, tokens: int = 32, layers: int = 2, vision_depth: int = 2, log: Any = print
) -> dict[str, Any]:
    """Time our caption generation; returns ms/token (measured and projected to 28 layers) and peak memory."""
    dtype = torch.float32 if dry else torch.bfloat16
    tokens = 4 if dry else tokens
    model = _build(dry, layers, vision_depth, device, dtype)
    tok = load_tokenizer(None)
    image = Image.new("RGB", (448, 448) if not dry else (56, 56), (120, 80, 40))
    patches, grid = image_patches(image, ImageProcessorConfig())
    ids = prompt_ids(tok, "en", grid, 2)
    pad = tok.token_to_id("<|image_pad|>")
    settings = GenerationSettings(eos_token_ids=())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(n: int) -> float:
        sync()
        t = time.perf_counter()
        generate_ids(model, ids, torch.from_numpy(patches), grid, pad, settings, n)
        sync()
        return time.perf_counter() - t

    run(2)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1, tn = run(1), run(tokens)
    per = (tn - t1) / (tokens - 1)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    # decoder share of a token: its layers vs the LM head (weights read per token dominate decoding)
    layer_params = sum(p.numel() for p in model.decoder.layers.parameters())
    head_params = model.lm_head.weight.numel()
    projected = per * (head_params + layer_params * REAL_LM_LAYERS / layers) / (head_params + layer_params)
    out = {
        "prompt_tokens": len(ids),
        "new_tokens": tokens,
        "prefill_plus_one_s": t1,
        "ms_per_token": per * 1e3,
        "ms_per_token_projected_28_layers": projected * 1e3,
        "peak_bytes": peak,
        "lm_layers": layers,
        "vision_blocks": vision_depth,
    }
    log(
        f"caption: {len(ids)} prompt tokens, prefill+1 {t1:.2f} s, {per * 1e3:.1f} ms/token with {layers} LM layers "
        f"(~{projected * 1e3:.1f} ms/token projected for 28), peak "
        f"{'n/a' if peak is None else f'{peak / 1e9:.2f} GB'}"
    )
    return out
