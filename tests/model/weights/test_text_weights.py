"""Loading the text encoder from diffusers folders and ComfyUI single files (plain and fp8-scaled), and bad files.

The same tiny random weights are written in every layout; each load must reproduce the reference's hidden
states. fp8 tolerance: a load equals the reference with the dequantised weights within 1e-5 (the arithmetic is
exact), and stays within 8% relative (Frobenius) of the unquantised reference (e4m3 keeps 3 mantissa bits).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from qwen_tiny import LM_PREFIX, TINY, build_reference, tiny_encoder
from safetensors.torch import save_file

from qil_core.errors import CorruptFileError, InputError, ModelFileNotFoundError, ModelMismatchError, WeightsError
from qil_core.model.weights.quant import Fp8Linear
from qil_core.model.weights.text_keys import map_text_keys
from qil_core.model.weights.text_loading import load_text_encoder

pytest.importorskip("transformers")
FP8_REL_TOL = 0.08


@pytest.fixture(scope="module")
def ref():
    return build_reference(seed=3)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY.vocab_size, (2, 19), generator=g)
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, 11:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def expected(ref, batch) -> torch.Tensor:
    with torch.no_grad():
        return ref(input_ids=batch[0], attention_mask=batch[1], output_hidden_states=True).hidden_states[-1]


def _run(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(*batch)


def _comfy_names(ref) -> dict[str, torch.Tensor]:
    """ComfyUI's single-file names: model.* for the language model, visual.* for the vision tower, no lm_head."""
    out = {}
    for k, v in ref.state_dict().items():
        if k.startswith(LM_PREFIX):
            out["model." + k[len(LM_PREFIX) :]] = v.contiguous()
        elif k.startswith("model.visual."):
            out["visual." + k[len("model.visual.") :]] = v.contiguous()
    return out


def _fp8(sd: dict[str, torch.Tensor], style: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Quantise every 2-D Linear weight (LM and vision) per tensor, written in one of ComfyUI's fp8 conventions."""
    out: dict[str, torch.Tensor] = {}
    layers = {}
    for k, v in sd.items():
        if v.ndim == 2 and k.endswith(".weight") and "embed_tokens" not in k and "patch_embed" not in k:
            scale = (v.abs().max().float() / 448.0).reshape(())
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            layer = k[: -len(".weight")]
            if style == "legacy":
                out[layer + ".scale_weight"] = scale
                out[layer + ".scale_input"] = torch.tensor(1.0)
            else:
                out[layer + ".weight_scale"] = scale
                layers[layer] = {"format": "float8_e4m3fn"}
                if style == "comfy_quant":
                    out[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        else:
            out[k] = v
    if style == "legacy":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    if style != "meta":
        return out, {}
    return out, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}


def _dequantised_reference(ref, fp8_sd: dict[str, torch.Tensor]):
    """Our encoder holding the dequantised fp8 weights, computed independently of the loader."""
    model = tiny_encoder(ref)
    sd = model.state_dict()
    for name in sd:
        key = "model." + name
        if fp8_sd[key].dtype == torch.float8_e4m3fn:
            layer = key[: -len(".weight")]
            scale = fp8_sd.get(layer + ".scale_weight", fp8_sd.get(layer + ".weight_scale"))
            sd[name] = fp8_sd[key].float() * scale
    model.load_state_dict(sd)
    return model


def test_diffusers_folder_sharded(ref, batch, expected, tmp_path: Path) -> None:
    root = tmp_path / "Qwen-Image-Layered"
    ref.save_pretrained(root / "text_encoder", max_shard_size="5MB")
    shards = sorted((root / "text_encoder").glob("model-*.safetensors"))
    assert len(shards) > 1 and (root / "text_encoder" / "model.safetensors.index.json").is_file()
    for source in (root, root / "text_encoder", root / "text_encoder" / "model.safetensors.index.json", shards[1]):
        model = load_text_encoder(source, dtype=torch.float32)
        assert model.config == TINY  # from config.json (transformers 5 nests it in text_config)
        torch.testing.assert_close(_run(model, batch), expected, atol=1e-5, rtol=0)
    (shards[0]).unlink()
    with pytest.raises(ModelFileNotFoundError, match="missing"):
        load_text_encoder(root, dtype=torch.float32)


def test_diffusers_single_file_bf16_and_transformers_names(ref, batch, expected, tmp_path: Path) -> None:
    ref.save_pretrained(tmp_path / "te")
    assert (tmp_path / "te" / "model.safetensors").is_file()
    model = load_text_encoder(tmp_path / "te")  # default dtype bf16
    assert model.dtype == torch.bfloat16
    out = _run(model, batch).float()
    assert ((out - expected).norm() / expected.norm()) < 0.05
    # transformers >= 4.52 in-memory names (model.language_model.*, model.visual.*), written as one file
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "v5_names.safetensors")
    model = load_text_encoder(tmp_path / "v5_names.safetensors", dtype=torch.float32, config=TINY)
    torch.testing.assert_close(_run(model, batch), expected, atol=1e-5, rtol=0)
    save_file(tiny_encoder(ref).state_dict(), tmp_path / "canonical.safetensors")
    model = load_text_encoder(tmp_path / "canonical.safetensors", dtype=torch.float32, config=TINY)
    torch.testing.assert_close(_run(model, batch), expected, atol=1e-5, rtol=0)


