"""fp8 weights: quantisation maths, Fp8Linear (dequantised at matmul time, CPU too), swapping, in-place quantising."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qil_core.model.weights.quant import (
    FP8_MAX,
    Fp8Linear,
    dequantize_fp8,
    quantize_module_fp8,
    quantize_tensor_fp8,
    swap_fp8_linears,
)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantize_tensor_absmax_scale_and_error_bound(fp8: torch.dtype) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 96) * 0.02
    q, scale = quantize_tensor_fp8(w, fp8)
    assert q.dtype == fp8 and q.shape == w.shape and scale.dtype == torch.float32 and scale.ndim == 0
    assert torch.isclose(scale, w.abs().max() / FP8_MAX[fp8])
    assert float(q.float().abs().max()) == FP8_MAX[fp8]  # the absmax element lands on the largest finite value
    deq = q.float() * scale
    mantissa = 3 if fp8 == torch.float8_e4m3fn else 2
    # round-to-nearest: relative error at most half an ulp for normal numbers; subnormals within half their step
    bound = torch.maximum(w.abs() * 2.0 ** -(mantissa + 1), scale * 2.0 ** (-9 if mantissa == 3 else -16))
    assert bool(((deq - w).abs() <= bound * 1.0001).all())


def test_quantize_tensor_edge_cases() -> None:
    q, scale = quantize_tensor_fp8(torch.zeros(4, 4))
    assert float(scale) == 1.0 and bool((q.float() == 0).all())
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_tensor_fp8(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="fp8_dtype"):
        quantize_tensor_fp8(torch.ones(2), torch.bfloat16)
    q, scale = quantize_tensor_fp8(torch.tensor([1e30, -1e30, 1.0]))  # huge values saturate, never NaN
    assert bool(torch.isfinite(q.float()).all())


def _fp8_layer(out_f: int = 32, in_f: int = 48, scale_shape: tuple[int, ...] = ()) -> tuple[Fp8Linear, nn.Linear]:
    torch.manual_seed(1)
    lin = nn.Linear(in_f, out_f)
    layer = Fp8Linear.from_linear(lin)
    if scale_shape:
        rows = torch.rand(out_f) + 0.5
        layer.weight_scale = rows.reshape(scale_shape)
    return layer, lin


def test_plain_fp8_matmul_fails_on_cpu_but_fp8linear_works() -> None:
    layer, lin = _fp8_layer()
    x = torch.randn(5, 48)
    with pytest.raises(RuntimeError):
        F.linear(x, layer.weight, None)  # what a naive fp8 load does on CPU (robustness L8)
    y = layer(x)
    assert y.shape == (5, 32) and y.dtype == torch.float32
    assert torch.allclose(y, lin(x), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_shape", [(), (32,)])
def test_fp8linear_equals_linear_on_dequantised_weight(dtype: torch.dtype, scale_shape: tuple[int, ...]) -> None:
    layer, _ = _fp8_layer(scale_shape=scale_shape)
    x = torch.randn(2, 7, 48).to(dtype)
    w = (
        layer.weight.float() * layer.weight_scale.float().reshape(-1, 1)
        if scale_shape
        else layer.weight.float() * layer.weight_scale
    ).to(dtype)
    assert torch.equal(layer.dequantized_weight(dtype), w)
    assert torch.equal(layer(x), F.linear(x, w, layer.bias.to(dtype)))


def test_fp8linear_state_dict_and_to_dtype() -> None:
    layer, _ = _fp8_layer()
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "weight_scale"}
    assert sd["weight"].dtype == torch.float8_e4m3fn and sd["weight_scale"].dtype == torch.float32
    w = layer.weight.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn and torch.equal(layer.weight.float(), w.float())
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    layer.half()
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.bias.dtype == torch.float16
    assert "float8_e4m3fn" in repr(layer)


def test_scaled_mm_path_is_close_and_optional() -> None:
    layer, _ = _fp8_layer(out_f=32, in_f=64)
    layer.to(torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    exact = layer(x)
    layer.use_scaled_mm = True  # fp8 x fp8 (activations quantised too): faster on sm89+, less exact
    fast = layer(x)
    assert fast.shape == exact.shape and fast.dtype == torch.bfloat16
    assert float((fast.float() - exact.float()).norm() / exact.float().norm()) < 0.08
    assert torch.equal(
        layer(x.float()), F.linear(x.float(), layer.dequantized_weight(torch.float32), layer.bias.float())
    )  # fp32 input falls back to dequantising


def test_swap_fp8_linears_on_meta_then_assign() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4, bias=False))
    swapped = swap_fp8_linears(model, {"0", "2"}, weight_dtypes={"2": torch.float8_e5m2}, input_scale_keys={"0"})
    assert swapped == ["0", "2"]
    assert isinstance(model[0], Fp8Linear) and model[0].input_scale is not None and model[2].bias is None
    assert model[2].weight.dtype == torch.float8_e5m2 and model[0].weight.is_meta
    state = {
        "0.weight": torch.randn(16, 8).to(torch.float8_e4m3fn), "0.bias": torch.randn(16),
        "0.weight_scale": torch.tensor(0.5), "0.input_scale": torch.tensor(0.25),
        "2.weight": torch.randn(4, 16).to(torch.float8_e5m2), "2.weight_scale": torch.tensor(2.0),
    }  # fmt: skip
    model.load_state_dict(state, strict=True, assign=True)
    x = torch.randn(3, 8)
    expected = F.linear(
        F.gelu(F.linear(x, state["0.weight"].float() * 0.5, state["0.bias"])), state["2.weight"].float() * 2.0
    )
    assert torch.equal(model(x), expected)
    with pytest.raises(ValueError, match="not a Linear"):
        swap_fp8_linears(model, {"1"})


def test_quantize_module_fp8_in_place_with_skip() -> None:
    torch.manual_seed(2)
    model = nn.Sequential()
    model.add_module("proj_in", nn.Linear(32, 64))
    model.add_module("act", nn.SiLU())
    model.add_module("mid", nn.Linear(64, 64))
    model.add_module("proj_out", nn.Linear(64, 8))
    x = torch.randn(4, 32)
    before = model(x).detach()
    names = quantize_module_fp8(model, skip=["proj_*"])
    assert names == ["mid"]
    assert isinstance(model.mid, Fp8Linear) and isinstance(model.proj_in, nn.Linear)
    assert not isinstance(model.proj_in, Fp8Linear) and model.proj_out.weight.dtype == torch.float32
    with torch.no_grad():
        after = model(x)
    assert float((after - before).norm() / before.norm()) < 0.05
    assert torch.equal(
        model.mid.dequantized_weight(torch.float32),
        dequantize_fp8(model.mid.weight, model.mid.weight_scale, torch.float32),
    )
    assert quantize_module_fp8(model) == ["proj_in", "proj_out"]  # Fp8Linear layers are not re-quantised
