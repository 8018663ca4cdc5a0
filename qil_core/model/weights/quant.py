"""Quantised weights kept quantised in memory and dequantised per layer at matmul time (model_spec.md §7.2).

`Fp8Linear` (alias `QuantLinear`) holds any of ComfyUI's Linear formats (quant_formats.py: fp8, int8_tensorwise
with or without ConvRot, mxfp8, nvfp4) as stored in the file; the fp8 conventions follow.

File format, as ComfyUI writes it (QUANTIZATION.md, `comfy/utils.py: convert_old_quants`): a quantised Linear
stores `<layer>.weight` in float8_e4m3fn (or e5m2) and `<layer>.weight_scale` (fp32 scalar, dequantised
weight = w_fp8 * scale), optionally `<layer>.input_scale`; the header's `_quantization_metadata` JSON lists
the layers. Dequantising to the activations' dtype works on any device, CPU included, because the fp8 values
are exactly representable in fp16/bf16/fp32; only one layer's dequantised weight exists at a time.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Collection, Iterable, Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import quant_formats as qf
from .quant_formats import LayerFormat

logger = logging.getLogger(__name__)

FP8_FORMATS: dict[str, torch.dtype] = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
FP8_DTYPES: tuple[torch.dtype, ...] = tuple(FP8_FORMATS.values())
FP8_MAX: dict[torch.dtype, float] = {dt: float(torch.finfo(dt).max) for dt in FP8_DTYPES}  # 448, 57344
# Quantise-on-load choices (CLI --quant, the loader node's weight dtype) -> the format each layer gets.
_UNROTATED_INT8 = LayerFormat("int8_tensorwise")  # ConvRot's weight without the rotation back (see forward)
QUANT_CHOICES: dict[str, LayerFormat] = {
    "fp8": LayerFormat("float8_e4m3fn"),
    "int8-convrot": LayerFormat("int8_tensorwise", convrot=True, group_size=256),
    "int8": LayerFormat("int8_tensorwise"),
    "mxfp8": LayerFormat("mxfp8"),
    "nvfp4": LayerFormat("nvfp4"),
}


def is_fp8(dtype: torch.dtype) -> bool:
    """True for the two fp8 storage dtypes this module handles."""
    return dtype in FP8_DTYPES


def _scale_for(weight_shape: torch.Size | tuple[int, ...], scale: Tensor) -> Tensor:
    # Per-tensor scales broadcast as they are; per-output-row scales (out,) need a trailing axis.
    if scale.ndim == 1 and scale.numel() == weight_shape[0] and scale.numel() != 1:
        return scale.view(-1, 1)
    return scale


def dequantize_fp8(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """w_fp8 (out, in) * scale -> (out, in) in `dtype`; the product is formed in fp32 with the fp32 scale."""
    # fp8 -> dtype is exact; the product is rounded once into `dtype`. Scaling in place keeps one full-size
    # temporary per call instead of two (150 MB per 3072x12288 layer in bf16).
    w = weight.to(dtype)
    if w.data_ptr() == weight.data_ptr():  # already in `dtype`: never scale the stored weight itself
        w = w.clone()
    return w.mul_(_scale_for(weight.shape, scale))


def quantize_tensor_fp8(w: Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    """Per-tensor absmax quantisation: w (any shape) -> (w_fp8 same shape, fp32 scalar scale = absmax / fp8 max)."""
    if not is_fp8(fp8_dtype):
        raise ValueError(f"fp8_dtype must be one of {list(FP8_FORMATS)}, got {fp8_dtype}")
    fmax = FP8_MAX[fp8_dtype]
    absmax = w.detach().abs().amax().float()
    if not torch.isfinite(absmax):
        raise ValueError(f"cannot quantise a tensor of shape {tuple(w.shape)} holding NaN or inf")
    # An all-zero tensor keeps scale 1 so dequantisation stays exact and nothing divides by zero.
    scale = torch.where(absmax > 0, absmax / fmax, torch.ones_like(absmax))
    # Clamp because rounding w / scale can land a hair above the largest finite fp8 value.
    w_fp8 = (w.detach().float() / scale).clamp_(-fmax, fmax).to(fp8_dtype)
    return w_fp8, scale


class Fp8Linear(nn.Module):
    """Linear layer with a quantised weight, its scales and a bias: (..., in) -> (..., out).

    `fmt` (default: per-tensor fp8 of `weight_dtype`) says how the weight is stored (quant_formats.py). The
    weight and scales are buffers/parameters in their stored dtypes, so moving the module (block swap, offload)
    moves the quantised bytes. A forward dequantises the weight to the activations' dtype for that call only,
    unless `kernel` is "comfy-kitchen" (quant_kernels.py: fused quantised matmuls, falling back to this path).
    """

    weight_scale: Tensor
    weight_scale_2: Tensor | None
    input_scale: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_dtype: torch.dtype = torch.float8_e4m3fn,
        scale_shape: tuple[int, ...] = (),
        has_input_scale: bool = False,
        bias_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        fmt: LayerFormat | None = None,
    ) -> None:
        super().__init__()
        if fmt is None:
            if not is_fp8(weight_dtype):
                raise ValueError(f"Fp8Linear needs an fp8 weight dtype, got {weight_dtype}")
            fmt = LayerFormat(str(weight_dtype).removeprefix("torch."))
        self.fmt = fmt
        self.in_features, self.out_features = in_features, out_features
        layout = qf.storage_layout(fmt, out_features, in_features)
        if fmt.is_fp8 or fmt.name == "int8_tensorwise":
            layout["weight_scale"] = (scale_shape, torch.float32)
        shape, dt = layout["weight"]
        self.weight = nn.Parameter(torch.zeros(shape, device=device).to(dt), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device)) if bias else None
        for name in ("weight_scale", "weight_scale_2"):
            shape, dt = layout.get(name, ((), torch.float32))
            self.register_buffer(name, torch.ones(shape, device=device).to(dt) if name in layout else None)
        input_scale = torch.ones((), dtype=torch.float32, device=device) if has_input_scale else None
        self.register_buffer("input_scale", input_scale)
        # fp8 x fp8 matmul (torch._scaled_mm) also quantises the activations: faster on sm89+, less exact.
        self.use_scaled_mm = False
        self.kernel = "portable"  # or "comfy-kitchen" (quant_kernels.enable_quant_kernels)

    def extra_repr(self) -> str:
        """Sizes and the storage format, for print(model)."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight_dtype={self.weight.dtype}, format={self.fmt.name}{' convrot' if self.fmt.convrot else ''}"
        )

    def _apply(self, fn, recurse: bool = True):
        # `module.to(dtype)` must not turn the quantised weight or its scales into the compute dtype.
        keep = {id(t): t.dtype for t in (self.weight, self.weight_scale, self.weight_scale_2, self.input_scale)
                if t is not None}  # fmt: skip

        def fn_keep(t: Tensor) -> Tensor:
            out = fn(t)
            want = keep.get(id(t))
            return out.to(want) if want is not None and out.dtype != want else out

        return super()._apply(fn_keep, recurse)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight as (out, in) in `dtype`, dequantised as comfy-kitchen's reference does for its format."""
        if self.fmt.is_fp8:
            return dequantize_fp8(self.weight, self.weight_scale, dtype)
        shape = (self.out_features, self.in_features)
        return qf.dequantize(self.fmt, self.weight, self.weight_scale, self.weight_scale_2, dtype, shape)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out) in x's dtype; the weight is dequantised to that dtype for this call only."""
        if self.kernel != "portable":
            from .quant_kernels import kernel_forward

            y = kernel_forward(self, x)
            if y is not None:
                return y
        if self.use_scaled_mm and self._scaled_mm_ok(x):
            return self._forward_scaled_mm(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.fmt.convrot and x.numel() < self.out_features * self.in_features:
            # Fewer rows than outputs: rotate the activations, not the weight (same product; quant_formats).
            plain = qf.dequantize_int8(self.weight, self.weight_scale, x.dtype, _UNROTATED_INT8)
            return F.linear(qf.rotate_activations(x, self.fmt.group_size), plain, bias)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def dequant_transient_bytes(self, dtype: torch.dtype) -> int:
        """Peak extra bytes of one portable forward's dequantisation to `dtype` (memory_plan reads this)."""
        return self.in_features * self.out_features * dequant_bytes_per_value(self.fmt, dtype)

    def _scaled_mm_ok(self, x: Tensor) -> bool:
        return (
            hasattr(torch, "_scaled_mm")
            and self.fmt.name == "float8_e4m3fn"
            and self.weight_scale.numel() == 1
            and x.dtype in (torch.bfloat16, torch.float16)
            and self.in_features % 16 == 0
            and self.out_features % 16 == 0
        )

    def _forward_scaled_mm(self, x: Tensor) -> Tensor:
        fmax = FP8_MAX[torch.float8_e4m3fn]
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        if self.input_scale is not None:
            x_scale = self.input_scale.reshape(()).float()
        else:
            x_scale = (x2.abs().amax().float() / fmax).clamp_(min=torch.finfo(torch.float32).tiny)
        x_fp8 = (x2.float() / x_scale).clamp_(-fmax, fmax).to(torch.float8_e4m3fn)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        y = torch._scaled_mm(
            x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.reshape(()).float(),
            bias=bias, out_dtype=x.dtype,
        )  # fmt: skip
        return y.reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, fp8_dtype: torch.dtype = torch.float8_e4m3fn, *, fmt: LayerFormat | None = None
    ) -> Fp8Linear:
        """Quantise a loaded nn.Linear (fp8: per-tensor absmax scale; other formats: quantise_weight)."""
        fmt = fmt or LayerFormat(str(fp8_dtype).removeprefix("torch."))
        tensors = quantize_weight(linear.weight.detach(), fmt)
        bias_dtype = linear.bias.dtype if linear.bias is not None else linear.weight.dtype
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            scale_shape=tuple(tensors["weight_scale"].shape), bias_dtype=bias_dtype, device="meta", fmt=fmt,
        )  # fmt: skip
        layer.weight = nn.Parameter(tensors.pop("weight"), requires_grad=False)
        for name, t in tensors.items():
            setattr(layer, name, t)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer


