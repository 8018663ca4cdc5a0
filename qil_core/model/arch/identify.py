"""What a checkpoint holds, told from its key names alone: `identify_checkpoint(keys)`.

The one "what file is this" guesser of the pack. The transformer, VAE and text-encoder loaders (and
`TransformerConfig.from_shapes`) ask it when a file is not what they expected, so a user who picks the wrong file
hears the same answer from each of them. It looks only at names (no shapes, no file I/O), and it lives beside the
networks because the key names it knows are theirs (`weights/` imports it; `arch/config.py` needs it too and may
import no other room).

Order of the checks (the first that matches wins): a Qwen2.5 language model under a known prefix; a file holding
only a vision tower; a diffusion model (Flux, a Qwen-Image-style MMDiT, a UNet, or anything under ComfyUI's
`model.diffusion_model.`); a T5 or CLIP text encoder; a VAE (bare or under a full checkpoint's wrapper prefix);
another language model; else unknown. Diffusion models come before VAEs so that an all-in-one file (transformer +
VAE) counts as a transformer: its VAE part is found by the VAE loader's own prefix strip.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

# ComfyUI single files may carry this prefix on every transformer key (model_spec §7.2).
COMFY_PREFIX = "model.diffusion_model."
# Wrapper prefixes some single files put in front of the VAE keys (full checkpoints, other tools).
KNOWN_VAE_PREFIXES: tuple[str, ...] = ("first_stage_model.", "vae.")
# Prefixes of the Qwen2.5 language-model tensors, most specific first (transformers >= 4.52, release/ComfyUI, bare).
LM_PREFIXES: tuple[str, ...] = ("model.language_model.", "model.", "")
# Keys that identify the Qwen2.5 language model under one of LM_PREFIXES (the q/k/v biases are Qwen2's own).
LM_PROBES: tuple[str, ...] = ("embed_tokens.weight", "layers.0.self_attn.k_proj.bias")
VISION_PREFIXES: tuple[str, ...] = ("visual.", "model.visual.")

CheckpointKind = Literal[
    "empty",
    "transformer",  # a Qwen-Image-style MMDiT (transformer_blocks.*, img_in)
    "flux",
    "unet",
    "diffusion_model",  # something else under ComfyUI's model.diffusion_model.
    "vae",
    "text_encoder",
    "vision_tower",
    "t5",
    "clip",
    "unknown",
]

_FLUX_STARTS = ("double_blocks.", "single_blocks.", "single_transformer_blocks.")
_UNET_STARTS = ("input_blocks.", "middle_block.", "output_blocks.", "down_blocks.", "mid_block.", "up_blocks.")
_VAE_STARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_FP8_MARKS = (".weight_scale", ".scale_weight", ".comfy_quant")
_WHAT: dict[str, str] = {
    "transformer": "a diffusion transformer",
    "flux": "a Flux transformer",
    "unet": "a UNet (Stable Diffusion style)",
    "diffusion_model": "a diffusion model checkpoint",
    "vae": "a VAE",
    "text_encoder": "a text encoder",
    "vision_tower": "the vision tower of a text encoder",
    "t5": "a T5 text encoder",
    "clip": "a CLIP text encoder",
}
_FOLDER: dict[str, str] = {
    "transformer": "models/diffusion_models",
    "flux": "models/diffusion_models",
    "unet": "models/diffusion_models",
    "diffusion_model": "models/diffusion_models",
    "vae": "models/vae",
    "text_encoder": "models/text_encoders",
    "vision_tower": "models/text_encoders",
    "t5": "models/text_encoders",
    "clip": "models/text_encoders",
}


@dataclass(frozen=True)
class CheckpointId:
    """What `identify_checkpoint` found: the kind, the prefix its keys sit under, and format hints.

    hints: "qwen2.5" (the Qwen2.5 language model, with its probe keys), "transformers_names" (transformers >= 4.52
    `model.language_model.` names), "comfy_prefix" (`model.diffusion_model.`), "fp8_scaled" (fp8 scale tensors or
    the `scaled_fp8` marker).
    """

    kind: CheckpointKind
    prefix: str = ""
    hints: frozenset[str] = field(default_factory=frozenset)
    count: int = 0
    examples: tuple[str, ...] = ()  # the first few keys, sorted (for messages about unknown files)

    @property
    def what(self) -> str:
        """A noun phrase for messages: "a VAE", "a Qwen2.5-VL text encoder", ..."""
        if self.kind == "text_encoder" and "qwen2.5" in self.hints:
            return "a Qwen2.5-VL text encoder"
        return _WHAT.get(self.kind, "an unknown model")

    @property
    def folder(self) -> str | None:
        """Where ComfyUI keeps files of this kind (models/vae, ...); None when unknown."""
        return _FOLDER.get(self.kind)

    def describe(self, *, folder: bool = False) -> str:
        """A clause for error messages: "it looks like a VAE" (with "(put it in models/vae)" when `folder`)."""
        if self.kind == "empty":
            return "it holds no tensors"
        if self.kind == "vision_tower":
            return "it holds only the vision tower (visual.*), not the language model"
        if self.kind == "unknown":
            return f"none of its {self.count} tensors belongs to a model this pack knows (e.g. {list(self.examples)})"
        text = f"it looks like {self.what}"
        if self.kind == "text_encoder" and "qwen2.5" not in self.hints:
            text += ", but not Qwen2.5-VL (no q/k/v biases or token embeddings where Qwen2.5 has them)"
        return f"{text} (put it in {self.folder})" if folder and self.folder else text


def identify_checkpoint(keys: Iterable[str]) -> CheckpointId:
    """Tell what a checkpoint holds from its tensor names (see the module docstring for the order of checks)."""
    ks = frozenset(keys)
    examples = tuple(sorted(ks)[:3])

    def found(kind: CheckpointKind, prefix: str = "", *extra: str) -> CheckpointId:
        return CheckpointId(kind, prefix, frozenset(_format_hints(ks) | set(extra)), len(ks), examples)

    if not ks:
        return found("empty")
    for prefix in LM_PREFIXES:
        if all(prefix + probe in ks for probe in LM_PROBES):
            names = ("transformers_names",) if prefix == "model.language_model." else ()
            return found("text_encoder", prefix, "qwen2.5", *names)
    if all(k.startswith(VISION_PREFIXES) for k in ks):
        return found("vision_tower", next(p for p in VISION_PREFIXES if any(k.startswith(p) for k in ks)))
    if any(k.startswith(COMFY_PREFIX) for k in ks):
        return found(
            _diffusion_kind({k[len(COMFY_PREFIX) :] for k in ks if k.startswith(COMFY_PREFIX)}) or "diffusion_model",
            COMFY_PREFIX,
            "comfy_prefix",
        )
    if kind := _diffusion_kind(ks):
        return found(kind)
    if any(k.startswith("encoder.block.") for k in ks):
        return found("t5")
    if any(k.startswith("text_model.encoder.") for k in ks):
        return found("clip")
    for prefix in (*KNOWN_VAE_PREFIXES, ""):
        if any(k.startswith(prefix + s) for k in ks for s in _VAE_STARTS):
            return found("vae", prefix)
    if any("embed_tokens." in k or "self_attn." in k or k.startswith(VISION_PREFIXES) for k in ks):
        return found("text_encoder")
    return found("unknown")


def _diffusion_kind(keys: Iterable[str]) -> CheckpointKind | None:
    keys = list(keys)
    if any(k.startswith(_FLUX_STARTS) for k in keys):
        return "flux"
    if any(k.startswith("transformer_blocks.") for k in keys) or "img_in.weight" in keys:
        return "transformer"
    if any(k.startswith(_UNET_STARTS) for k in keys):
        return "unet"
    return None


def _format_hints(keys: frozenset[str]) -> set[str]:
    return {"fp8_scaled"} if "scaled_fp8" in keys or any(k.endswith(_FP8_MARKS) for k in keys) else set()
