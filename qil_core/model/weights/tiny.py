"""Tiny RANDOM Qwen-Image-Layered weights in the real file layouts, for the demo and for tests.

`write_tiny_model` builds our own modules with small configs and random weights and writes them the way
users' files are laid out: ComfyUI's single files (transformer keys as diffusers', the VAE in Wan naming,
the text encoder under `model.`) or a diffusers pipeline folder (config.json per component). Every file is
labelled in its safetensors metadata (`qil_random_weights = "true"`), and `load_model` logs a warning for it.
The output of such a model is noise shaped like layers: it exercises every code path, nothing more.

The tokenizer is a tiny byte-level BPE (256 byte symbols, a few merges, the three chat tokens the prompt
template needs and the vision tokens of the caption prompt), unless `tokenizer_dir` points at real Qwen2.5
tokenizer files to copy. The text-encoder file also holds a tiny vision tower and LM head (tiny_caption.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict, TypeVar

import torch
from safetensors.torch import save_file
from torch import nn

from ...errors import InputError
from ..arch.config import TransformerConfig
from ..arch.text_encoder import Qwen25TextEncoder, TextEncoderConfig
from ..arch.transformer import QwenImageLayeredTransformer
from ..arch.vae import LATENTS_MEAN, LATENTS_STD, RGBAVAE, VAEConfig
from .checkpoint import RANDOM_WEIGHTS_KEY
from .tiny_caption import caption_tensors, vision_json, write_caption_configs
from .vae_keys import diffusers_to_wan_key

logger = logging.getLogger(__name__)
_M = TypeVar("_M", bound=nn.Module)

LAYOUTS = ("comfyui", "diffusers")
# File names of the ComfyUI layout (under models/), shaped like the real ones so folder lookups find them.
COMFY_FILES = {
    "transformer": Path("models/diffusion_models/qwen_image_layered_tiny_random.safetensors"),
    "vae": Path("models/vae/qwen_image_layered_vae_tiny_random.safetensors"),
    "text_encoder": Path("models/text_encoders/qwen_2.5_vl_7b_tiny_random.safetensors"),
}
COMFY_TOKENIZER = Path("comfy/text_encoders/qwen25_tokenizer")  # where a ComfyUI root keeps it
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
_MERGES = (("Ġ", "a"), ("t", "h"), ("Ġ", "t"), ("i", "n"), ("e", "r"), ("Ġt", "h"), ("o", "n"), ("Ċ", "Ċ"))
_REAL_TEXT_VOCAB = 152064  # the 7B model's embedding rows, when the real tokenizer is copied


class _TextSizes(TypedDict):
    """The TextEncoderConfig fields of the tiny text encoder (all but vocab_size)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float


# Widths: text 128 (one 128-wide head, so a single file's config is inferred exactly), DiT 2 x 32 heads,
# VAE base 8 with one residual block per stage. Seconds on a CPU at 640x640.
TINY_TEXT = _TextSizes(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=1,
    num_key_value_heads=1,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
)
TINY_TRANSFORMER = TransformerConfig(
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=128,
    axes_dims_rope=(4, 14, 14),
)
TINY_VAE = VAEConfig(base_dim=8, num_res_blocks=1)
METADATA = {
    RANDOM_WEIGHTS_KEY: "true",
    "description": "RANDOM tiny Qwen-Image-Layered test weights written by qil_core.model.weights.tiny; not a real "
    "model, its output is noise",
}