QuantLinear = Fp8Linear


def quantize_weight(w: Tensor, fmt: LayerFormat) -> dict[str, Tensor]:
    """A high-precision (out, in) weight -> the tensors a `fmt` Linear stores, as ComfyUI's quantiser makes them.

    int8: one scale per row (ConvRot needs it, and plain int8 loses less with it); nvfp4: per-tensor scale
    absmax / (448 * 6); mxfp8 and nvfp4 pad to their block multiples.
    """
    if fmt.is_fp8:
        q, scale = quantize_tensor_fp8(w, getattr(torch, fmt.name))
        return {"weight": q, "weight_scale": scale}
    if fmt.name == "int8_tensorwise":
        q, scale = qf.quantize_int8(w, convrot=fmt.convrot, group_size=fmt.group_size)
        return {"weight": q, "weight_scale": scale}
    if fmt.name == "mxfp8":
        q, scales = qf.quantize_mxfp8(w)
        return {"weight": q, "weight_scale": scales}
    q, scales, tensor_scale = qf.quantize_nvfp4(w)
    return {"weight": q, "weight_scale": scales, "weight_scale_2": tensor_scale}


def fits_format(fmt: LayerFormat, in_features: int) -> bool:
    """False where a Linear cannot take `fmt` (ConvRot needs the inputs to be a multiple of its group size)."""
    return not fmt.convrot or in_features % fmt.group_size == 0


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def swap_fp8_linears(
    module: nn.Module,
    fp8_keys: Collection[str],
    *,
    weight_dtypes: Mapping[str, torch.dtype] | None = None,
    scale_shapes: Mapping[str, tuple[int, ...]] | None = None,
    input_scale_keys: Collection[str] = (),
    formats: Mapping[str, LayerFormat] | None = None,
) -> list[str]:
    """Replace the nn.Linear modules named in `fp8_keys` (e.g. "transformer_blocks.0.attn.to_q") by Fp8Linear.

    `formats` gives layers stored in another format (int8_tensorwise, mxfp8, nvfp4) their LayerFormat; the
    others are fp8 of `weight_dtypes`.

    The replacements are built on the device of the Linear they replace (normally "meta", before
    `load_state_dict(assign=True)`); returns the swapped names. Raises ValueError for a name that is not a Linear.
    """
    swapped = []
    for name in sorted(fp8_keys):
        old = module.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{name} is a {type(old).__name__}, not a Linear; it cannot hold an fp8 weight")
        new = Fp8Linear(
            old.in_features, old.out_features, old.bias is not None,
            weight_dtype=(weight_dtypes or {}).get(name, torch.float8_e4m3fn),
            scale_shape=(scale_shapes or {}).get(name, ()),
            has_input_scale=name in input_scale_keys,
            bias_dtype=old.bias.dtype if old.bias is not None else old.weight.dtype,
            device=old.weight.device, fmt=(formats or {}).get(name),
        )  # fmt: skip
        _set_submodule(module, name, new)
        swapped.append(name)
    return swapped


