"""The Qwen2.5-VL vision tower: flattened image patches -> features at the language model's width.

Follows transformers 5.x `Qwen2_5_VisionTransformerPretrainedModel` (modeling_qwen2_5_vl.py, vision_utils.py):
- patch embed: a bias-free Conv3d whose kernel equals its stride, i.e. one matrix product per flattened
  (channels x temporal 2 x 14 x 14) patch;
- 2-D rotary positions: a quarter of each head's width rotates by the patch row, a quarter by the column;
- pre-norm blocks (RMSNorm, attention with a fused biased qkv, SwiGLU MLP with biases); blocks listed in
  `fullatt_block_indexes` attend over the whole image, the others inside windows of `window_size` pixels;
- the patch merger: RMSNorm, then each 2x2 group of patches concatenated and mapped by a GELU MLP to the LM width.

Patches arrive in the processor's order (row-major over 2x2 merge blocks, the four patches of a block adjacent).
Windowed attention regroups the merge blocks window by window and the merger output is put back in the
processor's order, so the features line up with the `<|image_pad|>` tokens. Parameter names are those of the
checkpoints after the `visual.` (or `model.visual.`) prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import InputError, ModelMismatchError
from .text_encoder import TextEncoderRMSNorm, apply_rope, rope_inv_freq, rope_tables


@dataclass(frozen=True)
class VisionConfig:
    """Hyper-parameters of the vision tower with transformers' field names (defaults: Qwen2.5-VL-7B)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        sizes = (
            "depth",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "in_channels",
            "patch_size",
            "temporal_patch_size",
            "spatial_merge_size",
            "window_size",
            "out_hidden_size",
        )
        bad = [f"{n}={v}" for n in sizes if not (isinstance(v := getattr(self, n), int) and v > 0)]
        if bad:
            raise InputError(f"VisionConfig needs positive integers, got {', '.join(bad)}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise InputError(
                f"VisionConfig: hidden_size {self.hidden_size} must split into {self.num_heads} heads "
                "whose width is a multiple of 4 (two rotary axes)"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head (80 for the 7B tower)."""
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened input patch (3 x 2 x 14 x 14 = 1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_transformers_config(cls, cfg: Mapping[str, object]) -> VisionConfig:
        """Read the `vision_config` of a Qwen2.5-VL config.json (or the vision dict itself)."""
        nested = cfg.get("vision_config")
        v: Mapping[str, Any] = nested if isinstance(nested, Mapping) else cfg
        rope = v.get("rope_parameters")
        theta = rope.get("rope_theta", 10000.0) if isinstance(rope, Mapping) else 10000.0
        defaults = cls()
        try:
            return cls(
                depth=int(v.get("depth", defaults.depth)),
                hidden_size=int(v.get("hidden_size", defaults.hidden_size)),
                intermediate_size=int(v.get("intermediate_size", defaults.intermediate_size)),
                num_heads=int(v.get("num_heads", defaults.num_heads)),
                in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
                patch_size=int(v.get("patch_size", 14)),
                temporal_patch_size=int(v.get("temporal_patch_size", 2)),
                spatial_merge_size=int(v.get("spatial_merge_size", 2)),
                window_size=int(v.get("window_size", 112)),
                out_hidden_size=int(v.get("out_hidden_size", defaults.out_hidden_size)),
                fullatt_block_indexes=tuple(
                    int(i) for i in v.get("fullatt_block_indexes", defaults.fullatt_block_indexes)
                ),
                rope_theta=float(theta),
            )
        except (TypeError, ValueError) as e:
            raise ModelMismatchError(
                "config.json: the vision_config has a field that is not a number; re-download it"
            ) from e

    @classmethod
    def from_shapes(
        cls, shapes: Mapping[str, Sequence[int]], *, head_dim: int = 80, source: str = "the state dict"
    ) -> VisionConfig:
        """Infer the config from canonical (prefix-stripped) vision parameter shapes; depth-dependent full-attention
        blocks follow the 7B rule (every 8th block, the last of each group of 8)."""
        need = ("patch_embed.proj.weight", "blocks.0.mlp.gate_proj.weight", "merger.mlp.2.weight")
        missing = [k for k in need if k not in shapes]
        if missing:
            raise ModelMismatchError(f"{source} has no Qwen2.5-VL vision tower: it lacks {missing}")
        hidden, channels, temporal, patch, _ = (int(s) for s in shapes["patch_embed.proj.weight"])
        depth = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
        merged = int(shapes["merger.mlp.0.weight"][1]) if "merger.mlp.0.weight" in shapes else hidden * 4
        return cls(
            depth=depth,
            hidden_size=hidden,
            intermediate_size=int(shapes["blocks.0.mlp.gate_proj.weight"][0]),
            num_heads=hidden // head_dim,
            in_channels=channels,
            patch_size=patch,
            temporal_patch_size=temporal,
            spatial_merge_size=int(round((merged // hidden) ** 0.5)),
            out_hidden_size=int(shapes["merger.mlp.2.weight"][0]),
            fullatt_block_indexes=tuple(i for i in range(depth) if i % 8 == 7),
        )


class VisionAttention(nn.Module):
    """Multi-head attention with one fused biased qkv projection, 2-D rotary positions, inside given spans."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, spans: Sequence[int]) -> Tensor:
        """(N, D) -> (N, D); attention runs separately inside each consecutive span of `spans` lengths."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)  # (H, N, hd)
        q = apply_rope(q.float(), cos, sin).to(x.dtype)  # rotation in fp32 as the reference does
        k = apply_rope(k.float(), cos, sin).to(x.dtype)
        if len(spans) == 1:
            out = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
        else:
            parts = zip(q.split(list(spans), dim=1), k.split(list(spans), dim=1), v.split(list(spans), dim=1))
            out = torch.cat([F.scaled_dot_product_attention(a[None], b[None], c[None])[0] for a, b, c in parts], 1)
        return self.proj(out.transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    """SwiGLU with biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """(N, D) -> (N, D)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = TextEncoderRMSNorm(cfg.hidden_size, 1e-6)
        self.norm2 = TextEncoderRMSNorm(cfg.hidden_size, 1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, spans: Sequence[int]) -> Tensor:
        """(N, D) -> (N, D)."""
        x = x + self.attn(self.norm1(x), cos, sin, spans)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each group of merge x merge patches concatenated and mapped to the LM width by a GELU MLP."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = TextEncoderRMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.out_hidden_size)
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, D) -> (N / merge^2, out_hidden_size)."""
        return self.mlp(self.ln_q(x).reshape(-1, self.width))


def patch_positions(grid: tuple[int, int, int], merge: int) -> Tensor:
    """(row, column) of every patch in the processor's order (merge blocks row-major, 2x2 inside): (N, 2) int64."""
    t, h, w = grid
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    shape = (h // merge, merge, w // merge, merge)
    pos = torch.stack([rows.reshape(shape).transpose(1, 2).flatten(), cols.reshape(shape).transpose(1, 2).flatten()], 1)
    return pos.repeat(t, 1)


def window_order(grid: tuple[int, int, int], merge: int, window_merged: int) -> tuple[Tensor, list[int]]:
    """Merge-block order that groups blocks window by window, and each window's length in patches.

    Windows tile the merged grid in squares of `window_merged` blocks from the top-left; edge windows are smaller.
    """
    t, h, w = grid
    gh, gw = h // merge, w // merge
    index = torch.arange(t * gh * gw).view(t, gh, gw)
    order: list[Tensor] = []
    spans: list[int] = []
    for f in range(t):
        for r0 in range(0, gh, window_merged):
            for c0 in range(0, gw, window_merged):
                block = index[f, r0 : r0 + window_merged, c0 : c0 + window_merged].reshape(-1)
                order.append(block)
                spans.append(block.numel() * merge * merge)
    return torch.cat(order), spans


class PatchEmbed(nn.Module):
    """Holds the patch projection under the checkpoint's name `patch_embed.proj` (used as one matrix product)."""

    def __init__(self, proj: nn.Conv3d) -> None:
        super().__init__()
        self.proj = proj


class VisionTower(nn.Module):
    """Flattened patches (N, patch_dim) of one image with grid (t, h, w) -> features (N / merge^2, out_hidden_size)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.config = cfg
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.patch_embed = PatchEmbed(nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel, stride=kernel, bias=False))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of the patch embedding)."""
        return self.patch_embed.proj.weight.dtype

    def _rotary(self, pos: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos/sin (N, head_dim) in fp32: first quarter-pairs rotate by the row, the next by the column."""
        inv = rope_inv_freq(self.config.head_dim // 2, self.config.rope_theta, device)
        angles = pos.to(device).float()[:, :, None] * inv  # (N, 2, hd/4)
        return rope_tables(angles.flatten(1), torch.float32)  # (N, hd/2): rows then columns, doubled

    def forward(self, patches: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """(N, patch_dim) patches in the processor's order -> (N / merge^2, out_hidden_size) in the same order."""
        cfg = self.config
        t, h, w = (int(g) for g in grid)
        n, unit = t * h * w, cfg.spatial_merge_size**2
        if (
            patches.ndim != 2
            or patches.shape != (n, cfg.patch_dim)
            or h % cfg.spatial_merge_size
            or w % cfg.spatial_merge_size
        ):
            raise InputError(
                f"vision patches must be ({n}, {cfg.patch_dim}) for grid {(t, h, w)} with h, w multiples of "
                f"{cfg.spatial_merge_size}; got {tuple(patches.shape)}"
            )
        weight = self.patch_embed.proj.weight
        x = F.linear(patches.to(device=weight.device, dtype=weight.dtype), weight.flatten(1))  # (N, D)
        cos, sin = self._rotary(patch_positions((t, h, w), cfg.spatial_merge_size), x.device)
        order, window_spans = window_order(
            (t, h, w), cfg.spatial_merge_size, cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
        )
        order = order.to(x.device)

        def regroup(a: Tensor) -> Tensor:
            return a.view(n // unit, unit, -1)[order].reshape(n, -1)

        x, cos, sin = regroup(x), regroup(cos), regroup(sin)
        full = [h * w] * t
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if i in cfg.fullatt_block_indexes else window_spans)
        merged = self.merger(x)
        return merged[torch.argsort(order)]
