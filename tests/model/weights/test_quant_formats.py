"""ComfyUI's int8 (with and without ConvRot), mxfp8 and nvfp4 Linear formats, against comfy-kitchen.

comfy-kitchen (requirements-test.txt) is what ComfyUI quantises and dequantises these formats with; its eager
backend runs on the CPU. Files are written the way ComfyUI writes them (`QuantizedTensor.state_dict` plus a
`comfy_quant` JSON marker per layer) and must load through `load_transformer` with every layer's dequantised
weight bit-identical to comfy-kitchen's dequantisation of the same tensors; quantising on load must give
comfy-kitchen's quantiser's tensors bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from comfy_kitchen.tensor import QuantizedTensor
from perf_models import random_transformer, transformer_inputs
from reference_models import tiny_transformer_config
from safetensors.torch import save_file
from torch import nn

from qil_core.errors import WeightsError
from qil_core.model.arch.transformer import build_transformer
from qil_core.model.runtime.offload import BlockSwapPlacement
from qil_core.model.runtime.placement import ResidentPlacement
from qil_core.model.weights import quant_kernels
from qil_core.model.weights.loading import load_transformer
from qil_core.model.weights.quant import QUANT_CHOICES, Fp8Linear, QuantLinear, quantize_module_fp8
from qil_core.model.weights.quant_formats import LayerFormat, parse_marker, storage_layout, weight_bytes

G = 64  # ConvRot group size for the tiny model (its block Linears have 64 or 256 inputs)
# kind -> (comfy-kitchen layout, its quantiser's options, the comfy_quant marker ComfyUI writes)
KINDS = {
    "int8-convrot": ("TensorWiseINT8Layout", {"per_channel": True, "convrot": True, "convrot_groupsize": G},
                     {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": G}),
    "int8-row": ("TensorWiseINT8Layout", {"per_channel": True}, {"format": "int8_tensorwise"}),
    "int8-tensor": ("TensorWiseINT8Layout", {}, {"format": "int8_tensorwise"}),
    "mxfp8": ("TensorCoreMXFP8Layout", {}, {"format": "mxfp8"}),
    "nvfp4": ("TensorCoreNVFP4Layout", {}, {"format": "nvfp4"}),
}  # fmt: skip
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CONFIG = tiny_transformer_config(axes_dims_rope=(4, 14, 14))


def ck_dequantize(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """comfy-kitchen's dequantisation of `qt` into `dtype` (what ComfyUI computes for that compute dtype)."""
    params = dataclasses.replace(qt._params, orig_dtype=dtype)
    return QuantizedTensor(qt._qdata, qt._layout_cls, params).dequantize()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (fp8, e8m0, int8, fp32 alike), for bit-for-bit comparisons."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def block_linears(sd: dict[str, torch.Tensor], kind: str) -> list[str]:
    """Block Linear layers (modulation too) plus txt_in, whose 48 inputs make mxfp8 pad; ConvRot needs 64 | in."""
    names = [k[:-7] for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2
             and (k.startswith("transformer_blocks.") or k.startswith("txt_in"))]  # fmt: skip
    return [n for n in names if kind != "int8-convrot" or sd[n + ".weight"].shape[1] % G == 0]