def _byte_symbols() -> list[str]:
    """GPT-2 byte-level alphabet: the printable symbol standing for each byte 0..255, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = 0
    out = []
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_tiny_tokenizer(folder: str | os.PathLike[str]) -> tuple[Path, int]:
    """Write a tiny byte-level BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json); (folder, ids)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    for a, b in _MERGES:
        vocab.setdefault(a + b, len(vocab))
    added: dict[str, dict[str, str | bool]] = {}
    for tok in SPECIAL_TOKENS:
        added[str(len(vocab) + len(added))] = {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES), encoding="utf-8")
    cfg = {
        "added_tokens_decoder": added,
        "model_max_length": 32768,
        "tokenizer_class": "Qwen2Tokenizer",
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "qil_note": METADATA["description"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return out, len(vocab) + len(added)


def _randomize(module: _M, seed: int) -> _M:
    """Fill every parameter from one seeded generator: norms near 1, other weights small (stable activations)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma") or (p.ndim == 1 and "norm" in name):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.02 * noise)
            else:
                fan_in = max(1, p[0].numel())
                p.copy_(noise / fan_in**0.5)
    return module.train(False)


def build_tiny_modules(
    seed: int = 0, text_vocab: int = 272
) -> tuple[QwenImageLayeredTransformer, RGBAVAE, Qwen25TextEncoder]:
    """The tiny transformer, RGBA-VAE and text encoder with random weights (fp32, CPU)."""
    te = Qwen25TextEncoder(TextEncoderConfig(vocab_size=text_vocab, **TINY_TEXT))
    return (
        _randomize(QwenImageLayeredTransformer(TINY_TRANSFORMER), seed),
        _randomize(RGBAVAE(TINY_VAE), seed + 1),
        _randomize(te, seed + 2),
    )


def _save(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}, str(path), metadata=METADATA)
    return path


def _vae_json() -> dict:
    c = TINY_VAE
    return {
        "_class_name": "AutoencoderKLQwenImage",
        "base_dim": c.base_dim,
        "z_dim": c.z_dim,
        "dim_mult": list(c.dim_mult),
        "num_res_blocks": c.num_res_blocks,
        "attn_scales": list(c.attn_scales),
        "temperal_downsample": list(c.temperal_downsample),
        "dropout": c.dropout,
        "input_channels": c.input_channels,
        "latents_mean": list(LATENTS_MEAN),
        "latents_std": list(LATENTS_STD),
    }


def _text_json(vocab: int) -> dict:
    text = {
        **TINY_TEXT,
        "vocab_size": vocab,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    }
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": text,
        "vision_config": vision_json(TINY_TEXT["hidden_size"]),
    }


def _token_ids(tok_folder: Path, tokens: Sequence[str]) -> list[int]:
    """The ids of added tokens in the written tokenizer (loaded once)."""
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(tok_folder, bundled=False)
    return [tok.token_to_id(t) for t in tokens]


def write_tiny_model(
    folder: str | os.PathLike[str],
    *,
    layout: str = "comfyui",
    seed: int = 0,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Path]:
    """Write tiny random weights in ComfyUI's single-file layout or a diffusers folder; returns the paths.

    Keys of the result: "root", "transformer", "vae", "text_encoder", "tokenizer" (and "model_dir" for the
    diffusers layout). `tokenizer_dir` copies real tokenizer files (then the text encoder gets 152064 rows).
    """
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root = Path(folder)
    tok_folder = root / (COMFY_TOKENIZER if layout == "comfyui" else Path("tokenizer"))
    if tokenizer_dir is not None:
        tok_folder.mkdir(parents=True, exist_ok=True)
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json", "tokenizer.json"):
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tok_folder / name)
        vocab = _REAL_TEXT_VOCAB
    else:
        _, ids = write_tiny_tokenizer(tok_folder)
        vocab = -(-ids // 16) * 16  # embedding rows rounded up to a multiple of 16, like real vocabularies
    dit, vae, te = build_tiny_modules(seed, vocab)
    text_sd = {"model." + k: v for k, v in te.state_dict().items()}  # the Qwen2.5-VL release / ComfyUI names
    text_sd.update(caption_tensors(TINY_TEXT["hidden_size"], vocab, seed + 3))  # vision tower + LM head
    paths: dict[str, Path] = {"root": root, "tokenizer": tok_folder}
    if layout == "comfyui":
        paths["transformer"] = _save(dit.state_dict(), root / COMFY_FILES["transformer"], dtype)
        wan = {diffusers_to_wan_key(k, TINY_VAE.num_res_blocks): v for k, v in vae.state_dict().items()}
        paths["vae"] = _save(wan, root / COMFY_FILES["vae"], dtype)
        paths["text_encoder"] = _save(text_sd, root / COMFY_FILES["text_encoder"], dtype)
    else:
        cfg = dict(TINY_TRANSFORMER.__dict__, axes_dims_rope=list(TINY_TRANSFORMER.axes_dims_rope))
        for sub, sd, name, conf in (
            (
                "transformer",
                dit.state_dict(),
                "diffusion_pytorch_model.safetensors",
                {"_class_name": "QwenImageTransformer2DModel", **cfg},
            ),
            ("vae", vae.state_dict(), "diffusion_pytorch_model.safetensors", _vae_json()),
            ("text_encoder", text_sd, "model.safetensors", _text_json(vocab)),
        ):
            _save(sd, root / sub / name, dtype)
            (root / sub / "config.json").write_text(json.dumps(conf, indent=1))
            paths[sub] = root / sub
        write_caption_configs(root, _token_ids(tok_folder, ("<|im_end|>", "<|endoftext|>")))
        (root / "scheduler").mkdir(exist_ok=True)
        (root / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(
                {
                    "_class_name": "FlowMatchEulerDiscreteScheduler",
                    "num_train_timesteps": 1000,
                    "shift": 1.0,
                    "use_dynamic_shifting": True,
                    "time_shift_type": "linear",
                },
                indent=1,
            )
        )
        (root / "model_index.json").write_text(
            json.dumps(
                {
                    "_class_name": "QwenImageLayeredPipeline",
                    "qil_note": METADATA["description"],
                    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
                    "vae": ["diffusers", "AutoencoderKLQwenImage"],
                    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                    "tokenizer": ["transformers", "Qwen2Tokenizer"],
                    "processor": ["transformers", "Qwen2VLProcessor"],
                    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                },
                indent=1,
            )
        )
        paths["model_dir"] = root
    logger.info("wrote a tiny RANDOM Qwen-Image-Layered model (%s layout) to %s", layout, root)
    return paths
