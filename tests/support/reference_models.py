"""Builders of tiny diffusers reference models and saved checkpoints for parity tests (test-only; imports diffusers).

Other test files import from here: `tiny_transformer_config()`, `tiny_diffusers_transformer()`,
`save_diffusers_transformer()`, `read_sharded_state_dict()`, `real_transformer_shapes()`,
`layered_scheduler()`, `tiny_diffusers_vae()`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from qil_core.model.arch.config import TransformerConfig

# 2 heads x 32 head dim, RoPE axes summing to 32, text width 48: all code paths, milliseconds per forward.
TINY_TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=48,
    axes_dims_rope=(8, 12, 12),
    guidance_embeds=False,
    use_additional_t_cond=True,
    use_layer3d_rope=True,
    zero_cond_t=False,
)

# The Layered scheduler_config.json (model_spec §1.1).
LAYERED_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    time_shift_type="linear",
    shift_terminal=None,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    invert_sigmas=False,
    stochastic_sampling=False,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
)


def tiny_transformer_config(**overrides: object) -> TransformerConfig:
    """Our TransformerConfig for the tiny reference transformer (fields overridable)."""
    return TransformerConfig(**{**TINY_TRANSFORMER, **overrides})


def tiny_diffusers_transformer(seed: int = 0, **overrides: object) -> torch.nn.Module:
    """diffusers' QwenImageTransformer2DModel with the tiny config and random (non-default) weights, fp32, eval."""
    from diffusers import QwenImageTransformer2DModel

    kwargs = {**TINY_TRANSFORMER, **overrides}
    kwargs["axes_dims_rope"] = tuple(kwargs["axes_dims_rope"])
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**kwargs).eval()
    with torch.no_grad():
        # random weights everywhere; norm weights around 1 so that q.k logits are O(1) and attention is sharp
        # enough for positions (RoPE) to change the output clearly
        for name, p in model.named_parameters():
            if "norm" in name and "norm_out" not in name:
                p.copy_(1 + torch.randn_like(p) * 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def tiny_diffusers_vae(
    seed: int = 0, base_dim: int = 8, num_res_blocks: int = 1, input_channels: int = 4
) -> torch.nn.Module:
    """diffusers' AutoencoderKLQwenImage (z_dim 16, dims x1/2/4/4), eval, with random norms (around 1) and biases."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=base_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=num_res_blocks, input_channels=input_channels
    ).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return vae


def save_diffusers_transformer(model: torch.nn.Module, folder: Path, max_shard_size: str = "50KB") -> Path:
    """save_pretrained with forced small shards (index + several safetensors files); returns the folder."""
    model.save_pretrained(folder, max_shard_size=max_shard_size, safe_serialization=True)
    return Path(folder)


def read_sharded_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Read a diffusers sharded folder through its index weight_map (test helper, not the product loader)."""
    folder = Path(folder)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "diffusion_pytorch_model.safetensors")
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(load_file(folder / shard))
    return out


def real_transformer_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the real (20B) diffusers Layered transformer, built on the meta device (no memory)."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(use_additional_t_cond=True, use_layer3d_rope=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def layered_scheduler():  # -> FlowMatchEulerDiscreteScheduler
    """diffusers' FlowMatchEulerDiscreteScheduler configured like Qwen-Image-Layered's scheduler_config.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**LAYERED_SCHEDULER)


def layered_img_shapes(layers: int, hp: int, wp: int, batch: int = 1) -> list[list[tuple[int, int, int]]]:
    """img_shapes exactly as QwenImageLayeredPipeline builds them: (1, hp, wp) x (N+1) + condition, per batch item."""
    return [[(1, hp, wp)] * (layers + 1) + [(1, hp, wp)]] * batch
