"""Flow-matching schedule and Euler step of Qwen-Image-Layered (model_spec §3.6, §3.7) as pure functions.

Reproduces diffusers 0.42.1 `FlowMatchEulerDiscreteScheduler` configured like the Layered scheduler_config.json
(`time_shift_type="linear"`, `use_dynamic_shifting=True`, no terminal stretch) as `QwenImageLayeredPipeline`
calls it: `set_timesteps(sigmas=linspace(1, 0, S+1)[:-1], mu=sqrt(cond_tokens/256))`, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ...errors import InputError

BASE_SEQ_LEN = 256  # 256*256/16/16 in the reference
NUM_TRAIN_TIMESTEPS = 1000


def calculate_mu(cond_tokens: int) -> float:
    """Shift strength mu = sqrt(condition-image tokens / 256), e.g. 2.5 at 640x640 (1600 tokens)."""
    if cond_tokens < 1:
        raise InputError(f"cond_tokens must be >= 1, got {cond_tokens}")
    return (cond_tokens / float(BASE_SEQ_LEN)) ** 0.5  # same expression as the reference, same rounding


def get_sigmas(steps: int, mu: float, base: Sequence[float] | None = None) -> torch.Tensor:
    """Shifted noise levels, fp32 [steps + 1]: sigma = mu / (mu + (1/s - 1)) over s in `base`, then a final 0.

    `base` defaults to 1, 1 - 1/steps, ..., 1/steps (the reference's linspace(1, 0, steps+1)[:-1]); a custom
    base replaces it (one value per step in (0, 1]) and is shifted too, as in the reference.
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    if not (mu > 0 and math.isfinite(mu)):
        raise InputError(f"mu must be a positive finite number, got {mu}")
    if base is None:
        grid = np.linspace(1.0, 0.0, steps + 1)[:-1]  # float64, exactly the reference's grid
    else:
        grid = np.asarray(list(base), dtype=np.float64)
        if grid.shape != (steps,):
            raise InputError(f"base must hold one sigma per step ({steps}), got {grid.shape[0]} values")
        if not np.all((grid > 0) & (grid <= 1)):
            raise InputError(f"base sigmas must lie in (0, 1], got {grid.tolist()}")
    s = grid.astype(np.float32)
    # numpy float32 arithmetic like the reference (torch's `scalar / tensor` is reciprocal-then-multiply,
    # which rounds twice and differs by 1 ulp)
    sigmas = (mu / (mu + (1 / s - 1))).astype(np.float32)
    return torch.cat([torch.from_numpy(sigmas), torch.zeros(1)])


def timesteps_for_model(
    sigma: torch.Tensor | float, dtype: torch.dtype, batch: int = 1, device: torch.device | str | None = None
) -> torch.Tensor:
    """The sigma the transformer sees, [batch] in `dtype`: (1000*sigma in fp32) cast to dtype, then /1000 in dtype.

    This double rounding is what the reference pipeline does (e.g. 0.99190 -> 992 -> 0.9921875 in bf16).
    """
    t = torch.as_tensor(sigma, dtype=torch.float32, device=device) * NUM_TRAIN_TIMESTEPS
    return t.reshape(-1).expand(batch).to(dtype) / NUM_TRAIN_TIMESTEPS


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
) -> torch.Tensor:
    """One flow-matching Euler step x + (sigma_next - sigma) * v, returned in x's dtype.

    As in the reference scheduler: dt is an fp32 scalar, dt*v is formed in v's dtype, the sum in fp32.
    """
    s = torch.as_tensor(sigma, dtype=torch.float32, device=v.device)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=v.device)
    dt = (s_next - s).reshape(())  # 0-dim: keeps `dt * v` in v's dtype, like the reference
    return (x.to(torch.float32) + dt * v).to(x.dtype)
