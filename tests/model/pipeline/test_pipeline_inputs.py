"""Bad and awkward inputs to the pipelines (robustness.md §4.2, rows D1-D14), input conversion, sizes and CFG batching.

Runs the tiny random model of qil_core.model.weights.tiny (ComfyUI single-file layout) at small "custom" sizes, so each
decomposition takes a fraction of a second; the reference parity lives in test_pipeline_parity.py.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from qil_core.errors import InputError
from qil_core.model.loader import load_model
from qil_core.model.pipeline import imaging
from qil_core.model.pipeline.decompose import decompose
from qil_core.model.pipeline.denoise import TextCond, batch_text, draw_noise
from qil_core.model.pipeline.imaging import (
    bucket_size,
    check_output_size,
    pack_latents,
    prepare_images,
    resize_rgba,
    to_model_pixels,
    unpack_latents,
)
from qil_core.model.weights.tiny import write_tiny_model

FAST = dict(steps=2, resolution="custom", max_side=96, layers=2)  # 96x64 px: 6x4 tokens per frame


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    paths = write_tiny_model(tmp_path_factory.mktemp("tiny"), layout="comfyui", seed=3)
    return load_model(
        transformer=paths["transformer"],
        vae=paths["vae"],
        text_encoder=paths["text_encoder"],
        dtype=torch.float32,
        device="cpu",
    )


def _img(h: int = 64, w: int = 96, c: int = 3, seed: int = 0) -> np.ndarray:
    """A smooth float32 test image (H, W, C) in 0..1."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = [0.5 + 0.45 * np.sin(xx / (5 + k + seed) + yy / (9 + 2 * k)) for k in range(c)]
    return np.stack(chans, axis=-1).astype(np.float32)


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert (x.name, x.x, x.y) == (y.name, y.x, y.y)
        np.testing.assert_array_equal(x.pixels, y.pixels)


# --- input conversion (D1, D2, D7, D8, D9) --------------------------------------------------------------


@pytest.mark.slow
def test_d1_rgb_float_batch_gives_n_layers_of_the_bucket_size(model) -> None:
    out = decompose(model, torch.from_numpy(_img())[None], prompt="a scene", **FAST)
    assert len(out) == 1 and out[0].size == (96, 64) and len(out[0]) == 2
    assert [layer.name for layer in out[0]] == ["Background", "Layer 1"]
    for layer in out[0]:
        assert layer.pixels.dtype == np.float32 and layer.pixels.min() >= 0 and layer.pixels.max() <= 1


def test_d2_channels_batch_axis_and_mask() -> None:
    rgb = _img()
    gray = prepare_images(torch.from_numpy(rgb[..., :1])[None])[0]
    assert gray.shape == (64, 96, 4) and np.array_equal(gray[..., 0], gray[..., 2]) and (gray[..., 3] == 255).all()
    no_batch = prepare_images(torch.from_numpy(rgb))
    with_batch = prepare_images(torch.from_numpy(rgb)[None])
    assert len(no_batch) == 1 and np.array_equal(no_batch[0], with_batch[0])
    rgba = np.concatenate([rgb, np.full((64, 96, 1), 0.5, np.float32)], axis=-1)
    assert (prepare_images(rgba[None])[0][..., 3] == 128).all()  # the input alpha is used
    mask = np.zeros((64, 96), np.float32)
    mask[:, :10] = 1.0  # ComfyUI MASK: 1 = transparent
    alpha = prepare_images(rgb[None], mask=torch.from_numpy(mask))[0][..., 3]
    assert (alpha[:, :10] == 0).all() and (alpha[:, 10:] == 255).all()
    pil = prepare_images(Image.fromarray((rgb * 255).astype(np.uint8), "RGB"))[0]
    assert pil.shape == (64, 96, 4) and (pil[..., 3] == 255).all()
    for bad in (np.zeros((2, 1, 64, 96, 3), np.float32), np.zeros((1, 64, 96, 5), np.float32)):
        with pytest.raises(InputError, match=r"expected an image \[B, H, W, C\]"):
            prepare_images(bad)
    with pytest.raises(InputError, match="mask 0 is 32x64 but image 0 is 96x64"):
        prepare_images(rgb, mask=np.zeros((64, 32), np.float32))


@pytest.mark.slow
def test_d2_gray_input_decomposes(model) -> None:
    out = decompose(model, _img(c=1)[None], prompt="gray", **FAST)
    assert len(out[0]) == 2


def test_d7_nan_inf_and_out_of_range_are_repaired_with_warnings(caplog: pytest.LogCaptureFixture) -> None:
    x = _img()
    x[0, 0] = [math.nan, math.inf, -math.inf]
    x[1, 1] = [1.7, -0.3, 0.5]
    with caplog.at_level(logging.WARNING):
        out = prepare_images(x)[0]
    assert list(out[0, 0, :3]) == [0, 255, 0] and list(out[1, 1, :3]) == [255, 0, 128]
    text = caplog.text
    assert "3 NaN/inf values" in text and "2 values outside 0..1" in text


