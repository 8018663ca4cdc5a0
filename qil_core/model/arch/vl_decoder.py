"""Qwen2.5-VL as a captioner: the text encoder's decoder stack with image features, multimodal RoPE, a key/value
cache and the LM head. Follows transformers 5.x `Qwen2_5_VLModel` (`get_rope_index`, `Qwen2_5_VLRotaryEmbedding`)
and `Qwen2_5_VLForConditionalGeneration`.

Multimodal RoPE: every position has three ids (temporal, height, width). Text tokens use their running index
for all three; the merged patches of an image sit on a (t, h, w) grid offset by the position where the image
starts, and the text after it continues from that start plus max(h, w). The rotary frequencies of one head are
split into `mrope_section` parts (16, 24, 24 pairs for the 7B model); part i rotates by id i.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ...errors import InputError
from .text_encoder import Qwen25TextEncoder, rope_inv_freq, rope_tables
from .vision import VisionTower

DEFAULT_MROPE_SECTION = (16, 24, 24)


def rope_index(
    input_ids: Sequence[int], image_token_id: int, grids: Sequence[tuple[int, int, int]], merge: int
) -> Tensor:
    """Position ids (3, L) for one sequence whose runs of `image_token_id` are the images of `grids`, in order."""
    rows: list[Tensor] = []
    start, i, n, images = 0, 0, len(input_ids), iter(grids)
    while i < n:
        j = i
        is_image = input_ids[i] == image_token_id
        while j < n and (input_ids[j] == image_token_id) == is_image:
            j += 1
        if not is_image:
            rows.append(torch.arange(start, start + j - i).expand(3, -1))
            start += j - i
        else:
            try:
                t, h, w = next(images)
            except StopIteration:
                raise InputError("the prompt holds more image placeholder runs than images") from None
            gh, gw = h // merge, w // merge
            if t * gh * gw != j - i:
                raise InputError(
                    f"an image placeholder run holds {j - i} tokens, its grid {(t, h, w)} needs {t * gh * gw}"
                )
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            rows.append(torch.stack([tt, hh, ww]).reshape(3, -1) + start)
            start += max(gh, gw)
        i = j
    return torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)


def mrope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, section: Sequence[int], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Rotary tables (L, head_dim) for (3, L) position ids; angles in fp32, section i of the pairs from id i."""
    if sum(section) != head_dim // 2:
        raise InputError(f"mrope_section {tuple(section)} must add up to half the head width {head_dim // 2}")
    angles = positions.float()[:, :, None] * rope_inv_freq(head_dim, theta, positions.device)  # (3, L, hd/2)
    parts = angles.split(list(section), dim=-1)
    return rope_tables(torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1), dtype)  # (L, hd)


class CaptionModel(nn.Module):
    """The decoder (borrowed, not copied), the LM head and the vision tower, stepping with a key/value cache."""

    def __init__(
        self,
        decoder: Qwen25TextEncoder,
        lm_head: nn.Linear,
        vision: VisionTower,
        mrope_section: Sequence[int] = DEFAULT_MROPE_SECTION,
    ) -> None:
        super().__init__()
        self.decoder, self.lm_head, self.vision = decoder, lm_head, vision
        self.mrope_section = tuple(mrope_section)
        self.cache: list[list[Tensor]] = []

    def reset(self) -> None:
        """Forget the key/value cache (a new sequence starts)."""
        self.cache = [[] for _ in self.decoder.layers]

    def embed(self, input_ids: Tensor, image_token_id: int, image_features: Tensor | None) -> Tensor:
        """Token ids (L,) -> embeddings (1, L, D) with the image placeholders replaced by the image features.

        Without features (generated tokens) every id keeps its own embedding, placeholders included, as the
        reference does once the prompt is consumed."""
        x = self.decoder.embed_tokens(input_ids.to(self.decoder.device))
        if image_features is None:
            return x[None]
        where = input_ids.to(x.device) == image_token_id
        count = int(where.sum())
        if image_features.shape[0] != count:
            raise InputError(
                f"the prompt holds {count} image placeholders but the image gave {image_features.shape[0]} features"
            )
        x = x.clone()
        x[where] = image_features.to(device=x.device, dtype=x.dtype)
        return x[None]

    def step(self, embeds: Tensor, positions: Tensor) -> Tensor:
        """Run (1, L, D) embeddings at (3, L) positions through the decoder, extending the cache; logits (vocab,)
        of the last position, in fp32."""
        cfg = self.decoder.config
        cos, sin = mrope_cos_sin(
            positions.to(embeds.device), cfg.head_dim, cfg.rope_theta, self.mrope_section, embeds.dtype
        )
        x = embeds
        for layer, cache in zip(self.decoder.layers, self.cache):
            x = layer(x, cos, sin, None, cache)
        last = self.decoder.norm(x[:, -1:])
        return self.lm_head(last.to(self.lm_head.weight.dtype))[0, 0].float()
