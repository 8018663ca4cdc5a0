"""Tiled VAE decode/encode: exact blending for local maps; seam-free, close to untiled on smooth and sharp content."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from perf_models import tiny_vae

from qil_core.errors import InputError
from qil_core.model.runtime import vae_tiling as vt


class LocalVAE:
    """A stand-in VAE whose decode/encode are pointwise maps: tiling must reproduce it exactly."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.config = SimpleNamespace(scale_factor=8, z_dim=16, input_channels=4)
        self.dtype = torch.float32
        self.dec = torch.randn(4, 16, generator=gen) / 4
        self.enc = torch.randn(16, 4, generator=gen)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(torch.einsum("oc,bchw->bohw", self.dec, z), scale_factor=8, mode="nearest").tanh()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", self.enc, F.avg_pool2d(x, 8))


@pytest.mark.slow
@pytest.mark.parametrize("h,w", [(24, 40), (17 * 2, 9 * 2), (8, 8)])
def test_blending_is_exact_for_local_maps(h: int, w: int) -> None:
    vae = LocalVAE()
    z = torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(1))
    out = vt.tiled_decode(vae, z, tile=64, overlap=16)  # tiles of 8 latents, stride 6, the last one flush
    assert out.shape == (2, 4, 8 * h, 8 * w)
    torch.testing.assert_close(out, vae.decode(z), rtol=0, atol=2e-6)
    x = torch.rand(2, 4, 8 * h, 8 * w, generator=torch.Generator().manual_seed(2)) * 2 - 1
    torch.testing.assert_close(vt.tiled_encode(vae, x, tile=64, overlap=16), vae.encode(x), rtol=0, atol=2e-6)


def test_tile_starts_cover_and_align() -> None:
    assert vt.tile_starts(10, 16, 4) == [0]
    assert vt.tile_starts(16, 16, 4) == [0]
    assert vt.tile_starts(30, 16, 4) == [0, 12, 14]
    for length in range(17, 90):
        starts = vt.tile_starts(length, 16, 4)
        assert starts[-1] + 16 == length and all(b - a <= 12 for a, b in zip(starts, starts[1:], strict=False))


