"""Loading the captioner's vision tower and LM head from the text encoder's files (diffusers folder, ComfyUI
single file plain and fp8-scaled), and the clear errors for files without them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from caption_tiny import VISION_80, build_reference, our_model, reference_processor
from PIL import Image
from safetensors.torch import save_file

from qil_core.errors import CaptionWeightsError
from qil_core.model.arch.text_encoder import TextEncoderConfig
from qil_core.model.pipeline.caption import GenerationSettings, generate_ids
from qil_core.model.weights.caption_loading import load_caption_model
from qil_core.model.weights.quant import Fp8Linear
from qil_core.model.weights.text_loading import load_text_encoder

LM = "model.language_model."


@pytest.fixture(scope="module")
def ref():
    return build_reference(seed=1)


@pytest.fixture(scope="module")
def inputs(tokenizer_dir):
    import numpy as np

    px = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    proc = reference_processor(tokenizer_dir)
    return proc(
        text="<|vision_start|><|image_pad|><|vision_end|>Describe.", images=Image.fromarray(px), return_tensors="pt"
    )


def _comfy(ref, lm_head: bool = True) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in ref.state_dict().items():
        if k.startswith(LM):
            out["model." + k[len(LM) :]] = v.contiguous()
        elif k.startswith("model.visual."):
            out["visual." + k[len("model.visual.") :]] = v.contiguous()
        elif k == "lm_head.weight" and lm_head:
            out[k] = v.contiguous()
    return out


def _ids(model, inputs) -> list[int]:
    grid = tuple(int(g) for g in inputs["image_grid_thw"][0])
    return generate_ids(
        model,
        inputs["input_ids"][0].tolist(),
        inputs["pixel_values"],
        grid,
        151655,
        GenerationSettings(eos_token_ids=(151645,)),
        16,
    )


def test_diffusers_folder_matches_the_reference(ref, inputs, tmp_path: Path) -> None:
    ref.save_pretrained(tmp_path / "text_encoder", max_shard_size="2MB")
    assert len(list((tmp_path / "text_encoder").glob("*.safetensors"))) > 1  # sharded, with an index
    te = load_text_encoder(tmp_path / "text_encoder", dtype=torch.float32)
    model = load_caption_model(tmp_path / "text_encoder", te, dtype=torch.float32)
    assert model.mrope_section == (2, 3, 3)  # read from config.json
    with torch.no_grad():
        expect = ref.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        got = model.vision(inputs["pixel_values"], tuple(int(g) for g in inputs["image_grid_thw"][0]))
    assert (got - expect).abs().max() <= 1e-5
    assert _ids(model, inputs) == _ids(our_model(ref), inputs)


def test_comfyui_single_file_plain_and_fp8_scaled(inputs, tmp_path: Path) -> None:
    ref = build_reference(seed=2, vision=VISION_80)  # no config.json: the vision config comes from the shapes
    text_cfg = TextEncoderConfig.from_transformers_config(ref.config.to_dict())
    sd = _comfy(ref)
    plain = tmp_path / "qwen_2.5_vl_7b.safetensors"
    save_file(sd, str(plain))
    te = load_text_encoder(plain, dtype=torch.float32, config=text_cfg)
    model = load_caption_model(plain, te, dtype=torch.float32, mrope_section=(2, 3, 3))
    assert _ids(model, inputs) == _ids(our_model(ref), inputs)
    with torch.no_grad():
        expect = ref.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        got = model.vision(inputs["pixel_values"], tuple(int(g) for g in inputs["image_grid_thw"][0]))
    assert (got - expect).abs().max() <= 1e-5

    fp8: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("visual.") and v.ndim == 2 and k.endswith(".weight"):
            scale = (v.abs().max().float() / 448.0).reshape(())
            fp8[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            fp8[k[: -len(".weight")] + ".scale_weight"] = scale
        else:
            fp8[k] = v
    fp8["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    save_file(fp8, str(path))
    te8 = load_text_encoder(path, dtype=torch.float32, config=text_cfg)
    quant = load_caption_model(path, te8, dtype=torch.float32, mrope_section=(2, 3, 3))
    assert isinstance(quant.vision.blocks[0].attn.qkv, Fp8Linear)
    deq = our_model(ref)
    with torch.no_grad():
        for name, mod in deq.vision.named_modules():
            key = "visual." + name + ".weight"
            if key in fp8 and fp8[key].dtype == torch.float8_e4m3fn:
                mod.weight.copy_(fp8[key].float() * fp8[key[: -len(".weight")] + ".scale_weight"])
        grid = tuple(int(g) for g in inputs["image_grid_thw"][0])
        got = quant.vision(inputs["pixel_values"], grid)
        expect = deq.vision(inputs["pixel_values"], grid)
    assert (got - expect).abs().max() <= 1e-4


def test_files_without_vision_or_lm_head_still_encode_but_cannot_caption(ref, tmp_path: Path) -> None:
    no_head = tmp_path / "qwen_2.5_vl_7b_no_head.safetensors"
    save_file(_comfy(ref, lm_head=False), str(no_head))
    cfg = TextEncoderConfig.from_transformers_config(ref.config.to_dict())
    te = load_text_encoder(no_head, dtype=torch.float32, config=cfg)  # prompts still work
    with pytest.raises(CaptionWeightsError, match=r"no LM head \(lm_head.weight\).*text_encoder/.*type a prompt"):
        load_caption_model(no_head, te, dtype=torch.float32)
    text_only = tmp_path / "text_only.safetensors"
    save_file({k: v for k, v in _comfy(ref).items() if not k.startswith("visual.")}, str(text_only))
    with pytest.raises(CaptionWeightsError, match="no vision tower"):
        load_caption_model(
            text_only, load_text_encoder(text_only, dtype=torch.float32, config=cfg), dtype=torch.float32
        )
