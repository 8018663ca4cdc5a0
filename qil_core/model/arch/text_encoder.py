"""The Qwen2.5-VL-7B language model as a text encoder: token ids -> final-norm hidden states.

Follows transformers 5.x `Qwen2_5_VLTextModel` (modeling_qwen2_5_vl.py): pre-norm decoder layers with RMSNorm,
grouped-query attention with q/k/v biases, SwiGLU MLP, rotary positions. Qwen2.5-VL's multimodal rotary
embedding splits the rotary frequencies into (temporal, height, width) sections, each rotated by its own
position id; for text-only input all three ids are the token index, so the sections recombine into ordinary
1D rotary positions and no section table is needed here (captioning, arch/vl_decoder.py, passes its own
multimodal tables and a key/value cache through `DecoderLayer.forward`). Parameter names are those of the language
model in the checkpoints after stripping their prefix (`model.` or `model.language_model.`), see text_keys.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import InputError, ModelMismatchError


def _json_int(value: object) -> int:
    """int() of a config.json number or numeric string; TypeError for anything else (null, list, object)."""
    if not isinstance(value, (int, float, str)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return int(value)


def _json_float(value: object) -> float:
    """float() of a config.json number or numeric string; TypeError for anything else (null, list, object)."""
    if not isinstance(value, (int, float, str)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


@dataclass(frozen=True)
class TextEncoderConfig:
    """Hyper-parameters of the Qwen2.5 decoder, with transformers' field names (defaults: Qwen2.5-VL-7B)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0

    def __post_init__(self) -> None:
        sizes = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
        bad = [f"{n}={v}" for n in sizes if not (isinstance(v := getattr(self, n), int) and v > 0)]
        if bad:
            raise InputError(f"TextEncoderConfig needs positive integers, got {', '.join(bad)}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise InputError(
                f"TextEncoderConfig: hidden_size {self.hidden_size} must split into num_attention_heads "
                f"{self.num_attention_heads} heads, which must be a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise InputError(f"TextEncoderConfig: head_dim {self.head_dim} must be even for rotary positions")

    @property
    def head_dim(self) -> int:
        """Width of one attention head (hidden_size / num_attention_heads; 128 for the 7B model)."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_shapes(
        cls,
        shapes: Mapping[str, Sequence[int]],
        *,
        head_dim: int = 128,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1_000_000.0,
        source: str = "the state dict",
    ) -> TextEncoderConfig:
        """Infer the config from canonical parameter shapes; the head width is not stored, so it is given (128)."""
        need = ("embed_tokens.weight", "layers.0.mlp.gate_proj.weight", "layers.0.self_attn.k_proj.weight")
        missing = [k for k in need if k not in shapes]
        if missing:
            raise ModelMismatchError(f"{source} is not a Qwen2.5 language model: it has no {missing}")
        vocab, hidden = (int(s) for s in shapes["embed_tokens.weight"])
        inter = int(shapes["layers.0.mlp.gate_proj.weight"][0])
        kv_out = int(shapes["layers.0.self_attn.k_proj.weight"][0])
        layer_ids = {int(m.group(1)) for k in shapes if (m := re.match(r"layers\.(\d+)\.", k))}
        if hidden % head_dim or kv_out % head_dim:
            raise ModelMismatchError(
                f"{source}: hidden size {hidden} and key width {kv_out} are not multiples of the head width "
                f"{head_dim}; pass the model's config (config.json) or the right head_dim"
            )
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=max(layer_ids) + 1,
            num_attention_heads=hidden // head_dim,
            num_key_value_heads=kv_out // head_dim,
            rms_norm_eps=rms_norm_eps,
            rope_theta=rope_theta,
        )

    @classmethod
    def from_transformers_config(cls, cfg: Mapping[str, object]) -> TextEncoderConfig:
        """Read a Qwen2.5-VL config.json dict: transformers 5 nests it in `text_config`, 4.x keeps it top level."""
        nested = cfg.get("text_config")
        text: Mapping[str, object] = nested if isinstance(nested, Mapping) and "hidden_size" in nested else cfg
        rope_parameters = text.get("rope_parameters")
        rope: Mapping[str, object] = rope_parameters if isinstance(rope_parameters, Mapping) else {}
        try:
            return cls(
                vocab_size=_json_int(text["vocab_size"]),
                hidden_size=_json_int(text["hidden_size"]),
                intermediate_size=_json_int(text["intermediate_size"]),
                num_hidden_layers=_json_int(text["num_hidden_layers"]),
                num_attention_heads=_json_int(text["num_attention_heads"]),
                num_key_value_heads=_json_int(text.get("num_key_value_heads", text["num_attention_heads"])),
                rms_norm_eps=_json_float(text.get("rms_norm_eps", 1e-6)),
                rope_theta=_json_float(rope.get("rope_theta", text.get("rope_theta", cfg.get("rope_theta", 1e6)))),
            )
        except KeyError as e:
            raise ModelMismatchError(f"config.json is not a Qwen2.5-VL text config (missing field {e})") from e
        except (TypeError, ValueError) as e:
            raise ModelMismatchError(
                "config.json is not a Qwen2.5-VL text config (a size or rate field is not a number); re-download it"
            ) from e

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter name of `Qwen25TextEncoder` with its shape."""
        d, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (self.vocab_size, d), "norm.weight": (d,)}
        for n in range(self.num_hidden_layers):
            p = f"layers.{n}."
            out.update(
                {
                    p + "self_attn.q_proj.weight": (d, d),
                    p + "self_attn.q_proj.bias": (d,),
                    p + "self_attn.k_proj.weight": (kv, d),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.weight": (kv, d),
                    p + "self_attn.v_proj.bias": (kv,),
                    p + "self_attn.o_proj.weight": (d, d),
                    p + "mlp.gate_proj.weight": (i, d),
                    p + "mlp.up_proj.weight": (i, d),
                    p + "mlp.down_proj.weight": (d, i),
                    p + "input_layernorm.weight": (d,),
                    p + "post_attention_layernorm.weight": (d,),
                }
            )
        return out