def test_ramps_are_a_partition_of_unity() -> None:
    a = vt._ramp(16, 0, 4, torch.float32, torch.device("cpu"))
    b = vt._ramp(16, 4, 0, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(a[-4:] + b[:4], torch.ones(4))
    assert a[0] == 1 and b[-1] == 1 and 0 < b[0] < 0.2


def _local_vae() -> torch.nn.Module:
    """The tiny RGBA-VAE with centre-dominant 3x3 kernels and weak attention: a short effective receptive field
    like a trained VAE's (random full kernels reach ~140 px, beyond any practical overlap)."""
    vae = tiny_vae(seed=4, base_dim=4)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "attentions" in name and "proj" in name:
                p.mul_(0.05)
            elif p.ndim == 5 and p.shape[-1] == 3:
                m = torch.full((3, 3), 0.1)
                m[1, 1] = 1.0
                p.mul_(m)
    return vae


def _images(size: int) -> dict[str, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    smooth = torch.stack([xx, yy, xx * yy, torch.full_like(xx, 0.8)])
    sharp = torch.stack([
        ((xx * 8).floor() % 2) * 2 - 1, ((yy * 6).floor() % 2) * 2 - 1, torch.sign(xx + yy), (xx > 0).float() * 2 - 1,
    ])  # fmt: skip
    return {"smooth": 0.9 * smooth[None], "sharp": 0.9 * sharp[None]}


def _seam_jump(img: torch.Tensor, cols: list[int]) -> float:
    """Mean |difference| between the pixel columns on both sides of each seam, over all rows and channels."""
    return float(torch.stack([(img[..., c] - img[..., c - 1]).abs().mean() for c in cols]).mean())


@pytest.fixture(scope="module")
def local_vae() -> torch.nn.Module:
    return _local_vae()


@pytest.fixture(scope="module")
def coded(local_vae) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """content -> (pixels, untiled latents, untiled decode), computed once."""
    out = {}
    with torch.no_grad():
        for name, img in _images(128).items():
            z = local_vae.encode(img)
            out[name] = (img, z, local_vae.decode(z))
    return out


@pytest.mark.parametrize("content", ["smooth", "sharp"])
def test_tiled_decode_close_to_untiled_and_seam_free(local_vae, coded, content: str) -> None:
    _, z, ref = coded[content]
    with torch.no_grad():
        tiled = vt.tiled_decode(local_vae, z, tile=64, overlap=32)
        naive = vt.tiled_decode(local_vae, z, tile=64, overlap=0)  # butt-joined tiles: the control
    err = (tiled - ref).abs()
    # measured: mean 0.008 (smooth) / 0.011 (sharp), 99th percentile 0.08 on a [-1, 1] range
    assert float(err.mean()) < 0.02 and float(torch.quantile(err.flatten(), 0.99)) < 0.12
    assert float((naive - ref).abs().mean()) > float(err.mean())
    # seams: tile starts at 32 and 64 px (stride 32); the tiled image jumps there no more than the untiled one
    jump_ref, jump = _seam_jump(ref, [32, 64]), _seam_jump(tiled, [32, 64])
    assert jump < 1.3 * jump_ref + 0.01
    assert _seam_jump(naive, [64]) > jump  # the metric sees a real seam


@pytest.mark.parametrize("content", ["smooth", "sharp"])
def test_tiled_encode_close_to_untiled(local_vae, coded, content: str) -> None:
    img, ref, _ = coded[content]
    with torch.no_grad():
        tiled = vt.tiled_encode(local_vae, img, tile=64, overlap=32)
    err = (tiled - ref).abs()
    assert float(err.mean()) < 0.1 * float(ref.std()) and float(torch.quantile(err.flatten(), 0.99)) < 0.5 * float(
        ref.std()
    )


def test_error_shrinks_with_overlap_and_vanishes_for_one_tile(local_vae, coded) -> None:
    img, z, ref = coded["sharp"]
    with torch.no_grad():
        errs = [
            float((vt.tiled_decode(local_vae, z, tile=t, overlap=o) - ref).abs().mean())
            for t, o in ((64, 0), (64, 16), (96, 32))
        ]
        assert errs[0] > errs[1] > errs[2]
        assert torch.equal(vt.tiled_decode(local_vae, z, tile=128, overlap=32), ref)
        assert torch.equal(vt.decode(local_vae, z), ref) and torch.equal(vt.encode(local_vae, img), z)


def test_real_vae_tiles_match_shapes_and_range() -> None:
    vae = tiny_vae(seed=1, base_dim=4)
    z = torch.randn(2, 16, 10, 14)
    with torch.no_grad():
        out = vt.tiled_decode(vae, z, tile=48, overlap=16)
        lat = vt.tiled_encode(vae, out, tile=48, overlap=16)
    assert out.shape == (2, 4, 80, 112) and out.dtype == vae.dtype and float(out.abs().max()) <= 1
    assert lat.shape == (2, 16, 10, 14) and torch.isfinite(lat).all()


@pytest.mark.parametrize("tile,overlap", [(60, 16), (64, 12), (64, 40), (8, 0), (64, -8)])
def test_bad_tiles_refused(tile: int, overlap: int) -> None:
    with pytest.raises(InputError, match="tile"):
        vt.tiled_decode(LocalVAE(), torch.zeros(1, 16, 20, 20), tile=tile, overlap=overlap)
    with pytest.raises(InputError):
        vt.tiled_encode(LocalVAE(), torch.zeros(1, 4, 36, 36), tile=64, overlap=16)  # 36 is not a multiple of 8


def test_pipeline_vae_tile_option() -> None:
    import numpy as np
    from perf_models import random_transformer

    from qil_core.model.loader import QwenLayeredModel
    from qil_core.model.pipeline.decompose import decompose

    model = QwenLayeredModel(random_transformer(seed=8), _local_vae(), dtype=torch.float32, device=torch.device("cpu"))
    img = (np.random.default_rng(3).random((96, 96, 4)) * 255).astype(np.uint8)
    pos = torch.randn(1, 4, 48, generator=torch.Generator().manual_seed(9))
    opts = dict(prompt_embeds=pos, negative_prompt=None, layers=1, steps=1, resolution="custom", max_side=96, seed=3)

    def canvas(tile: int | None) -> np.ndarray:
        layer = decompose(model, img, vae_tile=tile, **opts)[0].layers[0]
        out = np.zeros((96, 96, 4), np.float32)
        out[layer.y : layer.y + layer.height, layer.x : layer.x + layer.width] = layer.pixels
        return out

    whole, big_tile, tiled = canvas(None), canvas(96), canvas(64)
    assert np.array_equal(big_tile, whole)  # one tile covers the image: exactly the untiled path
    assert not np.array_equal(tiled, whole) and float(np.abs(tiled - whole).mean()) < 0.05
    with pytest.raises(InputError, match="vae_tile"):
        decompose(model, img, vae_tile=100, **opts)