# Transformer layers kept in the compute dtype when quantising on load: the small input/output projections and
# the timestep MLP (about 0.2% of the weights), which see every token and the noise level.
TRANSFORMER_FP8_SKIP = ("img_in", "txt_in", "proj_out", "norm_out.*", "time_text_embed.*")


def quantize_module_fp8(
    module: nn.Module,
    *,
    skip: Iterable[str] = (),
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    device: torch.device | str | None = None,
    fmt: LayerFormat | str | None = None,
) -> list[str]:
    """Quantise every nn.Linear of a loaded module in place; return the quantised names.

    The format is per-tensor fp8 of `fp8_dtype`, or `fmt` (a LayerFormat or a QUANT_CHOICES name such as
    "int8-convrot"). `skip` holds fnmatch patterns on qualified module names (e.g. "proj_out", "*.img_mod.*");
    matching layers stay in high precision, as do layers the format cannot take (fits_format). Each layer is
    swapped as soon as it is quantised, so peak extra memory is one layer. With `device`, each layer is moved
    there before quantising (e.g. a memory-mapped CPU model quantised straight onto the GPU, never holding the
    high-precision model there).
    """
    if isinstance(fmt, str):
        fmt = QUANT_CHOICES[fmt] if fmt in QUANT_CHOICES else qf.parse_marker(fmt)
    fmt = fmt or LayerFormat(str(fp8_dtype).removeprefix("torch."))
    patterns = tuple(skip)
    names = [
        n for n, m in module.named_modules()
        if isinstance(m, nn.Linear) and not any(fnmatch.fnmatchcase(n, p) for p in patterns)
    ]  # fmt: skip
    unfit = [n for n in names if not fits_format(fmt, cast(nn.Linear, module.get_submodule(n)).in_features)]
    if unfit:
        logger.info("%d Linear layers cannot take %s and stay in high precision (e.g. %s)", len(unfit), fmt, unfit[0])
        names = [n for n in names if n not in unfit]
    before = after = 0
    for name in names:
        old = cast(nn.Linear, module.get_submodule(name))
        before += old.weight.numel() * old.weight.element_size()
        if device is not None:
            old = old.to(device)
        new = Fp8Linear.from_linear(old, fmt=fmt)
        after += sum(t.numel() * t.element_size() for t in (new.weight, new.weight_scale, new.weight_scale_2)
                     if t is not None)  # fmt: skip
        _set_submodule(module, name, new)
    logger.info("quantised %d Linear layers to %s: %.1f MB -> %.1f MB", len(names), fmt.name, before / 1e6, after / 1e6)
    return names


