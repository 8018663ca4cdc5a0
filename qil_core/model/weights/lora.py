"""LoRA files for the Qwen-Image(-Layered) transformer: read, name, scale and check them (no model changes here).

Key layouts accepted (one file may use only one module naming, suffixes may mix):
- PEFT / diffusers: `transformer.<module>.lora_A.weight` / `.lora_B.weight` (also `lora_A.default.weight`,
  `base_model.model.` prefixes and no prefix at all, as lightx2v's Qwen-Image-Lightning files ship). Alpha comes
  from a `<module>.alpha` tensor, else the `lora_adapter_metadata` JSON diffusers writes (`lora_alpha`, `r`,
  `alpha_pattern`, `rank_pattern`, `use_rslora`), else alpha = rank (scale 1), as diffusers does.
- kohya / musubi-tuner: `lora_unet_<module with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha`
  (also SimpleTuner's `lycoris_` prefix).
- ComfyUI: `diffusion_model.<module>.lora_down.weight` / `.lora_up.weight` / `.alpha` (or `lora_A` / `lora_B`).
- Full deltas ("diff"): `<module>.diff` (weight), `<module>.diff_b` (bias), for any layer, norms included.
The scale of a low-rank pair is alpha / rank (alpha / sqrt(rank) with rsLoRA); without any alpha it is 1.

Every key must land on a module of the model with the right shape; anything else is refused with the key list
and the expected naming, and a file made for another architecture (Flux, SD, Wan, ...) is named as such.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import InputError, ModelMismatchError, WeightsError
from .checkpoint import open_checkpoint

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry holding the PEFT LoraConfig
# Module-name prefixes, longest first; the underscore forms flatten the dotted module name.
DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
FLAT_PREFIXES = ("lora_unet_", "lycoris_", "lora_transformer_")
# Tensor-name suffix -> role in a patch.
SUFFIXES: dict[str, str] = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_A.default.weight": "down",
    "lora_B.default.weight": "up",
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_B.bias": "up_bias",
    "lora_B.default.bias": "up_bias",
    "alpha": "alpha",
    "diff": "diff",
    "diff_b": "diff_b",
    "w_norm": "diff",
    "b_norm": "diff_b",
}
# Adapter types we know but do not apply: refused by name rather than as unknown keys.
UNSUPPORTED = {
    "dora_scale": "DoRA",
    "hada_w1_a": "LoHa",
    "lokr_w1": "LoKr",
    "lokr_w1_a": "LoKr",
    "lora_mid.weight": "LoCon (conv)",
    "lora_embedding_A": "embedding LoRA",
}
# Substrings that identify the transformer of another model family.
FOREIGN_MARKERS: tuple[tuple[str, str], ...] = (
    ("double_blocks", "Flux / HunyuanVideo"),
    ("single_blocks", "Flux / HunyuanVideo"),
    ("single_transformer_blocks", "Flux"),
    ("x_embedder", "Flux / SD3"),
    ("context_embedder", "Flux / SD3"),
    ("norm1_context", "Flux / SD3"),
    ("joint_blocks", "SD3"),
    ("down_blocks", "Stable Diffusion (UNet)"),
    ("input_blocks", "Stable Diffusion (UNet)"),
    ("mid_block", "Stable Diffusion (UNet)"),
    ("lora_te", "a text encoder"),
    ("text_encoder", "a text encoder"),
    ("cross_attn", "Wan"),
    ("self_attn", "Wan / a language model"),
    ("noise_refiner", "Lumina / Z-Image"),
    ("layers.0.attention", "Lumina / Z-Image"),
)
EXPECTED_NAMING = (
    "expected Qwen-Image transformer keys such as 'transformer_blocks.0.attn.to_q.lora_A.weight' (optionally "
    "prefixed 'transformer.' or 'diffusion_model.'), 'lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight' "
    "with '.alpha', or '<module>.diff' / '.diff_b'"
)


@dataclass
class LoraPatch:
    """Everything one file changes on one module: a low-rank pair and/or full deltas, strength not yet applied."""

    down: Tensor | None = None  # (rank, in)
    up: Tensor | None = None  # (out, rank)
    scale: float = 1.0  # alpha / rank
    up_bias: Tensor | None = None  # (out,), PEFT lora_bias: added to the bias times `scale`
    diff: Tensor | None = None  # same shape as the module's weight
    diff_b: Tensor | None = None  # same shape as the module's bias

    @property
    def rank(self) -> int:
        """The rank of the low-rank pair (0 without one)."""
        return 0 if self.down is None else int(self.down.shape[0])


@dataclass
class LoraFile:
    """A LoRA read from one file: per module name of the transformer, its patch."""

    name: str
    patches: dict[str, LoraPatch]
    layout: str  # "peft", "kohya", "comfyui", "bare"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors held."""
        return sum(
            t.numel() * t.element_size()
            for p in self.patches.values()
            for t in (p.down, p.up, p.up_bias, p.diff, p.diff_b)
            if t is not None
        )

    def describe(self) -> str:
        """One line for logs: name, layout, modules, ranks."""
        ranks = sorted({p.rank for p in self.patches.values() if p.rank})
        diffs = sum(p.diff is not None or p.diff_b is not None for p in self.patches.values())
        rank_text = f"rank {'/'.join(map(str, ranks))}" if ranks else "no low-rank pairs"
        return f"LoRA {self.name}: {self.layout} layout, {len(self.patches)} modules, {rank_text}, {diffs} full deltas"


