"""identify_checkpoint: one guess at what a file holds, from real key layouts, and the same answer from every loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qil_core.errors import ModelMismatchError
from qil_core.model.arch.config import TransformerConfig
from qil_core.model.arch.identify import COMFY_PREFIX, identify_checkpoint
from qil_core.model.weights.loading import load_transformer, load_vae
from qil_core.model.weights.text_loading import load_text_encoder
from qil_core.model.weights.tiny import build_tiny_modules
from qil_core.model.weights.vae_keys import diffusers_to_wan_key


@pytest.fixture(scope="module")
def keys() -> dict[str, list[str]]:
    transformer, vae, text = build_tiny_modules()
    vae_keys = list(vae.state_dict())
    lm = [f"model.{k}" for k in text.state_dict()]
    return {
        "transformer": list(transformer.state_dict()),
        "vae": vae_keys,
        "wan_vae": [diffusers_to_wan_key(k, 1) for k in vae_keys],
        "text": lm,
        "text_comfy_fp8": [
            *lm,
            "visual.blocks.0.attn.qkv.weight",
            "scaled_fp8",
            "model.layers.0.mlp.up_proj.scale_weight",
        ],
    }


def test_our_own_layouts_are_named_with_their_prefix(keys: dict[str, list[str]]) -> None:
    dit = identify_checkpoint(keys["transformer"])
    assert (dit.kind, dit.prefix, dit.hints) == ("transformer", "", frozenset())
    comfy = identify_checkpoint([COMFY_PREFIX + k for k in keys["transformer"]])
    assert (comfy.kind, comfy.prefix, "comfy_prefix" in comfy.hints) == ("transformer", COMFY_PREFIX, True)
    # an all-in-one file (transformer + VAE) is a transformer: the VAE loader finds its part by prefix
    all_in_one = [COMFY_PREFIX + k for k in keys["transformer"]] + ["vae." + k for k in keys["wan_vae"]]
    assert identify_checkpoint(all_in_one).kind == "transformer"
    for name in ("vae", "wan_vae"):
        assert identify_checkpoint(keys[name]).kind == "vae"
        wrapped = identify_checkpoint(["first_stage_model." + k for k in keys[name]])
        assert (wrapped.kind, wrapped.prefix) == ("vae", "first_stage_model.")
    text = identify_checkpoint(keys["text"])
    assert (text.kind, text.prefix, text.what) == ("text_encoder", "model.", "a Qwen2.5-VL text encoder")
    fp8 = identify_checkpoint(keys["text_comfy_fp8"])
    assert fp8.prefix == "model." and {"qwen2.5", "fp8_scaled"} <= fp8.hints
    new_names = identify_checkpoint([k.replace("model.", "model.language_model.", 1) for k in keys["text"]])
    assert (new_names.prefix, "transformers_names" in new_names.hints) == ("model.language_model.", True)
    canonical = identify_checkpoint(k[len("model.") :] for k in keys["text"])
    assert (canonical.kind, canonical.prefix) == ("text_encoder", "")


@pytest.mark.parametrize(
    ("names", "kind", "clause"),
    [
        ([], "empty", "it holds no tensors"),
        (["visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight"], "vision_tower", "only the vision tower"),
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "flux", "a Flux transformer"),
        ([COMFY_PREFIX + "input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"], "unet", "a UNet"),
        (["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"], "unet", "a UNet"),
        ([COMFY_PREFIX + "x_embedder.weight"], "diffusion_model", "a diffusion model checkpoint"),
        (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], "t5", "a T5 text encoder"),
        (["text_model.encoder.layers.0.self_attn.q_proj.weight"], "clip", "a CLIP text encoder"),
        (["model.layers.0.self_attn.k_proj.weight", "model.embed_tokens.weight"], "text_encoder", "not Qwen2.5-VL"),
        (["foo.weight", "bar.bias"], "unknown", "none of its 2 tensors"),
    ],
)
def test_other_files_are_named(names: list[str], kind: str, clause: str) -> None:
    found = identify_checkpoint(names)
    assert found.kind == kind and found.count == len(names)
    assert clause in found.describe()


def test_where_each_kind_belongs() -> None:
    vae = identify_checkpoint(["encoder.conv1.weight", "decoder.head.2.weight", "conv2.weight"])
    assert vae.describe(folder=True) == "it looks like a VAE (put it in models/vae)"
    assert identify_checkpoint(["x"]).describe(folder=True).startswith("none of its 1 tensors")  # no folder guessed


def _save(names: list[str], path: Path) -> Path:
    save_file({k: torch.zeros(2, 2) for k in names}, path)
    return path


def test_every_loader_gives_the_same_answer(tmp_path: Path) -> None:
    flux = _save(
        ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], tmp_path / "flux.safetensors"
    )
    for load in (load_transformer, load_text_encoder):
        with pytest.raises(ModelMismatchError, match="flux.safetensors.*it looks like a Flux transformer"):
            load(flux)
    with pytest.raises(ModelMismatchError, match="this is a Flux transformer, not a VAE"):
        load_vae(flux)
    with pytest.raises(ModelMismatchError, match="it looks like a Flux transformer; missing keys img_in.weight"):
        TransformerConfig.from_shapes({"double_blocks.0.img_attn.qkv.weight": (2, 2)})
    # a diffusers-named Qwen VAE is a VAE for every loader (the old transformer guess read down_blocks as a UNet)
    vae = ["encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.mid_block.attentions.0.x"]
    with pytest.raises(ModelMismatchError, match="it looks like a VAE;"):
        TransformerConfig.from_shapes(dict.fromkeys(vae, (2, 2)))
    with pytest.raises(ModelMismatchError, match=r"it looks like a VAE \(put it in models/vae\)"):
        load_text_encoder(_save(vae, tmp_path / "vae.safetensors"))
