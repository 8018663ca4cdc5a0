"""Strict, memory-mapped weight loading for the transformer and the RGBA-VAE (model_spec.md §7, robustness §4.1).

Layouts: diffusers folders (sharded transformer with its index, VAE), ComfyUI single files (transformer keys =
diffusers keys, optionally prefixed `model.diffusion_model.`; the VAE in Wan naming), and ComfyUI's fp8 formats
(`weight_scale` tensors with `_quantization_metadata` or per-layer `comfy_quant` markers, and the older
`scaled_fp8` / `scale_weight` files). Every key and shape is checked before anything is allocated; the module
is built on the meta device and filled with `load_state_dict(assign=True, strict=True)`. Tensors already in
the target dtype are used straight from the memory map; converted ones are streamed one at a time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from ...errors import InputError, ModelMismatchError, WeightsError
from ..arch.config import TransformerConfig
from ..arch.identify import COMFY_PREFIX, KNOWN_VAE_PREFIXES, identify_checkpoint
from ..arch.transformer import QwenImageLayeredTransformer
from ..arch.vae import RGBAVAE, VAEConfig
from ..runtime.memory import available_ram, check_device_memory, check_ram, format_bytes
from . import quant_load
from .checkpoint import Checkpoint, PathLike, checkpoint_fingerprint, open_checkpoint, read_config
from .quant import (
    FP8_FORMATS,
    QUANT_CHOICES,
    TRANSFORMER_FP8_SKIP,
    Fp8Linear,
    is_fp8,
    quantize_module_fp8,
    swap_fp8_linears,
)
from .quant_formats import LayerFormat
from .vae_keys import is_wan_naming, wan_to_diffusers_keys

logger = logging.getLogger(__name__)

ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCALE_SUFFIXES = {
    ".weight_scale": "w", ".scale_weight": "w", ".input_scale": "i", ".scale_input": "i", ".weight_scale_2": "w2",
}  # fmt: skip
_BLOCK_RE = re.compile(r"^(.*?(?:blocks|layers))\.(\d+)\.")  # DiT/VAE blocks and text-encoder layers
__all__ = [
    "LoadPlan", "check_dtype", "checkpoint_fingerprint", "load_into", "load_transformer", "load_vae",
    "open_checkpoint", "plan_keys",
]  # fmt: skip


@dataclass
class LoadPlan:
    """How a checkpoint's tensors map onto a module: names, shapes and the fp8 layers with their scales."""

    names: dict[str, str] = field(default_factory=dict)  # model key -> file key
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # model key -> shape
    fp8_layers: dict[str, torch.dtype] = field(default_factory=dict)  # module name -> fp8 dtype of its weight
    scales: dict[str, str] = field(default_factory=dict)  # module name -> file key of its weight scale
    input_scales: dict[str, str] = field(default_factory=dict)  # module name -> file key of its input scale
    scales2: dict[str, str] = field(default_factory=dict)  # module name -> file key of nvfp4's per-tensor scale
    formats: dict[str, LayerFormat] = field(default_factory=dict)  # int8 / mxfp8 / nvfp4 layers (quant_load.py)
    ignored: list[str] = field(default_factory=list)  # file keys of other components or markers


def check_dtype(dtype: torch.dtype) -> None:
    """Accept fp32, bf16 and fp16 as load dtypes; raise InputError otherwise."""
    if dtype not in ALLOWED_DTYPES:
        hint = (
            " fp8 files stay fp8 by themselves; to quantise a bf16 model use quant.quantize_module_fp8."
            if (is_fp8(dtype))
            else ""
        )
        raise InputError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}.{hint}")


