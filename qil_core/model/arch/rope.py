"""Layer3D rotary position embedding of Qwen-Image-Layered (model_spec §4.4), as small cache-free functions.

Follows diffusers 0.42.1 `QwenEmbedLayer3DRope` and `apply_rotary_emb_qwen(use_real=False)`: the same fp32
angles (position x theta^(-2j/a)), the same complex multiply, so results match it bit for bit on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ...errors import InputError

if TYPE_CHECKING:
    from .config import TransformerConfig

ROPE_THETA = 10000
FrameShape = tuple[int, int, int]


def normalize_img_shapes(img_shapes: Sequence, batch: int | None = None) -> list[FrameShape]:
    """Accept diffusers' per-batch nested list or a flat list of (frames, hp, wp); return the flat list.

    Every batch item must share one structure, since the positions are computed once for the whole batch.
    """
    if isinstance(img_shapes, tuple) and len(img_shapes) == 3 and all(isinstance(v, int) for v in img_shapes):
        img_shapes = [img_shapes]
    entries = list(img_shapes)
    if not entries:
        raise InputError("img_shapes is empty; expected a list of (frames, hp, wp) per image segment")
    if not _is_frame(entries[0]):
        # diffusers layout: one list of segments per batch item
        first = entries[0]
        if any(list(e) != list(first) for e in entries):
            raise InputError(
                f"img_shapes differs between batch items ({entries}); every item in one batch must have the same "
                "segments (same size and number of layers): run them as separate batches"
            )
        if batch is not None and len(entries) not in (1, batch):
            raise InputError(f"img_shapes has {len(entries)} batch entries but the batch size is {batch}")
        entries = list(first)
    out: list[FrameShape] = []
    for e in entries:
        if not _is_frame(e) or min(e) < 1:
            raise InputError(f"img_shapes entry {e!r} is not a (frames, hp, wp) triple of positive ints")
        out.append((int(e[0]), int(e[1]), int(e[2])))
    return out


def _is_frame(entry: object) -> bool:
    """True for a (frames, hp, wp) triple of ints."""
    return (
        isinstance(entry, (tuple, list))
        and len(entry) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
    )


def _centred(n: int) -> torch.Tensor:
    """Centred integer coordinates -(n - n//2) .. n//2 - 1 (diffusers `scale_rope=True`)."""
    return torch.arange(n, dtype=torch.int64) - (n - n // 2)


def rope_positions(
    img_shapes: Sequence[FrameShape], txt_len: int, condition: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer (frame, row, col) positions: image [S_img, 3] in token order and text [txt_len, 3] (CPU, int64).

    Segment k gets frame ids k.. (noisy frame k = layer k, frame 0 the composite); with `condition`, the last
    segment is the condition image with frame id -1. Rows and columns are centred per segment. Text token j sits
    at P0 + j on all three axes, P0 = max(hp//2, wp//2 over segments, number of noisy segments) - which is
    diffusers' max(..., layer_num) with layer_num = N + 1 when a condition segment is present.
    """
    if txt_len < 0:
        raise InputError(f"txt_len must be >= 0, got {txt_len}")
    segments: list[torch.Tensor] = []
    start = 0
    n_noisy = len(img_shapes) - 1 if condition else len(img_shapes)
    for idx, (frames, hp, wp) in enumerate(img_shapes):
        if condition and idx == n_noisy:
            if frames != 1:
                raise InputError(f"the condition segment of img_shapes must have 1 frame, got {frames}")
            frame_ids = torch.tensor([-1])
        else:
            frame_ids = torch.arange(idx, idx + frames)  # diffusers: a segment's frames count up from its index
        grid = torch.stack(
            torch.meshgrid(frame_ids, _centred(hp), _centred(wp), indexing="ij"), dim=-1
        )  # (frames, hp, wp, 3)
        segments.append(grid.reshape(-1, 3))
        start = max(start, hp // 2, wp // 2)
    start = max(start, n_noisy)
    txt = (start + torch.arange(txt_len, dtype=torch.int64))[:, None].expand(txt_len, 3)
    return torch.cat(segments, dim=0), txt


def rope_freqs(
    positions: torch.Tensor,
    axes_dims: Sequence[int],
    theta: int = ROPE_THETA,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Unit complex rotations e^(i*pos*w) for [S, 3] integer positions -> complex64 [S, sum(axes_dims)/2].

    Like the reference, a small per-axis table over the positions in use is computed on the CPU with the same
    fp32 expression as diffusers' `rope_params` (bit-identical angles), moved to `device` and gathered there.
    """
    # Ranges are read from the positions where they were built (the CPU), so a GPU run does not wait on the
    # device for them; only the gather happens on `device`.
    on_device = positions.to(device) if device is not None else positions
    parts = []
    for axis, dim in enumerate(axes_dims):
        host = positions[:, axis]
        lo, hi = (int(host.min()), int(host.max())) if host.numel() else (0, 0)
        pos = on_device[:, axis]
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim))  # (dim/2,)
        angles = torch.outer(torch.arange(lo, hi + 1).to(torch.float32), inv_freq)  # (hi-lo+1, dim/2)
        table = torch.polar(torch.ones_like(angles), angles)
        parts.append(table.to(on_device.device)[pos - lo])  # (S, dim/2)
    return torch.cat(parts, dim=1)  # (S, head_dim/2)


def layer3d_rope_freqs(
    img_shapes: Sequence[FrameShape],
    txt_len: int,
    cfg: TransformerConfig,
    condition: bool = True,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE rotations (img [S_img, head_dim/2], txt [txt_len, head_dim/2], complex64) on `device`, per forward.

    Only small per-axis tables are computed (on the CPU, bit-identical to the reference); the full tables are
    gathered on `device`, so a forward costs a few small transfers, not an S x 64 upload.
    """
    img_pos, txt_pos = rope_positions(normalize_img_shapes(img_shapes), txt_len, condition)
    axes = cfg.axes_dims_rope
    return rope_freqs(img_pos, axes, device=device), rope_freqs(txt_pos, axes, device=device)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate adjacent feature pairs of x [B, S, H, Dh] by freqs [S, Dh/2] (complex) in fp32; x's dtype back.

    With `out` (same shape as x, any float dtype, e.g. a slice of the joint q/k buffer) the result is written there
    instead of a new tensor, which saves the concatenation copy before attention.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, S, H, Dh/2)
    f = freqs[:, None, :]  # (S, 1, Dh/2): broadcast over heads
    if out is None:
        return torch.view_as_real(xc * f).flatten(-2).to(x.dtype)
    if out.dtype == torch.float32:
        torch.mul(xc, f, out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
    else:
        out.copy_(torch.view_as_real(xc * f).flatten(-2))
    return out
