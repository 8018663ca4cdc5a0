"""Auto-caption generation speed and peak RSS: ours against transformers' `generate`, same weights, same run.

A diffusers-style `text_encoder/` folder (config.json + safetensors) is written once with random weights at a
realistic width: the LM at the 7B width (3584, 28 heads / 4 KV heads, MLP 18944, the real 152064-row vocabulary
and LM head) with --layers layers, and the vision tower at its real width (1280, 16 heads, MLP 3420) with
--vision-depth blocks. Each side then runs in its own process (so peak RSS is its own), loading the same files
by its own loader, captioning the same image with the reference's English annotator prompt, greedy:
  ours          qil_core: load_text_encoder + load_caption_model + generate_ids (KV cache)
  transformers  Qwen2_5_VLForConditionalGeneration.from_pretrained + generate() (its processor's inputs)
Time per new token = (t(N tokens) - t(1 token)) / (N - 1), so the prefill (vision tower + prompt) is separated
out; both runs of a side are in the same process. Peak RSS is the process's ru_maxrss. Each side runs in
--rounds processes, the two sides alternating (and the order flipping every round) so that the drift of a shared
machine falls on both; the figures are the medians. The ratio ours / transformers (median time per token) is the
figure to keep at or below 1.0. Decoding one token reads every weight once (about 4 GB here, in fp32), so on a
CPU both sides are bound by memory bandwidth and the ratio sits at 1.0 within the machine's noise.

    python bench/bench_caption.py [--layers 2] [--vision-depth 2] [--tokens 16] [--image 224] [--rounds 3]
                                  [--folder DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "qil_core" / "assets" / "qwen25_tokenizer"


def write_folder(folder: Path, layers: int, vision_depth: int) -> None:
    """config.json + model.safetensors of a random Qwen2.5-VL at the real widths (fp32)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
                         num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=vision_depth, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, fullatt_block_indexes=[vision_depth - 1], window_size=112),
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(folder)


def _image(size: int):  # -> PIL.Image.Image
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    rgb = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) % 256], -1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def worker(side: str, folder: Path, tokens: int, image_size: int) -> dict:
    """Run one side in this process; returns its timings, generated ids and peak RSS."""
    import torch

    torch.manual_seed(0)
    image = _image(image_size)
    if side == "ours":
        from qil_core.model.pipeline.caption import GenerationSettings, generate_ids
        from qil_core.model.pipeline.caption_inputs import ImageProcessorConfig, image_patches, prompt_ids
        from qil_core.model.weights.caption_loading import load_caption_model
        from qil_core.model.weights.text_loading import load_text_encoder
        from qil_core.model.weights.tokenizer import load_tokenizer

        t0 = time.perf_counter()
        model = load_caption_model(folder, load_text_encoder(folder, dtype=torch.float32), dtype=torch.float32)
        load_s = time.perf_counter() - t0
        tok = load_tokenizer(TOKENIZER)
        patches, grid = image_patches(image, ImageProcessorConfig())
        ids = prompt_ids(tok, "en", grid, 2)
        settings = GenerationSettings(eos_token_ids=())

        def run(n: int) -> list[int]:
            return generate_ids(
                model, ids, torch.from_numpy(patches), grid, tok.token_to_id("<|image_pad|>"), settings, n
            )
    else:
        sys.path.insert(0, str(ROOT / "tests" / "support"))
        from caption_tiny import reference_processor
        from transformers import Qwen2_5_VLForConditionalGeneration

        from qil_core.model.pipeline.caption_inputs import caption_prompt

        t0 = time.perf_counter()
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        load_s = time.perf_counter() - t0
        inputs = reference_processor(TOKENIZER)(text=caption_prompt("en"), images=image, return_tensors="pt")
        start = inputs["input_ids"].shape[1]
        ids = inputs["input_ids"][0].tolist()

        def run(n: int) -> list[int]:
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return out[0, start:].tolist()

    run(1)  # warm-up (allocations, kernels)
    t = time.perf_counter()
    run(1)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    new = run(tokens)
    tn = time.perf_counter() - t
    return {
        "side": side,
        "load_s": load_s,
        "prompt_tokens": len(ids),
        "prefill_plus_one_s": t1,
        "s_per_token": (tn - t1) / (tokens - 1),
        "tokens_per_s": (tokens - 1) / (tn - t1),
        "ids": new,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _median(runs: list[dict]) -> dict:
    """One side's figures: the median of each number over its rounds (the ids must agree across rounds)."""
    assert all(r["ids"] == runs[0]["ids"] for r in runs), "a side generated different ids in different rounds"
    numbers = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in numbers}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--image", type=int, default=224, help="side of the square test image in px")
    p.add_argument("--rounds", type=int, default=3, help="processes per side, alternating (medians are reported)")
    p.add_argument("--folder", type=Path, help="where to keep the random weights (default: a temp folder)")
    p.add_argument("--worker", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.tokens, args.image)))
        return {}
    tmp = None
    if args.folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_caption_")
        args.folder = Path(tmp.name)
    if not (args.folder / "config.json").is_file():
        write_folder(args.folder, args.layers, args.vision_depth)
    runs: dict[str, list[dict]] = {"transformers": [], "ours": []}
    for r in range(args.rounds):
        for side in ("transformers", "ours") if r % 2 == 0 else ("ours", "transformers"):
            out = subprocess.run([sys.executable, __file__, "--worker", side, "--folder", str(args.folder),
                                  "--tokens", str(args.tokens), "--image", str(args.image)], capture_output=True,
                                 text=True, check=True)  # fmt: skip
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ours, ref = (_median(runs[side]) for side in ("ours", "transformers"))
    print(
        f"caption generation, LM {args.layers} layers x 3584, vision {args.vision_depth} blocks x 1280, "
        f"{ours['prompt_tokens']} prompt tokens, {args.tokens} new tokens, fp32 CPU"
    )
    for r in (ref, ours):
        spread = ", ".join(f"{x['s_per_token'] * 1000:.1f}" for x in runs[r["side"]])
        print(
            f"  {r['side']:<13} {r['s_per_token'] * 1000:8.1f} ms/token ({r['tokens_per_s']:.2f} tok/s)  "
            f"prefill+1 {r['prefill_plus_one_s']:.2f} s  load {r['load_s']:.1f} s  peak RSS {r['peak_rss_gib']:.2f} GiB"
            f"  (rounds: {spread} ms/token)"
        )
    ratio = ours["s_per_token"] / ref["s_per_token"]
    print(
        f"  ratio ours/transformers: {ratio:.2f}x time per token, {ours['peak_rss_gib'] / ref['peak_rss_gib']:.2f}x "
        f"peak RSS; same ids: {ours['ids'] == ref['ids']}"
    )
    if tmp is not None:
        tmp.cleanup()
    return {"ours": ours, "transformers": ref, "ratio": ratio}


if __name__ == "__main__":
    main()