def write_kitchen_file(
    sd: dict[str, torch.Tensor], path: Path, kind: str, *, source_dtype: torch.dtype = torch.bfloat16
) -> dict[str, QuantizedTensor]:
    """A ComfyUI file with `kind` layers quantised by comfy-kitchen from `source_dtype` weights; the rest bf16."""
    layout, options, marker = KINDS[kind]
    out = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    qts = {}
    for layer in block_linears(sd, kind):
        qt = QuantizedTensor.from_float(sd[layer + ".weight"].to(source_dtype), layout, **options)
        qts[layer] = qt
        out.update({k: v.contiguous() for k, v in qt.state_dict(layer + ".weight").items()})
        out[layer + ".comfy_quant"] = torch.tensor(list(json.dumps(marker).encode("utf-8")), dtype=torch.uint8)
    save_file(out, str(path))
    return qts


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    model = build_transformer(CONFIG, "cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_file_dequantises_bit_identically_to_comfy_kitchen(tiny_sd, tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.safetensors"
    qts = write_kitchen_file(tiny_sd, path, kind)
    assert qts, "nothing was quantised; the test would be vacuous"
    for dtype in DTYPES:
        # mxfp8 pads txt_in's 48 inputs to 64, so the width cannot be read off that shape: give the config
        model = load_transformer(path, dtype=dtype, config=CONFIG)
        for layer, qt in qts.items():
            mod = model.get_submodule(layer)
            assert isinstance(mod, QuantLinear) and mod.weight.dtype == qt._qdata.dtype  # kept quantised
            assert torch.equal(mod.dequantized_weight(dtype), ck_dequantize(qt, dtype)), (layer, dtype)
        assert model.img_in.weight.dtype == dtype  # unmarked layers load as usual


@pytest.mark.parametrize("kind", ["int8-convrot", "int8-row", "mxfp8", "nvfp4"])
def test_quantised_model_runs_like_its_dequantised_weights(tiny_sd, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "q.safetensors"
    qts = write_kitchen_file(tiny_sd, path, kind)
    model = load_transformer(path, dtype=torch.float32, config=CONFIG)
    dense = {k: v.float() for k, v in tiny_sd.items()}
    for layer, qt in qts.items():
        dense[layer + ".weight"] = ck_dequantize(qt, torch.float32)
    for k in dense:  # the unquantised tensors went through the file's bf16
        if not any(k == layer + ".weight" for layer in qts):
            dense[k] = dense[k].to(torch.bfloat16).float()
    reference = build_transformer(model.config, "cpu")
    reference.load_state_dict(dense)
    inputs = transformer_inputs(model.config)
    with torch.no_grad():
        out, ref = model(**inputs), reference.eval()(**inputs)
    if kind == "int8-convrot":  # few tokens: the activations are rotated instead of the weight (fp32 rounding)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out, ref)


def test_convrot_rotates_whichever_side_is_smaller() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(256, 64)
    layer = Fp8Linear.from_linear(lin, fmt=QUANT_CHOICES["int8-convrot"])
    w = layer.dequantized_weight(torch.float32)
    few, many = torch.randn(2, 5, 256), torch.randn(1, 80, 256)  # 10 rows < 64 outputs; 80 rows > 64
    with torch.no_grad():
        torch.testing.assert_close(layer(few), nn.functional.linear(few, w, layer.bias), rtol=1e-5, atol=1e-6)
        assert not torch.equal(layer(few), nn.functional.linear(few, w, layer.bias))  # the cheaper path ran
        assert torch.equal(layer(many), nn.functional.linear(many, w, layer.bias))


@pytest.mark.parametrize("shape", [(40, 200), (96, 256), (130, 64)])
@pytest.mark.parametrize("kind", ["int8-row", "mxfp8", "nvfp4"])
def test_padded_and_odd_shapes_match_comfy_kitchen(shape: tuple[int, int], kind: str) -> None:
    torch.manual_seed(2)
    w = torch.randn(*shape, dtype=torch.bfloat16) * 0.1
    w[1, : shape[1] // 2] = 0  # zero blocks
    layout, options, marker = KINDS[kind]
    qt = QuantizedTensor.from_float(w, layout, **options)
    lin = nn.Linear(shape[1], shape[0], bias=False)
    lin.weight.data = w
    ours = Fp8Linear.from_linear(lin, fmt=parse_marker(marker))
    ck = qt.state_dict("weight")
    for key, value in ck.items():
        mine = getattr(ours, key)
        assert mine.shape == value.shape and torch.equal(bits(mine), bits(value)), key
    for dtype in DTYPES:
        assert torch.equal(ours.dequantized_weight(dtype), ck_dequantize(qt, dtype))


@pytest.mark.parametrize("choice", ["int8-convrot", "int8", "mxfp8", "nvfp4"])
def test_quantise_on_load_equals_comfy_kitchen_quantiser(tiny_sd, tmp_path: Path, choice: str) -> None:
    path = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tiny_sd.items()}, str(path))
    fmt = QUANT_CHOICES[choice]
    if fmt.convrot:  # the tiny model's inputs are 64 or 256 wide: group 256 quantises the 256-input layers only
        model = load_transformer(path, dtype=torch.bfloat16, quantize=choice)
        quantised = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        assert quantised and all(m.in_features % 256 == 0 for m in quantised.values())
        assert not isinstance(model.transformer_blocks[0].attn.to_q, QuantLinear)  # 64 inputs: stays bf16
        model = load_transformer(path, dtype=torch.bfloat16)
        quantize_module_fp8(
            model,
            skip=("img_in", "txt_in", "proj_out", "norm_out.*", "time_text_embed.*"),
            fmt=LayerFormat("int8_tensorwise", True, G),
        )
        layout, options = KINDS["int8-convrot"][:2]
    else:
        model = load_transformer(path, dtype=torch.bfloat16, quantize=choice)
        layout, options = {"int8": KINDS["int8-row"], "mxfp8": KINDS["mxfp8"], "nvfp4": KINDS["nvfp4"]}[choice][:2]
    quantised = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantised) >= 10 and isinstance(model.transformer_blocks[0].img_mlp.net[2], QuantLinear)
    assert not isinstance(model.proj_out, QuantLinear)  # the small input/output layers stay in bf16
    for name, mod in quantised.items():
        qt = QuantizedTensor.from_float(tiny_sd[name + ".weight"].to(torch.bfloat16), layout, **options)
        for key, value in qt.state_dict("weight").items():
            mine = getattr(mod, key)
            assert mine.shape == value.shape and torch.equal(bits(mine), bits(value)), (name, key)


