"""Layer3D RoPE: positions per model_spec §4.4 / §11 check 3, tables and rotation identical to diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedLayer3DRope, apply_rotary_emb_qwen
from reference_models import layered_img_shapes, tiny_transformer_config

from qil_core.errors import InputError
from qil_core.model.arch.config import TransformerConfig
from qil_core.model.arch.rope import apply_rope, layer3d_rope_freqs, normalize_img_shapes, rope_positions


def test_spec_check_3_positions_640_n4() -> None:
    hp = wp = 40
    img, txt = rope_positions(normalize_img_shapes(layered_img_shapes(4, hp, wp)), 12)
    per_frame = hp * wp
    assert img.shape == (6 * per_frame, 3) and txt.shape == (12, 3)
    frames = img[:, 0].reshape(6, per_frame)
    for k in range(5):
        assert bool((frames[k] == k).all()), k  # noisy frame k (0 = composite) has layer index k
    assert bool((frames[5] == -1).all())  # the condition image
    rows = img[:per_frame, 1].reshape(hp, wp)
    cols = img[:per_frame, 2].reshape(hp, wp)
    assert rows[:, 0].tolist() == list(range(-20, 20)) and bool((rows == rows[:, :1]).all())
    assert cols[0].tolist() == list(range(-20, 20)) and bool((cols == cols[:1]).all())
    assert torch.equal(img[5 * per_frame :, 1:], img[:per_frame, 1:])  # the condition has its own centred grid
    assert txt[:, 0].tolist() == list(range(20, 32)) and bool((txt == txt[:, :1]).all())


def test_spec_check_3_angles_of_the_first_frequency() -> None:
    # the first frequency of every axis is 1 rad per position, so its angle recovers the position itself
    cfg = TransformerConfig()
    img, txt = layer3d_rope_freqs(layered_img_shapes(4, 40, 40), 3, cfg)
    assert img.shape == (6 * 1600, 64) and img.dtype == torch.complex64
    first = [0, 8, 8 + 28]  # frame, height, width blocks of the 64 rotations
    expected_img, expected_txt = rope_positions(normalize_img_shapes(layered_img_shapes(4, 40, 40)), 3)
    for axis, col in enumerate(first):
        angle = expected_img[:, axis].float()
        assert torch.allclose(img[:, col], torch.polar(torch.ones_like(angle), angle), atol=1e-6)
        angle = expected_txt[:, axis].float()
        assert torch.allclose(txt[:, col], torch.polar(torch.ones_like(angle), angle), atol=1e-6)
    assert torch.allclose(torch.angle(txt[0, first]), torch.full((3,), 20.0 - 6 * torch.pi), atol=1e-5)


def test_text_starts_after_the_last_layer_index_when_many_layers() -> None:
    # 20 layers at a small grid: max(hp//2, wp//2) = 2 < N + 1 = 21
    img, txt = rope_positions(normalize_img_shapes(layered_img_shapes(20, 4, 4)), 5)
    assert txt[0].tolist() == [21, 21, 21]
    assert img[:, 0].max().item() == 20 and img[-1, 0].item() == -1


def test_without_condition_all_frames_are_layers() -> None:
    img, txt = rope_positions([(1, 4, 6)] * 3, 2, condition=False)
    assert sorted(set(img[:, 0].tolist())) == [0, 1, 2]
    assert txt[0].tolist() == [3, 3, 3]


def test_odd_grid_is_centred_like_diffusers() -> None:
    img, _ = rope_positions([(1, 3, 5), (1, 3, 5)], 1)
    assert sorted(set(img[:, 1].tolist())) == [-2, -1, 0]
    assert sorted(set(img[:, 2].tolist())) == [-3, -2, -1, 0, 1]


@pytest.mark.parametrize(
    ("axes", "layers", "hp", "wp", "txt_len"),
    [
        ((16, 56, 56), 4, 40, 40, 7),
        ((16, 56, 56), 3, 34, 46, 30),
        ((8, 12, 12), 20, 4, 4, 5),
        ((8, 12, 12), 2, 3, 5, 1),
        ((8, 12, 12), 1, 6, 2, 9),
        ((8, 12, 12), 0, 4, 4, 0),
    ],
)
def test_tables_bit_identical_to_diffusers(
    axes: tuple[int, int, int], layers: int, hp: int, wp: int, txt_len: int
) -> None:
    cfg = TransformerConfig(attention_head_dim=sum(axes), axes_dims_rope=axes)
    shapes = layered_img_shapes(layers, hp, wp)
    ref_img, ref_txt = QwenEmbedLayer3DRope(theta=10000, axes_dim=list(axes), scale_rope=True)(
        shapes, max_txt_seq_len=txt_len, device=torch.device("cpu")
    )
    img, txt = layer3d_rope_freqs(shapes, txt_len, cfg)
    assert torch.equal(img, ref_img)
    assert torch.equal(txt, ref_txt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_bit_identical_to_diffusers(dtype: torch.dtype) -> None:
    cfg = tiny_transformer_config()
    img_freqs, _ = layer3d_rope_freqs(layered_img_shapes(2, 4, 6), 3, cfg)
    x = torch.randn(2, img_freqs.shape[0], 2, 32).to(dtype)
    ref = apply_rotary_emb_qwen(x, img_freqs, use_real=False)
    ours = apply_rope(x, img_freqs)
    assert ours.dtype == dtype and torch.equal(ours, ref)
    # writing into a slice of a larger joint buffer gives the same values in place, rounded to the buffer's dtype
    exact = apply_rotary_emb_qwen(x.float(), img_freqs, use_real=False)
    for out_dtype, expected in ((torch.float32, exact), (dtype, ref)):
        joint = torch.zeros(2, 5 + x.shape[1], 2, 32, dtype=out_dtype)
        returned = apply_rope(x, img_freqs, out=joint[:, 5:])
        assert returned.data_ptr() == joint[:, 5:].data_ptr()
        assert torch.equal(joint[:, 5:], expected) and bool((joint[:, :5] == 0).all())


def test_rotation_preserves_pair_norms() -> None:
    cfg = tiny_transformer_config()
    freqs, _ = layer3d_rope_freqs([(1, 2, 2), (1, 2, 2)], 0, cfg)
    x = torch.randn(1, 8, 1, 32)
    y = apply_rope(x, freqs)
    assert torch.allclose(x.unflatten(-1, (-1, 2)).norm(dim=-1), y.unflatten(-1, (-1, 2)).norm(dim=-1), atol=1e-5)
    assert not torch.allclose(x, y)


def test_img_shapes_forms() -> None:
    nested = layered_img_shapes(2, 4, 4, batch=3)
    assert normalize_img_shapes(nested, batch=3) == [(1, 4, 4)] * 4
    assert normalize_img_shapes([(1, 4, 4)] * 4) == [(1, 4, 4)] * 4
    assert normalize_img_shapes((1, 4, 4)) == [(1, 4, 4)]
    with pytest.raises(InputError, match="differs between batch items"):
        normalize_img_shapes([[(1, 4, 4), (1, 4, 4)], [(1, 2, 8), (1, 2, 8)]])
    with pytest.raises(InputError, match="batch size"):
        normalize_img_shapes(layered_img_shapes(1, 2, 2, batch=2), batch=3)
    with pytest.raises(InputError, match="not a"):
        normalize_img_shapes([(1, 4)])
    with pytest.raises(InputError, match="empty"):
        normalize_img_shapes([])
    with pytest.raises(InputError, match="condition segment"):
        rope_positions([(1, 2, 2), (2, 2, 2)], 1)
