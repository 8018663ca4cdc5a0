"""RGBA-VAE parity with diffusers' AutoencoderKLQwenImage (T=1): diffusers folder and Wan-named single file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from reference_models import tiny_diffusers_vae
from safetensors.torch import save_file

from qil_core.model.arch.vae import LATENTS_MEAN, LATENTS_STD, RGBAVAE, VAEConfig
from qil_core.model.weights import vae_keys
from qil_core.model.weights.loading import load_vae

TOL = 1e-5


def tiny_reference_vae(seed: int = 0, num_res_blocks: int = 2, input_channels: int = 4) -> AutoencoderKLQwenImage:
    """A small random AutoencoderKLQwenImage (base_dim 16, z_dim 16, dims 16/32/64/64), norms and biases random."""
    return tiny_diffusers_vae(seed, base_dim=16, num_res_blocks=num_res_blocks, input_channels=input_channels)


def wan_state_dict(vae: AutoencoderKLQwenImage, num_res_blocks: int) -> dict[str, torch.Tensor]:
    """The same weights under ComfyUI/Wan names, produced by our table applied in reverse."""
    return {vae_keys.diffusers_to_wan_key(k, num_res_blocks): v.contiguous() for k, v in vae.state_dict().items()}


@pytest.fixture(scope="module", params=[1, 2], ids=["res1", "res2"])
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(diffusers reference, diffusers folder, Wan single file) for num_res_blocks = 1 and 2."""
    nrb = request.param
    ref = tiny_reference_vae(seed=nrb, num_res_blocks=nrb)
    root = tmp_path_factory.mktemp(f"vae{nrb}")
    ref.save_pretrained(root / "vae")
    save_file(wan_state_dict(ref, nrb), root / "qwen_image_layered_vae.safetensors")
    return ref, root / "vae", root / "qwen_image_layered_vae.safetensors"


def _ref_encode(ref: AutoencoderKLQwenImage, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]