def test_d8_dtypes_and_layouts_convert_identically() -> None:
    u8 = np.rint(_img() * 255).astype(np.uint8)
    ref = prepare_images(u8)[0]
    f32 = torch.from_numpy(u8.astype(np.float32) / 255)
    assert np.array_equal(prepare_images(f32)[0], ref)
    assert np.array_equal(prepare_images(f32.half())[0], ref)  # fp16 keeps 8-bit steps exactly
    assert np.abs(prepare_images(f32.bfloat16())[0].astype(int) - ref).max() <= 1  # bf16 has 8 mantissa bits
    assert np.array_equal(prepare_images(torch.from_numpy(u8))[0], ref)
    wide = torch.zeros(64, 192, 3)
    wide[:, ::2] = f32
    assert not wide[:, ::2].is_contiguous()
    assert np.array_equal(prepare_images(wide[:, ::2])[0], ref)
    u16 = u8.astype(np.uint16) * 257
    assert np.array_equal(prepare_images(u16)[0], ref)
    with pytest.raises(InputError, match="dtype int32"):
        prepare_images(u8.astype(np.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_d8_cuda_tensor_on_a_cpu_model(model) -> None:
    out = decompose(model, torch.from_numpy(_img()).cuda()[None], prompt="x", **FAST)
    assert len(out[0]) == 2


def test_d9_almost_constant_input_warns(caplog: pytest.LogCaptureFixture) -> None:
    flat = np.full((64, 96, 3), 0.998, np.float32)
    flat[5, 5] = 0.2  # a single odd pixel does not make it a picture
    with caplog.at_level(logging.WARNING):
        prepare_images(flat)
    assert "almost constant" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_images(_img())
    assert "almost constant" not in caplog.text


# --- sizes (D4, D5, D6) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "res", "want"),
    [
        ((640, 640), 640, (640, 640)),
        ((1024, 768), 640, (736, 544)),
        ((1536, 1024), 640, (768, 512)),
        ((1920, 1080), 640, (864, 480)),
        ((1024, 1024), 1024, (1024, 1024)),
        ((1920, 1080), 1024, (1376, 768)),
        ((999, 577), 640, (832, 480)),
        ((577, 999), 640, (480, 832)),
    ],
)
def test_bucket_sizes_match_the_reference(size: tuple[int, int], res: int, want: tuple[int, int]) -> None:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import calculate_dimensions

    assert bucket_size(*size, res) == want
    w, h = calculate_dimensions(res * res, size[0] / size[1])
    assert (w // 16 * 16, h // 16 * 16) == want


def test_bucket_rounds_halves_to_even_and_custom_mode() -> None:
    # 2401x1600: sqrt(640^2 * 2401/1600) = 784.0 exactly, 784/32 = 24.5 -> Python round gives 24 (768), not 25
    assert bucket_size(2401, 1600, 640) == (768, 512)
    assert bucket_size(1000, 500, "custom", 1000) == (992, 512)  # 1000 -> 31.25 -> 992; 496 -> 15.5 -> 16 * 32
    assert bucket_size(1000, 500, "custom", 1008) == (1024, 512)  # 31.5 -> 32 (even)
    assert bucket_size(300, 900, "custom", 64) == (32, 64)
    for bad in (512, "big", None, 640.5):
        with pytest.raises(InputError, match="resolution must be 640, 1024 or 'custom'"):
            bucket_size(100, 100, bad)
    with pytest.raises(InputError, match="needs max_side"):
        bucket_size(100, 100, "custom", None)


@pytest.mark.slow
def test_d4_odd_sizes_map_back_and_tiny_images_are_refused(model) -> None:
    out = decompose(model, _img(57, 99), prompt="x", output_size="original", **FAST)[0]
    assert out.size == (99, 57)
    for layer in out:
        assert layer.x >= 0 and layer.y >= 0 and layer.x + layer.width <= 99 and layer.y + layer.height <= 57
    for h, w in ((1, 1), (15, 15), (31, 200)):
        with pytest.raises(InputError, match="at least 32 px"):
            decompose(model, _img(h, w), prompt="x", **FAST)


def test_d5_extreme_aspect_ratios_are_refused(model) -> None:
    for h, w in ((16 * 4, 10000), (10000, 16 * 4)):
        with pytest.raises(InputError, match="beyond 8:1 are not supported"):
            decompose(model, np.zeros((h, w, 3), np.uint8), prompt="x", **FAST)


@pytest.mark.slow
def test_d6_output_mapping_is_estimated_before_sampling(model, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="needs up to 25.60 GB"):
        check_output_size(4, 20_000, 20_000, available=24 * 2**30)
    with pytest.raises(InputError, match="over the 30000 px per side limit"):
        check_output_size(4, 31_000, 100)
    check_output_size(4, 8192, 8192, available=24 * 2**30)  # 4.3 GB fits
    monkeypatch.setattr(imaging, "available_ram", lambda: 100_000)  # 2 x 96 x 64 x 16 B do not fit in half
    calls = []
    with pytest.raises(InputError, match="output_size='processing'"):
        decompose(model, _img(), prompt="x", output_size="original", callback=lambda s, t: calls.append(s), **FAST)
    assert calls == []  # refused before the first step
    assert len(decompose(model, _img(), prompt="x", output_size="processing", **FAST)[0]) == 2


# --- parameters (D10, D12, D14) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("layers", 0, "layers must be in 1..20"),
        ("layers", 21, "layers must be in 1..20"),
        ("layers", -3, "layers must be in 1..20"),
        ("layers", math.nan, "layers must be an integer in 1..20"),
        ("layers", 2.5, "layers must be an integer"),
        ("layers", True, "layers must be an integer"),
        ("steps", 0, r"steps must be in 1..1000"),
        ("steps", 1001, r"steps must be in 1..1000"),
        ("cfg", math.nan, "cfg must be a finite number in 1..100"),
        ("cfg", 0.5, "cfg must be a finite number"),
        ("cfg", math.inf, "cfg must be a finite"),
        ("cfg", "4", "cfg must be a number"),
        ("seed", math.nan, "seed must be an integer"),
        ("seed", 1.5, "seed must be an integer"),
        ("seed", "7", "seed must be an integer"),
        ("resolution", 512, "resolution must be 640, 1024 or 'custom'"),
        ("output_size", "full", "output_size must be 'processing' or 'original'"),
        ("cfg_batch", "yes", "cfg_batch must be True, False or 'auto'"),
    ],
)
def test_d10_parameters_are_validated_with_their_range(model, name: str, value: object, match: str) -> None:
    kwargs = {**FAST, name: value}
    with pytest.raises(InputError, match=match):
        decompose(model, _img(), prompt="x", **kwargs)


