"""Tiny random models and inputs shared by the memory/speed tests (offload, fp8, tiling, benchmarks)."""

from __future__ import annotations

import torch

from qil_core.model.arch.config import TransformerConfig
from qil_core.model.arch.transformer import QwenImageLayeredTransformer, build_transformer
from qil_core.model.arch.vae import RGBAVAE, VAEConfig

# 2 heads x 32, RoPE axes summing to 32, text width 48, 3 blocks (so k = 0, 1, 2 blocks resident all differ).
TINY = TransformerConfig(
    num_layers=3, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(8, 12, 12)
)


def random_transformer(
    config: TransformerConfig = TINY, seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.1
) -> QwenImageLayeredTransformer:
    """Our transformer with every parameter random (norm weights around 1), eval mode, on the CPU."""
    model = build_transformer(config, "cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.3 * noise if "norm" in name and "norm_out" not in name else std * noise)
    return model.to(dtype).requires_grad_(False).eval()


def transformer_inputs(
    config: TransformerConfig = TINY,
    layers: int = 2,
    hp: int = 4,
    wp: int = 6,
    n_txt: int = 7,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Keyword inputs of one decomposition forward: N layers + composite + condition frames on an hp x wp grid."""
    gen = torch.Generator().manual_seed(seed)
    frames = layers + 2
    return dict(
        hidden_states=torch.randn(1, frames * hp * wp, config.in_channels, generator=gen).to(dtype),
        encoder_hidden_states=torch.randn(1, n_txt, config.joint_attention_dim, generator=gen).to(dtype),
        encoder_hidden_states_mask=None,
        timestep=torch.tensor([0.7], dtype=dtype),
        img_shapes=[(1, hp, wp)] * frames,
    )


def tiny_vae(seed: int = 0, base_dim: int = 8, dtype: torch.dtype = torch.float32) -> RGBAVAE:
    """A small RGBA-VAE (8x down-sampling like the real one) with random weights, eval mode, on the CPU."""
    vae = RGBAVAE(VAEConfig(base_dim=base_dim, num_res_blocks=1))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                fan_in = max(1, p[0].numel() // (p.shape[2] if p.ndim == 5 else 1))
                p.copy_(noise / fan_in**0.5)
    return vae.to(dtype).requires_grad_(False).eval()
