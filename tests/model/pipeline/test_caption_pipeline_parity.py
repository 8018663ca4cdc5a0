"""An empty prompt: our decomposition (auto-caption, then the denoise) against diffusers' QwenImageLayeredPipeline,
which captions with transformers' Qwen2.5-VL through its processor. Same tiny random weights, CPU, fp32.

The tiny LM's `<|im_end|>` head row is scaled so its random captions end after some 30 tokens: a 512-token
caption would test the long-prompt path's float noise (covered elsewhere) instead of the captioning.

Both sides run the official usage's `cfg_normalize=True` (our default; diffusers' default is False), or both the
diffusers default: the layers must agree within 1/255 in English and in Chinese."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from caption_tiny import reference_processor
from PIL import Image
from qwen_tiny import build_reference
from reference_models import tiny_diffusers_transformer, tiny_diffusers_vae
from test_pipeline_parity import STEPS, _assert_layers_match, _image, model, pipe  # noqa: F401

from qil_core.model.pipeline.decompose import decompose

pytest.importorskip("diffusers")
IM_END = 151645


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """The parity test's diffusers folder, with a text encoder whose captions end early."""
    root = tmp_path_factory.mktemp("layered_caption")
    tiny_diffusers_transformer(seed=0, joint_attention_dim=64).save_pretrained(root / "transformer")
    tiny_diffusers_vae(seed=1).save_pretrained(root / "vae")
    te = build_reference(seed=2)
    with torch.no_grad():
        te.lm_head.weight[IM_END] *= -3.5
    te.save_pretrained(root / "text_encoder")
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageLayeredPipeline"}))
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prompt", "language", "seed", "normalize"),
    [(None, "en", 3, True), ("", "en", 5, False), (" ", "zh", 0, True), (None, "zh", 2, False)],
)
def test_empty_prompt_matches_the_reference(pipe, model, tokenizer_dir, prompt, language, seed, normalize) -> None:  # noqa: F811
    pipe.vl_processor = pipe.processor = reference_processor(tokenizer_dir)
    img = _image(seed)
    ref = pipe(
        image=Image.fromarray(img, "RGBA"),
        prompt=prompt,
        negative_prompt=" ",
        true_cfg_scale=4.0,
        layers=2,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(7),
        resolution=640,
        use_en_prompt=language == "en",
        cfg_normalize=normalize,
    ).images[0]
    ours = decompose(
        model,
        img,
        prompt=prompt,
        layers=2,
        steps=STEPS,
        cfg=4.0,
        cfg_normalize=normalize,
        seed=7,
        resolution=640,
        caption_language=language,
    )
    w, h = ours[0].size
    prompt_image = pipe.image_processor.resize(Image.fromarray(img, "RGBA"), h, w)
    caption = pipe.get_image_caption(prompt_image, use_en_prompt=language == "en", device="cpu")
    assert ours[0].metadata.get("caption") == caption
    assert 5 < len(pipe.tokenizer(caption)["input_ids"]) < 200
    _assert_layers_match(ref, ours[0])
    assert np.asarray(ref[1])[..., 3].any()
    typed = decompose(
        model, img, prompt=caption, layers=2, steps=STEPS, cfg=4.0, cfg_normalize=normalize, seed=7, resolution=640
    )
    for a, b in zip(ours[0].layers, typed[0].layers, strict=True):  # the caption was exactly the conditioning
        assert np.array_equal(a.pixels, b.pixels)
