"""The RGBA-VAE of Qwen-Image-Layered: 4 channels in and out, 16 latent channels, 8x spatial (model_spec.md §5).

Follows diffusers 0.42.1 `AutoencoderKLQwenImage` (parameter names and shapes, including the unused temporal
convolutions), but runs every layer as one frame with exact 2D convolutions (see `vae_blocks.py`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...errors import ModelMismatchError
from .vae_blocks import Decoder, Encoder, FrameConv

# Published latent statistics (model_spec.md §2.3; diffusers defaults, ComfyUI `Wan21`).
LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

_DOWN_RE = re.compile(r"^encoder\.down_blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters with the diffusers `vae/config.json` field names; defaults are the layered VAE's."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    input_channels: int = 4
    latents_mean: tuple[float, ...] = field(default=LATENTS_MEAN)
    latents_std: tuple[float, ...] = field(default=LATENTS_STD)

    def __post_init__(self) -> None:
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample needs {len(self.dim_mult) - 1} entries for dim_mult {self.dim_mult}, "
                f"got {self.temperal_downsample}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"latents_mean/latents_std need z_dim={self.z_dim} values each, "
                f"got {len(self.latents_mean)} and {len(self.latents_std)}"
            )

    @property
    def scale_factor(self) -> int:
        """Spatial down-sampling factor between pixels and latents (8 for the real model)."""
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_dict(cls, config: Mapping[str, object]) -> VAEConfig:
        """Build from a diffusers `config.json` dict, ignoring the fields this implementation does not use."""
        names = set(cls.__dataclass_fields__)
        kwargs: dict[str, object] = {}
        for key, value in config.items():
            if key in names:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], source: str) -> VAEConfig:
        """Infer the config from diffusers-named tensor shapes; raise ModelMismatchError naming `source`."""

        def need(key: str) -> Sequence[int]:
            if key not in shapes:
                raise ModelMismatchError(
                    f"{source}: this is not a Qwen-Image VAE (tensor {key!r} is missing). "
                    "Select the Qwen-Image-Layered RGBA VAE (qwen_image_layered_vae.safetensors or the vae/ folder)."
                )
            return shapes[key]

        conv_in = need("encoder.conv_in.weight")  # (base_dim, in_channels, 3, 3, 3)
        post = need("post_quant_conv.weight")  # (z_dim, z_dim, 1, 1, 1)
        base_dim, input_channels, z_dim = int(conv_in[0]), int(conv_in[1]), int(post[0])
        # Encoder down path: residual blocks carry conv1, resamplers carry resample.1, attention carries to_qkv.
        kinds: dict[int, str] = {}
        widths: dict[int, int] = {}
        for key, shape in shapes.items():
            m = _DOWN_RE.match(key)
            if m is None:
                continue
            idx, rest = int(m.group(1)), m.group(2)
            if rest == "conv1.weight":
                kinds[idx], widths[idx] = "res", int(shape[0])
            elif rest == "resample.1.weight":
                kinds.setdefault(idx, "down2d")
            elif rest == "time_conv.weight":
                kinds[idx] = "down3d"
            elif rest == "to_qkv.weight":
                kinds[idx] = "attn"
        if not kinds or sorted(kinds) != list(range(len(kinds))):
            raise ModelMismatchError(
                f"{source}: encoder.down_blocks are missing or not numbered 0..n; not a Qwen-Image VAE"
            )
        stages: list[list[int]] = [[]]  # residual widths per stage
        temporal: list[bool] = []
        attn_scales: list[float] = []
        scale = 1.0
        for idx in range(len(kinds)):
            kind = kinds[idx]
            if kind == "res":
                stages[-1].append(widths[idx])
            elif kind == "attn":
                if scale not in attn_scales:
                    attn_scales.append(scale)
            else:
                temporal.append(kind == "down3d")
                stages.append([])
                scale /= 2.0
        counts = {len(s) for s in stages}
        if len(counts) != 1 or 0 in counts:
            raise ModelMismatchError(
                f"{source}: uneven residual blocks per encoder stage {stages}; not a Qwen-Image VAE"
            )
        mults = []
        for stage in stages:
            if stage[0] % base_dim:
                raise ModelMismatchError(f"{source}: encoder width {stage[0]} is not a multiple of {base_dim}")
            mults.append(stage[0] // base_dim)
        kwargs: dict[str, object] = {}
        if z_dim != len(LATENTS_MEAN):
            # The published statistics only exist for 16 channels; the caller must supply its own.
            kwargs = {"latents_mean": (0.0,) * z_dim, "latents_std": (1.0,) * z_dim}
        return cls(
            base_dim=base_dim,
            z_dim=z_dim,
            dim_mult=tuple(mults),
            num_res_blocks=counts.pop(),
            attn_scales=tuple(attn_scales),
            temperal_downsample=tuple(temporal),
            input_channels=input_channels,
            **kwargs,  # type: ignore[arg-type]
        )


class RGBAVAE(nn.Module):
    """Frame-wise RGBA-VAE: `encode` (B,4,H,W) in [-1,1] -> (B,16,H/8,W/8); `decode` the inverse, clamped."""

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        cfg = config or VAEConfig()
        self.config = cfg
        self.encoder = Encoder(
            cfg.base_dim, cfg.z_dim * 2, cfg.dim_mult, cfg.num_res_blocks, cfg.attn_scales,
            cfg.temperal_downsample, cfg.dropout, cfg.input_channels,
        )  # fmt: skip
        self.quant_conv = FrameConv(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.post_quant_conv = FrameConv(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(
            cfg.base_dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks, cfg.temperal_downsample[::-1],
            cfg.dropout, cfg.input_channels,
        )  # fmt: skip

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the convolution weights (the compute dtype)."""
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.quant_conv.weight.device

    def _check(self, x: Tensor, channels: int, what: str) -> None:
        multiple = self.config.scale_factor if what == "encode" else 1
        if x.ndim != 4 or x.shape[1] != channels or x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(
                f"RGBAVAE.{what} expects (B, {channels}, H, W) with H and W multiples of {multiple}, "
                f"got {tuple(x.shape)}"
            )

    def encode(self, x: Tensor) -> Tensor:
        """Posterior mean of pixels (B, 4, H, W) in [-1, 1] -> latents (B, 16, H/8, W/8), not normalised."""
        self._check(x, self.config.input_channels, "encode")
        h = self.encoder(x.to(self.dtype))  # (B, 2*z, h, w)
        z = self.config.z_dim
        # Only the mean half of quant_conv is needed; its log-variance half is never used for the mode.
        w = self.quant_conv.weight[:z, :, -1]
        b = self.quant_conv.bias[:z] if self.quant_conv.bias is not None else None
        return torch.nn.functional.conv2d(h, w, b)  # (B, z, h, w)

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, 16, h, w), not normalised -> pixels (B, 4, 8h, 8w) clamped to [-1, 1]."""
        self._check(z, self.config.z_dim, "decode")
        x = self.decoder(self.post_quant_conv(z.to(self.dtype)))
        return x.clamp_(-1.0, 1.0)

    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, self.config.z_dim, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=z.device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=z.device).view(shape)
        return mean.to(z.dtype), std.to(z.dtype)

    def normalize_latents(self, z: Tensor) -> Tensor:
        """(z - mean_c) / std_c per channel, (B, 16, h, w) -> same shape (model_spec.md §2.3)."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize_latents(self, z: Tensor) -> Tensor:
        """z * std_c + mean_c per channel, the inverse of `normalize_latents`."""
        mean, std = self._stats(z)
        # Written as a division by the reciprocal, rounded in z's dtype, exactly as the reference pipeline does.
        return z / (1.0 / std) + mean
