"""fp8 weights kept as fp8 in memory and dequantised per layer at matmul time (model_spec.md §7.2).

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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

FP8_FORMATS: dict[str, torch.dtype] = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
FP8_DTYPES: tuple[torch.dtype, ...] = tuple(FP8_FORMATS.values())
FP8_MAX: dict[torch.dtype, float] = {dt: float(torch.finfo(dt).max) for dt in FP8_DTYPES}  # 448, 57344


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
    """Linear layer with an fp8 weight (out, in), an fp32 `weight_scale` and a bias: (..., in) -> (..., out)."""

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
    ) -> None:
        super().__init__()
        if not is_fp8(weight_dtype):
            raise ValueError(f"Fp8Linear needs an fp8 weight dtype, got {weight_dtype}")
        self.in_features, self.out_features = in_features, out_features
        w = torch.zeros(out_features, in_features, device=device).to(weight_dtype)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device)) if bias else None
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        input_scale = torch.ones((), dtype=torch.float32, device=device) if has_input_scale else None
        self.register_buffer("input_scale", input_scale)
        # fp8 x fp8 matmul (torch._scaled_mm) also quantises the activations: faster on sm89+, less exact.
        self.use_scaled_mm = False

    def extra_repr(self) -> str:
        """Sizes and the fp8 storage dtype, for print(model)."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight_dtype={self.weight.dtype}"
        )

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # `module.to(dtype)` must not turn the fp8 weight or the fp32 scales into the compute dtype.
        keep = {id(self.weight): self.weight.dtype, id(self.weight_scale): torch.float32}
        if self.input_scale is not None:
            keep[id(self.input_scale)] = torch.float32

        def fn_keep(t: Tensor) -> Tensor:
            out = fn(t)
            want = keep.get(id(t))
            return out.to(want) if want is not None and out.dtype != want else out

        return super()._apply(fn_keep, recurse)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight as (out, in) in `dtype`: w_fp8 * weight_scale."""
        return dequantize_fp8(self.weight, self.weight_scale, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out) in x's dtype; the weight is dequantised to that dtype for this call only."""
        if self.use_scaled_mm and self._scaled_mm_ok(x):
            return self._forward_scaled_mm(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _scaled_mm_ok(self, x: Tensor) -> bool:
        return (
            hasattr(torch, "_scaled_mm")
            and self.weight.dtype == torch.float8_e4m3fn
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
    def from_linear(cls, linear: nn.Linear, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> Fp8Linear:
        """Quantise a loaded nn.Linear (per-tensor absmax scale); the bias keeps its dtype."""
        w_fp8, scale = quantize_tensor_fp8(linear.weight, fp8_dtype)
        bias_dtype = linear.bias.dtype if linear.bias is not None else linear.weight.dtype
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            weight_dtype=fp8_dtype, bias_dtype=bias_dtype, device="meta",
        )  # fmt: skip
        layer.weight = nn.Parameter(w_fp8, requires_grad=False)
        layer.weight_scale = scale
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer


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
) -> list[str]:
    """Replace the nn.Linear modules named in `fp8_keys` (e.g. "transformer_blocks.0.attn.to_q") by Fp8Linear.

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
            device=old.weight.device,
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
) -> list[str]:
    """Quantise every nn.Linear of a loaded module in place (per-tensor fp8); return the quantised names.

    `skip` holds fnmatch patterns on qualified module names (e.g. "proj_out", "*.img_mod.*"); matching
    layers stay in high precision. Each layer is swapped as soon as it is quantised, so peak extra memory is
    one layer. With `device`, each layer is moved there before quantising (e.g. a memory-mapped CPU model
    quantised straight onto the GPU, never holding the high-precision model there).
    """
    patterns = tuple(skip)
    names = [
        n for n, m in module.named_modules()
        if isinstance(m, nn.Linear) and not any(fnmatch.fnmatchcase(n, p) for p in patterns)
    ]  # fmt: skip
    before = after = 0
    for name in names:
        old = module.get_submodule(name)
        before += old.weight.numel() * old.weight.element_size()
        if device is not None:
            old = old.to(device)
        new = Fp8Linear.from_linear(old, fp8_dtype)
        after += new.weight.numel()
        _set_submodule(module, name, new)
    logger.info(
        "quantised %d Linear layers to %s: %.1f MB -> %.1f MB", len(names), fp8_dtype, before / 1e6, after / 1e6
    )
    return names
