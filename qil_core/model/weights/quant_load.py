"""Reading ComfyUI's quantisation markers and the int8 / mxfp8 / nvfp4 Linear layers of a checkpoint.

Used by weights.py (`plan_keys`, `load_into`): the markers come from the header's `_quantization_metadata`
table or from per-layer `<layer>.comfy_quant` tensors (quant_formats.py describes each format). fp8 layers keep
their existing handling in weights.py; the layers in other formats are checked here (weight dtype, scales
present, storage shapes) and their tensors are read as stored, so they stay quantised (and memory-mapped on the
CPU) inside Fp8Linear modules.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ...errors import WeightsError
from . import quant_formats as qf
from .quant_formats import FP8_NAMES, LayerFormat

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .loading import LoadPlan

_FIX = "Use the bf16, fp8mixed or int8 ConvRot version of this model."
_STORED = {"int8_tensorwise": torch.int8, "mxfp8": torch.float8_e4m3fn, "nvfp4": torch.uint8}


def read_markers(ckpt: Checkpoint) -> dict[str, LayerFormat]:
    """Layer name (as in the file) -> its format, from the header table and the `comfy_quant` markers.

    Unknown formats raise WeightsError naming the layer and the format.
    """
    confs: dict[str, object] = {}
    raw = ckpt.metadata.get("_quantization_metadata")
    if raw:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise WeightsError(f"{ckpt.source}: unreadable _quantization_metadata in the header ({e})") from None
        layers = meta.get("layers") if isinstance(meta, dict) else None
        if not isinstance(layers, dict):
            raise WeightsError(f'{ckpt.source}: _quantization_metadata has no "layers" table')
        confs.update(layers)
    for key in ckpt.keys():
        if key.endswith(".comfy_quant"):
            try:
                confs[key[: -len(".comfy_quant")]] = json.loads(bytes(ckpt.get(key).tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeightsError(f"{ckpt.source}: unreadable quantisation marker {key} ({e})") from None
    out = {}
    for name, conf in confs.items():
        try:
            out[name] = qf.parse_marker(conf)
        except ValueError as e:
            fmt = conf.get("format", conf) if isinstance(conf, dict) else conf
            raise WeightsError(
                f"{ckpt.source}: layer {name} uses the quantisation format {fmt!r}, which this loader cannot read "
                f"({e}). {_FIX}"
            ) from None
    return out


def check_formats(ckpt: Checkpoint, plan: LoadPlan, rename: Callable[[str], str | None]) -> None:
    """Check each marked layer's weight against its format; record the non-fp8 ones in `plan.formats`."""
    for name, fmt in read_markers(ckpt).items():
        mkey = rename(name + ".weight")
        if mkey is None:
            continue
        layer = mkey[: -len(".weight")]
        got = ckpt.info(plan.names[mkey]).dtype if mkey in plan.names else None
        want = getattr(torch, fmt.name) if fmt.is_fp8 else _STORED[fmt.name]
        if got != want:
            raise WeightsError(
                f"{ckpt.source}: the quantisation metadata lists {name} as {fmt.name} but its weight is "
                f"{got or 'no weight'}; the file is inconsistent, re-download it"
            )
        if fmt.is_fp8:
            continue
        plan.fp8_layers.pop(layer, None)  # an mxfp8 weight is fp8 data but not a per-tensor fp8 layer
        plan.formats[layer] = fmt
        needed = {"weight_scale": plan.scales} | ({"weight_scale_2": plan.scales2} if fmt.name == "nvfp4" else {})
        for suffix, table in needed.items():
            if layer not in table:
                raise WeightsError(f"{ckpt.source}: {name} is {fmt.name} but has no {suffix}; re-download the file")
        if fmt.name == "nvfp4":  # the plan's shapes are logical ones (config inference reads them)
            rows, half = plan.shapes[mkey]
            plan.shapes[mkey] = (rows, 2 * half)


