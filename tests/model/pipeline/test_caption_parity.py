"""Captioning parity with transformers' Qwen2.5-VL (processor, vision tower, rope index, generate) and with the
diffusers pipeline's `get_image_caption`, on tiny random fp32 models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from caption_tiny import build_reference, our_model, reference_processor
from PIL import Image

from qil_core.errors import InputError
from qil_core.model.arch.vl_decoder import rope_index
from qil_core.model.pipeline.caption import GenerationSettings, caption_image, generate_ids
from qil_core.model.pipeline.caption_inputs import ImageProcessorConfig, image_patches, prompt_ids
from qil_core.model.weights.tokenizer import load_tokenizer


def _image(h: int, w: int, mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    px = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    if mode == "L":
        return Image.fromarray(px[:, :, 0], mode)
    if mode == "RGBA":
        px[: h // 2, :, 3] = 0  # fully transparent half: composited onto white
        px[h // 2 :, : w // 3, 3] = 128
    return Image.fromarray(px, mode)


@pytest.fixture(scope="module")
def reference():
    return build_reference()


@pytest.fixture(scope="module")
def ours(reference):
    return our_model(reference)


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    return reference_processor(tokenizer_dir)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.mark.parametrize(
    ("h", "w", "mode", "limits"),
    [
        (100, 150, "RGB", None),
        (100, 150, "RGBA", None),
        (20, 30, "RGB", None),  # upscaled to min_pixels
        (300, 410, "RGBA", (56 * 56, 28 * 28 * 40)),  # downscaled to max_pixels
        (57, 333, "L", None),
    ],
)
def test_patches_and_grid_match_the_processor(processor, h, w, mode, limits):
    image = _image(h, w, mode)
    cfg = ImageProcessorConfig() if limits is None else ImageProcessorConfig(min_pixels=limits[0], max_pixels=limits[1])
    kwargs = {} if limits is None else {"size": {"shortest_edge": limits[0], "longest_edge": limits[1]}}
    ref = processor.image_processor(images=image, return_tensors="np", **kwargs)
    patches, grid = image_patches(image, cfg)
    assert grid == tuple(int(g) for g in ref["image_grid_thw"][0])
    assert patches.shape == ref["pixel_values"].shape
    assert np.abs(patches - ref["pixel_values"]).max() <= 1e-6


def test_processor_config_files(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text('{"min_pixels": 100, "max_pixels": 2000}')
    cfg = ImageProcessorConfig.from_folder(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels) == (100, 2000)
    (tmp_path / "preprocessor_config.json").unlink()
    (tmp_path / "processor_config.json").write_text(
        '{"image_processor": {"size": {"shortest_edge": 300, "longest_edge": 9000}}}'
    )
    assert ImageProcessorConfig.from_folder(tmp_path).max_pixels == 9000
    assert ImageProcessorConfig.from_folder(tmp_path / "none") == ImageProcessorConfig()


@pytest.mark.parametrize("language", ["en", "zh"])
def test_prompt_ids_and_rope_index_match(reference, processor, tok, language):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import QwenImageLayeredPipeline

    pipe = QwenImageLayeredPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None
    )
    text = pipe.image_caption_prompt_en if language == "en" else pipe.image_caption_prompt_cn
    image = _image(100, 150, "RGBA")
    inputs = processor(text=text, images=image, padding=True, return_tensors="pt")
    grid = tuple(int(g) for g in inputs["image_grid_thw"][0])
    ids = prompt_ids(tok, language, grid, 2)
    assert ids == inputs["input_ids"][0].tolist()
    ref_pos, _ = reference.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    assert torch.equal(rope_index(ids, tok.token_to_id("<|image_pad|>"), [grid], 2), ref_pos[:, 0])


@pytest.mark.parametrize(("h", "w"), [(100, 150), (168, 56), (280, 308)])
def test_vision_features_match(reference, ours, processor, h, w):
    inputs = processor.image_processor(images=_image(h, w, "RGB", seed=h), return_tensors="pt")
    grid = tuple(int(g) for g in inputs["image_grid_thw"][0])
    with torch.no_grad():
        ref = reference.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        got = ours.vision(inputs["pixel_values"], grid)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_generated_ids_equal_generate(reference, ours, processor, tok, penalty):
    inputs = processor(
        text="<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n",
        images=_image(100, 150, "RGB", seed=3),
        return_tensors="pt",
    )
    eos = tok.token_to_id("<|im_end|>")
    with torch.no_grad():
        ref = reference.generate(
            **inputs, max_new_tokens=24, do_sample=False, repetition_penalty=penalty, eos_token_id=[eos]
        )
    expect = ref[0, inputs["input_ids"].shape[1] :].tolist()
    settings = GenerationSettings(repetition_penalty=penalty, eos_token_ids=(eos,))
    got = generate_ids(
        ours,
        inputs["input_ids"][0].tolist(),
        inputs["pixel_values"],
        tuple(int(g) for g in inputs["image_grid_thw"][0]),
        tok.token_to_id("<|image_pad|>"),
        settings,
        24,
    )
    assert got == expect
    assert len(set(got)) > 1


@pytest.fixture(scope="module")
def flat():
    """A reference whose next-token distributions are flat enough (top token < 0.5) that sampling has choices."""
    ref = build_reference(seed=4)
    with torch.no_grad():
        ref.lm_head.weight.mul_(0.15)
    return ref, our_model(ref)


@pytest.mark.parametrize(
    "knobs",
    [
        {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0},
        {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.1},
        {"temperature": 1.3, "top_k": 50, "top_p": 0.5, "repetition_penalty": 1.05},
    ],
)
def test_sampled_ids_equal_generate_with_the_same_seed(flat, processor, tok, knobs):
    """transformers samples from the global generator; ours from one seeded the same: the same ids, token for token."""
    reference, ours = flat
    inputs = processor(
        text="<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n",
        images=_image(100, 150, "RGB", seed=5),
        return_tensors="pt",
    )
    eos = tok.token_to_id("<|im_end|>")
    torch.manual_seed(11)
    with torch.no_grad():
        first = reference(**inputs).logits[0, -1].softmax(-1)
        ref = reference.generate(**inputs, max_new_tokens=24, do_sample=True, eos_token_id=[eos], **knobs)
    assert first.max() < 0.5  # a real choice at every step, not a disguised argmax
    expect = ref[0, inputs["input_ids"].shape[1] :].tolist()
    args = (inputs["input_ids"][0].tolist(), inputs["pixel_values"], tuple(int(g) for g in inputs["image_grid_thw"][0]))
    pad = tok.token_to_id("<|image_pad|>")
    settings = GenerationSettings(do_sample=True, eos_token_ids=(eos,), **knobs)
    got = generate_ids(ours, *args, pad, settings, 24, torch.Generator().manual_seed(11))
    assert got == expect
    greedy = generate_ids(ours, *args, pad, GenerationSettings(eos_token_ids=(eos,)), 24)
    assert got != greedy
    assert got != generate_ids(ours, *args, pad, settings, 24, torch.Generator().manual_seed(12))


@pytest.mark.parametrize("language", ["en", "zh"])
def test_caption_text_equals_diffusers_get_image_caption(reference, ours, processor, tok, language):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import QwenImageLayeredPipeline

    pipe = QwenImageLayeredPipeline(
        scheduler=None,
        vae=None,
        text_encoder=reference,
        tokenizer=processor.tokenizer,
        processor=processor,
        transformer=None,
    )
    image = _image(84, 112, "RGBA", seed=7)
    expect = pipe.get_image_caption(image, use_en_prompt=language == "en", device="cpu")
    got = caption_image(ours, tok, image, language=language)
    assert got == expect
    assert got


def test_sampling_with_top_k_1_is_greedy_and_bad_inputs(ours, tok):
    image = _image(56, 56, "RGB")
    greedy = caption_image(ours, tok, image, max_new_tokens=6)
    sampled = caption_image(
        ours,
        tok,
        image,
        max_new_tokens=6,
        settings=GenerationSettings(do_sample=True, top_k=1, temperature=0.1, top_p=0.001),
    )
    assert greedy == sampled
    with pytest.raises(InputError, match="caption language"):
        caption_image(ours, tok, image, language="fr")
    with pytest.raises(InputError, match="max_new_tokens"):
        caption_image(ours, tok, image, max_new_tokens=0)
