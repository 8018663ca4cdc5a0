"""Transformer parity with diffusers' QwenImageTransformer2DModel (tiny random config, CPU) and config inference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference_models import (
    layered_img_shapes,
    read_sharded_state_dict,
    real_transformer_shapes,
    save_diffusers_transformer,
    tiny_diffusers_transformer,
    tiny_transformer_config,
)

from qil_core.errors import InputError, ModelMismatchError
from qil_core.model.arch.config import TransformerConfig
from qil_core.model.arch.rope import rope_freqs
from qil_core.model.arch.transformer import QwenImageLayeredTransformer, Rope, build_transformer, expected_shapes

ATOL = 1e-5  # outputs are O(1) with the tiny model's 0.1-std weights


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return tiny_diffusers_transformer(seed=0)


@pytest.fixture(scope="module")
def saved(reference: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_diffusers_transformer(reference, tmp_path_factory.mktemp("tiny_transformer"))


@pytest.fixture(scope="module")
def ours(saved: Path) -> QwenImageLayeredTransformer:
    model = build_transformer(tiny_transformer_config(), device="meta")
    model.load_state_dict(read_sharded_state_dict(saved), strict=True, assign=True)
    return model.eval()


def run_reference(model: torch.nn.Module, x, txt, mask, sigma, shapes, t_cond) -> torch.Tensor:
    with torch.no_grad():
        return model(
            hidden_states=x,
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=mask,
            timestep=sigma,
            img_shapes=shapes,
            additional_t_cond=t_cond,
            return_dict=False,
        )[0]


def inputs(layers: int, hp: int, wp: int, txt_len: int, batch: int = 1, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, (layers + 2) * hp * wp, 64, generator=gen)
    txt = torch.randn(batch, txt_len, 48, generator=gen)
    sigma = torch.rand(batch, generator=gen)
    return x, txt, sigma, layered_img_shapes(layers, hp, wp, batch)


def test_keys_order_and_shapes_equal_diffusers(reference: torch.nn.Module, saved: Path) -> None:
    ref = reference.state_dict()
    ours = QwenImageLayeredTransformer(tiny_transformer_config()).state_dict()
    assert list(ours) == list(ref)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert len(list(saved.glob("*.safetensors"))) > 3  # the weights really came through several shards


@pytest.mark.parametrize(("layers", "hp", "wp"), [(1, 4, 4), (3, 4, 6), (20, 2, 4), (2, 3, 5), (2, 6, 2)])
@pytest.mark.parametrize("t_cond", [0, 1])
def test_forward_matches_diffusers(reference, ours, layers: int, hp: int, wp: int, t_cond: int) -> None:
    x, txt, sigma, shapes = inputs(layers, hp, wp, txt_len=7)
    cond = torch.tensor([t_cond])
    ref = run_reference(reference, x, txt, None, sigma, shapes, cond)
    with torch.inference_mode():
        out = ours(x, txt, None, sigma, shapes, cond)
    assert out.shape == ref.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_product_loader_gives_the_same_model(reference, saved: Path) -> None:
    from qil_core.model.weights.loading import load_transformer

    loaded = load_transformer(saved, dtype=torch.float32).eval()
    assert loaded.config == tiny_transformer_config()
    x, txt, sigma, shapes = inputs(3, 4, 6, txt_len=5)
    ref = run_reference(reference, x, txt, None, sigma, shapes, torch.tensor([0]))
    with torch.inference_mode():
        out = loaded(x, txt, None, sigma, shapes, torch.tensor([0]))
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_parity_is_sensitive_to_positions_and_t_cond(reference, ours) -> None:
    # guards the tolerance: a wrong frame index, text start (N+1 rule) or t-cond gives errors far above ATOL
    x, txt, sigma, shapes = inputs(20, 2, 4, txt_len=5)
    ref = run_reference(reference, x, txt, None, sigma, shapes, torch.tensor([0]))
    with torch.inference_mode():
        no_condition = ours(x, txt, None, sigma, shapes, torch.tensor([0]), condition=False)
        other_cond = ours(x, txt, None, sigma, shapes, torch.tensor([1]))
        # the same forward by hand, with the text starting at max(hp//2, wp//2) = 2 instead of N + 1 = 21
        state = ours.embed_inputs(x, txt, None, sigma, shapes, None)
        start_2 = rope_freqs((2 + torch.arange(5))[:, None].expand(5, 3), ours.config.axes_dims_rope)
        rope = Rope(state.rope.img, start_2)
        img, txt_h = state.img, state.txt
        for i in range(ours.config.num_layers):
            img, txt_h = ours.forward_block(i, img, txt_h, state.temb, rope, None)
        wrong_start = ours.project_out(img, state.temb)
        img, txt_h = state.img, state.txt
        for i in range(ours.config.num_layers):
            img, txt_h = ours.forward_block(i, img, txt_h, state.temb, state.rope, None)
        by_hand = ours.project_out(img, state.temb)
    torch.testing.assert_close(by_hand, ref, rtol=0, atol=ATOL)
    for wrong in (no_condition, other_cond, wrong_start):
        assert (wrong - ref).abs().max() > 100 * ATOL


def test_flat_img_shapes_scalar_timestep_and_default_t_cond(ours) -> None:
    x, txt, _, shapes = inputs(2, 4, 4, txt_len=6)
    with torch.inference_mode():
        a = ours(x, txt, None, torch.tensor([0.25]), shapes, torch.tensor([0]))
        b = ours(x, txt, None, 0.25, shapes[0], None)
    assert torch.equal(a, b)


def test_right_padding_with_masked_tail_equals_unpadded_run(reference, ours) -> None:
    x, txt, sigma, shapes = inputs(3, 4, 4, txt_len=9)
    padded = torch.cat([txt, torch.randn(1, 5, 48) * 10], dim=1)
    mask = torch.tensor([[1] * 9 + [0] * 5])
    with torch.inference_mode():
        unpadded = ours(x, txt, None, sigma, shapes, None)
        masked = ours(x, padded, mask, sigma, shapes, None)
        all_ones = ours(x, txt, torch.ones(1, 9, dtype=torch.long), sigma, shapes, None)
    torch.testing.assert_close(masked, unpadded, rtol=0, atol=ATOL)
    assert torch.equal(all_ones, unpadded)
    ref = run_reference(reference, x, padded, mask, sigma, shapes, torch.tensor([0]))
    torch.testing.assert_close(masked, ref, rtol=0, atol=ATOL)


def test_mask_with_holes_and_fully_masked_text_match_diffusers(reference, ours) -> None:
    x, txt, sigma, shapes = inputs(2, 4, 6, txt_len=8)
    for mask in (torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0]]), torch.zeros(1, 8, dtype=torch.long)):
        ref = run_reference(reference, x, txt, mask, sigma, shapes, torch.tensor([0]))
        with torch.inference_mode():
            out = ours(x, txt, mask.bool(), sigma, shapes, torch.tensor([0]))
        torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_batch_with_different_text_lengths(reference, ours) -> None:
    x, txt, sigma, shapes = inputs(2, 4, 4, txt_len=10, batch=2)
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    cond = torch.tensor([0, 1])
    ref = run_reference(reference, x, txt, mask, sigma, shapes, cond)
    with torch.inference_mode():
        out = ours(x, txt, mask, sigma, shapes, cond)
        singles = [
            ours(x[i : i + 1], txt[i : i + 1, : int(mask[i].sum())], None, sigma[i : i + 1], shapes[0], cond[i : i + 1])
            for i in range(2)
        ]
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(out, torch.cat(singles), rtol=0, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_the_reference(reference, ours, dtype: torch.dtype) -> None:
    x, txt, sigma, shapes = inputs(2, 4, 4, txt_len=6)
    sigma = sigma.to(dtype)  # both models round sigma to the compute dtype; keep fp32 on the same value
    ref_half = tiny_diffusers_transformer(seed=0).to(dtype)
    ours_half = build_transformer(tiny_transformer_config(), "cpu").to(dtype).eval()
    ours_half.load_state_dict(ref_half.state_dict(), strict=True)
    fp32 = run_reference(reference, x, txt, None, sigma.float(), shapes, torch.tensor([0]))
    ref = run_reference(ref_half, x.to(dtype), txt.to(dtype), None, sigma, shapes, torch.tensor([0]))
    with torch.inference_mode():
        out = ours_half(x.to(dtype), txt.to(dtype), None, sigma, shapes, None)
    assert out.dtype == dtype
    ours_err = (out.float() - ref.float()).abs().max().item()
    half_err = (ref.float() - fp32).abs().max().item()
    # we differ from the reference's half run by rounding-order noise only (fused norms round once, about one
    # ulp), less than its own error vs fp32; a real math difference, e.g. rounding the timestep frequencies to
    # bf16, gives errors of ~0.3 here
    assert ours_err <= half_err, (ours_err, half_err)
    assert (out.float() - fp32).abs().max().item() <= 2 * half_err


def test_block_hook_point_is_used_for_every_block(ours) -> None:
    calls: list[int] = []
    original = ours.forward_block

    def spy(i, *args):
        calls.append(i)
        return original(i, *args)

    x, txt, sigma, shapes = inputs(1, 2, 2, txt_len=3)
    ours.forward_block = spy
    try:
        with torch.inference_mode():
            ours(x, txt, None, sigma, shapes)
    finally:
        del ours.forward_block
    assert calls == [0, 1]


def test_input_errors(ours) -> None:
    x, txt, sigma, shapes = inputs(2, 4, 4, txt_len=6)
    with torch.inference_mode():
        with pytest.raises(InputError, match="describe 48 tokens but hidden_states has 64"):
            ours(x, txt, None, sigma, layered_img_shapes(1, 4, 4))
        with pytest.raises(InputError, match="hidden_states must be"):
            ours(x[..., :32], txt, None, sigma, shapes)
        with pytest.raises(InputError, match="encoder_hidden_states must be"):
            ours(x, txt[..., :40], None, sigma, shapes)
        with pytest.raises(InputError, match="mask must be"):
            ours(x, txt, torch.ones(1, 5), sigma, shapes)
        with pytest.raises(InputError, match="0 or 1"):
            ours(x, txt, None, sigma, shapes, torch.tensor([2]))
        with pytest.raises(InputError, match="timestep"):
            ours(x, txt, None, torch.rand(3), shapes)


def test_real_config_builds_on_meta_with_the_spec_inventory() -> None:
    with torch.device("meta"):
        model = QwenImageLayeredTransformer(TransformerConfig())
    state = model.state_dict()
    assert len(state) == 1934
    assert sum(p.numel() for p in model.parameters()) == 20_430_407_232
    assert all(p.is_meta for p in model.parameters())
    assert expected_shapes(TransformerConfig()) == real_transformer_shapes()


def test_from_shapes_and_from_json(reference) -> None:
    cfg = tiny_transformer_config()
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert TransformerConfig.from_shapes(shapes, "tiny.safetensors", axes_dims_rope=(8, 12, 12)) == cfg
    # without the RoPE split the real model's proportions are assumed
    assert TransformerConfig.from_shapes(shapes).axes_dims_rope == (4, 14, 14)
    prefixed = {"model.diffusion_model." + k: v for k, v in shapes.items()}
    assert TransformerConfig.from_shapes(prefixed, axes_dims_rope=(8, 12, 12)) == cfg
    assert TransformerConfig.from_shapes(real_transformer_shapes()) == TransformerConfig()
    assert TransformerConfig.from_json(dict(reference.config)) == cfg


def test_foreign_checkpoints_raise_model_mismatch() -> None:
    unet = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    }
    with pytest.raises(ModelMismatchError, match=r"sd15\.safetensors.*UNet.*missing keys img_in\.weight"):
        TransformerConfig.from_shapes(unet, "sd15.safetensors")
    vae = {"encoder.conv_in.weight": (96, 3, 3, 3, 3), "decoder.conv_out.weight": (3, 96, 3, 3, 3)}
    with pytest.raises(ModelMismatchError, match="VAE"):
        TransformerConfig.from_shapes(vae, "vae.safetensors")
    real = real_transformer_shapes()
    text_to_image = {k: v for k, v in real.items() if "addition_t_embedding" not in k}
    with pytest.raises(ModelMismatchError, match=r"qwen_image\.safetensors.*text-to-image or edit.*not Qwen-Image-"):
        TransformerConfig.from_shapes(text_to_image, "qwen_image.safetensors")
    with pytest.raises(ModelMismatchError, match="Edit-2511"):
        TransformerConfig.from_shapes({**real, "__index_timestep_zero__": (0,)})
    missing_block = {k: v for k, v in real.items() if not k.startswith("transformer_blocks.7.")}
    with pytest.raises(ModelMismatchError, match="block 7 is missing"):
        TransformerConfig.from_shapes(missing_block, "cut.safetensors")


def test_non_layered_configs_are_refused() -> None:
    with pytest.raises(ModelMismatchError, match="text-to-image or edit"):
        TransformerConfig.from_json(
            {"_class_name": "QwenImageTransformer2DModel", "use_additional_t_cond": False, "use_layer3d_rope": False},
            "transformer/config.json",
        )
    with pytest.raises(ModelMismatchError, match="Edit-2511"):
        QwenImageLayeredTransformer(tiny_transformer_config(zero_cond_t=True))
    with pytest.raises(ModelMismatchError, match="expected 'QwenImageTransformer2DModel'"):
        TransformerConfig.from_json({"_class_name": "FluxTransformer2DModel"})
    with pytest.raises(InputError, match="axes_dims_rope"):
        TransformerConfig(axes_dims_rope=(16, 56, 58))
