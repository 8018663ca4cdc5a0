"""decompose / decompose_layer with an empty prompt caption the resized input as the reference does."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from qil_core.errors import InputError
from qil_core.layers.stack import Layer, LayerStack
from qil_core.model.loader import load_model
from qil_core.model.pipeline.auto_caption import caption_images, config_folders, wants_caption
from qil_core.model.pipeline.caption import GenerationSettings
from qil_core.model.pipeline.decompose import decompose
from qil_core.model.pipeline.denoise import draw_noise
from qil_core.model.pipeline.layer_split import decompose_layer
from qil_core.model.runtime.placement import ResidentPlacement
from qil_core.model.weights.tiny import write_tiny_model

FAST = dict(steps=2, resolution="custom", max_side=96, layers=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tinycap")
    comfy = write_tiny_model(root / "c", layout="comfyui", seed=5)
    diff = write_tiny_model(root / "d", layout="diffusers", seed=5)
    return {
        "comfyui": load_model(
            transformer=comfy["transformer"],
            vae=comfy["vae"],
            text_encoder=comfy["text_encoder"],
            dtype=torch.float32,
            device="cpu",
        ),
        "diffusers": load_model(model_dir=diff["model_dir"], dtype=torch.float32, device="cpu"),
    }


def _img(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (64, 96, 4), dtype=np.uint8)


def test_the_option_offers_the_languages_the_captioner_has() -> None:
    from qil_core.model.pipeline.caption_inputs import LANGUAGES
    from qil_core.model.pipeline.options import CAPTION_LANGUAGES

    assert CAPTION_LANGUAGES == LANGUAGES


def test_which_prompts_trigger_captioning() -> None:
    assert wants_caption(None, None, True) and wants_caption("", None, True) and wants_caption(" ", None, True)
    assert not wants_caption("  ", None, True)  # the reference captions only None, "" and " "
    assert not wants_caption("", None, False) and not wants_caption(None, torch.zeros(1, 2, 3), True)


def test_config_folders_of_both_layouts(models) -> None:
    gen, proc = config_folders(models["diffusers"].sources["text_encoder"])
    assert gen is not None and (gen / "generation_config.json").is_file()
    assert proc is not None and proc.name == "processor"
    assert GenerationSettings.from_folder(gen).do_sample and GenerationSettings.from_folder(gen).top_k == 1
    assert config_folders(models["comfyui"].sources["text_encoder"])[1] is None  # single file: processor defaults


def test_generation_config_fields(tmp_path) -> None:
    """What transformers' generate takes from generation_config.json; its length limits never apply (the reference
    passes max_new_tokens=512), and an unreadable file is named in the error."""
    import json

    from qil_core.errors import ModelMismatchError

    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {
                "do_sample": True,
                "temperature": 0.7,
                "top_k": 20,
                "top_p": 0.8,
                "repetition_penalty": 1.05,
                "eos_token_id": [151645, 151643],
                "max_new_tokens": 5,
                "max_length": 9,
            }
        )
    )
    got = GenerationSettings.from_folder(tmp_path)
    assert got == GenerationSettings(True, 0.7, 20, 0.8, 1.05, (151645, 151643))
    assert not hasattr(got, "max_new_tokens")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 151645, "temperature": null}')
    assert GenerationSettings.from_folder(tmp_path) == GenerationSettings(eos_token_ids=(151645,))
    assert GenerationSettings.from_folder(tmp_path / "missing") == GenerationSettings()
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ModelMismatchError, match="generation_config.json is not a readable generation config"):
        GenerationSettings.from_folder(tmp_path)


@pytest.mark.parametrize("layout", ["comfyui", "diffusers"])
def test_empty_prompt_is_captioned_logged_and_returned(models, layout, caplog: pytest.LogCaptureFixture) -> None:
    model = models[layout]
    images = [_img(0), _img(1)]
    with caplog.at_level(logging.INFO):
        out = decompose(model, np.stack(images), prompt="", caption_language="zh", **FAST)
    captions = [s.metadata.get("caption") for s in out]
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    assert "auto-caption of image 0" in caplog.text and captions[0] in caplog.text
    # the same caption typed as the prompt gives the same layers (the caption was the conditioning)
    typed = decompose(model, images[0][None], prompt=captions[0], **FAST)
    again = decompose(model, images[0][None], prompt=None, caption_language="zh", **FAST)
    assert again[0].metadata.get("caption") == captions[0] and typed[0].metadata.get("caption") is None
    for a, b in zip(typed[0].layers, again[0].layers, strict=True):
        assert np.array_equal(a.pixels, b.pixels)
    # direct captioning of the resized input equals what decompose used
    direct = caption_images(model, ResidentPlacement("cpu", torch.float32), [images[0]], language="zh")
    assert direct == [captions[0]]


def test_auto_caption_off_and_bad_options(models) -> None:
    out = decompose(models["comfyui"], _img()[None], prompt="", auto_caption=False, **FAST)
    assert out[0].metadata.get("caption") is None
    with pytest.raises(InputError, match="caption_language"):
        decompose(models["comfyui"], _img()[None], prompt="", caption_language="fr", **FAST)
    with pytest.raises(InputError, match="auto_caption"):
        decompose(models["comfyui"], _img()[None], prompt="", auto_caption="yes", **FAST)


def test_decompose_layer_captions_the_layer(models) -> None:
    px = np.zeros((64, 96, 4), np.float32)
    px[8:56, 10:90] = (0.8, 0.3, 0.2, 1.0)
    stack = LayerStack(96, 64, [Layer(pixels=px, name="art")])
    out = decompose_layer(models["comfyui"], stack, 0, prompt=" ", **{k: v for k, v in FAST.items() if k != "layers"})
    assert isinstance(out.metadata.get("caption"), str) and out.metadata.get("caption")
    assert len(out) == 2


@pytest.mark.parametrize("kind", ["offload", "block_swap"])
def test_caption_is_the_same_in_every_memory_mode(models, kind: str) -> None:
    from qil_core.model.runtime.offload import BlockSwapPlacement, OffloadPlacement

    model = models["comfyui"]
    resident = caption_images(model, ResidentPlacement("cpu", torch.float32), [_img(3)], max_new_tokens=12)
    placement = OffloadPlacement("cpu") if kind == "offload" else BlockSwapPlacement("cpu", 0, prefetch=True)
    assert caption_images(model, placement, [_img(3)], max_new_tokens=12) == resident


def test_the_vision_tower_loads_only_for_a_caption_and_is_freed_after(models, monkeypatch) -> None:
    import gc
    import weakref

    from qil_core.model.pipeline import auto_caption

    loaded: list[weakref.ref] = []
    real = auto_caption.load_caption_model

    def spy(*args, **kwargs):
        captioner = real(*args, **kwargs)
        loaded.append(weakref.ref(captioner.vision))
        return captioner

    monkeypatch.setattr(auto_caption, "load_caption_model", spy)
    model = models["comfyui"]
    decompose(model, _img()[None], prompt="a typed prompt", **FAST)
    decompose(model, _img()[None], prompt="", auto_caption=False, **FAST)
    assert loaded == []  # a prompt, or auto-caption off: nothing of the vision tower is read
    out = decompose(model, _img()[None], prompt="", **FAST)
    assert out[0].metadata.get("caption") and len(loaded) == 1
    gc.collect()
    assert loaded[0]() is None  # released once the caption is written
    assert not any(n.startswith(("visual", "vision")) for n, _ in model.text_encoder.named_parameters())


def test_caption_callback_counts_tokens_over_the_batch_and_can_cancel(models) -> None:
    model = models["comfyui"]
    ticks: list[tuple[int, int]] = []
    steps: list[tuple[int, int]] = []
    out = decompose(
        model,
        np.stack([_img(0), _img(1)]),
        prompt="",
        caption_callback=lambda n, total: ticks.append((n, total)),
        callback=lambda s, total: steps.append((s, total)),
        **FAST,
    )
    assert {t for _, t in ticks} == {1024}  # 2 images x 512 most tokens
    first = [n for n, _ in ticks if n <= 512]
    second = [n - 512 for n, _ in ticks if n > 512]
    assert first == list(range(1, len(first) + 1)) and second == list(range(1, len(second) + 1))
    assert all(len(s.metadata["caption"]) > 0 for s in out) and len(steps) == 2 * FAST["steps"]

    class Stop(Exception):
        pass

    def stop_at_three(n: int, _total: int) -> None:
        if n == 3:
            raise Stop

    steps.clear()
    with pytest.raises(Stop):
        decompose(
            model,
            _img(0)[None],
            prompt="",
            caption_callback=stop_at_three,
            callback=lambda s, t: steps.append((s, t)),
            **FAST,
        )
    assert steps == []  # cancelled while captioning: no denoising ran
    again = decompose(model, np.stack([_img(0), _img(1)]), prompt="", **FAST)
    assert [s.metadata["caption"] for s in again] == [s.metadata["caption"] for s in out]


def test_captions_and_per_image_negative_embeddings_together(models) -> None:
    """A batch's captions are encoded in one use of the text encoder, and negative embeddings with one row per
    image work under auto-caption as they do with a typed prompt (they used to be refused)."""
    from qil_core.model.pipeline import decompose as pipeline

    model = models["comfyui"]
    images = np.stack([_img(0), _img(1)])
    out = decompose(model, images, prompt="", **FAST)
    captions = [s.metadata["caption"] for s in out]
    width = model.transformer.config.joint_attention_dim
    neg = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(0))
    calls = []
    real = pipeline._encode_strings

    def spy(model, placement, strings, max_len):
        calls.append(list(strings))
        return real(model, placement, strings, max_len)

    pipeline._encode_strings = spy
    try:
        auto = decompose(model, images, prompt="", negative_prompt=None, negative_embeds=neg, cfg=4.0, **FAST)
    finally:
        pipeline._encode_strings = real
    assert calls == [captions]  # both captions, one call; the negative came as embeddings
    w, h = out[0].size
    noise = draw_noise([(FAST["layers"] + 1, h // 8, w // 8)] * 2, 0, torch.float32)  # the batch's own draw
    for b in range(2):
        typed = decompose(
            model,
            images[b : b + 1],
            prompt=captions[b],
            negative_prompt=None,
            negative_embeds=neg[b : b + 1],
            noise=[noise[b]],
            **FAST,
        )
        for a, c in zip(auto[b].layers, typed[0].layers, strict=True):
            assert np.array_equal(a.pixels, c.pixels)
