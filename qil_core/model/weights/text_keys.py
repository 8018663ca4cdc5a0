"""Key maps for the Qwen2.5-VL text encoder files: which tensors feed `Qwen25TextEncoder`, which are skipped, and why.

Layouts (the language model's names after the prefix are identical in all of them):
- ComfyUI single files `qwen_2.5_vl_7b.safetensors` / `qwen_2.5_vl_7b_fp8_scaled.safetensors`: `model.embed_tokens`,
  `model.layers.{i}.…`, `model.norm`, vision tower under `visual.` (ComfyUI's `Qwen25_7BVLI` module holds `model`
  = its Llama-style decoder and `visual`; `comfy/sd.py` detects it by `model.layers.0.self_attn.k_proj.bias` of
  width 512; read in comfyanonymous/ComfyUI `comfy/text_encoders/llama.py`, `qwen_image.py`, `comfy/sd.py`).
- diffusers `text_encoder/` shards, as the original Qwen2.5-VL release and transformers' `save_pretrained` write
  them (transformers 5.x converts back on save): the same `model.` / `visual.` names plus `lm_head.weight`.
- transformers >= 4.52 in-memory names (`state_dict()` of `Qwen2_5_VLForConditionalGeneration`):
  `model.language_model.…`, `model.visual.…`, `lm_head.weight`.
- already stripped (canonical) names, as `Qwen25TextEncoder.state_dict()` writes them.

fp8 "scaled" conventions (ComfyUI `comfy/utils.py: convert_old_quants`, `QUANTIZATION.md`):
- legacy: a top-level `scaled_fp8` marker tensor (its dtype names the fp8 format), per Linear an fp8 `<layer>.weight`
  and an fp32 `<layer>.scale_weight`, optionally `<layer>.scale_input`;
- current: per Linear `<layer>.weight` + `<layer>.weight_scale` (+ `input_scale`), with the layer formats in the
  header's `_quantization_metadata` JSON or in per-layer `<layer>.comfy_quant` uint8 tensors holding that JSON.
Dequantised weight = fp8 weight * scale. Scales and markers are sorted by weights.plan_keys (shared with the
transformer loader); a scale or marker of a skipped (vision) layer is skipped with its layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ...errors import ModelMismatchError
from ..arch.identify import LM_PREFIXES, identify_checkpoint

__all__ = ["LM_PREFIXES", "SCALED_FP8_MARKER", "SKIP_PREFIXES", "TextKeyMap", "detect_prefix", "map_text_keys"]

# Tensors present in complete checkpoints that the text encoder does not use; each skipped by name, not by leniency.
SKIP_PREFIXES = {
    "visual.": "vision tower (used only for image captioning)",
    "model.visual.": "vision tower (used only for image captioning)",
    "lm_head.": "language-model output head (conditioning uses hidden states, not logits)",
}
SCALED_FP8_MARKER = "scaled_fp8"


@dataclass(frozen=True)
class TextKeyMap:
    """How one checkpoint's keys map to `Qwen25TextEncoder` names: the prefix to strip and what was set aside."""

    prefix: str
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> number of keys skipped by name

    @property
    def layout(self) -> str:
        """A short name of the layout, for logs and messages."""
        return {
            "model.language_model.": "transformers >= 4.52 names (model.language_model.*)",
            "model.": "Qwen2.5-VL release / ComfyUI names (model.*)",
            "": "canonical names",
        }[self.prefix]

    def rename(self, key: str) -> str | None:
        """File key -> canonical name; None for the vision tower, the LM head and quantisation markers."""
        if key == SCALED_FP8_MARKER or key.startswith(tuple(SKIP_PREFIXES)):
            return None
        return key[len(self.prefix) :] if key.startswith(self.prefix) else None


def detect_prefix(keys: Iterable[str], *, source: str) -> str:
    """The language-model prefix of a checkpoint; ModelMismatchError for vision-only or unrelated files."""
    found = identify_checkpoint(keys)
    if found.kind == "text_encoder" and "qwen2.5" in found.hints:
        return found.prefix
    raise ModelMismatchError(f"{source} is not a Qwen2.5-VL text encoder: {found.describe(folder=True)}")


def map_text_keys(keys: Iterable[str], *, source: str) -> TextKeyMap:
    """Check that every key is a language-model tensor, an fp8 scale or marker, or a named skip; else fail."""
    keys = list(keys)
    prefix = detect_prefix(keys, source=source)
    skipped: dict[str, int] = {}
    unexpected = []
    for key in keys:
        if key == SCALED_FP8_MARKER:
            continue
        reason = next((why for p, why in SKIP_PREFIXES.items() if key.startswith(p)), None)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
        elif not key.startswith(prefix) or (prefix == "" and key.startswith("model.")):
            unexpected.append(key)
    if unexpected:
        raise ModelMismatchError(
            f"{source}: {len(unexpected)} tensors belong to neither the Qwen2.5-VL language model nor its vision "
            f"tower, e.g. {sorted(unexpected)[:5]}; this file mixes in another model. Use the plain text-encoder "
            "file (qwen_2.5_vl_7b*.safetensors) or the diffusers text_encoder/ folder."
        )
    return TextKeyMap(prefix, skipped)
