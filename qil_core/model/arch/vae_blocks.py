"""Building blocks of the RGBA-VAE, run frame by frame as exact 2D operations (model_spec.md §5.1).

The checkpoint stores Wan-2.1 causal 3D convolutions. Every Qwen-Image-Layered layer is encoded and decoded
as its own single-frame clip, and for one frame a causal 3x3x3 convolution (two zero frames padded in front)
equals a 2D convolution with the last temporal kernel slice `weight[:, :, -1]`. The parameters keep their
3D shapes and diffusers 0.42.1 names (`autoencoder_kl_qwenimage.py`) so the real weights load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FrameConv(nn.Conv3d):
    """A causal 3D convolution evaluated on a single frame: (B, C, H, W) -> (B, C', H, W)."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """(B, C, H, W) -> (B, C', H, W) with the last temporal tap of the 3D kernel."""
        # With T=1 the causal padding puts the real frame under the last temporal tap.
        return F.conv2d(x, self.weight[:, :, -1], self.bias, self.stride[1:], self.padding[1:])


class ChannelRMSNorm(nn.Module):
    """Channel L2 normalisation times sqrt(C) and a learned gain; `gamma` is (C,1,1,1) or (C,1,1) as stored."""

    def __init__(self, dim: int, gamma_dims: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim,) + (1,) * gamma_dims))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        # Half precision is normalised in fp32 and cast back, as the reference does.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = F.normalize(xf, dim=1).to(x.dtype)
        return y * self.scale * self.gamma.reshape(-1, 1, 1)


class ResidualBlock(nn.Module):
    """shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))), (B, Cin, H, W) -> (B, Cout, H, W)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_dim, gamma_dims=3)
        self.conv1 = FrameConv(in_dim, out_dim, 3, padding=1)
        self.norm2 = ChannelRMSNorm(out_dim, gamma_dims=3)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = FrameConv(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut: nn.Module = FrameConv(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(B, Cin, H, W) -> (B, Cout, H, W)."""
        h = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)))
        x = self.conv2(self.dropout(F.silu(self.norm2(x))))
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of one frame, with a residual: (B, C, H, W)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(dim, gamma_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x))  # (B, 3C, H, W)
        # contiguous: with a strided last dim SDPA falls back to its math kernel and builds the HW x HW matrix
        qkv = qkv.reshape(b, 1, 3 * c, h * w).transpose(2, 3).contiguous()  # (B, 1, HW, 3C)
        q, k, v = qkv.chunk(3, dim=-1)  # each (B, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale 1/sqrt(C)
        y = y.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return self.proj(y) + x


class Resample(nn.Module):
    """2x spatial down- or up-sampling; the `time_conv` of the 3D modes is stored but inert for one frame."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            # Index 0 of the reference Sequential is the parameter-free upsampler; the conv stays at index 1.
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        # Temporal convolutions only run from the second frame on; kept so the state dict loads strictly.
        if mode == "upsample3d":
            self.time_conv: nn.Module | None = nn.Conv3d(dim, dim * 2, (3, 1, 1))
        elif mode == "downsample3d":
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            self.time_conv = None

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C/2, 2H, 2W) when upsampling, (B, C, H/2, W/2) when downsampling."""
        if self.mode.startswith("up"):
            # Integer-factor nearest-exact is a pure copy, so no fp32 round trip is needed for exactness.
            x = F.interpolate(x, scale_factor=2.0, mode="nearest-exact")
        return self.resample(x)


class MidBlock(nn.Module):
    """Res -> Attention -> Res at the lowest resolution: (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x))


class UpBlock(nn.Module):
    """num_res_blocks + 1 residual blocks, then an optional 2x upsampler."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, upsample: str | None) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([ResidualBlock(a, b, dropout) for a, b in zip(dims[:-1], dims[1:])])
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample)]) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        """(B, Cin, h, w) -> (B, Cout/2, 2h, 2w) with an upsampler, else (B, Cout, h, w)."""
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Pixels (B, Cin, H, W) -> posterior parameters (B, 2*z_dim, H/8, W/8) before `quant_conv`."""

    def __init__(
        self,
        dim: int,
        z_dim2: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_scales: tuple[float, ...],
        temperal_downsample: tuple[bool, ...],
        dropout: float,
        input_channels: int,
    ) -> None:
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        self.conv_in = FrameConv(input_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        scale = 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], dropout)
        self.norm_out = ChannelRMSNorm(dims[-1], gamma_dims=3)
        self.conv_out = FrameConv(dims[-1], z_dim2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, Cin, H, W) -> (B, 2*z_dim, H/8, W/8)."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Latents (B, z_dim, h, w) after `post_quant_conv` -> pixels (B, Cout, 8h, 8w), not yet clamped."""

    def __init__(
        self,
        dim: int,
        z_dim: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        temperal_upsample: tuple[bool, ...],
        dropout: float,
        output_channels: int,
    ) -> None:
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        self.conv_in = FrameConv(z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], dropout)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            # Every upsampler halves the channels, so the next block starts from half its nominal width.
            in_dim = in_dim // 2 if i > 0 else in_dim
            mode = None
            if i != len(dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, num_res_blocks, dropout, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = ChannelRMSNorm(dims[-1], gamma_dims=3)
        self.conv_out = FrameConv(dims[-1], output_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, z_dim, h, w) -> (B, Cout, 8h, 8w)."""
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))
