"""Optional speed-ups: pluggable attention kernels (used only when installed and applicable), compiled blocks."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from perf_models import random_transformer, transformer_inputs

from bench import speed
from qil_core.errors import InputError
from qil_core.model.arch.attention import joint_attention
from qil_core.model.runtime.offload import BlockSwapPlacement


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_transformer(seed=11)


@pytest.fixture(scope="module")
def inputs() -> dict:
    return transformer_inputs(seed=12)


def _nhd_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: object) -> torch.Tensor:
    """flash-attn's calling convention ((B, L, H, D) in and out) implemented with SDPA."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@pytest.fixture
def fake_flash(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls: list[tuple] = []
    module = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, causal=False):
        calls.append((q.shape, causal))
        return _nhd_sdpa(q, k, v)

    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return calls


def test_sdpa_always_available() -> None:
    assert speed.available_attention_backends()[0] == "sdpa"
    name, fn = speed.attention_function("sdpa")
    assert name == "sdpa" and fn is joint_attention


def test_auto_picks_an_installed_kernel_and_falls_back_where_it_does_not_apply(fake_flash, model, inputs) -> None:
    assert "flash_attn" in speed.available_attention_backends()
    with torch.inference_mode():
        ref = model(**inputs)
        assert speed.set_attention_backend(model, "auto") in ("flash_attn", "flash_attn3", "sageattention")
        out = model(**inputs)
    speed.set_attention_backend(model, "sdpa")
    assert not fake_flash  # fp32 CPU tensors: the kernel does not apply, SDPA ran
    assert torch.equal(out, ref)


def test_kernel_runs_when_it_applies(fake_flash, monkeypatch: pytest.MonkeyPatch, model, inputs) -> None:
    monkeypatch.setattr(speed, "_fast_path", lambda q, key_mask: key_mask is None)
    with torch.inference_mode():
        ref = model(**inputs)
        speed.set_attention_backend(model, "flash_attn")
        out = model(**inputs)
        speed.set_attention_backend(model, "sdpa")
    assert len(fake_flash) == model.config.num_layers and fake_flash[0][1] is False
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_custom_backend_function(model, inputs) -> None:
    calls = []

    def math_attention(q, k, v, key_mask=None):
        calls.append(q.shape)
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / q.shape[-1] ** 0.5
        return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).flatten(2)

    with torch.inference_mode():
        ref = model(**inputs)
        assert speed.set_attention_backend(model, math_attention) == "math_attention"
        out = model(**inputs)
        speed.set_attention_backend(model, "sdpa")
    assert len(calls) == model.config.num_layers
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_missing_or_unknown_backend_is_refused(monkeypatch: pytest.MonkeyPatch, model) -> None:
    monkeypatch.setitem(sys.modules, "sageattention", None)  # import fails: not installed
    with pytest.raises(InputError, match="not installed"):
        speed.attention_function("sageattention")
    with pytest.raises(InputError, match="one of"):
        speed.attention_function("xformers-magic")
    with pytest.raises(InputError, match="attention_fn"):
        speed.set_attention_backend(torch.nn.Linear(2, 2), "sdpa")


def test_compiled_blocks_match_and_work_with_block_swap(model, inputs) -> None:
    with torch.inference_mode():
        ref = model(**inputs)
        assert speed.compile_blocks(model, backend="eager") == model.config.num_layers
        assert speed.compile_blocks(model, backend="eager") == model.config.num_layers  # idempotent
        try:
            out = model(**inputs)
            placement = BlockSwapPlacement("cpu", 1, prefetch=True)
            with placement.use("transformer", model) as dit:
                swapped = dit(**inputs)
            placement.unload()
        finally:
            speed.uncompile_blocks(model)
    assert all("forward" not in vars(b) for b in model.transformer_blocks)
    assert torch.equal(out, ref) and torch.equal(swapped, ref)
    with pytest.raises(InputError):
        speed.compile_blocks(torch.nn.Linear(2, 2))
