"""The whole decomposition against diffusers' QwenImageLayeredPipeline with the same tiny random weights (CPU, fp32).

The reference components (tiny transformer, tiny RGBA-VAE, tiny Qwen2.5-VL and the real tokenizer) are saved by
diffusers/transformers in the diffusers folder layout and loaded by our loaders. Final layer pixels must agree
within 1/255 (uint8 RGBA at processing size; RGB compared where the layer is not fully transparent, since our
layers are cropped to their content). Resolution 640 with a small 4:3 input gives the reference's 736x544 bucket.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from qwen_tiny import build_reference
from reference_models import layered_scheduler, tiny_diffusers_transformer, tiny_diffusers_vae

from qil_core.layers.composite import paste_layer
from qil_core.layers.stack import LayerStack
from qil_core.model.loader import load_model
from qil_core.model.pipeline.decompose import decompose

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

PROMPT = "a red fox sitting in front of a small blue house"
STEPS = 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A diffusers pipeline folder written by diffusers/transformers themselves (sharded transformer)."""
    root = tmp_path_factory.mktemp("layered")
    tiny_diffusers_transformer(seed=0, joint_attention_dim=64).save_pretrained(
        root / "transformer", max_shard_size="40KB"
    )
    tiny_diffusers_vae(seed=1).save_pretrained(root / "vae")
    build_reference(seed=2).save_pretrained(root / "text_encoder")
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageLayeredPipeline"}))
    return root


@pytest.fixture(scope="module")
def pipe(saved: Path, tokenizer_dir: Path):
    """diffusers' pipeline over the saved components (processor None: every test passes a prompt)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    p = diffusers.QwenImageLayeredPipeline(
        scheduler=layered_scheduler(),
        vae=diffusers.AutoencoderKLQwenImage.from_pretrained(saved / "vae").eval(),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(saved / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir)),
        processor=None,
        transformer=diffusers.QwenImageTransformer2DModel.from_pretrained(saved / "transformer").eval(),
    )
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def model(saved: Path):
    return load_model(model_dir=saved, dtype=torch.float32, device="cpu")


def _image(seed: int) -> np.ndarray:
    """A 120x90 RGBA uint8 image with smooth colour, a hard-edged square and partly transparent corners."""
    yy, xx = np.mgrid[0:90, 0:120].astype(np.float32)
    rng = np.random.default_rng(seed)
    img = np.empty((90, 120, 4), np.float32)
    for c in range(3):
        img[..., c] = 0.5 + 0.4 * np.sin(xx / (7 + 3 * c + seed) + rng.uniform(0, 6)) * np.cos(yy / 11)
    img[30:60, 40:80, :3] = rng.uniform(0, 1, 3)
    img[..., 3] = np.clip(1.2 - ((xx - 60) ** 2 + (yy - 45) ** 2) / 4000, 0, 1)
    return np.rint(img * 255).astype(np.uint8)


def _assert_layers_match(ref_images: list, stack: LayerStack) -> None:
    """Reference PIL layers vs our stack at processing size: alpha everywhere, RGB where our alpha > 0, <= 1/255."""
    assert len(ref_images) == len(stack)
    for k, (ref, layer) in enumerate(zip(ref_images, stack.layers, strict=True)):
        assert ref.mode == "RGBA" and ref.size == stack.size
        want = np.asarray(ref).astype(np.int16)
        full = paste_layer(np.zeros((stack.height, stack.width, 4), np.float32), layer)
        got = np.rint(full * 255).astype(np.int16)
        da = np.abs(want[..., 3] - got[..., 3])
        assert da.max() <= 1, f"layer {k}: alpha differs by up to {da.max()}/255"
        seen = full[..., 3] > 0
        assert seen.mean() > 0.5, f"layer {k} is mostly transparent; the comparison would be vacuous"
        drgb = np.abs(want[..., :3] - got[..., :3])[seen]
        assert drgb.max() <= 1, f"layer {k}: RGB differs by up to {drgb.max()}/255"


@pytest.mark.slow
def test_decompose_matches_reference_with_cfg_normalize(pipe, model) -> None:
    img = _image(0)
    ref = pipe(
        image=Image.fromarray(img, "RGBA"),
        prompt=PROMPT,
        negative_prompt=" ",
        true_cfg_scale=4.0,
        layers=2,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(42),
        resolution=640,
        cfg_normalize=True,
    ).images[0]
    calls = []
    ours = decompose(
        model,
        img,
        prompt=PROMPT,
        layers=2,
        steps=STEPS,
        cfg=4.0,
        cfg_normalize=True,
        seed=42,
        resolution=640,
        callback=lambda s, t: calls.append((s, t)),
    )
    assert len(ours) == 1 and ours[0].size == (736, 544)
    assert [layer.name for layer in ours[0]] == ["Background", "Layer 1"]
    assert calls == [(1, STEPS), (2, STEPS)]
    _assert_layers_match(ref, ours[0])


@pytest.mark.slow
def test_decompose_matches_reference_with_embeddings_no_normalize(pipe, model) -> None:
    """Embeddings from diffusers' own encode_prompt, passed to both; three layers; plain true CFG; sequential CFG."""
    img = _image(1)
    pos, pos_mask = pipe.encode_prompt(PROMPT, device=torch.device("cpu"))
    neg, neg_mask = pipe.encode_prompt(" ", device=torch.device("cpu"))
    ref = pipe(
        image=Image.fromarray(img, "RGBA"),
        prompt="(ignored: embeddings are given)",
        prompt_embeds=pos,
        prompt_embeds_mask=pos_mask,
        negative_prompt_embeds=neg,
        negative_prompt_embeds_mask=neg_mask,
        true_cfg_scale=3.0,
        layers=3,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(5),
        resolution=640,
        cfg_normalize=False,
    ).images[0]
    ours = decompose(
        model,
        torch.from_numpy(img.astype(np.float32) / 255)[None],
        prompt_embeds=pos,
        prompt_mask=pos_mask,
        negative_prompt=None,
        negative_embeds=neg,
        negative_mask=neg_mask,
        layers=3,
        steps=STEPS,
        cfg=3.0,
        cfg_normalize=False,
        seed=5,
        resolution=640,
        cfg_batch=False,
    )
    assert [layer.name for layer in ours[0]] == ["Background", "Layer 1", "Layer 2"]
    _assert_layers_match(ref, ours[0])


@pytest.mark.slow
def test_batch_is_grouped_correctly_unlike_the_reference(pipe, model) -> None:
    """Two images, one layer each: the reference slices its B*N decoded layers in groups of N+1 (wrong); ours by N.

    Noise for a batch is one (B, N+1, 16, h, w) draw, like the reference, so image b's layers equal the
    reference's layers b*N..(b+1)*N-1 (test_pipeline_inputs checks them against single-image runs).
    """
    imgs = [_image(2), _image(3)]
    ref = pipe(
        image=[Image.fromarray(i, "RGBA") for i in imgs],
        prompt=[PROMPT, PROMPT],
        negative_prompt=[" ", " "],
        true_cfg_scale=4.0,
        layers=1,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(9),
        resolution=640,
        cfg_normalize=True,
    ).images
    assert [len(g) for g in ref] == [2, 0]  # the reference bug: image 0 gets both images' layers, image 1 none
    ours = decompose(model, np.stack(imgs), prompt=PROMPT, layers=1, steps=STEPS, seed=9, resolution=640)
    assert len(ours) == 2 and [len(s) for s in ours] == [1, 1]
    _assert_layers_match(ref[0][0:1], ours[0])
    _assert_layers_match(ref[0][1:2], ours[1])