def test_comfyui_plain_single_file(ref, batch, expected, tmp_path: Path) -> None:
    path = tmp_path / "qwen_2.5_vl_7b.safetensors"
    save_file(_comfy_names(ref), path)
    keymap = map_text_keys(_comfy_names(ref).keys(), source=str(path))
    assert keymap.prefix == "model." and sum(keymap.skipped.values()) == 18  # the vision tower, by name
    model = load_text_encoder(path, dtype=torch.float32, config=TINY)
    torch.testing.assert_close(_run(model, batch), expected, atol=1e-5, rtol=0)
    # Without config.json the head width is assumed to be the 7B's 128, which the tiny shapes contradict.
    with pytest.raises(ModelMismatchError, match="head width"):
        load_text_encoder(path, dtype=torch.float32)


@pytest.mark.parametrize("style", ["legacy", "meta", "comfy_quant"])
def test_comfyui_fp8_scaled(ref, batch, expected, tmp_path: Path, style: str) -> None:
    sd, meta = _fp8(_comfy_names(ref), style)
    path = tmp_path / f"qwen_2.5_vl_7b_fp8_scaled_{style}.safetensors"
    save_file(sd, path, metadata=meta)
    model = load_text_encoder(path, dtype=torch.float32, config=TINY)
    q = model.layers[1].mlp.down_proj
    assert isinstance(q, Fp8Linear) and q.weight.dtype == torch.float8_e4m3fn  # kept fp8 in memory
    assert model.embed_tokens.weight.dtype == torch.float32
    out = _run(model, batch)
    torch.testing.assert_close(out, _run(_dequantised_reference(ref, sd), batch), atol=1e-5, rtol=0)
    assert ((out - expected).norm() / expected.norm()) < FP8_REL_TOL
    bf16 = _run(load_text_encoder(path, dtype=torch.bfloat16, config=TINY), batch)
    assert bf16.dtype == torch.bfloat16 and ((bf16.float() - expected).norm() / expected.norm()) < FP8_REL_TOL


def test_vision_only_and_wrong_checkpoints(ref, tmp_path: Path) -> None:
    comfy = _comfy_names(ref)
    vision = tmp_path / "vision_only.safetensors"
    save_file({k: v for k, v in comfy.items() if k.startswith("visual.")}, vision)
    with pytest.raises(ModelMismatchError, match="only the vision tower") as e:
        load_text_encoder(vision)
    assert str(vision) in str(e.value)
    dit = tmp_path / "qwen_image_layered_bf16.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4), "img_in.weight": torch.zeros(4, 4)}, dit)
    with pytest.raises(ModelMismatchError, match="diffusion transformer"):
        load_text_encoder(dit)
    mixed = tmp_path / "mixed.safetensors"
    save_file({**comfy, "text_projection.weight": torch.zeros(2, 2)}, mixed)
    with pytest.raises(ModelMismatchError, match="text_projection"):
        load_text_encoder(mixed, config=TINY)
    missing = tmp_path / "missing_layer.safetensors"
    save_file({k: v for k, v in comfy.items() if "layers.1.mlp" not in k}, missing)
    with pytest.raises(ModelMismatchError, match="missing keys: layers.1.mlp"):
        load_text_encoder(missing, config=TINY)
    plain = tmp_path / "plain.safetensors"
    save_file(comfy, plain)
    with pytest.raises(ModelMismatchError, match=r"has shape \[128, 64\], expected \[96, 64\]"):
        load_text_encoder(plain, config=dataclasses.replace(TINY, intermediate_size=96))


def test_truncated_missing_and_damaged_files(ref, tmp_path: Path) -> None:
    path = tmp_path / "qwen_2.5_vl_7b.safetensors"
    save_file(_comfy_names(ref), path)
    data = path.read_bytes()
    cut = tmp_path / "truncated.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated.safetensors"):
        load_text_encoder(cut)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CorruptFileError):
        load_text_encoder(empty)
    with pytest.raises(ModelFileNotFoundError):
        load_text_encoder(tmp_path / "nope.safetensors")
    nan = {k: v.clone() for k, v in _comfy_names(ref).items()}
    nan["model.norm.weight"][3] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors")
    with pytest.raises(WeightsError, match="NaN"):
        load_text_encoder(tmp_path / "nan.safetensors", config=TINY)
    int8 = tmp_path / "int8.safetensors"
    sd, _ = _fp8(_comfy_names(ref), "meta")
    layers = {"model.layers.0.mlp.up_proj": {"format": "int8_blockwise"}}
    meta = {"_quantization_metadata": json.dumps({"layers": layers})}
    save_file(sd, int8, metadata=meta)
    with pytest.raises(WeightsError, match="int8_blockwise"):
        load_text_encoder(int8, config=TINY)
    with pytest.raises(InputError, match="dtype"):
        load_text_encoder(path, dtype=torch.int8)
