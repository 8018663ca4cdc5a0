"""Qwen25TextEncoder against transformers' Qwen2_5_VLForConditionalGeneration (tiny random config, fp32, CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from qwen_tiny import LM_PREFIX, TINY, build_reference, tiny_encoder

from qil_core.errors import InputError, ModelMismatchError
from qil_core.model.arch.text_encoder import Qwen25TextEncoder, TextEncoderConfig

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models():
    ref = build_reference(seed=0)
    return ref, tiny_encoder(ref)


def _ref_hidden(ref, ids, mask=None, position_ids=None) -> torch.Tensor:
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
    return out.hidden_states[-1]


def test_hidden_states_equal_transformers_without_padding(models) -> None:
    ref, enc = models
    ids = torch.randint(0, TINY.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = enc(ids)
    assert ours.shape == (2, 37, TINY.hidden_size)
    torch.testing.assert_close(ours, _ref_hidden(ref, ids), atol=1e-5, rtol=0)


def test_hidden_states_equal_transformers_with_padding(models) -> None:
    ref, enc = models
    ids = torch.randint(0, TINY.vocab_size, (3, 41), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 41, dtype=torch.long)
    mask[1, 30:] = 0
    mask[2, 6:] = 0
    with torch.no_grad():
        ours = enc(ids, mask)
    torch.testing.assert_close(ours, _ref_hidden(ref, ids, mask), atol=1e-5, rtol=0)
    # model_spec §11 check 7: a masked tail leaves the valid positions as in an unpadded run.
    with torch.no_grad():
        alone = enc(ids[2:3, :6])
    torch.testing.assert_close(ours[2:3, :6], alone, atol=1e-5, rtol=0)


def test_text_only_mrope_is_1d_rope(models) -> None:
    """All three mRoPE axes at the token index (what get_rope_index gives text) equal our 1D rotary positions."""
    ref, enc = models
    ids = torch.randint(0, TINY.vocab_size, (2, 25), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(25).view(1, 1, -1).expand(3, 2, -1)  # (3 axes, B, L)
    with torch.no_grad():
        ours = enc(ids)
    torch.testing.assert_close(ours, _ref_hidden(ref, ids, position_ids=pos), atol=1e-5, rtol=0)
    # The sections do matter once the axes differ (a uniform shift would not: rotary angles are relative).
    shifted = pos.clone()
    shifted[1] *= 2
    assert (ours - _ref_hidden(ref, ids, position_ids=shifted)).abs().max() > 1e-3


def test_leading_padding_gives_finite_outputs(models) -> None:
    _, enc = models
    ids = torch.randint(0, TINY.vocab_size, (1, 8))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        assert torch.isfinite(enc(ids, mask)).all()


def test_bf16_runs_close_to_fp32(models) -> None:
    ref, enc = models
    enc16 = tiny_encoder(ref).to(torch.bfloat16)
    assert enc16.dtype == torch.bfloat16
    ids = torch.randint(0, TINY.vocab_size, (1, 20))
    with torch.no_grad():
        a, b = enc(ids), enc16(ids)
    assert b.dtype == torch.bfloat16
    assert ((a - b.float()).norm() / a.norm()) < 0.05


def test_parameter_names_and_shapes_match_transformers_7b_config() -> None:
    """The real Qwen2.5-VL-7B language model, built on meta: our names and shapes equal its stripped ones."""
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(depth=1),
    )
    with torch.device("meta"):
        ref = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
    theirs = {k[len(LM_PREFIX) :]: tuple(v.shape) for k, v in ref.state_dict().items() if k.startswith(LM_PREFIX)}
    ours = TextEncoderConfig()
    assert ours.parameter_shapes() == theirs
    with torch.device("meta"):
        model = Qwen25TextEncoder(ours)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == theirs
    inferred = TextEncoderConfig.from_shapes(theirs)
    assert inferred == ours and inferred.head_dim == 128
    assert sum(torch.Size(s).numel() for s in theirs.values()) == 7_070_619_136


def test_config_from_transformers_json() -> None:
    v5 = {
        "text_config": {
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 1e6},
        }
    }
    v4 = {**v5["text_config"], "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
    del v4["rope_parameters"]
    assert TextEncoderConfig.from_transformers_config(v5) == TextEncoderConfig()
    assert TextEncoderConfig.from_transformers_config(v4) == TextEncoderConfig()
    with pytest.raises(ModelMismatchError, match="config.json"):
        TextEncoderConfig.from_transformers_config({"model_type": "t5"})


def test_config_validation_and_shape_inference_errors() -> None:
    with pytest.raises(InputError, match="positive"):
        TextEncoderConfig(num_hidden_layers=0)
    with pytest.raises(InputError, match="num_key_value_heads"):
        TextEncoderConfig(num_key_value_heads=5)
    shapes = TINY.parameter_shapes()
    with pytest.raises(ModelMismatchError, match="head width 128"):
        TextEncoderConfig.from_shapes(shapes)  # tiny heads are 16 wide: the default guess must not fit silently
    assert TextEncoderConfig.from_shapes(shapes, head_dim=16) == TINY
    with pytest.raises(ModelMismatchError, match="not a Qwen2.5"):
        TextEncoderConfig.from_shapes({"norm.weight": (64,)})
    assert dataclasses.replace(TINY, num_hidden_layers=3).parameter_shapes().keys() > shapes.keys()


def test_bad_forward_inputs(models) -> None:
    _, enc = models
    with pytest.raises(InputError, match="outside the vocabulary"):
        enc(torch.tensor([[1, TINY.vocab_size]]))
    with pytest.raises(InputError, match=r"\(B, L\)"):
        enc(torch.tensor([1, 2, 3]))
    with pytest.raises(InputError, match=r"\(B, L\)"):
        enc(torch.zeros((1, 0), dtype=torch.long))
    with pytest.raises(InputError, match="attention_mask"):
        enc(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0]]))
