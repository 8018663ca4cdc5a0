"""The Qwen-Image-Layered MMDiT ("VLD-MMDiT", model_spec §4) in plain PyTorch.

Follows diffusers 0.42.1 `transformer_qwenimage.py` (QwenImageTransformer2DModel with use_layer3d_rope and
use_additional_t_cond). Parameter names equal the diffusers keys, so a diffusers or ComfyUI state dict loads with
`load_state_dict(strict=True)`; every Linear is called as a module (never through its `.weight`), so a loader may
swap in quantised Linear modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputError
from .attention import (
    gated_residual,
    joint_attention,
    modulated_layer_norm,
    rms_norm,
    timestep_embedding,
)
from .config import TransformerConfig
from .rope import FrameShape, apply_rope, layer3d_rope_freqs, normalize_img_shapes

FP16_MAX = 65504.0


class DiTRMSNorm(nn.Module):
    """RMSNorm with a learnable weight (key `<name>.weight`), eps 1e-6."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., dim] -> [..., dim]."""
        return rms_norm(x, self.weight, self.eps)


class TimestepEmbedder(nn.Module):
    """256-d sinusoid -> Linear -> SiLU -> Linear (keys `linear_1`, `linear_2`)."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, proj: torch.Tensor) -> torch.Tensor:
        """[B, 256] -> [B, D]."""
        return self.linear_2(F.silu(self.linear_1(proj)))


class TimeTextEmbed(nn.Module):
    """temb = MLP(sinusoid(1000*sigma)) + E[additional_t_cond] (diffusers `QwenTimestepProjEmbeddings`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)
        self.addition_t_embedding = nn.Embedding(2, dim)

    def forward(self, sigma: torch.Tensor, t_cond: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """sigma [B] (already in `dtype`), t_cond [B] long -> temb [B, D] in `dtype`."""
        temb = self.timestep_embedder(timestep_embedding(sigma).to(dtype))
        return temb + self.addition_t_embedding(t_cond).to(dtype)


class GeluProj(nn.Module):
    """Linear followed by tanh-approximated GELU (key `proj`)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., dim_in] -> [..., dim_out]."""
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """D -> 4D -> GELU(tanh) -> D; keys `net.0.proj` and `net.2` (net.1 is diffusers' parameter-free dropout)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([GeluProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]."""
        return self.net[2](self.net[0](x))


class Rope(NamedTuple):
    """Per-forward RoPE rotations: img [S_img, Dh/2] and txt [L_txt, Dh/2], complex64."""

    img: torch.Tensor
    txt: torch.Tensor


class JointAttention(nn.Module):
    """Joint text+image attention with per-stream projections and per-head QK RMSNorm (diffusers key order)."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.norm_q = DiTRMSNorm(head_dim)
        self.norm_k = DiTRMSNorm(head_dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.add_k_proj = nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.add_q_proj = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)
        self.norm_added_q = DiTRMSNorm(head_dim)
        self.norm_added_k = DiTRMSNorm(head_dim)
        # q, k, v [B, L, H, Dh], key_mask -> [B, L, H*Dh]; bench/speed.py can swap in faster kernels
        self.attention_fn = joint_attention

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, rope: Rope, key_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, S, D], txt [B, L, D], key_mask [B, L+S] or None -> (img_out [B, S, D], txt_out [B, L, D])."""
        batch, n_img, _ = img.shape
        n_txt = txt.shape[1]
        heads = img.shape[-1] // self.head_dim
        shape = (batch, n_txt + n_img, heads, self.head_dim)
        # q and k go straight into the joint [text ; image] buffers: RoPE writes its result there, no concat copy
        q = img.new_empty(shape)
        k = img.new_empty(shape)
        split = (-1, self.head_dim)
        apply_rope(self.norm_added_q(self.add_q_proj(txt).unflatten(-1, split)), rope.txt, out=q[:, :n_txt])
        apply_rope(self.norm_q(self.to_q(img).unflatten(-1, split)), rope.img, out=q[:, n_txt:])
        apply_rope(self.norm_added_k(self.add_k_proj(txt).unflatten(-1, split)), rope.txt, out=k[:, :n_txt])
        apply_rope(self.norm_k(self.to_k(img).unflatten(-1, split)), rope.img, out=k[:, n_txt:])
        v = torch.cat([self.add_v_proj(txt), self.to_v(img)], dim=1).unflatten(-1, split)  # (B, L+S, H, Dh)
        out = self.attention_fn(q, k, v, key_mask)  # (B, L+S, D)
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class DualStreamBlock(nn.Module):
    """One MMDiT block: AdaLN-modulated joint attention and MLP on separate image and text streams (§4.2)."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(dim, head_dim)
        self.img_mlp = FeedForward(dim)
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mlp = FeedForward(dim)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, rope: Rope, key_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, S, D], txt [B, L, D], temb [B, D] -> updated (img, txt)."""
        act = F.silu(temb)
        # rows of each modulation: shift1, scale1, gate1, shift2, scale2, gate2
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = self.img_mod[1](act).chunk(6, dim=-1)
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = self.txt_mod[1](act).chunk(6, dim=-1)

        img_attn, txt_attn = self.attn(
            modulated_layer_norm(img, i_sh1, i_sc1), modulated_layer_norm(txt, t_sh1, t_sc1), rope, key_mask
        )
        img = gated_residual(img, i_g1, img_attn)
        txt = gated_residual(txt, t_g1, txt_attn)
        img = gated_residual(img, i_g2, self.img_mlp(modulated_layer_norm(img, i_sh2, i_sc2)))
        txt = gated_residual(txt, t_g2, self.txt_mlp(modulated_layer_norm(txt, t_sh2, t_sc2)))
        if img.dtype == torch.float16:
            img = img.clip(-FP16_MAX, FP16_MAX)
            txt = txt.clip(-FP16_MAX, FP16_MAX)
        return img, txt


class OutputNorm(nn.Module):
    """AdaLayerNormContinuous: Linear(SiLU(temb)) -> (scale, shift), note the order (§4.3)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], temb [B, D] -> [B, S, D]."""
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=-1)
        return modulated_layer_norm(x, shift, scale)