class TextEncoderRMSNorm(nn.Module):
    """RMS normalisation computed in fp32, cast back, then scaled (the order transformers uses)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(dim: int, theta: float, device: torch.device) -> Tensor:
    """Rotary inverse frequencies 1 / theta^(2i / dim) for i < dim / 2, fp32 (the text, M-RoPE and vision rule)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)


def rope_tables(angles: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of fp32 angles (..., d/2), doubled to (..., d) (both halves share the frequencies), in `dtype`."""
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rotary tables for 1D positions (L,) -> cos, sin of shape (L, head_dim), angles in fp32."""
    angles = positions.float()[:, None] * rope_inv_freq(head_dim, theta, positions.device)[None, :]  # (L, hd/2)
    return rope_tables(angles, dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, heads, L, hd) by the tables (L, hd) using the half-split pairing of Qwen/Llama."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query self-attention with biased q/k/v projections, rotary positions and SDPA."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.heads * hd, bias=True)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: list[Tensor] | None = None
    ) -> Tensor:
        """(B, L, D) -> (B, L, D); `mask` is a boolean (B, 1, L, L) keep-mask, or None for plain causal.

        `cache` (captioning): a list holding this layer's past rotated keys and values ([] at first); the new ones
        are appended to it and the queries attend causally to the past plus the new positions.
        """
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, L, hd)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = True
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
            past = k.shape[2] - n
            if past and n == 1:  # one new token (every generation step) sees every key: no mask to build
                causal = False
            elif past:  # queries at past..past+n-1 see keys 0..their own position
                keys, queries = torch.arange(k.shape[2], device=x.device), torch.arange(n, device=x.device)
                keep = keys[None, :] <= past + queries[:, None]
                mask = keep[None, None].expand(b, 1, n, k.shape[2])
        groups = self.heads // self.kv_heads  # query head h reads key/value head h // groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, L, hd)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D)."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = TextEncoderRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = TextEncoderRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: list[Tensor] | None = None
    ) -> Tensor:
        """(B, L, D) -> (B, L, D); `cache` as in `Attention.forward`."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen25TextEncoder(nn.Module):
    """Qwen2.5 decoder stack returning the final-norm hidden states (B, L, hidden_size) for token ids (B, L)."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = TextEncoderRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: that of the embedding table (bf16 for the released weights)."""
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.embed_tokens.weight.device

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Token ids (B, L) and an optional {1 keep, 0 pad} mask (B, L) -> hidden states (B, L, D).

        Positions are the token indices 0..L-1 (what transformers uses for text-only input), so pad on the right;
        outputs at padded positions are defined but meaningless.
        """
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64) or input_ids.shape[1] == 0:
            raise InputError(
                f"input_ids must be a non-empty integer tensor (B, L), got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size:
            raise InputError(
                f"input_ids hold values in [{int(input_ids.min())}, {int(input_ids.max())}], outside the vocabulary "
                f"of {self.config.vocab_size}; the tokenizer does not match this text encoder"
            )
        b, n = input_ids.shape
        x = self.embed_tokens(input_ids.to(self.device))  # (B, L, D)
        cos, sin = rope_cos_sin(torch.arange(n, device=x.device), self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = None if attention_mask is None else _attention_mask(attention_mask.to(x.device), b, n)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


def _attention_mask(attention_mask: Tensor, b: int, n: int) -> Tensor | None:
    """Causal and padding keep-mask (B, 1, L, L) from a {1, 0} mask (B, L); None when nothing is padded."""
    if tuple(attention_mask.shape) != (b, n):
        raise InputError(f"attention_mask must have shape {(b, n)} like input_ids, got {tuple(attention_mask.shape)}")
    keys = attention_mask.bool()
    if bool(keys.all()):
        return None
    causal = torch.ones(n, n, dtype=torch.bool, device=keys.device).tril()
    mask = causal[None, None] & keys[:, None, None, :]  # (B, 1, L, L)
    # A query with no visible key (a leading pad) would give NaN; let it see itself. Valid rows are unchanged.
    empty = ~mask.any(dim=-1, keepdim=True)
    return mask | (empty & torch.eye(n, dtype=torch.bool, device=keys.device))
