"""text_to_layers: composite + N layers from noise with no condition segment (tiny random model, CPU).

A recording placement wraps the transformer so the test sees exactly what the pipeline feeds it: only the N+1
noisy frames (no condition tokens), `condition=False`, the img_shapes without a condition entry, the
double-rounded timesteps of the schedule for one frame's tokens, and the text start of RoPE.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from qil_core.errors import InputError
from qil_core.model.arch.rope import rope_positions
from qil_core.model.loader import load_model
from qil_core.model.pipeline.decompose import COMPOSITE_NAME, text_to_layers
from qil_core.model.pipeline.scheduler import calculate_mu, get_sigmas, timesteps_for_model
from qil_core.model.runtime.placement import Placement, ResidentPlacement
from qil_core.model.weights.tiny import write_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    paths = write_tiny_model(tmp_path_factory.mktemp("tiny"), layout="diffusers", seed=5)
    return load_model(model_dir=paths["model_dir"], dtype=torch.float32, device="cpu")


class Recorder(nn.Module):
    """Calls the wrapped transformer and records (hidden_states shape, timestep, img_shapes, condition)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple] = []

    def forward(self, hidden, txt, mask, t, img_shapes, t_cond, condition):  # type: ignore[no-untyped-def]
        self.calls.append((tuple(hidden.shape), t.clone(), list(img_shapes), condition, tuple(txt.shape)))
        return self.inner(hidden, txt, mask, t, img_shapes, t_cond, condition)


class RecordingPlacement(ResidentPlacement):
    """Resident placement that hands out a recorder instead of the transformer and logs use/release."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.events: list[tuple[str, str]] = []
        self.recorder: Recorder | None = None

    @contextlib.contextmanager
    def _use(self, name: str, module: nn.Module) -> Iterator[nn.Module]:
        self.events.append(("use", name))
        if name == "transformer":
            self.recorder = Recorder(module)
            yield self.recorder
        else:
            yield module

    def release(self, name: str, module: nn.Module) -> None:
        self.events.append(("release", name))


def test_no_condition_segment_and_the_schedule_of_one_frame(model) -> None:
    placement = RecordingPlacement()
    assert isinstance(placement, Placement)
    stack = text_to_layers(
        model,
        "a red kite over the sea",
        width=96,
        height=64,
        layers=3,
        steps=3,
        cfg=4.0,
        cfg_batch=False,
        placement=placement,
    )
    assert stack.size == (96, 64) and [layer.name for layer in stack] == ["Background", "Layer 1", "Layer 2"]
    calls = placement.recorder.calls
    assert len(calls) == 6  # 3 steps x (positive, negative)
    hp, wp = 64 // 16, 96 // 16
    sigmas = get_sigmas(3, calculate_mu(hp * wp))
    for i, (shape, t, shapes, condition, _txt) in enumerate(calls):
        assert shape == (1, 4 * hp * wp, 64)  # frames 0..N only: no condition tokens
        assert condition is False and shapes == [(1, hp, wp)] * 4
        assert torch.equal(t, timesteps_for_model(sigmas[i // 2], torch.float32, 1))
    # text is encoded once per prompt, and the text encoder is released before sampling
    assert placement.events[:2] == [("use", "text_encoder"), ("release", "text_encoder")]
    assert ("use", "vae") in placement.events and ("release", "transformer") in placement.events


def test_rope_text_start_without_condition() -> None:
    """Frame ids 0..N; text at max(hp//2, wp//2, N+1): 3 here for a 6x4 grid and 2 layers, N+1 = 6 with 5 layers."""
    img, txt = rope_positions([(1, 4, 6)] * 3, 2, condition=False)
    assert sorted(set(img[:, 0].tolist())) == [0, 1, 2] and txt[0].tolist() == [3, 3, 3]
    img, txt = rope_positions([(1, 4, 6)] * 6, 2, condition=False)
    assert sorted(set(img[:, 0].tolist())) == [0, 1, 2, 3, 4, 5] and txt[0].tolist() == [6, 6, 6]


@pytest.mark.slow
def test_deterministic_seeded_and_composite_kept(model) -> None:
    kw = dict(width=64, height=64, layers=2, steps=2)
    a = text_to_layers(model, "x", seed=3, **kw)
    b = text_to_layers(model, "x", seed=3, **kw)
    c = text_to_layers(model, "x", seed=4, **kw)
    for la, lb in zip(a.layers, b.layers, strict=True):
        np.testing.assert_array_equal(la.pixels, lb.pixels)
    assert not np.array_equal(a.layers[0].pixels, c.layers[0].pixels)
    kept = text_to_layers(model, "x", seed=3, keep_composite=True, **kw)
    assert [layer.name for layer in kept] == ["Background", "Layer 1", COMPOSITE_NAME]
    assert not kept.layers[-1].visible and kept.layers[-1].pixels.size
    for la, lk in zip(a.layers, kept.layers, strict=False):
        np.testing.assert_array_equal(la.pixels, lk.pixels)


def test_sizes_are_rounded_to_16_and_validated(model, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        stack = text_to_layers(model, "x", width=100, height=70, layers=1, steps=1)
    assert stack.size == (96, 64) and "rounded to 96x64" in caplog.text and len(stack) == 1
    for w, h in ((32, 64), (64, 5000), (64.0, 64)):
        with pytest.raises(InputError, match="must be"):
            text_to_layers(model, "x", width=w, height=h, layers=1, steps=1)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="connect a Load Qwen-Layered node"):
        text_to_layers(None, "x")  # type: ignore[arg-type]


def test_callback_and_embeddings(model) -> None:
    calls = []
    text_to_layers(model, "x", width=64, height=64, layers=1, steps=3, callback=lambda s, t: calls.append((s, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    emb = torch.randn(1, 4, 128)
    out = text_to_layers(
        model, prompt_embeds=emb, negative_embeds=torch.zeros(1, 2, 128), width=64, height=64, layers=2, steps=1
    )
    assert len(out) == 2
