"""Transformer weights in every layout: diffusers shards, pipeline folders, ComfyUI single files, ComfyUI fp8 formats.

Every layout is written the way its producer writes it (diffusers `save_pretrained` with forced small shards;
ComfyUI files with `safetensors.torch.save_file`, fp8 weights, fp32 `weight_scale` scalars and the
`_quantization_metadata` header or `comfy_quant` markers) and must load through `load_transformer` and agree with
diffusers' forward on the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference_models import layered_img_shapes, tiny_diffusers_transformer, tiny_transformer_config
from safetensors.torch import load_file, save_file

from qil_core.errors import WeightsError
from qil_core.model.arch.config import TransformerConfig
from qil_core.model.arch.transformer import QwenImageLayeredTransformer, build_transformer
from qil_core.model.weights.checkpoint import open_checkpoint
from qil_core.model.weights.loading import load_transformer
from qil_core.model.weights.quant import Fp8Linear, quantize_tensor_fp8

TOL = 1e-5
FP8_REL_TOL = 0.08  # relative L2 error of the fp8 model vs the original fp32 weights (e4m3: 3 mantissa bits)
INFERABLE_AXES = (4, 14, 14)  # what from_shapes infers for head dim 32 (the real model's 1/8, 7/16, 7/16 split)
N, HP, WP = 2, 4, 6


def model_inputs(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(hidden [1, (N+2)*HP*WP, 64], text [1, 7, 48], mask [1, 7], timestep [1]) for a 2-layer decomposition."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, (N + 2) * HP * WP, 64, generator=g)
    txt = torch.randn(1, 7, 48, generator=g)
    mask = torch.ones(1, 7, dtype=torch.long)
    return x, txt, mask, torch.tensor([0.7])


def run_reference(model: torch.nn.Module) -> torch.Tensor:
    """diffusers QwenImageTransformer2DModel forward on `model_inputs()`."""
    x, txt, mask, t = model_inputs()
    with torch.no_grad():
        return model(
            hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=mask, timestep=t,
            img_shapes=layered_img_shapes(N, HP, WP), additional_t_cond=torch.zeros(1, dtype=torch.long),
            return_dict=False,
        )[0]  # fmt: skip


def run_ours(model: QwenImageLayeredTransformer) -> torch.Tensor:
    """Our transformer's forward on `model_inputs()`, in the model's dtype."""
    x, txt, mask, t = (v.to(model.dtype) if v.is_floating_point() else v for v in model_inputs())
    with torch.no_grad():
        return model(x, txt, mask, t, layered_img_shapes(N, HP, WP), torch.zeros(1, dtype=torch.long))


def quantised_layers(sd: dict[str, torch.Tensor]) -> list[str]:
    """A mixed recipe: every 2-D Linear weight inside the blocks except the modulation layers (kept high precision)."""
    return [
        k[: -len(".weight")] for k, v in sd.items()
        if k.startswith("transformer_blocks.") and k.endswith(".weight") and v.ndim == 2 and "_mod." not in k
    ]  # fmt: skip


def write_comfy_file(
    sd: dict[str, torch.Tensor],
    path: Path,
    *,
    prefix: str = "",
    style: str | None = None,
    layers: list[str] | None = None,
    input_scaled: tuple[str, ...] = (),
    other_dtype: torch.dtype = torch.bfloat16,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a ComfyUI-style single file; `style` None = plain copy, else one of the fp8 layouts ComfyUI reads:

    "metadata"   weight fp8 + weight_scale + `_quantization_metadata` header (QUANTIZATION.md, current);
    "comfy_quant" weight fp8 + weight_scale + per-layer `<layer>.comfy_quant` uint8 JSON markers;
    "scales_only" weight fp8 + weight_scale, no metadata at all;
    "scaled_fp8"  the older format: `scaled_fp8` marker, `<layer>.scale_weight` and `<layer>.scale_input`;
    "plain"       fp8 weights cast without any scale (like *_fp8_e4m3fn.safetensors).
    """
    out: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] | None = None
    layers = layers or []
    for key, value in sd.items():
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if style is None or layer not in layers:
            out[prefix + key] = value.to(other_dtype if style else value.dtype).contiguous()
            continue
        if style == "plain":
            out[prefix + key] = value.to(torch.float8_e4m3fn)
            continue
        w8, scale = quantize_tensor_fp8(value)
        out[prefix + key] = w8
        old = style == "scaled_fp8"
        out[prefix + layer + (".scale_weight" if old else ".weight_scale")] = scale
        if layer in input_scaled or old:
            out[prefix + layer + (".scale_input" if old else ".input_scale")] = torch.tensor(0.03125)
        if style == "comfy_quant":
            blob = json.dumps({"format": "float8_e4m3fn"}).encode("utf-8")
            out[prefix + layer + ".comfy_quant"] = torch.tensor(list(blob), dtype=torch.uint8)
    if style == "metadata":
        table = {prefix + layer: {"format": "float8_e4m3fn"} for layer in layers}
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": table})}
    if style == "scaled_fp8":
        out[prefix + "scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    out.update(extra or {})
    save_file(out, str(path), metadata=metadata)
    return path


def dequantised_reference(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """What a ComfyUI file means, in fp32 diffusers names: fp8 weights times their scale, markers dropped."""
    raw = load_file(str(path))
    out = {}
    for key, value in raw.items():
        key = key[len(prefix) :] if key.startswith(prefix) else key
        if key.endswith((".weight_scale", ".scale_weight", ".input_scale", ".scale_input", ".comfy_quant")):
            continue
        if key == "scaled_fp8" or key.startswith(("vae.", "text_encoders.")):
            continue
        scale = raw.get(
            prefix + key[: -len("weight")] + "weight_scale", raw.get(prefix + key[: -len("weight")] + "scale_weight")
        )
        out[key] = value.float() * scale if scale is not None else value.float()
    return out


@pytest.fixture(scope="module")
def ref() -> torch.nn.Module:
    """The tiny diffusers transformer with the reference RoPE axes (8, 12, 12)."""
    return tiny_diffusers_transformer(seed=3)


@pytest.fixture(scope="module")
def ref_c() -> torch.nn.Module:
    """A tiny diffusers transformer whose RoPE axes can be inferred from shapes, as the real model's can."""
    return tiny_diffusers_transformer(seed=4, axes_dims_rope=INFERABLE_AXES)


@pytest.fixture(scope="module")
def sharded(ref: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers pipeline folder: model_index.json + transformer/ saved with 50 KB shards."""
    root = tmp_path_factory.mktemp("pipeline")
    ref.save_pretrained(root / "transformer", max_shard_size="50KB")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageLayeredPipeline"}))
    return root


def test_sharded_folder_loads_and_matches_diffusers(ref, sharded: Path) -> None:
    shards = sorted((sharded / "transformer").glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) >= 3
    expected = run_reference(ref)
    for source in (
        sharded / "transformer",
        sharded,
        sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json",
    ):
        model = load_transformer(source, dtype=torch.float32)
        assert model.config == tiny_transformer_config()  # read from config.json (RoPE axes included)
        assert torch.allclose(run_ours(model), expected, atol=TOL, rtol=0), source


def test_same_dtype_tensors_stay_memory_mapped(sharded: Path) -> None:
    model = load_transformer(sharded, dtype=torch.float32)
    params = dict(model.named_parameters())
    with open_checkpoint(sharded / "transformer") as ckpt:
        bases: dict[Path, set[int]] = {}
        for key, p in params.items():
            info = ckpt.info(key)
            bases.setdefault(info.file, set()).add(p.data_ptr() - info.start)
    # every tensor sits at its file offset inside one mapping per shard: views, not copies
    assert all(len(b) == 1 for b in bases.values()) and len(bases) >= 3
    converted = load_transformer(sharded, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in converted.parameters())
    assert all(p.untyped_storage().nbytes() == p.numel() * 2 for p in converted.parameters())  # one owned copy each


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_comfy_single_file_loads_and_matches(ref_c, tmp_path: Path, prefix: str) -> None:
    extra = {"vae.encoder.conv1.weight": torch.zeros(4, 4)} if prefix else None  # an all-in-one file
    path = write_comfy_file(
        ref_c.state_dict(), tmp_path / "qwen_image_layered_bf16.safetensors", prefix=prefix, extra=extra
    )
    model = load_transformer(path, dtype=torch.float32)
    assert model.config.axes_dims_rope == INFERABLE_AXES and model.config.num_layers == 2
    assert torch.allclose(run_ours(model), run_reference(ref_c), atol=TOL, rtol=0)


def test_single_file_with_explicit_config(ref, tmp_path: Path) -> None:
    path = write_comfy_file(ref.state_dict(), tmp_path / "t.safetensors")
    model = load_transformer(path, dtype=torch.float32, config=tiny_transformer_config())
    assert torch.allclose(run_ours(model), run_reference(ref), atol=TOL, rtol=0)


def _reference_from(sd: dict[str, torch.Tensor], dtype: torch.dtype, axes: tuple[int, int, int]) -> torch.nn.Module:
    model = build_transformer(tiny_transformer_config(axes_dims_rope=axes), "cpu")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    return model.to(dtype).eval()


@pytest.mark.parametrize(("style", "prefix"), [
    ("metadata", ""), ("comfy_quant", ""), ("scales_only", ""), ("scaled_fp8", ""), ("plain", ""),
    ("metadata", "model.diffusion_model."), ("comfy_quant", "model.diffusion_model."),
])  # fmt: skip
def test_fp8_files_stay_fp8_and_match_their_dequantised_weights(ref_c, tmp_path: Path, style: str, prefix: str) -> None:
    sd = ref_c.state_dict()
    layers = quantised_layers(sd)
    path = write_comfy_file(
        sd, tmp_path / "fp8mixed.safetensors", prefix=prefix, style=style, layers=layers, input_scaled=(layers[0],)
    )
    model = load_transformer(path, dtype=torch.float32)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert fp8 == set(layers)
    assert all(model.get_submodule(n).weight.dtype == torch.float8_e4m3fn for n in fp8)
    assert model.img_in.weight.dtype == torch.float32 and not isinstance(
        model.transformer_blocks[0].img_mod[1], Fp8Linear
    )
    if style in ("metadata", "comfy_quant", "scaled_fp8"):
        assert float(model.get_submodule(layers[0]).input_scale) == 0.03125
    out = run_ours(model)
    deq = dequantised_reference(path, prefix)
    # exactly the model built from the dequantised weights, and diffusers' forward on them within TOL
    assert torch.equal(out, run_ours(_reference_from(deq, torch.float32, INFERABLE_AXES)))
    diffusers_deq = tiny_diffusers_transformer(seed=4, axes_dims_rope=INFERABLE_AXES)
    diffusers_deq.load_state_dict(deq)
    assert torch.allclose(out, run_reference(diffusers_deq), atol=TOL, rtol=0)
    original = run_reference(ref_c)
    assert float((out - original).norm() / original.norm()) < FP8_REL_TOL


def test_fp8_in_bf16_equals_the_bf16_model_of_the_dequantised_weights(ref_c, tmp_path: Path) -> None:
    sd = ref_c.state_dict()
    path = write_comfy_file(sd, tmp_path / "fp8.safetensors", style="metadata", layers=quantised_layers(sd))
    model = load_transformer(path)  # default dtype bf16
    assert model.dtype == torch.bfloat16
    assert torch.equal(
        run_ours(model), run_ours(_reference_from(dequantised_reference(path), torch.bfloat16, INFERABLE_AXES))
    )


def test_fp8_model_survives_to_dtype(ref_c, tmp_path: Path) -> None:
    sd = ref_c.state_dict()
    path = write_comfy_file(sd, tmp_path / "fp8.safetensors", style="metadata", layers=quantised_layers(sd))
    model = load_transformer(path, dtype=torch.float32)
    before = run_ours(model)
    model.to(torch.bfloat16).to(torch.float32)
    layer = model.get_submodule(quantised_layers(sd)[0])
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert torch.allclose(run_ours(model), before, atol=0.05 * float(before.abs().max()))


def test_unsupported_quantisation_format_is_refused(ref_c, tmp_path: Path) -> None:
    sd = ref_c.state_dict()
    layers = quantised_layers(sd)[:1]
    path = tmp_path / "awq.safetensors"
    meta = {
        "_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {layers[0]: {"format": "awq_w4a16"}}})
    }
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    with pytest.raises(WeightsError, match=f"layer {layers[0]} .*'awq_w4a16'.*bf16, fp8mixed or int8 ConvRot version"):
        load_transformer(path)
    # nvfp4 is read now; a file whose marker says nvfp4 over an unquantised weight is refused as inconsistent
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {layers[0]: {"format": "nvfp4"}}})}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    with pytest.raises(WeightsError, match="as nvfp4 but its weight is torch.float32; the file is inconsistent"):
        load_transformer(path)


def test_checkpoint_view(sharded: Path, tmp_path: Path) -> None:
    with open_checkpoint(sharded, default_subfolder="transformer") as ckpt:
        assert len(ckpt.files) >= 3 and ckpt.folder == sharded / "transformer"
        key = "transformer_blocks.1.img_mlp.net.2.weight"
        info = ckpt.info(key)
        assert info.dtype == torch.float32 and info.shape == (64, 256) and ckpt.file_of(key) == info.file
        assert ckpt.shapes()[key] == info.shape and key in ckpt and len(ckpt) == len(ckpt.keys())
        mapped = ckpt.get(key)
        converted = ckpt.read(key, torch.bfloat16)
        assert torch.equal(converted, mapped.to(torch.bfloat16))
        assert torch.equal(ckpt.read(key), mapped)
        owned = ckpt.read(key, copy=True)  # the streamed path in the same dtype
        assert torch.equal(owned, mapped) and owned.data_ptr() != mapped.data_ptr()
        assert ckpt.read("proj_out.bias", torch.float16).dtype == torch.float16
    path = write_comfy_file({"a.weight": torch.randn(3, 3)}, tmp_path / "m.safetensors", style="metadata", layers=["a"])
    with open_checkpoint(path) as ckpt:
        assert json.loads(ckpt.metadata["_quantization_metadata"])["layers"] == {"a": {"format": "float8_e4m3fn"}}
        assert ckpt.info("a.weight").dtype == torch.float8_e4m3fn


def test_text_encoder_style_index_name_is_found(ref, tmp_path: Path) -> None:
    # transformers names its shards model-0000k-of-0000n.safetensors with model.safetensors.index.json
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    keys = sorted(sd)
    halves = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    weight_map = {k: name for name, ks in halves.items() for k in ks}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with open_checkpoint(tmp_path) as ckpt:
        assert len(ckpt.files) == 2 and set(ckpt.keys()) == set(sd)
    assert isinstance(TransformerConfig.from_shapes(ckpt.shapes(), "x"), TransformerConfig)
