"""ComfyUI's quantised Linear formats: their on-disk layout, dequantisation and quantisation (model_spec.md §7.2).

ComfyUI marks each quantised layer with `<layer>.comfy_quant`, a uint8 tensor holding JSON such as
`{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 256}`, and stores (out = output
features, in = input features):

- `float8_e4m3fn` / `float8_e5m2`: weight (out, in) in fp8, `weight_scale` fp32 scalar or one per row
  (dequantised in quant.py, as before);
- `int8_tensorwise`: weight (out, in) int8, `weight_scale` fp32 scalar or one per row ((out, 1) or (out,));
  weight = q * scale. With `convrot` the rows were rotated before quantising, group by group along the input
  features, by the normalised "regular" Hadamard matrix H of size `convrot_groupsize` (a power of 4, built as
  Kronecker powers of a symmetric 4x4 +-1 matrix): stored = round((W Hᵀ) / scale), so W = (q * scale) H.
- `mxfp8`: weight (out, in) float8_e4m3fn, both sides zero-padded to multiples of 32 when needed, and
  `weight_scale` one power-of-two (E8M0: 2^(e - 127), e = 0 meaning 0) per 32 consecutive inputs;
- `nvfp4`: weight (out, in / 2) uint8 holding two E2M1 codes per byte (the even column in the high nibble),
  sides padded to multiples of 16; `weight_scale` one float8_e4m3fn scale per 16 inputs and `weight_scale_2`
  an fp32 per-tensor scale: weight = e2m1 * (block scale * tensor scale), formed in the output dtype.

Block scales are stored in cuBLAS's swizzled layout: the (rows, blocks) scale matrix is zero-padded to
multiples of (128, 4) and each 128 x 4 tile is stored as 32 x 16 with element [i, 4 j + k] = tile[32 j + i, k].

The arithmetic follows comfy-kitchen's portable (eager) reference step by step, so the results are bit-identical
to it (tests/test_quant_formats.py): int8 products in fp32, then rotated in fp32, then rounded once to the
output dtype; mxfp8 in fp32; nvfp4 in the output dtype.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

FP8_NAMES = ("float8_e4m3fn", "float8_e5m2")
FORMATS = (*FP8_NAMES, "int8_tensorwise", "mxfp8", "nvfp4")
MXFP8_BLOCK, NVFP4_BLOCK = 32, 16
F8_E4M3_MAX, F4_E2M1_MAX, E8M0_BIAS = 448.0, 6.0, 127
# E2M1 codes 0..7 are these magnitudes; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class LayerFormat:
    """A quantised Linear's format as its `comfy_quant` marker gives it."""

    name: str
    convrot: bool = False
    group_size: int = 256

    @property
    def is_fp8(self) -> bool:
        """Per-tensor / per-row fp8 (the formats quant.py read before the others)."""
        return self.name in FP8_NAMES

    def marker(self) -> dict[str, Any]:
        """The JSON ComfyUI writes into `<layer>.comfy_quant` for this format."""
        out: dict[str, Any] = {"format": self.name}
        if self.convrot:
            out.update(convrot=True, convrot_groupsize=self.group_size)
        return out


def parse_marker(conf: object) -> LayerFormat:
    """A `comfy_quant` JSON object (or a bare format string) -> LayerFormat; ValueError names what is wrong."""
    if isinstance(conf, str):
        conf = {"format": conf}
    if not isinstance(conf, dict):
        raise ValueError(f"a quantisation marker must be a JSON object, got {conf!r}")
    name = str(conf.get("format", ""))
    if name not in FORMATS:
        raise ValueError(f"the quantisation format {name!r} is unknown; supported: {', '.join(FORMATS)}")
    convrot = bool(conf.get("convrot", False))
    group = int(conf.get("convrot_groupsize", 256))
    if convrot and (name != "int8_tensorwise" or not is_power_of_4(group)):
        raise ValueError(f"convrot needs int8_tensorwise and a group size that is a power of 4, got {conf!r}")
    return LayerFormat(name, convrot, group)


def marker_tensor(fmt: LayerFormat) -> Tensor:
    """The uint8 tensor stored as `<layer>.comfy_quant`."""
    return torch.tensor(list(json.dumps(fmt.marker()).encode("utf-8")), dtype=torch.uint8)


def is_power_of_4(n: int) -> bool:
    """4, 16, 64, 256, ...: the sizes a regular Hadamard matrix has."""
    return n >= 4 and n & (n - 1) == 0 and (n.bit_length() - 1) % 2 == 0