def test_d14_missing_model() -> None:
    with pytest.raises(InputError, match="connect a Load Qwen-Layered node"):
        decompose(None, _img(), prompt="x")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="connect a Load Qwen-Layered node"):
        decompose("model.safetensors", _img(), prompt="x")  # type: ignore[arg-type]


@pytest.mark.slow
def test_d12_seeds_are_deterministic_and_taken_modulo_2_64(model) -> None:
    a = decompose(model, _img(), prompt="x", seed=-1, **FAST)[0]
    _same(a, decompose(model, _img(), prompt="x", seed=2**64 - 1, **FAST)[0])
    _same(
        decompose(model, _img(), prompt="x", seed=2**64 + 5, **FAST)[0],
        decompose(model, _img(), prompt="x", seed=5.0, **FAST)[0],
    )
    other = decompose(model, _img(), prompt="x", seed=6, **FAST)[0]
    assert not np.array_equal(a.layers[0].pixels, other.layers[0].pixels)


# --- cancel and progress (D11) --------------------------------------------------------------------------


class Cancelled(Exception):
    pass


@pytest.mark.slow
def test_d11_callback_counts_steps_and_cancels_within_one_step(model) -> None:
    calls = []
    decompose(model, [_img(), _img(seed=1)], prompt="x", callback=lambda s, t: calls.append((s, t)), **FAST)
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # steps x images

    seen = []

    def cancel(step: int, total: int) -> None:
        seen.append(step)
        raise Cancelled

    result = None
    with pytest.raises(Cancelled):
        result = decompose(model, _img(), prompt="x", callback=cancel, **{**FAST, "steps": 5})
    assert seen == [1] and result is None


# --- prompts (D13) and CFG ------------------------------------------------------------------------------


