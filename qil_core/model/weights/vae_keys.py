"""VAE key names: diffusers <-> ComfyUI / original Wan-2.1 (model_spec.md §7.3), as plain tables and rules.

ComfyUI's `qwen_image_layered_vae.safetensors` uses the original Wan naming; diffusers' `vae/` folder uses
`AutoencoderKLQwenImage` naming. Tensor shapes are identical on both sides, so conversion is a pure rename.
The decoder's flat Wan list `decoder.upsamples.{j}` holds, per up block b, `num_res_blocks + 1` residual
blocks followed by one upsampler (none after the last block), so j depends on `num_res_blocks`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Residual block internals: diffusers suffix -> Wan suffix (Wan keeps them in a Sequential `residual`).
RESIDUAL_TO_WAN: dict[str, str] = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}
RESIDUAL_FROM_WAN: dict[str, str] = {v: k for k, v in RESIDUAL_TO_WAN.items()}

# Whole-prefix renames that do not depend on block numbering: diffusers prefix -> Wan prefix.
PREFIX_TO_WAN: dict[str, str] = {
    "quant_conv.": "conv1.",
    "post_quant_conv.": "conv2.",
    "encoder.conv_in.": "encoder.conv1.",
    "decoder.conv_in.": "decoder.conv1.",
    "encoder.norm_out.": "encoder.head.0.",
    "decoder.norm_out.": "decoder.head.0.",
    "encoder.conv_out.": "encoder.head.2.",
    "decoder.conv_out.": "decoder.head.2.",
    "encoder.mid_block.attentions.0.": "encoder.middle.1.",
    "decoder.mid_block.attentions.0.": "decoder.middle.1.",
}
PREFIX_FROM_WAN: dict[str, str] = {v: k for k, v in PREFIX_TO_WAN.items()}

# Keys that only a Wan-named VAE has (used to tell the two namings apart).
WAN_MARKERS: tuple[str, ...] = ("encoder.conv1.weight", "decoder.head.2.weight", "conv2.weight")
DIFFUSERS_MARKERS: tuple[str, ...] = ("encoder.conv_in.weight", "decoder.conv_out.weight", "post_quant_conv.weight")


_D_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(.+)$")
_D_MID = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)$")
_D_UP_RES = re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_D_UP_SAMPLE = re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$")
_W_DOWN = re.compile(r"^encoder\.downsamples\.(\d+)\.(.+)$")
_W_MID = re.compile(r"^(encoder|decoder)\.middle\.([02])\.(.+)$")
_W_UP = re.compile(r"^decoder\.upsamples\.(\d+)\.(.+)$")


def _residual(suffix: str, table: dict[str, str]) -> str:
    # Resample (`resample.1.*`, `time_conv.*`) and attention (`norm.gamma`, `to_qkv.*`, `proj.*`) names match.
    return table.get(suffix, suffix)


def diffusers_to_wan_key(key: str, num_res_blocks: int) -> str:
    """Rename one diffusers VAE key to its ComfyUI/Wan name (unknown keys come back unchanged)."""
    for src, dst in PREFIX_TO_WAN.items():
        if key.startswith(src):
            return dst + key[len(src) :]
    if m := _D_DOWN.match(key):
        return f"encoder.downsamples.{m.group(1)}.{_residual(m.group(2), RESIDUAL_TO_WAN)}"
    if m := _D_MID.match(key):
        return f"{m.group(1)}.middle.{2 * int(m.group(2))}.{_residual(m.group(3), RESIDUAL_TO_WAN)}"
    per_block = num_res_blocks + 2  # resnets + one upsampler per up block
    if m := _D_UP_RES.match(key):
        j = int(m.group(1)) * per_block + int(m.group(2))
        return f"decoder.upsamples.{j}.{_residual(m.group(3), RESIDUAL_TO_WAN)}"
    if m := _D_UP_SAMPLE.match(key):
        j = int(m.group(1)) * per_block + num_res_blocks + 1
        return f"decoder.upsamples.{j}.{m.group(2)}"
    return key


def wan_to_diffusers_key(key: str, num_res_blocks: int) -> str:
    """Rename one ComfyUI/Wan VAE key to its diffusers name (unknown keys come back unchanged)."""
    for src, dst in PREFIX_FROM_WAN.items():
        if key.startswith(src):
            return dst + key[len(src) :]
    if m := _W_DOWN.match(key):
        return f"encoder.down_blocks.{m.group(1)}.{_residual(m.group(2), RESIDUAL_FROM_WAN)}"
    if m := _W_MID.match(key):
        return f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) // 2}.{_residual(m.group(3), RESIDUAL_FROM_WAN)}"
    if m := _W_UP.match(key):
        per_block = num_res_blocks + 2
        block, pos = divmod(int(m.group(1)), per_block)
        if pos == num_res_blocks + 1:
            return f"decoder.up_blocks.{block}.upsamplers.0.{m.group(2)}"
        return f"decoder.up_blocks.{block}.resnets.{pos}.{_residual(m.group(2), RESIDUAL_FROM_WAN)}"
    return key


def is_wan_naming(keys: Iterable[str]) -> bool:
    """True when the keys use the ComfyUI/Wan VAE naming rather than diffusers'."""
    ks = set(keys)
    return any(k in ks for k in WAN_MARKERS) and not any(k in ks for k in DIFFUSERS_MARKERS)


def wan_num_res_blocks(keys: Iterable[str]) -> int:
    """Residual blocks per stage of a Wan-named VAE, read from where the first decoder upsampler sits."""
    first_upsampler: int | None = None
    for key in keys:
        m = _W_UP.match(key)
        if m and (m.group(2).startswith("resample.") or m.group(2).startswith("time_conv.")):
            j = int(m.group(1))
            first_upsampler = j if first_upsampler is None else min(first_upsampler, j)
    if first_upsampler is None:
        # No upsampler at all: count residual blocks of the single decoder stage instead.
        ids = {int(m.group(1)) for k in keys if (m := _W_UP.match(k))}
        return max(len(ids) - 1, 0)
    return first_upsampler - 1


def wan_to_diffusers_keys(keys: Iterable[str]) -> dict[str, str]:
    """Map every Wan key to its diffusers name: {wan_key: diffusers_key}."""
    ks = list(keys)
    nrb = wan_num_res_blocks(ks)
    return {k: wan_to_diffusers_key(k, nrb) for k in ks}
