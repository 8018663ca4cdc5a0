"""Sampler options: the reference schedule stays bit-identical; shift, exponential shift and custom sigmas; cfg 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qil_core.cli.lora import parse_lora
from qil_core.errors import InputError
from qil_core.model.loader import load_model
from qil_core.model.pipeline.decompose import decompose
from qil_core.model.pipeline.sampler_options import SamplerOptions, parse_sigmas, schedule_for
from qil_core.model.pipeline.scheduler import calculate_mu, get_sigmas
from qil_core.model.weights.tiny import write_tiny_model


@pytest.mark.parametrize("tokens", [16, 1600, 4096])
def test_default_is_the_reference_schedule_bit_for_bit(tokens: int) -> None:
    ref = get_sigmas(30, calculate_mu(tokens))
    assert torch.equal(schedule_for(None, 30, tokens), ref)
    assert torch.equal(schedule_for(SamplerOptions(), 30, tokens), ref)
    assert SamplerOptions().is_reference and SamplerOptions().describe() == "reference schedule"


@pytest.mark.parametrize(("mu", "kind"), [(math.log(3), "exponential"), (0.8, "exponential"), (3.0, "linear")])
def test_fixed_shift_and_exponential_match_diffusers_scheduler(mu: float, kind: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, time_shift_type=kind, base_shift=0.5, max_shift=0.9
    )
    steps = 8
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], mu=mu)
    ours = SamplerOptions(shift=mu, time_shift=kind).schedule(steps, 99999)  # the token count is ignored
    assert torch.equal(ours, sched.sigmas.float())


def test_custom_sigmas_are_used_as_given() -> None:
    opts = SamplerOptions(sigmas=parse_sigmas("1, 0.9, 0.6 0.3, 0"))
    assert opts.resolve_steps(50) == 4
    assert torch.equal(opts.schedule(4, 1600), torch.tensor([1.0, 0.9, 0.6, 0.3, 0.0]))
    assert parse_sigmas("  ") is None
    for bad in ("1, 1.2", "0.5, 0.7", "a, b", "0"):
        with pytest.raises(InputError, match="sigmas"):
            parse_sigmas(bad)
    with pytest.raises(InputError, match="time_shift"):
        SamplerOptions(time_shift="cosine")
    with pytest.raises(InputError, match="shift"):
        SamplerOptions(shift=-1.0)


def test_parse_lora_argument() -> None:
    assert parse_lora("a/b.safetensors") == (parse_lora("a/b.safetensors:1")[0], 1.0)
    assert parse_lora("x.safetensors:0.6")[1] == 0.6
    assert parse_lora("C:\\loras\\x.safetensors")[1] == 1.0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    paths = write_tiny_model(tmp_path_factory.mktemp("tiny"), layout="diffusers", seed=5)
    return load_model(model_dir=paths["model_dir"], dtype=torch.float32, device="cpu")


@pytest.mark.slow
def test_pipeline_uses_the_options_and_cfg_one_skips_the_negative_pass(model) -> None:
    calls: list[float] = []
    hook = model.transformer.register_forward_hook(lambda _m, a, _o: calls.append(float(a[3].reshape(-1)[0])))
    steps: list[tuple[int, int]] = []
    img = np.full((48, 48, 4), 200, np.uint8)
    try:
        decompose(
            model,
            img,
            prompt="x",
            layers=1,
            cfg=1.0,
            seed=1,
            resolution="custom",
            max_side=64,
            sampler=SamplerOptions(sigmas=(1.0, 0.5)),
            callback=lambda s, t: steps.append((s, t)),
        )
    finally:
        hook.remove()
    assert steps == [(1, 2), (2, 2)]  # the sigmas set the step count
    assert calls == [1.0, 0.5]  # one forward per step: no negative pass at cfg 1
    with pytest.raises(InputError, match="SamplerOptions"):
        decompose(model, img, prompt="x", layers=1, steps=1, sampler="lightning")  # type: ignore[arg-type]