@pytest.mark.slow
def test_d13_empty_long_and_broken_prompts(model, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        decompose(model, _img(), prompt=None, auto_caption=False, **FAST)
    assert "no prompt given: encoding '' as the prompt" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = decompose(model, _img(), prompt="ab " * 4000, **FAST)
    assert "only the first 512 are used" in caplog.text and len(out[0]) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        decompose(model, _img(), prompt="bad \udcff bytes, مرحبا, 夜", **FAST)
    assert "invalid UTF-8" in caplog.text
    with pytest.raises(InputError, match="prompt must be a str"):
        decompose(model, _img(), prompt=b"bytes", **FAST)  # type: ignore[arg-type]


@pytest.mark.slow
def test_cfg_switches(model, caplog: pytest.LogCaptureFixture) -> None:
    plain = decompose(model, _img(), prompt="x", cfg=1.0, **FAST)[0]
    with caplog.at_level(logging.WARNING):
        no_neg = decompose(model, _img(), prompt="x", cfg=4.0, negative_prompt=None, **FAST)[0]
    assert "guidance is off" in caplog.text
    _same(plain, no_neg)
    guided = decompose(model, _img(), prompt="x", cfg=4.0, **FAST)[0]
    assert not np.array_equal(plain.layers[1].pixels, guided.layers[1].pixels)
    with pytest.raises(InputError, match="either prompt or prompt_embeds"):
        decompose(model, _img(), prompt="x", prompt_embeds=torch.zeros(1, 3, 128), **FAST)


@pytest.mark.slow
def test_cfg_batch_equals_sequential_passes(model) -> None:
    """One batched forward (negative padded with a masked tail) equals the two separate passes in fp32."""
    kwargs = dict(prompt="a long prompt about many things in a scene", negative_prompt=" ", cfg=4.0, **FAST)
    seq = decompose(model, _img(), cfg_batch=False, **kwargs)[0]
    bat = decompose(model, _img(), cfg_batch=True, **kwargs)[0]
    for a, b in zip(seq.layers, bat.layers, strict=True):
        assert (a.x, a.y, a.width, a.height) == (b.x, b.y, b.width, b.height)
        np.testing.assert_allclose(a.pixels, b.pixels, atol=2e-5, rtol=0)
    a = torch.randn(1, 7, 4)
    pair = batch_text(TextCond(a), TextCond(a[:, :3]))
    assert pair.embeds.shape == (2, 7, 4) and pair.mask.tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert torch.equal(pair.embeds[1, 3:], torch.zeros(4, 4))


def test_text_encoder_is_needed_for_strings(model) -> None:
    from dataclasses import replace

    bare = replace(model, text_encoder=None, tokenizer=None)
    with pytest.raises(InputError, match="no text encoder"):
        decompose(bare, _img(), prompt="x", **FAST)
    emb = torch.randn(1, 5, 128)
    out = decompose(bare, _img(), prompt_embeds=emb, negative_prompt=None, **FAST)
    assert len(out[0]) == 2


# --- batches (D3) ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_d3_batch_equals_single_runs_with_the_same_noise(model) -> None:
    imgs = np.stack([_img(seed=0), _img(seed=4)])
    both = decompose(model, imgs, prompt="x", seed=11, **FAST)
    assert len(both) == 2
    noise = draw_noise([(3, 8, 12)] * 2, 11, torch.float32)
    assert torch.equal(noise[0], draw_noise([(3, 8, 12)], 11, torch.float32)[0])  # image 0 = a single run's noise
    _same(both[0], decompose(model, imgs[0], prompt="x", seed=11, **FAST)[0])
    _same(both[1], decompose(model, imgs[1], prompt="x", noise=noise[1], **FAST)[0])


def test_d3_images_of_different_sizes_in_a_list(model) -> None:
    out = decompose(model, [_img(64, 96), _img(96, 64)], prompt="x", **FAST)
    assert [s.size for s in out] == [(96, 64), (64, 96)]


# --- preprocessing and packing equal the reference's ----------------------------------------------------


def test_resize_and_normalise_equal_diffusers_image_processor() -> None:
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (90, 120, 4), dtype=np.uint8)
    img[..., 3] = rng.choice([0, 40, 255], (90, 120))
    proc = VaeImageProcessor(vae_scale_factor=16)
    pil = proc.resize(Image.fromarray(img, "RGBA"), 544, 736)
    want = proc.preprocess(pil, 544, 736)
    ours = resize_rgba(img, (736, 544))
    assert np.array_equal(ours, np.asarray(pil))
    # Pillow resamples RGBA premultiplied: equal to an explicit RGBa round trip
    prem = Image.fromarray(img, "RGBA").convert("RGBa").resize((736, 544), Image.Resampling.LANCZOS)
    assert np.array_equal(ours, np.asarray(prem.convert("RGBA")))
    assert torch.equal(to_model_pixels(ours, torch.float32, "cpu"), want)


def test_pack_latents_equals_diffusers_and_inverts() -> None:
    from diffusers import QwenImageLayeredPipeline

    z = torch.randn(2, 3, 16, 6, 8)
    packed = pack_latents(z)
    assert torch.equal(packed, QwenImageLayeredPipeline._pack_latents(z, 2, 16, 6, 8, 3))
    assert torch.equal(unpack_latents(packed, 3, 6, 8), z)
    ref = QwenImageLayeredPipeline._unpack_latents(packed, 48, 64, 2, 8)  # (B, C, F, h, w)
    assert torch.equal(ref.permute(0, 2, 1, 3, 4), z)