def test_kernel_dispatch_uses_comfy_kitchen_and_falls_back(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quant_kernels, "_WARNED", set())  # the fallback warns once per process: start afresh
    torch.manual_seed(0)
    lin = nn.Linear(256, 96).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    model = nn.ModuleDict({k: Fp8Linear.from_linear(lin, fmt=QUANT_CHOICES[k]) for k in ("int8-convrot", "nvfp4")})
    portable = {k: m(x) for k, m in model.items()}
    assert quant_kernels.enable_quant_kernels(model, "auto") == 0  # CPU: auto keeps the portable path
    assert all(m.kernel == "portable" for m in model.values())
    assert quant_kernels.enable_quant_kernels(model, "comfy-kitchen") == 2
    y = model["int8-convrot"](x)  # comfy-kitchen's W8A8 int8 matmul (its eager backend on the CPU)
    assert model["int8-convrot"].kernel == "comfy-kitchen" and not torch.equal(y, portable["int8-convrot"])
    ref = lin(x).float()
    assert float((y.float() - ref).norm() / ref.norm()) < 0.03
    with caplog.at_level("DEBUG", logger="qil_core.model.quant_kernels"):
        y = model["nvfp4"](x)  # its FP4 matmul needs a GPU: falls back, exactly the portable result
    assert torch.equal(y, portable["nvfp4"]) and model["nvfp4"].kernel == "portable"
    assert "comfy-kitchen kernel for nvfp4 layers failed" in caplog.text


def test_kernel_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert quant_kernels.resolve_backend("portable", "cuda") == "portable"
    assert quant_kernels.resolve_backend("auto", "cpu") == "portable"
    assert quant_kernels.resolve_backend("auto", "cuda") == "comfy-kitchen"
    monkeypatch.setattr(quant_kernels, "load_kitchen", lambda: None)  # not installed
    assert quant_kernels.resolve_backend("auto", "cuda") == "portable"
    assert quant_kernels.resolve_backend("comfy-kitchen", "cuda") == "portable"
    layer = Fp8Linear.from_linear(nn.Linear(64, 32), fmt=QUANT_CHOICES["int8"])
    layer.kernel = "comfy-kitchen"
    x = torch.randn(2, 64)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantized_weight(x.dtype), layer.bias))
    assert layer.kernel == "portable"
    with pytest.raises(Exception, match="backend must be one of"):
        quant_kernels.resolve_backend("triton", "cuda")


def test_int8_convrot_blocks_stream_quantised() -> None:
    model = random_transformer(seed=3)
    quantize_module_fp8(
        model,
        skip=("img_in", "txt_in", "proj_out", "norm_out.*", "time_text_embed.*"),
        fmt=LayerFormat("int8_tensorwise", True, 16),
    )
    inputs = transformer_inputs()
    with torch.inference_mode(), ResidentPlacement("cpu").use("transformer", model) as dit:
        reference = dit(**inputs)
    seen = []
    placement = BlockSwapPlacement("cpu", resident_blocks=0, prefetch=True)
    with torch.inference_mode(), placement.use("transformer", model) as dit:
        h = model.transformer_blocks[1].register_forward_pre_hook(
            lambda m, a: seen.append((m.attn.to_q.weight.dtype, m.attn.to_q.weight_scale.dtype))
        )
        out = dit(**inputs)
        h.remove()
    assert seen == [(torch.int8, torch.float32)] and torch.equal(out, reference)
    block = model.transformer_blocks[0]
    q_bytes = sum(t.numel() * t.element_size() for t in block.state_dict().values())
    assert placement.stats.bytes_uploaded == (len(model.transformer_blocks) + 1) * q_bytes


def test_unknown_and_inconsistent_layers_are_refused(tiny_sd, tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    layer = "transformer_blocks.0.attn.to_q"
    sd = {k: v.contiguous() for k, v in tiny_sd.items()}
    sd[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "svdquant_w4a4"}'), dtype=torch.uint8)
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=f"layer {layer} uses the quantisation format 'svdquant_w4a4'"):
        load_transformer(path)
    write_kitchen_file(tiny_sd, path, "nvfp4")
    from safetensors.torch import load_file

    broken = load_file(str(path))
    del broken[layer + ".weight_scale_2"]
    save_file(broken, str(path))
    with pytest.raises(WeightsError, match="is nvfp4 but has no weight_scale_2"):
        load_transformer(path)


