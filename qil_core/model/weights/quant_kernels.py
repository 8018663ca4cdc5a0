"""comfy-kitchen's quantised matmul kernels for Fp8Linear layers, with the portable path as the fallback.

ComfyUI installs comfy-kitchen (Apache-2.0) with itself; where it is importable and the weights are on CUDA,
`enable_quant_kernels(model)` switches the quantised Linear layers to its kernels instead of dequantising the
weight per call:

- int8_tensorwise (with or without ConvRot): W8A8 INT8, the activations rotated and quantised per row on the
  fly (`comfy_kitchen.int8_linear`);
- nvfp4: activations quantised to NVFP4, then the block-scaled FP4 matmul (`scaled_mm_nvfp4`, Blackwell);
- mxfp8: activations quantised to MXFP8, then `scaled_mm_mxfp8`;
- fp8: `torch._scaled_mm` (Fp8Linear.use_scaled_mm), as before.

A kernel that fails (an unsupported card, a shape it rejects, an old comfy-kitchen) logs one warning and puts
that layer back on the portable path for good, so a run never breaks because of the faster path. Backends:
"portable" (never use kernels), "comfy-kitchen" (use them wherever comfy-kitchen imports, CPU included: its
eager reference runs there, which is how the tests exercise this dispatch) and "auto" (comfy-kitchen on CUDA
only, where it is faster).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ...errors import InputError

if TYPE_CHECKING:
    from .quant import Fp8Linear

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "portable", "comfy-kitchen")
KITCHEN = "comfy-kitchen"


def load_kitchen() -> ModuleType | None:
    """comfy_kitchen when it imports, else None (never raises)."""
    try:
        return importlib.import_module("comfy_kitchen")
    except Exception as e:  # noqa: BLE001 - a broken optional install must not stop a run
        logger.debug("comfy-kitchen is not usable: %s", e)
        return None


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend layers on `device` get: "comfy-kitchen" or "portable"."""
    if backend not in BACKENDS:
        raise InputError(f"quant kernel backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "portable":
        return "portable"
    if backend == "auto" and torch.device(device).type != "cuda":
        return "portable"
    if load_kitchen() is None:
        if backend == KITCHEN:
            logger.warning("comfy-kitchen is not installed: quantised layers are dequantised per layer instead")
        return "portable"
    return KITCHEN


def enable_quant_kernels(model: nn.Module, backend: str = "auto", *, device: torch.device | str | None = None) -> int:
    """Set the kernel backend of every quantised Linear of `model`; return how many use comfy-kitchen."""
    from .quant import Fp8Linear  # noqa: F811 - at run time (quant imports this module lazily)

    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    if not layers:
        return 0
    where = torch.device(device) if device is not None else layers[0].weight.device
    chosen = resolve_backend(backend, where)
    for layer in layers:
        layer.kernel = chosen
    logger.info("%d quantised Linear layers: %s matmuls", len(layers), chosen)
    return len(layers) if chosen == KITCHEN else 0


def kernel_forward(layer: Fp8Linear, x: Tensor) -> Tensor | None:
    """The layer's output from comfy-kitchen's kernel, or None to use the portable path (then for good)."""
    ck = load_kitchen()
    try:
        if ck is None:
            raise RuntimeError("comfy-kitchen is not importable")
        return _KERNELS[layer.fmt.name](ck, layer, x)
    except Exception as e:  # noqa: BLE001 - any kernel failure falls back to the exact portable path
        key = (layer.fmt.name, x.device.type, type(e).__name__)
        log = logger.debug if key in _WARNED else logger.warning
        _WARNED.add(key)
        log(
            "comfy-kitchen kernel for %s layers failed on %s (%s); those layers dequantise per call instead "
            "(first: %dx%d)", layer.fmt.name, x.device.type, e, layer.out_features, layer.in_features,
        )  # fmt: skip
        layer.kernel = "portable"
        return None


_WARNED: set[tuple[str, str, str]] = set()  # (format, device type, error) already reported


def _bias(layer: Fp8Linear, x: Tensor) -> Tensor | None:
    return layer.bias.to(x.dtype) if layer.bias is not None else None


def _int8(ck: ModuleType, layer: Fp8Linear, x: Tensor) -> Tensor:
    fmt = layer.fmt
    scale = layer.weight_scale.float().reshape(-1)
    return ck.int8_linear(
        x, layer.weight, scale, _bias(layer, x), x.dtype, convrot=fmt.convrot, convrot_groupsize=fmt.group_size
    )


def _fp8(ck: ModuleType, layer: Fp8Linear, x: Tensor) -> Tensor:
    if not layer._scaled_mm_ok(x):
        raise RuntimeError("no fp8 matmul for this layout or dtype")
    return layer._forward_scaled_mm(x)


def _padded_rows(x2: Tensor, multiple: int) -> tuple[Tensor, int]:
    rows, cols = x2.shape
    pr, pc = -(-rows // multiple) * multiple, -(-cols // multiple) * multiple
    if (pr, pc) != (rows, cols):
        x2 = torch.nn.functional.pad(x2, (0, pc - cols, 0, pr - rows))
    return x2, rows


def _nvfp4(ck: ModuleType, layer: Fp8Linear, x: Tensor) -> Tensor:
    x2, rows = _padded_rows(x.reshape(-1, x.shape[-1]), 16)
    x_scale = (x2.abs().amax().float() / (448.0 * 6.0)).clamp(min=torch.finfo(torch.float32).tiny)
    qx, bx = ck.quantize_nvfp4(x2, x_scale)
    w_blocks = layer.weight_scale.view(torch.float8_e4m3fn)
    y = ck.scaled_mm_nvfp4(
        qx, layer.weight, tensor_scale_a=x_scale, tensor_scale_b=layer.weight_scale_2,
        block_scale_a=bx, block_scale_b=w_blocks, bias=None, out_dtype=x.dtype,
    )  # fmt: skip
    return _finish(layer, x, y, rows)


def _mxfp8(ck: ModuleType, layer: Fp8Linear, x: Tensor) -> Tensor:
    x2, rows = _padded_rows(x.reshape(-1, x.shape[-1]), 32)
    qx, bx = ck.quantize_mxfp8(x2)
    w_blocks = layer.weight_scale.view(torch.float8_e8m0fnu)
    y = ck.scaled_mm_mxfp8(qx, layer.weight, bx, w_blocks, bias=None, out_dtype=x.dtype)
    return _finish(layer, x, y, rows)


def _finish(layer: Fp8Linear, x: Tensor, y: Tensor, rows: int) -> Tensor:
    y = y[:rows, : layer.out_features]
    bias = _bias(layer, x)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], layer.out_features)


_KERNELS = {
    "int8_tensorwise": _int8, "float8_e4m3fn": _fp8, "float8_e5m2": _fp8, "nvfp4": _nvfp4, "mxfp8": _mxfp8,
}  # fmt: skip

__all__ = ["BACKENDS", "enable_quant_kernels", "kernel_forward", "load_kitchen", "resolve_backend"]