class BlockInputs(NamedTuple):
    """Everything the block loop needs: img [B, S, D], txt [B, L, D], temb [B, D], rope, key_mask [B, L+S]|None."""

    img: torch.Tensor
    txt: torch.Tensor
    temb: torch.Tensor
    rope: Rope
    key_mask: torch.Tensor | None


class QwenImageLayeredTransformer(nn.Module):
    """Qwen-Image-Layered MMDiT: packed latents [B, S_img, 64] + text [B, L, 3584] -> velocity [B, S_img, 64]."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        config.check_layered()
        self.config = config
        dim = config.inner_dim
        self.time_text_embed = TimeTextEmbed(dim)
        self.txt_norm = DiTRMSNorm(config.joint_attention_dim)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [DualStreamBlock(dim, config.attention_head_dim) for _ in range(config.num_layers)]
        )
        self.norm_out = OutputNorm(dim)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype: that of the (never quantised) text RMSNorm weight."""
        return self.txt_norm.weight.dtype

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None,
        timestep: torch.Tensor | float,
        img_shapes: Sequence,
        additional_t_cond: torch.Tensor | None = None,
        condition: bool = True,
    ) -> torch.Tensor:
        """Predict the flow velocity [B, S_img, out] for packed image tokens; see `embed_inputs` for the inputs."""
        x = self.embed_inputs(
            hidden_states,
            encoder_hidden_states,
            encoder_hidden_states_mask,
            timestep,
            img_shapes,
            additional_t_cond,
            condition,
        )
        img, txt = x.img, x.txt
        for i in range(len(self.transformer_blocks)):
            img, txt = self.forward_block(i, img, txt, x.temb, x.rope, x.key_mask)
        return self.project_out(img, x.temb)

    def forward_block(
        self,
        i: int,
        img: torch.Tensor,
        txt: torch.Tensor,
        temb: torch.Tensor,
        rope: Rope,
        key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run block i on (img [B, S, D], txt [B, L, D]): the step `forward` repeats for every block.

        Block swap and offload do not hook this method: they install forward hooks on the block modules
        themselves (runtime/offload.py), so any caller of a block gets the right weights.
        """
        return self.transformer_blocks[i](img, txt, temb, rope, key_mask)

    def project_out(self, img: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Final AdaLN and projection of the image stream: [B, S, D] -> [B, S, patch^2 * out_channels]."""
        return self.proj_out(self.norm_out(img, temb))

    def embed_inputs(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None,
        timestep: torch.Tensor | float,
        img_shapes: Sequence,
        additional_t_cond: torch.Tensor | None = None,
        condition: bool = True,
    ) -> BlockInputs:
        """Embed the inputs and build RoPE and the key mask once per forward.

        hidden_states [B, S_img, 64]: packed noisy frames 0..N then the condition image; encoder_hidden_states
        [B, L, 3584] with mask [B, L] (1 = valid) or None; timestep: sigma in [0, 1], [B] or a scalar;
        img_shapes: per segment (frames, hp, wp), flat or diffusers' per-batch nesting; additional_t_cond [B] long
        (0 for decomposition, None means 0); condition=False when there is no condition segment (text-to-layers).
        Text padding is removed here (exactly: masked keys contribute nothing and padded queries never reach the
        image stream), so single-sample forwards never need an attention mask.
        """
        cfg = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise InputError(f"hidden_states must be [B, S_img, {cfg.in_channels}], got {tuple(hidden_states.shape)}")
        batch, n_img = hidden_states.shape[:2]
        if (
            encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[0] != batch
            or encoder_hidden_states.shape[-1] != cfg.joint_attention_dim
        ):
            raise InputError(
                f"encoder_hidden_states must be [{batch}, L, {cfg.joint_attention_dim}], "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        shapes = normalize_img_shapes(img_shapes, batch)
        if sum(f * h * w for f, h, w in shapes) != n_img:
            raise InputError(
                f"img_shapes {shapes} describe {sum(f * h * w for f, h, w in shapes)} tokens but hidden_states has "
                f"{n_img}; pass one (1, hp, wp) per noisy frame and one for the condition image"
            )
        dtype, device = self.dtype, hidden_states.device
        txt, txt_keep, txt_mask = _drop_text_padding(encoder_hidden_states, encoder_hidden_states_mask)

        img = self.img_in(hidden_states.to(dtype))  # (B, S_img, D)
        txt = self.txt_in(self.txt_norm(txt.to(dtype)))  # (B, L', D)

        sigma = torch.as_tensor(timestep, device=device)
        if sigma.numel() not in (1, batch):
            raise InputError(f"timestep must hold 1 or {batch} values, got shape {tuple(sigma.shape)}")
        sigma = sigma.reshape(-1).expand(batch).to(dtype)  # the reference casts sigma to the compute dtype
        if additional_t_cond is None:  # the pipelines' case: zeros, nothing to check (no device sync per step)
            t_cond = torch.zeros(batch, dtype=torch.long, device=device)
        else:
            t_cond = additional_t_cond.to(device=device, dtype=torch.long).reshape(-1).expand(batch)
            if bool(((t_cond < 0) | (t_cond > 1)).any()):
                raise InputError(f"additional_t_cond must be 0 or 1 (0 for decomposition), got {t_cond.tolist()}")
        temb = self.time_text_embed(sigma, t_cond, dtype)  # (B, D)

        img_freqs, txt_freqs = layer3d_rope_freqs(shapes, encoder_hidden_states.shape[1], cfg, condition, device)
        if txt_keep is not None:
            txt_freqs = txt_freqs[txt_keep]  # valid tokens keep their original positions
        rope = Rope(img_freqs, txt_freqs)
        key_mask = None
        if txt_mask is not None:
            key_mask = torch.cat([txt_mask, txt_mask.new_ones(batch, n_img)], dim=1)  # (B, L' + S_img)
        return BlockInputs(img, txt, temb, rope, key_mask)


def _drop_text_padding(
    txt: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Keep text columns valid in at least one sample: (txt [B, L', C], kept indices or None, mask [B, L'] or None).

    The returned mask is None when every kept token is valid for every sample (always so for B = 1), which lets
    SDPA use its fastest kernel; otherwise it is the boolean mask of the kept columns.
    """
    if mask is None:
        return txt, None, None
    if mask.shape != txt.shape[:2]:
        raise InputError(f"encoder_hidden_states_mask must be [B, L] = {tuple(txt.shape[:2])}, got {tuple(mask.shape)}")
    mask = mask.to(device=txt.device, dtype=torch.bool)
    if bool(mask.all()):
        return txt, None, None
    keep = mask.any(dim=0).nonzero().squeeze(1)  # (L',)
    txt = txt.index_select(1, keep)
    mask = mask.index_select(1, keep)
    return txt, keep, None if bool(mask.all()) else mask


def build_transformer(config: TransformerConfig, device: torch.device | str = "meta") -> QwenImageLayeredTransformer:
    """Build the model on `device` (meta by default: no memory, weights come later via load_state_dict(assign=True))."""
    with torch.device(device):
        return QwenImageLayeredTransformer(config)


def expected_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the model for `config` with its shape, in diffusers' order (built on meta)."""
    return {k: tuple(v.shape) for k, v in build_transformer(config, "meta").state_dict().items()}


__all__ = [
    "BlockInputs",
    "FrameShape",
    "QwenImageLayeredTransformer",
    "Rope",
    "build_transformer",
    "expected_shapes",
]