def dequant_bytes_per_value(fmt: LayerFormat, dtype: torch.dtype) -> int:
    """Transient bytes per weight value while the portable path dequantises one layer to `dtype` (peak).

    fp8: the cast and the scaled copy; int8 / mxfp8: the fp32 data scaled in place, then the cast (ConvRot: the
    rotated fp32 copy beside it); nvfp4: the unpacked codes (int32 indices) and the values, scaled in place.
    """
    item = dtype.itemsize
    if fmt.is_fp8:
        return 2 * item
    if fmt.convrot:
        return 8 + item
    return 5 + item if fmt.name == "nvfp4" else 4 + item


def transformer_bytes(fmt: str = "bf16", shapes: Mapping[str, tuple[int, ...]] | None = None) -> int:
    """Bytes of the transformer's weights stored in `fmt` ("bf16", "fp16", "fp32" or a ComfyUI format such as
    "int8_tensorwise", "mxfp8", "nvfp4", "float8_e4m3fn"), its Linear layers quantised except TRANSFORMER_FP8_SKIP
    and everything else in bf16, as quantise-on-load keeps them. `shapes` (key -> shape) defaults to the real 20B
    transformer's, built on the meta device.
    """
    if shapes is None:
        from ..arch.config import TransformerConfig
        from ..arch.transformer import QwenImageLayeredTransformer

        with torch.device("meta"):
            model = QwenImageLayeredTransformer(TransformerConfig())
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    total = 0
    for key, shape in shapes.items():
        layer = key[: -len(".weight")]
        if (
            fmt not in ("bf16", "fp16", "fp32")
            and key.endswith(".weight")
            and len(shape) == 2
            and not any(fnmatch.fnmatchcase(layer, p) for p in TRANSFORMER_FP8_SKIP)
        ):
            total += qf.weight_bytes(fmt, shape[0], shape[1])
        else:
            total += torch.Size(shape).numel() * (4 if fmt == "fp32" else 2)
    return total


def is_quantized(module: nn.Module) -> bool:
    """True when any Linear of `module` keeps a quantised weight (any format)."""
    return any(isinstance(m, Fp8Linear) for m in module.modules())
