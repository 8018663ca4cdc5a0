"""Transformer configuration: the diffusers `config.json` fields, read from JSON or inferred from tensor shapes."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ...errors import InputError, ModelMismatchError
from .identify import COMFY_PREFIX, identify_checkpoint

logger = logging.getLogger(__name__)

LAYERED_MARKER = "time_text_embed.addition_t_embedding.weight"
EDIT_2511_MARKER = "__index_timestep_zero__"
DIFFUSERS_CLASS = "QwenImageTransformer2DModel"

# Keys every Qwen-Image transformer has; used to tell "another model" from "a broken Qwen-Image file".
_CORE_KEYS = (
    "img_in.weight",
    "txt_in.weight",
    "txt_norm.weight",
    "time_text_embed.timestep_embedder.linear_1.weight",
    "transformer_blocks.0.attn.norm_q.weight",
    "transformer_blocks.0.img_mod.1.weight",
    "norm_out.linear.weight",
    "proj_out.weight",
)
_BLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.")


@dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of the Qwen-Image-Layered MMDiT; field names follow diffusers' transformer config.json."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    guidance_embeds: bool = False
    use_additional_t_cond: bool = True
    use_layer3d_rope: bool = True
    zero_cond_t: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        for name in (
            "patch_size",
            "in_channels",
            "out_channels",
            "num_layers",
            "attention_head_dim",
            "num_attention_heads",
            "joint_attention_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        axes = self.axes_dims_rope
        if len(axes) != 3 or any(a <= 0 or a % 2 for a in axes) or sum(axes) != self.attention_head_dim:
            raise InputError(
                f"TransformerConfig.axes_dims_rope must be 3 positive even sizes summing to attention_head_dim "
                f"({self.attention_head_dim}), got {axes}"
            )

    @property
    def inner_dim(self) -> int:
        """Model width D = heads x head_dim (3072 for the real model)."""
        return self.num_attention_heads * self.attention_head_dim

    def check_layered(self, source: str = "") -> None:
        """Raise ModelMismatchError unless this config describes Qwen-Image-Layered (not text-to-image or edit)."""
        where = f" ({source})" if source else ""
        if self.zero_cond_t:
            raise ModelMismatchError(
                f"transformer{where} has zero_cond_t=True: this is the Qwen-Image-Edit-2511 model, not "
                "Qwen-Image-Layered; choose the Qwen-Image-Layered transformer file"
            )
        if not self.use_additional_t_cond or not self.use_layer3d_rope:
            raise ModelMismatchError(
                f"transformer{where} has use_additional_t_cond={self.use_additional_t_cond}, "
                f"use_layer3d_rope={self.use_layer3d_rope} (Layered needs both True): this is the Qwen-Image "
                "text-to-image or edit model, not Qwen-Image-Layered; choose the Qwen-Image-Layered transformer file"
            )
        if self.guidance_embeds:
            raise ModelMismatchError(
                f"transformer{where} has guidance_embeds=True (a guidance-distilled variant); Qwen-Image-Layered has "
                "no guidance embedder; choose the Qwen-Image-Layered transformer file"
            )

    @classmethod
    def from_json(cls, config: Mapping[str, Any], source: str = "") -> TransformerConfig:
        """Build from a diffusers transformer `config.json` dict (unknown and `_`-prefixed keys are ignored)."""
        where = f" ({source})" if source else ""
        class_name = config.get("_class_name")
        if class_name is not None and class_name != DIFFUSERS_CLASS:
            raise ModelMismatchError(
                f"config{where} is for {class_name!r}, expected {DIFFUSERS_CLASS!r}; point to the transformer/ "
                "folder of Qwen-Image-Layered"
            )
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            if key in known:
                kwargs[key] = tuple(value) if key == "axes_dims_rope" else value
            elif not key.startswith("_"):
                logger.debug("ignoring transformer config field %r%s", key, where)
        if kwargs.get("out_channels") is None:
            kwargs.pop("out_channels", None)
            kwargs["out_channels"] = int(kwargs.get("in_channels", cls.in_channels))  # diffusers: None -> in
        cfg = cls(**kwargs)
        cfg.check_layered(source)
        return cfg

    @classmethod
    def from_shapes(
        cls,
        shapes: Mapping[str, tuple[int, ...]],
        source: str = "",
        axes_dims_rope: tuple[int, int, int] | None = None,
    ) -> TransformerConfig:
        """Infer the config from checkpoint tensor shapes (key -> shape); ModelMismatchError if not Layered.

        The RoPE axis split cannot be read from weights: it defaults to the real model's 1/8, 7/16, 7/16 of the
        head dim ((16, 56, 56) for 128) unless `axes_dims_rope` is given. The patch size is taken as 2.
        """
        where = f" in {source}" if source else ""
        if shapes and all(k.startswith(COMFY_PREFIX) for k in shapes):
            shapes = {k[len(COMFY_PREFIX) :]: v for k, v in shapes.items()}
        missing = [k for k in _CORE_KEYS if k not in shapes]
        if missing:
            raise ModelMismatchError(
                f"this is not a Qwen-Image-Layered transformer{where}: {identify_checkpoint(shapes).describe()}; "
                "missing keys "
                f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; choose the Qwen-Image-Layered "
                "diffusion model file"
            )
        if EDIT_2511_MARKER in shapes:
            raise ModelMismatchError(
                f"the transformer{where} carries '{EDIT_2511_MARKER}': this is Qwen-Image-Edit-2511, not "
                "Qwen-Image-Layered; choose the Qwen-Image-Layered diffusion model file"
            )
        if LAYERED_MARKER not in shapes:
            raise ModelMismatchError(
                f"the transformer{where} has no '{LAYERED_MARKER}': this is the Qwen-Image text-to-image or edit "
                "model, not Qwen-Image-Layered; choose the Qwen-Image-Layered diffusion model file"
            )
        blocks = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k))})
        if blocks != list(range(len(blocks))):
            gap = next(i for i in range(len(blocks) + 1) if i not in blocks)
            raise ModelMismatchError(
                f"transformer{where} has blocks {blocks[0]}..{blocks[-1]} but block {gap} is missing; the file is "
                "incomplete, re-download it"
            )
        inner, in_channels = (int(s) for s in shapes["img_in.weight"])
        head_dim = int(shapes["transformer_blocks.0.attn.norm_q.weight"][0])
        if inner % head_dim:
            raise ModelMismatchError(
                f"transformer{where}: width {inner} (img_in.weight) is not a multiple of the head dim {head_dim} "
                "(norm_q.weight); the file is not a valid Qwen-Image transformer"
            )
        patch = cls.patch_size
        proj_rows = int(shapes["proj_out.weight"][0])
        if axes_dims_rope is None:
            if head_dim % 16:
                raise ModelMismatchError(
                    f"transformer{where}: cannot infer the RoPE axes for head dim {head_dim}; load it with its "
                    "diffusers config.json"
                )
            axes_dims_rope = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
        cfg = cls(
            patch_size=patch,
            in_channels=in_channels,
            out_channels=proj_rows // (patch * patch),
            num_layers=len(blocks),
            attention_head_dim=head_dim,
            num_attention_heads=inner // head_dim,
            joint_attention_dim=int(shapes["txt_in.weight"][1]),
            axes_dims_rope=axes_dims_rope,  # __post_init__ makes it a tuple of ints
            guidance_embeds=any(k.startswith("time_text_embed.guidance_embedder.") for k in shapes),
            use_additional_t_cond=True,
            use_layer3d_rope=True,
            zero_cond_t=False,
        )
        cfg.check_layered(source)
        return cfg