def roundup(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def storage_layout(
    fmt: LayerFormat, out_features: int, in_features: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Suffix ("weight", "weight_scale", ...) -> (shape, dtype) of what a Linear of this format stores.

    fp8 and int8 scales may be scalars or per row; the shapes given here are the per-tensor ones.
    """
    if fmt.is_fp8:
        return {"weight": ((out_features, in_features), getattr(torch, fmt.name)), "weight_scale": ((), torch.float32)}
    if fmt.name == "int8_tensorwise":
        return {"weight": ((out_features, in_features), torch.int8), "weight_scale": ((), torch.float32)}
    if fmt.name == "mxfp8":
        rows, cols = roundup(out_features, MXFP8_BLOCK), roundup(in_features, MXFP8_BLOCK)
        return {
            "weight": ((rows, cols), torch.float8_e4m3fn),
            "weight_scale": ((roundup(rows, 128), roundup(cols // MXFP8_BLOCK, 4)), torch.uint8),
        }
    rows, cols = roundup(out_features, NVFP4_BLOCK), roundup(in_features, NVFP4_BLOCK)
    return {
        "weight": ((rows, cols // 2), torch.uint8),
        "weight_scale": ((roundup(rows, 128), roundup(cols // NVFP4_BLOCK, 4)), torch.float8_e4m3fn),
        "weight_scale_2": ((), torch.float32),
    }


def weight_bytes(fmt: str, out_features: int, in_features: int) -> int:
    """Bytes of one (out, in) Linear weight in `fmt` ("bf16", "fp16", "fp32" or a quantised format), with scales."""
    plain = {"bf16": 2, "fp16": 2, "fp32": 4}
    if fmt in plain:
        return plain[fmt] * out_features * in_features
    if fmt == "int8_tensorwise":  # one fp32 scale per row, as ComfyUI's files (and ConvRot) have them
        return out_features * in_features + 4 * out_features
    layout = storage_layout(parse_marker(fmt), out_features, in_features)
    return sum(torch.Size(s).numel() * dt.itemsize for s, dt in layout.values())


# --- swizzled block scales ---------------------------------------------------------------------------------


def swizzle(scales: Tensor) -> Tensor:
    """(rows, blocks) block scales -> cuBLAS's tiled layout, zero-padded to (128 k, 4 m), as a 2-D tensor."""
    rows, cols = scales.shape
    pr, pc = roundup(rows, 128), roundup(cols, 4)
    padded = scales.new_zeros((pr, pc))
    padded[:rows, :cols] = scales
    tiles = padded.view(pr // 128, 4, 32, pc // 4, 4)  # (row tile, j, i, col tile, k): row = 128 t + 32 j + i
    return tiles.permute(0, 3, 2, 1, 4).reshape(pr, pc)  # stored order: (row tile, col tile, i, j, k)


def unswizzle(stored: Tensor, rows: int, cols: int) -> Tensor:
    """The inverse of `swizzle`, cut to (rows, cols)."""
    pr, pc = roundup(rows, 128), roundup(cols, 4)
    if tuple(stored.shape) != (pr, pc) and stored.numel() == pr * pc:
        stored = stored.reshape(pr, pc)
    tiles = stored.reshape(pr // 128, pc // 4, 32, 4, 4)  # (row tile, col tile, i, j, k)
    return tiles.permute(0, 3, 2, 1, 4).reshape(pr, pc)[:rows, :cols]


def e8m0_to_float(e: Tensor) -> Tensor:
    """E8M0 exponents (uint8) -> fp32 2^(e - 127), with e = 0 read as 0 (as comfy-kitchen reads it)."""
    bits = e.to(torch.int32) << 23
    return torch.where(e == 0, torch.zeros_like(bits), bits).view(torch.float32)


# --- dequantisation ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _hadamard(size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    if not is_power_of_4(size):
        raise ValueError(f"a regular Hadamard matrix needs a power-of-4 size, got {size}")
    base = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=dtype, device=device)
    h = base
    while h.shape[0] < size:
        h = torch.kron(h, base)
    return h / (size**0.5)  # exact: the size is a power of 4


def hadamard(size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """The normalised regular (symmetric, orthogonal) Hadamard matrix ConvRot rotates with; cached."""
    return _hadamard(size, torch.device(device), dtype)


def rotate_groups(w: Tensor, group_size: int) -> Tensor:
    """W (out, in) -> W Hᵀ applied to each group of `group_size` inputs (H is its own inverse: rotating twice = W)."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"{in_f} input features are not a multiple of the ConvRot group size {group_size}")
    h = hadamard(group_size, w.device, w.dtype)
    return torch.matmul(w.reshape(out_f, in_f // group_size, group_size), h.T).reshape(out_f, in_f)


def rotate_activations(x: Tensor, group_size: int) -> Tensor:
    """x (..., in) -> x H per group of inputs, formed in fp32 and returned in x's dtype.

    With W = D H (D the unrotated dequantised ConvRot weight, H symmetric), x Wᵀ = (x H) Dᵀ: rotating the
    activations instead of the weight gives the same product, cheaper when there are fewer rows than outputs.
    """
    h = hadamard(group_size, x.device, torch.float32)
    grouped = x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    return torch.matmul(grouped, h).reshape(x.shape).to(x.dtype)


def _row_scale(scale: Tensor, rows: int) -> Tensor:
    scale = scale.float()
    return scale.reshape(rows, 1) if scale.numel() == rows and scale.numel() != 1 else scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype, fmt: LayerFormat) -> Tensor:
    """int8 (out, in) with a scalar or per-row scale -> (out, in) in `dtype`, rotated back for ConvRot."""
    w = q.float().mul_(_row_scale(scale, q.shape[0]))  # in place: one fp32 temporary, same bits
    if fmt.convrot:
        w = rotate_groups(w, fmt.group_size)
    return w.to(dtype)


def dequantize_mxfp8(q: Tensor, block_scales: Tensor, dtype: torch.dtype, shape: tuple[int, int]) -> Tensor:
    """Padded fp8 data with swizzled E8M0 block scales -> the (out, in) = `shape` weight in `dtype`."""
    rows, cols = q.shape
    nb = cols // MXFP8_BLOCK
    scales = e8m0_to_float(unswizzle(block_scales.view(torch.uint8), rows, nb))
    w = q.float().reshape(rows, nb, MXFP8_BLOCK).mul_(scales.unsqueeze(-1)).reshape(rows, cols).to(dtype)
    return w[: shape[0], : shape[1]]


@functools.lru_cache(maxsize=16)
def _e2m1_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The 16 E2M1 code values (sign bit high) in `dtype` on `device`: made once, not per layer and step (on CUDA a
    tensor built from a Python list is a host copy and a sync)."""
    return torch.tensor([*E2M1_VALUES, *(-v for v in E2M1_VALUES)], dtype=dtype, device=device)


def dequantize_nvfp4(
    q: Tensor, block_scales: Tensor, tensor_scale: Tensor, dtype: torch.dtype, shape: tuple[int, int]
) -> Tensor:
    """Packed E2M1 pairs with swizzled e4m3 block scales and an fp32 tensor scale -> (out, in) in `dtype`."""
    rows, cols = q.shape[0], q.shape[1] * 2
    nb = cols // NVFP4_BLOCK
    codes = torch.stack([q >> 4, q & 0x0F], dim=-1).reshape(rows, cols).int()
    values = _e2m1_table(dtype, q.device)[codes].reshape(rows, nb, NVFP4_BLOCK)
    del codes
    scales = unswizzle(block_scales.view(torch.float8_e4m3fn), rows, nb)
    total = tensor_scale.to(dtype) * scales.to(dtype)
    return values.mul_(total.unsqueeze(-1)).reshape(rows, cols)[: shape[0], : shape[1]]


def dequantize(
    fmt: LayerFormat, q: Tensor, scale: Tensor, scale2: Tensor | None, dtype: torch.dtype, shape: tuple[int, int]
) -> Tensor:
    """An int8, mxfp8 or nvfp4 weight (its stored tensors) -> the (out, in) = `shape` weight in `dtype`."""
    if fmt.name == "int8_tensorwise":
        return dequantize_int8(q, scale, dtype, fmt)
    if fmt.name == "mxfp8":
        return dequantize_mxfp8(q, scale, dtype, shape)
    assert scale2 is not None, "an nvfp4 layer has a second (per-tensor) scale"
    return dequantize_nvfp4(q, scale, scale2, dtype, shape)


# --- quantisation -----------------------------------------------------------------------------------------


def quantize_int8(
    w: Tensor, *, convrot: bool = False, group_size: int = 256, per_row: bool = True
) -> tuple[Tensor, Tensor]:
    """W (out, in) -> (int8 (out, in), fp32 scale (out, 1) per row, or a scalar with per_row=False).

    scale = absmax / 127 (at least 1e-30); q = round-half-even(w / scale) clamped to [-128, 127], computed in
    W's dtype as ComfyUI's quantiser does. With `convrot` the rows are rotated first (per_row is then required).
    """
    if convrot:
        if not per_row:
            raise ValueError("ConvRot quantises with one scale per row")
        w = rotate_groups(w, group_size)
    absmax = w.abs().amax(dim=-1, keepdim=True) if per_row else w.abs().max()
    scale = (absmax.float() / 127.0).clamp(min=1e-30)
    safe = scale.to(w.dtype)
    safe = torch.where(safe == 0, torch.full_like(safe, torch.finfo(w.dtype).tiny), safe)
    return (w / safe).round_().clamp_(-128.0, 127.0).to(torch.int8), scale


def quantize_mxfp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """W (out, in) -> (padded fp8 data, swizzled E8M0 block scales as uint8): scale 2^ceil(log2(absmax / 448))."""
    rows, cols = roundup(w.shape[0], MXFP8_BLOCK), roundup(w.shape[1], MXFP8_BLOCK)
    if (rows, cols) != tuple(w.shape):
        w = torch.nn.functional.pad(w, (0, cols - w.shape[1], 0, rows - w.shape[0]))
    blocks = w.reshape(rows, cols // MXFP8_BLOCK, MXFP8_BLOCK)
    absmax = blocks.abs().amax(dim=-1)
    need = (absmax.float() / F8_E4M3_MAX).clamp(min=2.0**-127)
    exp = (torch.ceil(torch.log2(need)).to(torch.int32) + E8M0_BIAS).clamp(0, 254)
    zero = absmax == 0
    step = torch.where(zero, torch.ones_like(need), e8m0_to_float(exp.to(torch.uint8)))
    data = (blocks.float() / step.unsqueeze(-1)).clamp(-F8_E4M3_MAX, F8_E4M3_MAX)
    data = torch.where(zero.unsqueeze(-1), torch.zeros_like(data), data)
    e = torch.where(zero, torch.zeros_like(exp), exp).to(torch.uint8)
    return data.reshape(rows, cols).to(torch.float8_e4m3fn), swizzle(e)


def _e2m1_codes(x: Tensor) -> Tensor:
    """fp32 values within [-6, 6] -> E2M1 codes (uint8), rounding to nearest with ties to the even code."""
    mag = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    # Midpoints between neighbouring magnitudes; at a tie the even code wins (ties up where the upper is even).
    mids = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
    for mid, tie_up in mids:
        code += (mag >= mid if tie_up else mag > mid).to(torch.uint8)
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def quantize_nvfp4(w: Tensor, tensor_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """W (out, in) -> (packed uint8 data, swizzled e4m3 block scales, fp32 tensor scale = absmax / (448 * 6))."""
    if tensor_scale is None:
        tensor_scale = torch.amax(w.abs()) / (F8_E4M3_MAX * F4_E2M1_MAX)
    tensor_scale = tensor_scale.to(device=w.device, dtype=torch.float32)
    rows, cols = roundup(w.shape[0], NVFP4_BLOCK), roundup(w.shape[1], NVFP4_BLOCK)
    if (rows, cols) != tuple(w.shape):
        w = torch.nn.functional.pad(w, (0, cols - w.shape[1], 0, rows - w.shape[0]))
    blocks = w.reshape(rows, cols // NVFP4_BLOCK, NVFP4_BLOCK)
    block = blocks.abs().amax(dim=-1).to(torch.float32) / F4_E2M1_MAX
    scales_fp8 = torch.clamp(block / tensor_scale, max=F8_E4M3_MAX).to(torch.float8_e4m3fn)
    total = tensor_scale * scales_fp8.to(torch.float32)
    zero = total == 0
    data = blocks.float() / torch.where(zero, torch.ones_like(total), total).unsqueeze(-1)
    data = torch.where(zero.unsqueeze(-1), torch.zeros_like(data), data).clamp(-F4_E2M1_MAX, F4_E2M1_MAX)
    codes = _e2m1_codes(data.reshape(rows, cols)).reshape(rows, cols // 2, 2)
    return (codes[..., 0] << 4) | codes[..., 1], swizzle(scales_fp8), tensor_scale


__all__ = [
    "FORMATS", "FP8_NAMES", "LayerFormat", "dequantize_int8", "dequantize_mxfp8", "dequantize_nvfp4",
    "hadamard", "marker_tensor", "parse_marker", "quantize_int8", "quantize_mxfp8", "quantize_nvfp4",
    "rotate_activations", "rotate_groups", "storage_layout", "swizzle", "unswizzle", "weight_bytes",
]  # fmt: skip