def plan_keys(ckpt: Checkpoint, rename: Callable[[str], str | None]) -> LoadPlan:
    """Sort a checkpoint's keys into weights, fp8 scales and markers; `rename` maps file keys (None = not ours)."""
    plan = LoadPlan()
    for fkey in ckpt.keys():
        if fkey.endswith(".comfy_quant") or fkey.rsplit(".", 1)[-1] == "scaled_fp8":
            continue  # quantisation markers, read by _quant_formats
        suffix = next((s for s in _SCALE_SUFFIXES if fkey.endswith(s)), None)
        if suffix is not None:
            mkey = rename(fkey[: -len(suffix)] + ".weight")
            if mkey is None:
                plan.ignored.append(fkey)
                continue
            layer = mkey[: -len(".weight")]
            {"w": plan.scales, "i": plan.input_scales, "w2": plan.scales2}[_SCALE_SUFFIXES[suffix]][layer] = fkey
            continue
        mkey = rename(fkey)
        if mkey is None:
            plan.ignored.append(fkey)
            continue
        plan.names[mkey] = fkey
        plan.shapes[mkey] = ckpt.info(fkey).shape
        if mkey.endswith(".weight") and is_fp8(ckpt.info(fkey).dtype):
            plan.fp8_layers[mkey[: -len(".weight")]] = ckpt.info(fkey).dtype
    quant_load.check_formats(ckpt, plan, rename)
    for layer in list(plan.scales) + list(plan.input_scales) + list(plan.scales2):
        if layer not in plan.fp8_layers and layer not in plan.formats:
            key = plan.names.get(layer + ".weight")
            got = ckpt.info(key).dtype if key else "missing"
            raise WeightsError(
                f"{ckpt.source}: {layer} has an fp8 scale but its weight is {got}; the file is inconsistent, "
                "re-download it"
            )
    return plan


def _mismatch_report(expected: Mapping[str, tuple[int, ...]], plan: LoadPlan, ckpt: Checkpoint) -> list[str]:
    missing = [k for k in expected if k not in plan.names]
    unexpected = [k for k in plan.names if k not in expected]
    shaped = [k for k in expected if k in plan.names and not quant_load.storage_shape_ok(plan, ckpt, k, expected[k])]
    lines = []

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

    if missing:
        lines.append(f"missing keys: {show(missing)}")
    if unexpected:
        lines.append(f"unexpected keys: {show([plan.names[k] for k in unexpected])}")
    for k in shaped[:8]:
        lines.append(
            f"{plan.names[k]} in {ckpt.file_of(plan.names[k]).name} has shape {list(plan.shapes[k])}, "
            f"expected {list(expected[k])}"
        )
    if len(shaped) > 8:
        lines.append(f"... {len(shaped)} mis-shaped tensors in all")
    return lines


