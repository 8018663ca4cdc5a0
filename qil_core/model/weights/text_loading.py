"""Load `Qwen25TextEncoder` from a diffusers `text_encoder/` folder or a ComfyUI single file (plain or fp8-scaled).

Strict, through the shared loader (checkpoint.py, loading.py): the config comes from config.json or from the
tensor shapes, the model is built on the meta device, and `load_state_dict(strict=True, assign=True)` receives
exactly the language-model tensors (text_keys.py says which file keys those are and which are skipped by name).
Tensors are memory-mapped and used in place, or streamed one at a time when converted, so no second full copy
of the weights is held. fp8 Linear weights stay fp8 with their fp32 scale and are dequantised per layer when they
run (quant.Fp8Linear).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..arch.text_encoder import Qwen25TextEncoder, TextEncoderConfig
from .checkpoint import PathLike, open_checkpoint, read_config
from .loading import check_dtype, load_into, plan_keys
from .text_keys import map_text_keys

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")
_FIX = (
    "Choose the Qwen2.5-VL-7B text encoder: ComfyUI's qwen_2.5_vl_7b.safetensors or qwen_2.5_vl_7b_fp8_scaled."
    "safetensors (models/text_encoders), or the diffusers text_encoder/ folder with all its shards; re-download it "
    "if it is damaged."
)


def load_text_encoder(
    source: PathLike | Sequence[PathLike],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    config: TextEncoderConfig | None = None,
) -> Qwen25TextEncoder:
    """Load the text encoder from a diffusers root or `text_encoder/` folder, an index, shards or a single file.

    `config` overrides what config.json (diffusers) or the tensor shapes (single files, head width 128) say.
    """
    check_dtype(dtype)
    source, subfolder = locate_source(source)
    with open_checkpoint(source, subfolder=subfolder) as ckpt:
        keymap = map_text_keys(ckpt.keys(), source=ckpt.source)
        plan = plan_keys(ckpt, keymap.rename)
        if config is None:
            cfg_json = read_config(ckpt.folder)
            config = (
                TextEncoderConfig.from_transformers_config(cfg_json)
                if cfg_json is not None
                else TextEncoderConfig.from_shapes(plan.shapes, source=ckpt.source)
            )
        with torch.device("meta"):
            model = Qwen25TextEncoder(config)
        load_into(model, ckpt, plan, dtype=dtype, device=device, what="Qwen2.5-VL text encoder", fix=_FIX)
        skipped = ", ".join(f"{n} {why}" for why, n in keymap.skipped.items()) or "nothing"
        log.info(
            "loaded the Qwen2.5 text encoder from %s (%s): %d layers, hidden %d, %d fp8 layers; skipped %s",
            ckpt.source, keymap.layout, config.num_hidden_layers, config.hidden_size, len(plan.fp8_layers), skipped,
        )  # fmt: skip
    return model


def locate_source(source: PathLike | Sequence[PathLike]) -> tuple[PathLike | Sequence[PathLike], str | None]:
    """Point a diffusers root at its text_encoder/ and a lone shard at its index; other sources pass through."""
    if not isinstance(source, (str, Path)):
        return source, None
    path = Path(source)
    if path.is_dir() and (path / "text_encoder").is_dir():
        return path, "text_encoder"
    if path.is_file() and _SHARD_RE.search(path.name) and (path.parent / INDEX_FILE).is_file():
        log.info("%s is one shard; loading every shard listed in %s", path.name, INDEX_FILE)
        return path.parent / INDEX_FILE, None
    return source, None
