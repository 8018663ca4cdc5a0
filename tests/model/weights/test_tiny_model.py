"""The tiny random model writer (qil_core.model.weights.tiny) and load_model on its files, in both layouts."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from qil_core.errors import InputError, ModelFileNotFoundError, ModelMismatchError
from qil_core.model.arch.text_encoder import Qwen25TextEncoder, TextEncoderConfig
from qil_core.model.loader import QwenLayeredModel, load_model
from qil_core.model.pipeline.decompose import decompose
from qil_core.model.pipeline.prompt import template_prefix_length
from qil_core.model.weights.tiny import COMFY_FILES, write_tiny_model
from qil_core.model.weights.tokenizer import load_tokenizer

FAST = dict(prompt="a scene", layers=2, steps=1, resolution="custom", max_side=64)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("tiny")
    return {layout: write_tiny_model(root / layout, layout=layout, seed=2) for layout in ("comfyui", "diffusers")}


def _load_comfy(paths: dict[str, Path], **kw) -> QwenLayeredModel:
    return load_model(
        transformer=paths["transformer"],
        vae=paths["vae"],
        text_encoder=paths["text_encoder"],
        device="cpu",
        **{"dtype": torch.float32, **kw},
    )


def test_files_are_labelled_random_and_the_load_says_so(written, caplog: pytest.LogCaptureFixture) -> None:
    comfy = written["comfyui"]
    for key in ("transformer", "vae", "text_encoder"):
        assert comfy[key] == comfy["root"] / COMFY_FILES[key]
        with safe_open(str(comfy[key]), framework="pt") as f:
            meta = f.metadata()
        assert meta["qil_random_weights"] == "true" and "RANDOM" in meta["description"]
    with caplog.at_level(logging.WARNING):
        model = _load_comfy(comfy)
    assert model.random_weights and "RANDOM WEIGHTS" in caplog.text


def test_comfyui_key_layouts(written) -> None:
    comfy = written["comfyui"]
    with safe_open(str(comfy["transformer"]), framework="pt") as f:
        keys = set(f.keys())
    assert "time_text_embed.addition_t_embedding.weight" in keys and "img_in.weight" in keys
    with safe_open(str(comfy["vae"]), framework="pt") as f:
        vae_keys = set(f.keys())
    assert "decoder.head.2.weight" in vae_keys and "encoder.conv1.weight" in vae_keys  # Wan naming
    assert not any("conv_out" in k or "down_blocks" in k for k in vae_keys)
    with safe_open(str(comfy["text_encoder"]), framework="pt") as f:
        keys = set(f.keys())
    assert all(k.startswith(("model.", "visual.")) or k == "lm_head.weight" for k in keys)
    assert "lm_head.weight" in keys and "visual.merger.mlp.2.weight" in keys  # the captioning parts


@pytest.mark.slow
def test_both_layouts_hold_the_same_model(written) -> None:
    a = _load_comfy(written["comfyui"])
    b = load_model(model_dir=written["diffusers"]["model_dir"], dtype=torch.float32, device="cpu")
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    img = np.random.default_rng(0).uniform(0, 1, (48, 64, 3)).astype(np.float32)
    ra, rb = decompose(a, img, **FAST)[0], decompose(b, img, **FAST)[0]
    for la, lb in zip(ra.layers, rb.layers, strict=True):
        np.testing.assert_array_equal(la.pixels, lb.pixels)


def test_diffusers_reads_the_diffusers_layout(written) -> None:
    diffusers = pytest.importorskip("diffusers")
    root = written["diffusers"]["model_dir"]
    ours = load_model(model_dir=root, dtype=torch.float32, device="cpu", load_text=False)
    assert ours.text_encoder is None and not ours.can_encode_prompts
    dit = diffusers.QwenImageTransformer2DModel.from_pretrained(root / "transformer").eval()
    vae = diffusers.AutoencoderKLQwenImage.from_pretrained(root / "vae").eval()
    g = torch.Generator().manual_seed(0)
    x, txt = torch.randn(1, 3 * 8, 64, generator=g), torch.randn(1, 5, 128, generator=g)
    shapes = [(1, 2, 4)] * 3
    with torch.no_grad():
        want = dit(
            hidden_states=x,
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=None,
            timestep=torch.tensor([0.5]),
            img_shapes=[shapes],
            additional_t_cond=torch.zeros(1, dtype=torch.long),
            return_dict=False,
        )[0]
        got = ours.transformer(x, txt, None, torch.tensor([0.5]), shapes)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        pix = torch.rand(1, 4, 32, 48, generator=g) * 2 - 1
        torch.testing.assert_close(
            ours.vae.encode(pix), vae.encode(pix[:, :, None]).latent_dist.mode()[:, :, 0], atol=1e-5, rtol=1e-5
        )


def test_tiny_tokenizer(written) -> None:
    tok = load_tokenizer(written["diffusers"]["tokenizer"])
    assert tok.vocab_size == 270  # 256 bytes + 8 merges + 3 chat tokens + 3 vision tokens (captioning)
    assert len(tok.encode("<|im_start|>")) == 1 and len(tok.encode("<|im_end|>")) == 1
    assert len(tok.encode("<|image_pad|>")) == 1
    text = "Grüße, 世界 🙂 the thin"
    assert tok.decode(tok.encode(text)) == text
    assert 20 < template_prefix_length(tok) < 200  # computed from this vocabulary, not the real 34


@pytest.mark.slow
def test_real_tokenizer_copy(tmp_path: Path, tokenizer_dir: Path) -> None:
    paths = write_tiny_model(tmp_path, layout="comfyui", tokenizer_dir=tokenizer_dir, dtype=torch.bfloat16)
    model = load_model(
        transformer=paths["transformer"],
        vae=paths["vae"],
        text_encoder=paths["text_encoder"],
        dtype=torch.bfloat16,
        device="cpu",
    )
    assert model.text_encoder.config.vocab_size == 152064 and model.tokenizer.vocab_size > 151_000
    assert template_prefix_length(model.tokenizer) == 34
    out = decompose(model, np.zeros((48, 64, 3), np.uint8) + 100, **FAST)  # bf16 end to end, no dtype errors
    assert len(out[0]) == 2 and out[0].layers[0].pixels.dtype == np.float32


def test_load_model_errors(written, tokenizer_dir: Path, tmp_path: Path) -> None:
    comfy = written["comfyui"]
    with pytest.raises(ModelMismatchError, match="tokenizer .* has 151"):
        _load_comfy(comfy, tokenizer=tokenizer_dir)  # the real vocabulary does not fit the tiny text encoder
    with pytest.raises(InputError, match="needs model_dir .* or both transformer= and vae="):
        load_model(transformer=comfy["transformer"])
    with pytest.raises(ModelFileNotFoundError, match="vae weights not found"):
        load_model(transformer=comfy["transformer"], vae=tmp_path / "none.safetensors")
    with pytest.raises(ModelFileNotFoundError, match="model folder not found"):
        load_model(model_dir=tmp_path / "nowhere")
    model = _load_comfy(comfy)
    narrow = Qwen25TextEncoder(
        TextEncoderConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ModelMismatchError, match="hidden size 64, but the transformer expects 128"):
        replace(model, text_encoder=narrow)
