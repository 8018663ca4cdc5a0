"""Sigma schedule, model timesteps and Euler step against diffusers' FlowMatchEulerDiscreteScheduler (Layered)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_models import layered_scheduler

from qil_core.errors import InputError
from qil_core.model.pipeline.scheduler import calculate_mu, euler_step, get_sigmas, timesteps_for_model


def reference_schedule(cond_tokens: int, steps: int, base: list[float] | None = None):
    """The scheduler after `set_timesteps` exactly as QwenImageLayeredPipeline calls it."""
    sched = layered_scheduler()
    sigmas = np.linspace(1.0, 0, steps + 1)[:-1] if base is None else base
    sched.set_timesteps(sigmas=sigmas, mu=(cond_tokens / (256 * 256 / 16 / 16)) ** 0.5)
    return sched


def test_mu_matches_the_spec_table() -> None:
    assert calculate_mu(1600) == 2.5
    assert calculate_mu(4096) == 4.0
    assert round(calculate_mu(1564), 3) == 2.472
    assert round(calculate_mu(4128), 3) == 4.016


def test_spec_check_4_values_at_640() -> None:
    sigmas = get_sigmas(50, calculate_mu(40 * 40))
    assert sigmas.dtype == torch.float32 and sigmas.shape == (51,)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    assert sigmas[1].item() == pytest.approx(0.99190, abs=5e-6)
    assert sigmas[49].item() == pytest.approx(0.04854, abs=5e-6)
    assert sigmas[48].item() == pytest.approx(0.09434, abs=5e-6)
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_values_at_1024() -> None:
    sigmas = get_sigmas(50, 4.0)
    assert sigmas[1].item() == pytest.approx(0.99492, abs=5e-6)
    assert sigmas[49].item() == pytest.approx(0.07547, abs=5e-6)


@pytest.mark.parametrize("cond_tokens", [16, 100, 1536, 1564, 1600, 1620, 4096, 4128, 12345])
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
def test_sigmas_bit_identical_to_diffusers(cond_tokens: int, steps: int) -> None:
    sched = reference_schedule(cond_tokens, steps)
    ours = get_sigmas(steps, calculate_mu(cond_tokens))
    assert torch.equal(ours, sched.sigmas)
    assert torch.equal(ours[:-1] * 1000, sched.timesteps)


def test_custom_base_is_shifted_like_diffusers() -> None:
    base = [1.0, 0.8, 0.5, 0.3, 0.1]
    sched = reference_schedule(1600, 5, base)
    assert torch.equal(get_sigmas(5, calculate_mu(1600), base), sched.sigmas)


def test_linear_shift_is_not_the_exponential_one() -> None:
    # the Qwen-Image text-to-image pitfall (§3.6): e^mu shift would give sigma_1 ~ 0.998 at 640
    assert get_sigmas(50, 2.5)[1].item() < 0.9925


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_model_timesteps_reproduce_the_pipeline_rounding(dtype: torch.dtype) -> None:
    sched = reference_schedule(1600, 50)
    sigmas = get_sigmas(50, 2.5)
    for i, t in enumerate(sched.timesteps):
        reference = t.expand(2).to(dtype) / 1000  # what QwenImageLayeredPipeline feeds the transformer
        ours = timesteps_for_model(sigmas[i], dtype, batch=2)
        assert ours.dtype == dtype and ours.shape == (2,)
        assert torch.equal(ours, reference), (i, ours, reference)


def test_bf16_double_rounding_examples() -> None:
    assert timesteps_for_model(get_sigmas(50, 2.5)[1], torch.bfloat16).item() == 0.9921875
    assert timesteps_for_model(torch.tensor(0.048544), torch.bfloat16).item() == pytest.approx(0.0485, abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_euler_steps_bit_identical_to_diffusers(dtype: torch.dtype) -> None:
    sched = reference_schedule(1600, 8)
    sigmas = get_sigmas(8, 2.5)
    gen = torch.Generator().manual_seed(0)
    x_ref = torch.randn(1, 40, 64, generator=gen).to(dtype)
    x_ours = x_ref.clone()
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(1, 40, 64, generator=gen).to(dtype)
        x_ref = sched.step(v, t, x_ref, return_dict=False)[0]
        x_ours = euler_step(x_ours, v, sigmas[i], sigmas[i + 1])
        assert x_ours.dtype == dtype
        assert torch.equal(x_ours, x_ref), i


def test_bad_arguments_raise_input_error() -> None:
    with pytest.raises(InputError, match="steps"):
        get_sigmas(0, 2.5)
    with pytest.raises(InputError, match="mu"):
        get_sigmas(10, 0.0)
    with pytest.raises(InputError, match="one sigma per step"):
        get_sigmas(3, 2.5, [1.0, 0.5])
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        get_sigmas(2, 2.5, [1.0, 0.0])
    with pytest.raises(InputError, match="cond_tokens"):
        calculate_mu(0)