def storage_shape_ok(plan: LoadPlan, ckpt: Checkpoint, key: str, expected: tuple[int, ...]) -> bool:
    """Whether the file's tensor for model key `key` has the shape the model expects (storage shape if quantised)."""
    layer = key[: -len(".weight")] if key.endswith(".weight") else None
    fmt = plan.formats.get(layer or "")
    if fmt is None or len(expected) != 2:
        return tuple(plan.shapes[key]) == tuple(expected)
    want = qf.storage_layout(fmt, expected[0], expected[1])["weight"][0]
    return tuple(ckpt.info(plan.names[key]).shape) == want


def scale_shapes(plan: LoadPlan, ckpt: Checkpoint, layers: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """int8 layers' scale shapes as their module holds them: () or (out, 1); `layers` maps name -> logical shape."""
    out: dict[str, tuple[int, ...]] = {}
    for layer, fmt in plan.formats.items():
        if fmt.name == "int8_tensorwise" and layer in layers:
            n = torch.Size(ckpt.info(plan.scales[layer]).shape).numel()
            rows = layers[layer][0]
            if n not in (1, rows):
                raise WeightsError(
                    f"{ckpt.source}: {plan.scales[layer]} has {n} values; expected a scalar or one per output row "
                    f"({rows}). The file is inconsistent, re-download it"
                )
            out[layer] = () if n == 1 else (rows, 1)
    return out


def scale_state(
    plan: LoadPlan, ckpt: Checkpoint, layer: str, module: torch.nn.Module, dev: torch.device
) -> dict[str, Tensor]:
    """The scale tensors of one int8 / mxfp8 / nvfp4 layer for `load_state_dict`, read as stored."""
    fmt = plan.formats[layer]
    out = {}
    for suffix, table in (("weight_scale", plan.scales), ("weight_scale_2", plan.scales2)):
        want = getattr(module, suffix)
        if want is None:
            continue
        key = table[layer]
        if fmt.name in ("int8_tensorwise",) or suffix == "weight_scale_2":
            t = ckpt.read(key, torch.float32, dev).reshape(want.shape)
        else:
            t = ckpt.read(key, None, dev)
            t = t.view(want.dtype) if t.dtype.itemsize == 1 else t
            if tuple(t.shape) != tuple(want.shape) and t.numel() == want.numel():
                t = t.reshape(want.shape)
        if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
            raise WeightsError(
                f"{ckpt.source}: {key} is {t.dtype} {list(ckpt.info(key).shape)}; a {fmt.name} layer of this size "
                f"needs {want.dtype} {list(want.shape)}. The file is inconsistent, re-download it"
            )
        out[f"{layer}.{suffix}"] = t
    return out


def dequantize_at_load(
    plan: LoadPlan, ckpt: Checkpoint, layer: str, shape: tuple[int, ...], dtype: torch.dtype, dev: torch.device
) -> Tensor:
    """A quantised tensor outside a Linear (e.g. an int8 embedding table): dequantised once, here, to `dtype`."""
    fmt = plan.formats[layer]
    w = ckpt.read(plan.names[layer + ".weight"])
    scale = ckpt.read(plan.scales[layer])
    scale2 = ckpt.read(plan.scales2[layer], torch.float32) if fmt.name == "nvfp4" else None
    return qf.dequantize(fmt, w, scale, scale2, dtype, (shape[0], shape[1])).to(dev)


def comfy_state_dict(module: torch.nn.Module) -> dict[str, Tensor]:
    """`module`'s tensors in ComfyUI's file layout: quantised Linears as weight, scales and a `comfy_quant` marker.

    Saved with safetensors, this is the file ComfyUI (and this loader) reads back; after quantising on load it
    holds exactly the tensors comfy-kitchen's quantiser makes from the same weights.
    """
    from .quant import Fp8Linear

    out = dict(module.state_dict())
    for name, m in module.named_modules():
        if isinstance(m, Fp8Linear):
            if m.fmt.name == "int8_tensorwise" and m.weight_scale.numel() > 1:
                out[f"{name}.weight_scale"] = m.weight_scale.reshape(-1, 1)
            out[f"{name}.comfy_quant"] = qf.marker_tensor(m.fmt)
    return {k: v.contiguous() for k, v in out.items()}


__all__ = [
    "FP8_NAMES",
    "check_formats",
    "dequantize_at_load",
    "read_markers",
    "scale_shapes",
    "scale_state",
    "storage_shape_ok",
]
