"""Auto-captioning: Qwen2.5-VL writes the caption of an image, as the reference pipeline does for an empty prompt.

The reference (diffusers `QwenImageLayeredPipeline.get_image_caption`) runs `text_encoder.generate(**inputs,
max_new_tokens=512)` with the text encoder's generation config, decodes the new tokens skipping special tokens and
strips the text. `GenerationSettings` reads `generation_config.json` (greedy or sampling, temperature, top-k,
top-p, repetition penalty, eos ids); without one it is what transformers uses then: greedy, no penalty, eos
`<|im_end|>`. The logits go through transformers' order: repetition penalty, then (sampling only) temperature,
top-k, top-p. The number of new tokens is not the config's: the reference passes max_new_tokens=512 to
`generate`, which overrides any `max_new_tokens`/`max_length` there, so it is 512 unless the caller gives another
(`caption_image(max_new_tokens=...)`, CLI `caption --max-new-tokens`, the Caption node's widget).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ...errors import InputError, ModelMismatchError
from ..arch.vl_decoder import CaptionModel, rope_index
from ..weights.tokenizer import QwenTokenizer
from .caption_inputs import IMAGE_PAD, ImageProcessorConfig, image_patches, prompt_ids
from .options import REFERENCE_MAX_NEW_TOKENS

log = logging.getLogger(__name__)

# Called after every new token with (tokens written, most tokens); may raise (e.g. the host's Cancel) to stop.
TokenCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class GenerationSettings:
    """How tokens are chosen (transformers' `GenerationConfig` names; defaults: transformers' own)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_folder(cls, folder: Path | None) -> GenerationSettings:
        """Read `generation_config.json` in `folder` (the text encoder's); defaults when absent."""
        path = None if folder is None else Path(folder) / "generation_config.json"
        if path is None or not path.is_file():
            return cls()
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            eos = d.get("eos_token_id")
            return cls(
                do_sample=bool(d.get("do_sample", False)),
                temperature=float(d.get("temperature") if d.get("temperature") is not None else 1.0),
                top_k=int(d.get("top_k") if d.get("top_k") is not None else 50),
                top_p=float(d.get("top_p") if d.get("top_p") is not None else 1.0),
                repetition_penalty=float(d.get("repetition_penalty") or 1.0),
                eos_token_ids=tuple(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos])),
            )
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise ModelMismatchError(f"{path} is not a readable generation config ({e}); re-download it") from e


def choose_token(logits: Tensor, seen: Tensor, s: GenerationSettings, generator: torch.Generator | None) -> int:
    """Next token id from fp32 logits (vocab,) given every id of the sequence so far."""
    scores = logits  # the steps below make new tensors; only the penalty writes in place, on a copy
    if s.repetition_penalty != 1.0:
        scores = logits.clone()
        prev = scores.gather(0, seen)
        scores.scatter_(0, seen, torch.where(prev < 0, prev * s.repetition_penalty, prev / s.repetition_penalty))
    if not s.do_sample:
        return int(scores.argmax())
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k > 0:
        k = min(s.top_k, scores.numel())
        scores = scores.masked_fill(scores < torch.topk(scores, k).values[-1], float("-inf"))
    if s.top_p < 1.0:
        ordered, idx = scores.sort()
        cum = ordered.softmax(-1).cumsum(-1)
        drop = cum <= 1 - s.top_p
        drop[-1] = False
        scores = scores.masked_fill(drop.scatter(0, idx, drop), float("-inf"))
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate_ids(
    model: CaptionModel,
    input_ids: list[int],
    patches: Tensor,
    grid: tuple[int, int, int],
    image_token_id: int,
    settings: GenerationSettings,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    on_token: TokenCallback | None = None,
) -> list[int]:
    """New token ids (eos included when reached) for the prompt `input_ids` holding the image placeholders.

    `on_token(n, max_new_tokens)` runs after the n-th new token; an exception it raises stops the generation
    (the key/value cache is cleared either way).
    """
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    merge = model.vision.config.spatial_merge_size
    features = model.vision(patches, grid)
    positions = rope_index(input_ids, image_token_id, [grid], merge)
    ids = torch.tensor(input_ids, dtype=torch.long)
    model.reset()
    try:
        logits = model.step(model.embed(ids, image_token_id, features), positions)
        next_pos = int(positions.max()) + 1
        seen = ids.to(logits.device)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = choose_token(logits, seen, settings, generator)
            out.append(token)
            if on_token is not None:
                on_token(len(out), max_new_tokens)
            if token in settings.eos_token_ids or len(out) == max_new_tokens:
                break
            tok = torch.tensor([token], dtype=torch.long)
            if settings.repetition_penalty != 1.0:  # the only reader of the ids so far
                seen = torch.cat([seen, tok.to(seen.device)])
            logits = model.step(model.embed(tok, image_token_id, None), torch.full((3, 1), next_pos))
            next_pos += 1
        return out
    finally:
        model.reset()


def caption_image(
    model: CaptionModel,
    tokenizer: QwenTokenizer,
    image: Image.Image | np.ndarray,
    *,
    language: str = "en",
    max_new_tokens: int = REFERENCE_MAX_NEW_TOKENS,
    settings: GenerationSettings | None = None,
    processor: ImageProcessorConfig | None = None,
    seed: int = 0,
    on_token: TokenCallback | None = None,
) -> str:
    """The caption of `image` (PIL, or uint8 HxWx3/4 array) as the reference writes it for an empty prompt;
    `on_token` as in `generate_ids`."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InputError(f"the image to caption must be uint8 HxWx3 or HxWx4, got {image.dtype} {image.shape}")
        image = Image.fromarray(image, "RGBA" if image.shape[2] == 4 else "RGB")
    settings = settings or GenerationSettings()
    if not settings.eos_token_ids:
        settings = GenerationSettings(**{**settings.__dict__, "eos_token_ids": (tokenizer.token_to_id("<|im_end|>"),)})
    processor = processor or ImageProcessorConfig()
    if (
        model.vision.config.patch_size != processor.patch_size
        or model.vision.config.spatial_merge_size != processor.merge_size
    ):
        raise ModelMismatchError("the processor config's patch/merge sizes do not match the vision tower's")
    patches, grid = image_patches(image, processor)
    image_token = tokenizer.token_to_id(IMAGE_PAD)
    ids = prompt_ids(tokenizer, language, grid, processor.merge_size)
    generator = torch.Generator().manual_seed(seed) if settings.do_sample else None
    patches_t = torch.from_numpy(patches)
    new = generate_ids(model, ids, patches_t, grid, image_token, settings, max_new_tokens, generator, on_token)
    text = tokenizer.decode([i for i in new if i < tokenizer.vocab_size], skip_special_tokens=True).strip()
    log.info("caption (%s, %d tokens): %s", language, len(new), text)
    return text