def _split_suffix(key: str) -> tuple[str, str] | None:
    """(module part, suffix) for a key ending in a known suffix, longest suffix first."""
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def _unsupported(keys: list[str]) -> str | None:
    for k in keys:
        for marker, kind in UNSUPPORTED.items():
            if marker in k:
                return kind
    return None


def foreign_architecture(keys: list[str]) -> str | None:
    """The model family a set of LoRA keys belongs to when it is clearly not Qwen-Image, else None."""
    for marker, family in FOREIGN_MARKERS:
        if any(marker in k for k in keys):
            return family
    return None


def _layout(keys: list[str]) -> str:
    if any(k.startswith(FLAT_PREFIXES) for k in keys):
        return "kohya"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "comfyui"
    if any(k.startswith(("transformer.", "base_model.model.")) or ".lora_A." in k for k in keys):
        return "peft"
    return "bare"


def module_table(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of the transformer a LoRA may patch: those with a `weight` (Linear, fp8 Linear, norms, ...)."""
    out = {}
    for name, m in model.named_modules():
        if name and isinstance(getattr(m, "weight", None), Tensor) and "qil_lora" not in name:
            out[name] = m
    return out


def _resolve(raw: str, table: Mapping[str, nn.Module], flat: Mapping[str, str]) -> str | None:
    """The model's module name for the module part of a key (any accepted prefix), or None."""
    for prefix in FLAT_PREFIXES:
        if raw.startswith(prefix):
            return flat.get(raw[len(prefix) :])
    for prefix in DOTTED_PREFIXES:
        if raw.startswith(prefix) and raw[len(prefix) :] in table:
            return raw[len(prefix) :]
    return raw if raw in table else None


def _metadata_config(metadata: Mapping[str, str]) -> dict:
    """The PEFT LoraConfig diffusers stored (keys with or without the 'transformer.' prefix), or {}."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except ValueError:
        logger.warning("LoRA metadata %r is not JSON; ignoring it", METADATA_KEY)
        return {}
    if not isinstance(cfg, dict):
        return {}
    return {k.removeprefix("transformer."): v for k, v in cfg.items()}


def _pattern_value(patterns: Mapping[str, float], module: str) -> float | None:
    """PEFT's rank/alpha pattern lookup: a key matching the module name or its trailing part."""
    for pattern, value in patterns.items():
        try:
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
                return float(value)
        except re.error:
            if module == pattern or module.endswith("." + pattern):
                return float(value)
    return None


def _scale(module: str, rank: int, alpha: Tensor | None, cfg: Mapping) -> float:
    """alpha / rank (or / sqrt(rank) with rsLoRA): the file's alpha tensor, else the PEFT config, else rank."""
    if alpha is not None:
        value = float(alpha.float().reshape(-1)[0])
    elif cfg:
        found = _pattern_value(cfg.get("alpha_pattern") or {}, module)
        value = found if found is not None else float(cfg.get("lora_alpha", rank))
    else:
        return 1.0
    return value / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def _weight_shape(m: nn.Module) -> tuple[int, ...]:
    """(out, in) of a Linear (fp8 or not), else the weight's shape."""
    info: Any = m
    if hasattr(info, "out_features") and hasattr(info, "in_features"):
        return (int(info.out_features), int(info.in_features))
    return tuple(info.weight.shape)


def _check_shapes(name: str, module: str, m: nn.Module, p: LoraPatch, source: str) -> None:
    shape = _weight_shape(m)
    bias = getattr(m, "bias", None)
    problems = []
    if (p.down is None) != (p.up is None):
        problems.append("has only one half of its low-rank pair (lora_down/lora_A without lora_up/lora_B or back)")
    if p.down is not None and p.up is not None:
        if len(shape) != 2:
            problems.append(f"is a low-rank pair but {module} is not a Linear layer (weight {shape})")
        elif (
            p.down.ndim != 2
            or p.up.ndim != 2
            or p.up.shape[1] != p.down.shape[0]
            or (p.up.shape[0], p.down.shape[1]) != shape
        ):
            problems.append(
                f"has up {tuple(p.up.shape)} x down {tuple(p.down.shape)}, the layer needs "
                f"({shape[0]}, r) x (r, {shape[1]})"
            )
    # a full delta is applied as (out, in): a quantised layer's packed storage shape is no match for it
    if p.diff is not None and tuple(p.diff.shape) != shape:
        problems.append(f"has a diff of shape {tuple(p.diff.shape)}, the weight is {shape}")
    for what, t in (("diff_b", p.diff_b), ("lora_B.bias", p.up_bias)):
        if t is not None and (bias is None or tuple(t.shape) != tuple(bias.shape)):
            problems.append(
                f"has a {what} of shape {tuple(t.shape)}, the bias is {None if bias is None else tuple(bias.shape)}"
            )
    if problems:
        raise ModelMismatchError(
            f"{source}: the LoRA entry for {module} {'; '.join(problems)}. This LoRA was made for a model of another "
            f"size or architecture than this Qwen-Image-Layered transformer ({name})"
        )


def _match_keys(p: Path, keys: list[str], table: dict[str, nn.Module]) -> dict[str, dict[str, str]]:
    """{module: {role: key}} for every key of a LoRA file; WeightsError/ModelMismatchError for a file that is empty,
    another adapter type, for another architecture, or with keys that match no layer."""
    if not keys:
        raise WeightsError(f"{p}: the file holds no tensors; it is not a LoRA")
    kind = _unsupported(keys)
    if kind:
        raise WeightsError(
            f"{p}: this is a {kind} adapter, which is not supported; use a plain LoRA (lora_A/lora_B "
            "or lora_down/lora_up) or full-delta (.diff) file"
        )
    flat = {n.replace(".", "_"): n for n in table}
    parts: dict[str, dict[str, str]] = {}
    unknown = []
    for k in keys:
        split = _split_suffix(k)
        module = _resolve(split[0], table, flat) if split else None
        if module is None or split is None:
            unknown.append(k)
            continue
        role = SUFFIXES[split[1]]
        if role in parts.setdefault(module, {}):
            raise WeightsError(
                f"{p}: {module} appears twice as {role} (e.g. {k}); the file mixes two namings of the same layer"
            )
        parts[module][role] = k
    if unknown:
        family = foreign_architecture(unknown)
        if family and len(unknown) * 2 >= len(keys):
            raise ModelMismatchError(
                f"{p}: this LoRA is for {family}, not for Qwen-Image / Qwen-Image-Layered ({len(unknown)} of "
                f"{len(keys)} keys match nothing here, e.g. {unknown[0]}); choose a LoRA trained on Qwen-Image"
            )
        shown = ", ".join(unknown[:12]) + (f", ... ({len(unknown) - 12} more)" if len(unknown) > 12 else "")
        hint = f" (they look like {family} keys)" if family else ""
        raise ModelMismatchError(
            f"{p}: {len(unknown)} of {len(keys)} keys match no layer of the Qwen-Image-Layered transformer{hint}: "
            f"{shown}; {EXPECTED_NAMING}"
        )
    return parts


def read_lora(path: PathLike, model: nn.Module, *, name: str | None = None) -> LoraFile:
    """Read a LoRA .safetensors file and match every key to a module of `model` (checked, nothing dropped).

    Tensors are read into memory in fp32 (LoRAs are small); a key that matches nothing raises ModelMismatchError
    listing the keys and the expected naming; a file for another architecture is named as such.
    """
    p = Path(path)
    label = name or p.name
    if not p.is_file():
        raise InputError(f"LoRA file not found: {p}; put it into models/loras or give the full path")
    table = module_table(model)
    with open_checkpoint(p) as ckpt:
        keys = ckpt.keys()
        metadata = dict(ckpt.metadata)
        names = _match_keys(p, keys, table)  # every refusal comes before any tensor is read
        parts = {
            m: {role: ckpt.read(k, torch.float32, copy=True) for role, k in roles.items()} for m, roles in names.items()
        }
    cfg = _metadata_config(metadata)
    patches = {}
    for module, roles in parts.items():
        if set(roles) == {"alpha"}:
            raise WeightsError(f"{p}: {module} has an alpha but no lora_down/lora_up (or lora_A/lora_B) pair")
        down, up = roles.get("down"), roles.get("up")
        rank = int(down.shape[0]) if down is not None and down.ndim == 2 else 0
        scale = _scale(module, rank, roles.get("alpha"), cfg) if rank else 1.0
        patch = LoraPatch(down, up, scale, roles.get("up_bias"), roles.get("diff"), roles.get("diff_b"))
        _check_shapes(label, module, table[module], patch, str(p))
        patches[module] = patch
    lora = LoraFile(label, patches, _layout(keys), metadata)
    logger.info(
        "%s: %d of %d keys matched %d of %d patchable layers",
        lora.describe(),
        len(keys),
        len(keys),
        len(patches),
        len(table),
    )
    return lora


__all__ = ["LoraFile", "LoraPatch", "foreign_architecture", "module_table", "read_lora"]
