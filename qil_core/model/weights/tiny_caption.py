"""The captioning parts of the tiny RANDOM test model: a small vision tower, the LM head and the config files.

`write_tiny_model` (tiny.py) adds these to its text-encoder file so an empty prompt runs the whole auto-caption
path: `visual.*` + `lm_head.weight` in both layouts, plus, in the diffusers layout, `processor/preprocessor_config.json`
and `text_encoder/generation_config.json` shaped like the released ones. The vision width is 80 (one 80-wide head,
the 7B head width) so a single file's vision config is inferred from shapes as it is for the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..arch.vision import VisionConfig, VisionTower

TINY_VISION = VisionConfig(
    depth=2, hidden_size=80, intermediate_size=96, num_heads=1, out_hidden_size=128, window_size=112,
    fullatt_block_indexes=(1,),
)  # fmt: skip


def caption_tensors(width: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Random `visual.*` and `lm_head.weight` tensors (release names) for a text encoder of `width` x `vocab`."""
    from .tiny import _randomize

    vision = _randomize(VisionTower(VisionConfig(**{**TINY_VISION.__dict__, "out_hidden_size": width})), seed)
    head = _randomize(nn.Linear(width, vocab, bias=False), seed + 1)
    out = {"visual." + k: v for k, v in vision.state_dict().items()}
    out["lm_head.weight"] = head.weight.detach() * 4.0  # peaked logits: a varied, not uniform, random caption
    return out


def vision_json(width: int) -> dict:
    """The `vision_config` of config.json, with transformers' names."""
    v = TINY_VISION
    return {"depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads, "out_hidden_size": width, "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes), "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
            "in_channels": v.in_channels}  # fmt: skip


def write_caption_configs(root: Path, eos_ids: list[int]) -> None:
    """processor/preprocessor_config.json and text_encoder/generation_config.json like the released folder's."""
    (root / "processor").mkdir(parents=True, exist_ok=True)
    (root / "processor" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "do_rescale": True, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
        indent=1))  # fmt: skip
    (root / "text_encoder" / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.1, "top_k": 1, "top_p": 0.001, "repetition_penalty": 1.05,
        "eos_token_id": eos_ids}, indent=1))  # fmt: skip