def _ref_decode(ref: AutoencoderKLQwenImage, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref.decode(z[:, :, None]).sample[:, :, 0]


@pytest.mark.slow
@pytest.mark.parametrize("hw", [(64, 96), (48, 48)])
def test_encode_decode_match_diffusers_from_folder(saved, hw: tuple[int, int]) -> None:
    ref, folder, _ = saved
    vae = load_vae(folder)
    assert vae.dtype == torch.float32
    torch.manual_seed(1)
    x = torch.rand(2, 4, *hw) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
    assert z.shape == (2, 16, hw[0] // 8, hw[1] // 8)
    assert torch.allclose(z, _ref_encode(ref, x), atol=TOL, rtol=0)
    zin = torch.randn(2, 16, hw[0] // 8, hw[1] // 8)
    with torch.no_grad():
        out = vae.decode(zin)
    expected = _ref_decode(ref, zin)
    assert out.shape == (2, 4, hw[0], hw[1])
    assert torch.allclose(out, expected, atol=TOL, rtol=0)
    assert float(out.abs().max()) <= 1.0 and float(expected.abs().amax()) > 0.05  # clamped, and not all zero


@pytest.mark.slow
def test_wan_single_file_loads_and_agrees(saved) -> None:
    ref, folder, wan_file = saved
    a, b = load_vae(folder), load_vae(wan_file)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.rand(1, 4, 64, 96) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(b.encode(x), _ref_encode(ref, x), atol=TOL, rtol=0)


def test_key_table_agrees_with_diffusers_converter() -> None:
    ref = tiny_reference_vae(num_res_blocks=2)
    wan = wan_state_dict(ref, 2)
    assert len(wan) == len(ref.state_dict()) == 194
    assert vae_keys.is_wan_naming(wan) and not vae_keys.is_wan_naming(ref.state_dict())
    converted = convert_wan_vae_to_diffusers(dict(wan))  # diffusers' own single-file conversion
    ours = vae_keys.wan_to_diffusers_keys(wan)
    assert {ours[k] for k in wan} == set(converted)
    for wkey, dkey in ours.items():
        assert converted[dkey] is wan[wkey]
    # the spec's table, spot-checked (model_spec §7.3)
    assert vae_keys.diffusers_to_wan_key("decoder.up_blocks.2.upsamplers.0.resample.1.weight", 2) == (
        "decoder.upsamples.11.resample.1.weight"
    )
    assert vae_keys.diffusers_to_wan_key("decoder.up_blocks.3.resnets.2.conv2.bias", 2) == (
        "decoder.upsamples.14.residual.6.bias"
    )
    assert vae_keys.diffusers_to_wan_key("encoder.down_blocks.5.time_conv.weight", 2) == (
        "encoder.downsamples.5.time_conv.weight"
    )


def test_real_config_state_dict_equals_diffusers() -> None:
    with torch.device("meta"):
        ref = AutoencoderKLQwenImage(input_channels=4)
        ours = RGBAVAE(VAEConfig())
    a = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert a == b and len(a) == 194
    assert sum(p.numel() for p in ours.parameters()) == 126_897_716  # model_spec §1
    assert b["encoder.conv_in.weight"] == (96, 4, 3, 3, 3) and b["decoder.conv_out.weight"] == (4, 96, 3, 3, 3)
    assert VAEConfig.from_shapes(b, "real") == VAEConfig()
    assert list(ref.config.latents_mean) == list(LATENTS_MEAN) and list(ref.config.latents_std) == list(LATENTS_STD)


@pytest.mark.parametrize("kwargs", [
    dict(num_res_blocks=1), dict(dim_mult=(1, 2, 2), temperal_downsample=(True, False)), dict(attn_scales=(0.5,)),
])  # fmt: skip
def test_config_from_shapes_round_trips(kwargs: dict) -> None:
    cfg = VAEConfig(base_dim=8, **kwargs)
    with torch.device("meta"):
        ref = AutoencoderKLQwenImage(
            base_dim=8, z_dim=16, input_channels=4,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        )  # fmt: skip
        ours = RGBAVAE(cfg)
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert VAEConfig.from_shapes(shapes, "x") == cfg
    assert shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


@pytest.mark.slow
def test_time_conv_weights_do_not_matter(saved) -> None:
    _, folder, _ = saved
    vae = load_vae(folder)
    z = torch.randn(1, 16, 6, 8)
    with torch.no_grad():
        before = vae.decode(z)
        for name, p in vae.named_parameters():
            if "time_conv" in name:
                p.data = torch.zeros_like(p)
        assert torch.equal(vae.decode(z), before)


@pytest.mark.slow
def test_decode_one_layer_at_a_time_equals_batch(saved) -> None:
    _, folder, _ = saved
    vae = load_vae(folder)
    z = torch.randn(3, 16, 4, 6)
    with torch.no_grad():
        whole = vae.decode(z)
        per_layer = torch.cat([vae.decode(z[i : i + 1]) for i in range(3)])
    assert torch.allclose(whole, per_layer, atol=TOL, rtol=0)  # conv kernels may sum in another order per batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_normalisation_matches_pipeline_formulas(dtype: torch.dtype) -> None:
    vae = RGBAVAE(VAEConfig(base_dim=4))
    z = (torch.randn(2, 16, 3, 5) * 3).to(dtype)
    mean = torch.tensor(LATENTS_MEAN).view(1, 16, 1, 1).to(dtype)
    std = torch.tensor(LATENTS_STD).view(1, 16, 1, 1).to(dtype)
    # QwenImageLayeredPipeline: encode (z - mean) / std; decode z / (1 / std) + mean, all in the latents' dtype
    assert torch.equal(vae.normalize_latents(z), (z - mean) / std)
    assert torch.equal(vae.denormalize_latents(z), z / (1.0 / std) + mean)
    if dtype == torch.float32:
        assert torch.allclose(vae.denormalize_latents(vae.normalize_latents(z)), z, atol=1e-5)


@pytest.mark.slow
def test_bf16_load_is_close_to_fp32(saved) -> None:
    _, folder, wan_file = saved
    a, b = load_vae(folder), load_vae(wan_file, dtype=torch.bfloat16)
    assert b.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in b.parameters())
    x = torch.rand(1, 4, 32, 48) * 2 - 1
    with torch.no_grad():
        za, zb = a.encode(x), b.encode(x)
    assert zb.dtype == torch.bfloat16
    assert float((za - zb.float()).abs().max()) < 0.05 * float(za.abs().max())


def test_encode_and_decode_reject_bad_shapes() -> None:
    vae = RGBAVAE(VAEConfig(base_dim=4))
    with pytest.raises(ValueError, match="expects"):
        vae.encode(torch.zeros(1, 3, 64, 64))  # RGB without alpha
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 4, 60, 64))
    with pytest.raises(ValueError, match="expects"):
        vae.decode(torch.zeros(1, 16, 1, 8, 8))  # 5-D video latents


def test_no_activation_state_is_kept(saved) -> None:
    _, folder, _ = saved
    vae = load_vae(folder)
    before = {k: v.data_ptr() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        vae.decode(torch.randn(1, 16, 4, 4))
    assert {k: v.data_ptr() for k, v in vae.state_dict().items()} == before
    assert not list(vae.buffers())  # no caches of any kind


def test_saved_reference_folder_layout(saved) -> None:
    _, folder, wan_file = saved
    assert (Path(folder) / "config.json").is_file()
    assert (Path(folder) / "diffusion_pytorch_model.safetensors").is_file()
    assert wan_file.is_file()