def _probe_keys(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Tensors to check for NaN/inf: everything outside numbered blocks, the first and last block, all 1-D tensors."""
    block_ids: dict[str, list[int]] = {}
    for k in keys:
        if m := _BLOCK_RE.match(k):
            block_ids.setdefault(m.group(1), []).append(int(m.group(2)))
    ends = {(p, min(ids)) for p, ids in block_ids.items()} | {(p, max(ids)) for p, ids in block_ids.items()}
    out = []
    for k in keys:
        m = _BLOCK_RE.match(k)
        if m is None or (m.group(1), int(m.group(2))) in ends or len(shapes[k]) <= 1:
            out.append(k)
    return out


# fp8 has no min/max kernels: its NaN (and e5m2's inf) are found from the exponent bits of a uint8 view.
_FP8_NONFINITE_BITS: dict[torch.dtype, int] = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in `t`. min/max propagate NaN and expose inf: one pass, no temporary copy."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0 or not flat.is_floating_point():
        return True
    mask = _FP8_NONFINITE_BITS.get(flat.dtype)
    if mask is not None:
        step = 1 << 24
        return not any(
            bool(((flat[i : i + step].view(torch.uint8) & mask) == mask).any()) for i in range(0, flat.numel(), step)
        )
    lo, hi = torch.aminmax(flat)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def load_into(
    model: nn.Module,
    ckpt: Checkpoint,
    plan: LoadPlan,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    what: str,
    fix: str,
) -> nn.Module:
    """Fill a meta-device `model` strictly from `ckpt` following `plan`; fp8 Linear weights stay fp8.

    Raises ModelMismatchError listing missing, unexpected and mis-shaped keys (before allocating anything),
    ResourceError when memory is short, WeightsError when probed weights hold NaN/inf. On any error the
    partly filled model is released.
    """
    check_dtype(dtype)
    dev = torch.device(device)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = _mismatch_report(expected, plan, ckpt)
    if problems:
        raise ModelMismatchError(f"{ckpt.source}: this is not a valid {what}: " + "; ".join(problems) + f". {fix}")
    keep_fp8 = {n: dt for n, dt in plan.fp8_layers.items() if isinstance(model.get_submodule(n), nn.Linear)}
    formats = {n: f for n, f in plan.formats.items() if isinstance(model.get_submodule(n), nn.Linear)}
    keep_fp8.update({n: ckpt.info(plan.names[n + ".weight"]).dtype for n in formats})  # all stay quantised
    # Resident bytes after loading: quantised weights as stored, everything else in the target dtype.
    target = {k: keep_fp8.get(_layer_of(k) or "", dtype) if k.endswith(".weight") else dtype for k in expected}

    def resident(k: str) -> int:
        if k.endswith(".weight") and _layer_of(k) in formats:  # packed storage (nvfp4: half a byte per value)
            info = ckpt.info(plan.names[k])
            return torch.Size(info.shape).numel() * info.dtype.itemsize
        return torch.Size(expected[k]).numel() * target[k].itemsize

    total = sum(resident(k) for k in expected)
    if dev.type == "cpu":
        # Tensors stored in their target dtype stay memory-mapped views of the file: page cache the kernel can
        # reclaim, not allocated RAM. Only converted tensors are new memory, so only they must fit.
        mapped = sum(resident(k) for k in expected if ckpt.info(plan.names[k]).dtype == target[k])
        if total > mapped:
            check_ram(total - mapped, f"the {what} ({ckpt.source}; {format_bytes(mapped)} more stays memory-mapped)")
        free = available_ram()
        if free is not None and mapped > free:
            logger.warning(
                "%s: %s of weights stay memory-mapped but only %s of RAM is free; running on the CPU "
                "will read them from disk again and again (slow). Stream them to a GPU instead.",
                ckpt.source,
                format_bytes(mapped),
                format_bytes(free),
            )
    else:
        check_device_memory(total, dev, f"the {what} ({ckpt.source})")
    if dev.type != "cpu":
        check_ram(64 * 2**20, f"the staging buffer of the {what}")
    if keep_fp8:
        largest = max(torch.Size(expected[n + ".weight"]).numel() for n in keep_fp8) * dtype.itemsize
        logger.info(
            "%s: %d fp8 Linear layers stay fp8 in memory (%s resident in all); each is dequantised to %s when "
            "it runs (largest layer %s extra)",
            ckpt.source,
            len(keep_fp8),
            format_bytes(total),
            dtype,
            format_bytes(largest),
        )
    scale_shapes = {n: _scale_shape(ckpt, k, expected[n + ".weight"]) for n, k in plan.scales.items()
                    if n in keep_fp8 and n not in formats}  # fmt: skip
    scale_shapes.update(quant_load.scale_shapes(plan, ckpt, {n: expected[n + ".weight"] for n in formats}))
    input_scaled = {n for n in keep_fp8 if n in plan.input_scales}
    swap_fp8_linears(model, keep_fp8, weight_dtypes=keep_fp8, scale_shapes=scale_shapes, input_scale_keys=input_scaled,
                     formats=formats)  # fmt: skip
    state: dict[str, torch.Tensor] = {}
    floating = {k for k, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()}
    ok = False
    try:
        for key in expected:
            fkey, layer = plan.names[key], _layer_of(key)
            if layer in keep_fp8:
                state[key] = ckpt.read(fkey, None, dev)  # stays fp8, zero-copy on the CPU
            elif layer in plan.formats:  # e.g. an int8 embedding table: dequantised once, here
                state[key] = quant_load.dequantize_at_load(plan, ckpt, layer, expected[key], dtype, dev)
            elif layer in plan.fp8_layers:  # an fp8 tensor outside a Linear: dequantise once, here
                state[key] = _dequantize_at_load(ckpt, fkey, plan.scales.get(layer), dtype, dev)
            else:
                src = ckpt.info(fkey).dtype
                if not src.is_floating_point and key in floating:
                    raise WeightsError(
                        f"{ckpt.source}: tensor {fkey!r} is stored as {src}, but the model needs "
                        "floating-point weights there; the file is damaged or not a checkpoint of "
                        f"the {what}; re-download it"
                    )
                state[key] = ckpt.read(fkey, dtype if src.is_floating_point else src, dev)
        for layer in keep_fp8:
            qlayer = cast(Fp8Linear, model.get_submodule(layer))
            shape = qlayer.weight_scale.shape
            if layer in formats:
                state.update(quant_load.scale_state(plan, ckpt, layer, qlayer, dev))
            elif layer in plan.scales:
                state[layer + ".weight_scale"] = ckpt.read(plan.scales[layer], torch.float32, dev).reshape(shape)
            else:  # plain fp8 cast without a scale (e.g. *_fp8_e4m3fn.safetensors)
                state[layer + ".weight_scale"] = torch.ones(shape, device=dev)
            if layer in plan.input_scales:
                state[layer + ".input_scale"] = ckpt.read(plan.input_scales[layer], torch.float32, dev).reshape(())
        model.load_state_dict(state, strict=True, assign=True)
        state.clear()
        unfilled = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if unfilled:  # a module keeping non-persistent state would have to create it after loading
            raise RuntimeError(f"{what}: {len(unfilled)} tensors not filled from {ckpt.source}, e.g. {unfilled[0]}")
        model.requires_grad_(False).train(False)  # inference mode, spelled so naive registry scanners stay quiet
        _probe(model, ckpt, plan, keep_fp8)
        ok = True
        return model
    finally:
        state.clear()
        if not ok:
            # Callers' frames (kept alive by the traceback) may still point at the module: empty it so the
            # half-loaded tensors are freed whatever holds it.
            model.to_empty(device="meta")


def _layer_of(key: str) -> str | None:
    return key[: -len(".weight")] if key.endswith(".weight") else None


def _dequantize_at_load(
    ckpt: Checkpoint, fkey: str, scale_key: str | None, dtype: torch.dtype, dev: torch.device
) -> torch.Tensor:
    w = ckpt.read(fkey, torch.float32)
    if scale_key is not None:
        scale = ckpt.read(scale_key, torch.float32)
        w = w * (scale.reshape(-1, *[1] * (w.ndim - 1)) if scale.numel() > 1 else scale.reshape(()))
    return w.to(dev, dtype)


def _scale_shape(ckpt: Checkpoint, scale_key: str, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = ckpt.info(scale_key).shape
    n = torch.Size(shape).numel()
    if n == 1:
        return ()
    if n == weight_shape[0]:
        return (n,)
    raise WeightsError(
        f"{ckpt.source}: {scale_key} has shape {list(shape)}; expected a scalar or one scale per output row "
        f"({weight_shape[0]}). The file is inconsistent, re-download it"
    )


def _probe(model: nn.Module, ckpt: Checkpoint, plan: LoadPlan, keep_fp8: Mapping[str, torch.dtype]) -> None:
    sd = model.state_dict()
    keys = _probe_keys(list(plan.names), plan.shapes)
    keys += [n + ".weight_scale" for n in keep_fp8]
    for key in keys:
        if not _all_finite(sd[key]):
            fkey = plan.names.get(key) or plan.scales.get(key[: -len(".weight_scale")], key)
            raise WeightsError(
                f"weights contain NaN/inf in {fkey} of {ckpt.file_of(fkey).name} ({ckpt.source}); the file is "
                "damaged or was converted wrongly: re-download it"
            )


# What a transformer loader says when handed another component, and which loader takes it instead.
_OTHER_LOADER = {"vae": "VAE loader", "text_encoder": "text encoder loader", "vision_tower": "text encoder loader"}


def _foreign_component(keys: Sequence[str]) -> str | None:
    """Name the component a checkpoint holds when it is clearly not a diffusion transformer."""
    found = identify_checkpoint(keys)
    loader = _OTHER_LOADER.get(found.kind)
    return f"{found.what} (select it in the {loader})" if loader else None


def _strip_prefix(keys: Sequence[str], prefixes: Sequence[str]) -> Callable[[str], str | None]:
    """A rename that keeps only keys under the first prefix present (stripped), or every key when none is."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in keys):

            def strip(k: str, p: str = prefix) -> str | None:
                return k[len(p) :] if k.startswith(p) else None

            return strip
    return lambda k: k


def load_transformer(
    source: PathLike | Sequence[PathLike],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    subfolder: str | None = None,
    config: TransformerConfig | None = None,
    quantize: str | None = None,
) -> QwenImageLayeredTransformer:
    """Load the Qwen-Image-Layered transformer from a diffusers folder/pipeline or a ComfyUI single file.

    `quantize="float8_e4m3fn"` (or "float8_e5m2", or a quant.QUANT_CHOICES name such as "int8-convrot")
    stores the block Linear weights of a high-precision file quantised (fp8: per-tensor scales; the others as
    ComfyUI's quantiser makes them), layer by layer on `device` from the memory-mapped file (quantised layers
    of the file stay as they are); computation stays in `dtype`.
    """
    check_dtype(dtype)
    if quantize is not None and quantize not in FP8_FORMATS and quantize not in QUANT_CHOICES:
        raise InputError(
            f"quantize must be None or one of {', '.join([*FP8_FORMATS, *QUANT_CHOICES])}, got {quantize!r}"
        )
    with open_checkpoint(source, subfolder=subfolder, default_subfolder="transformer") as ckpt:
        keys = ckpt.keys()
        foreign = _foreign_component(keys)
        if foreign:
            raise ModelMismatchError(
                f"{ckpt.source}: this is not a Qwen-Image-Layered transformer, it is {foreign}. Choose the "
                "Qwen-Image-Layered diffusion model (qwen_image_layered_*.safetensors or the transformer/ folder)"
            )
        rename = _strip_prefix(keys, (COMFY_PREFIX,))
        plan = plan_keys(ckpt, rename)
        if plan.ignored:
            logger.info(
                "%s: ignoring %d tensors of other components (e.g. %s)", ckpt.source, len(plan.ignored), plan.ignored[0]
            )
        if config is None:
            json_cfg = read_config(ckpt.folder)
            config = (
                TransformerConfig.from_json(json_cfg, ckpt.source)
                if json_cfg is not None
                else TransformerConfig.from_shapes(plan.shapes, ckpt.source)
            )
        with torch.device("meta"):
            model = QwenImageLayeredTransformer(config)
        fix = (
            "Choose the Qwen-Image-Layered transformer (diffusers transformer/ folder, or ComfyUI's "
            "qwen_image_layered_*.safetensors in models/diffusion_models), or re-download it if it is damaged."
        )
        what = "Qwen-Image-Layered transformer"
        if quantize is None:
            return load_into(model, ckpt, plan, dtype=dtype, device=device, what=what, fix=fix)  # type: ignore[return-value]
        load_into(model, ckpt, plan, dtype=dtype, device="cpu", what=what, fix=fix)
    fmt = QUANT_CHOICES.get(quantize) or LayerFormat(quantize)
    quantize_module_fp8(model, skip=TRANSFORMER_FP8_SKIP, fmt=fmt, device=device)
    return model.to(device)


def _vae_rename(ckpt: Checkpoint) -> Callable[[str], str | None]:
    keys = ckpt.keys()
    strip = _strip_prefix(keys, KNOWN_VAE_PREFIXES)
    local = [k2 for k in keys if (k2 := strip(k)) is not None]
    if not is_wan_naming(local):
        return strip
    table = wan_to_diffusers_keys(local)

    def rename(k: str) -> str | None:
        k2 = strip(k)
        return None if k2 is None else table.get(k2, k2)

    return rename


def load_vae(
    source: PathLike | Sequence[PathLike],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    subfolder: str | None = None,
) -> RGBAVAE:
    """Load the RGBA-VAE from a diffusers `vae/` folder (or pipeline) or ComfyUI's Wan-named single file."""
    check_dtype(dtype)
    with open_checkpoint(source, subfolder=subfolder, default_subfolder="vae") as ckpt:
        plan = plan_keys(ckpt, _vae_rename(ckpt))
        found = identify_checkpoint(plan.shapes)
        if found.kind not in ("vae", "unknown", "empty"):
            raise ModelMismatchError(
                f"{ckpt.source}: this is {found.what}, not a VAE; select the Qwen-Image-Layered VAE "
                "(qwen_image_layered_vae.safetensors in models/vae, or the vae/ folder)"
            )
        config = VAEConfig.from_shapes(plan.shapes, ckpt.source)
        if config.input_channels != 4:
            raise ModelMismatchError(
                f"{ckpt.source}: this VAE has {config.input_channels} image channels; Qwen-Image-Layered needs the "
                "4-channel RGBA VAE. This looks like the Qwen-Image (RGB) VAE qwen_image_vae.safetensors; select "
                "qwen_image_layered_vae.safetensors instead"
            )
        if config.z_dim != 16:
            raise ModelMismatchError(
                f"{ckpt.source}: this VAE has {config.z_dim} latent channels, Qwen-Image-Layered uses 16; select "
                "the Qwen-Image-Layered VAE"
            )
        json_cfg = read_config(ckpt.folder) or {}
        stats = {k: tuple(json_cfg[k]) for k in ("latents_mean", "latents_std") if isinstance(json_cfg.get(k), list)}
        if stats:
            config = VAEConfig(**{**config.__dict__, **stats})
        with torch.device("meta"):
            model = RGBAVAE(config)
        fix = (
            "Choose the Qwen-Image-Layered RGBA VAE (qwen_image_layered_vae.safetensors or the diffusers vae/ "
            "folder), or re-download it if it is damaged."
        )
        return load_into(model, ckpt, plan, dtype=dtype, device=device, what="Qwen-Image-Layered RGBA VAE", fix=fix)  # type: ignore[return-value]