def test_weight_bytes_per_format() -> None:
    assert weight_bytes("bf16", 3072, 12288) == 2 * 3072 * 12288
    assert weight_bytes("int8_tensorwise", 3072, 12288) == 3072 * 12288 + 4 * 3072
    assert weight_bytes("mxfp8", 3072, 12288) == 3072 * 12288 + 3072 * 12288 // 32
    assert weight_bytes("nvfp4", 3072, 12288) == 3072 * 12288 // 2 + 3072 * 12288 // 16 + 4
    layout = storage_layout(LayerFormat("nvfp4"), 40, 200)
    assert layout["weight"] == ((48, 104), torch.uint8) and layout["weight_scale"][0] == (128, 16)
    with pytest.raises(ValueError, match="unknown"):
        parse_marker({"format": "awq_w4a16"})


def test_memory_plan_knows_each_format() -> None:
    from qil_core.model.runtime import memory_plan as mp
    from qil_core.model.weights.quant import transformer_bytes

    sizes = {f: transformer_bytes(f) for f in ("bf16", "float8_e4m3fn", "int8_tensorwise", "mxfp8", "nvfp4")}
    assert round(sizes["bf16"] / 1e9, 1) == 40.9  # the real 20B transformer
    assert 20.4e9 < sizes["float8_e4m3fn"] < sizes["int8_tensorwise"] < 20.6e9 < sizes["mxfp8"] < 21.2e9
    assert 11.5e9 < sizes["nvfp4"] < 11.6e9
    model = random_transformer(seed=1)
    assert mp.dequant_transient_bytes(model, torch.bfloat16) == 0
    quantize_module_fp8(model, fmt=LayerFormat("int8_tensorwise", True, 16))
    largest = max(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    assert mp.dequant_transient_bytes(model, torch.bfloat16) == largest * (8 + 2)  # fp32 product + data, bf16 cast


def test_quantised_on_load_saves_as_comfyui_file(tiny_sd, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from qil_core.model.weights.quant_load import comfy_state_dict

    src = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tiny_sd.items()}, str(src))
    model = load_transformer(src, dtype=torch.bfloat16, config=CONFIG)
    fmt = LayerFormat("int8_tensorwise", True, G)
    names = quantize_module_fp8(
        model, skip=("img_in", "txt_in", "proj_out", "norm_out.*", "time_text_embed.*"), fmt=fmt
    )
    out = tmp_path / "int8_convrot.safetensors"
    save_file(comfy_state_dict(model), str(out))
    saved = load_file(str(out))
    layout, options, marker = KINDS["int8-convrot"]
    for name in names:
        qt = QuantizedTensor.from_float(tiny_sd[name + ".weight"].to(torch.bfloat16), layout, **options)
        for key, value in qt.state_dict(name + ".weight").items():
            assert saved[key].shape == value.shape and torch.equal(bits(saved[key]), bits(value)), key
        assert json.loads(bytes(saved[name + ".comfy_quant"].tolist())) == marker
    again = load_transformer(out, dtype=torch.bfloat16, config=CONFIG)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in transformer_inputs(CONFIG).items()}  # fmt: skip
    with torch.no_grad():
        assert torch.equal(again(**inputs), model(**inputs))


def test_the_loading_policy_offers_every_quantise_on_load_format() -> None:
    from qil_core.model.policy import QUANT_FORMATS, QUANT_KERNELS
    from qil_core.model.weights.quant import QUANT_CHOICES
    from qil_core.model.weights.quant_kernels import BACKENDS

    assert QUANT_FORMATS == tuple(QUANT_CHOICES) and QUANT_KERNELS == BACKENDS


def test_memory_estimate_counts_packed_weights_as_stored(
    tiny_sd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """nvfp4 keeps half a byte per value: the load's estimate of what stays memory-mapped uses the stored bytes
    (it used one byte per logical value, which made a file that fits look too big for the RAM)."""
    import logging

    from qil_core.model.weights import loading

    path = tmp_path / "nvfp4.safetensors"
    qts = write_kitchen_file(tiny_sd, path, "nvfp4")
    stored = sum(qt._qdata.numel() * qt._qdata.element_size() for qt in qts.values())
    logical = sum(tiny_sd[layer + ".weight"].numel() for layer in qts)
    assert stored * 2 == logical
    monkeypatch.setattr(loading, "available_ram", lambda: stored + 1)  # room for the packed weights only
    with caplog.at_level(logging.WARNING):
        load_transformer(path, dtype=torch.float32, config=CONFIG)
    assert "stay memory-mapped" not in caplog.text
    monkeypatch.setattr(loading, "available_ram", lambda: stored - 1)
    with caplog.at_level(logging.WARNING):
        load_transformer(path, dtype=torch.float32, config=CONFIG)
    assert "stay memory-mapped" in caplog.text
