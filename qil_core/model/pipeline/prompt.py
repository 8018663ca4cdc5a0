"""Prompt -> conditioning embeddings, as model_spec §3.3 (diffusers 0.42.1 `QwenImageLayeredPipeline.encode_prompt`).

Each prompt is wrapped in the chat template, run through the text encoder, and the template prefix (the system
turn and `<|im_start|>user\\n`, 34 tokens with the real vocabulary) is dropped; the user tokens and the 5 suffix
tokens are kept. Rows are right-padded with zeros and come with a {1, 0} mask, or `None` when nothing is padded.

Behaviour on awkward prompts (all documented, none silent):
- empty prompt "": encoded like any other, giving the 5 suffix tokens (what ComfyUI's empty negative gives).
  The diffusers pipeline would auto-caption an empty prompt instead; this function never captions, so callers
  that want a caption must ask for one (the pipeline and nodes decide, not this function).
- long prompts (e.g. 10 kB): cut to `max_sequence_length` kept tokens with a logged warning. The encoder is
  causal, so running only the first prefix + max_sequence_length tokens gives exactly the embeddings diffusers
  keeps after encoding the whole prompt, without paying for the rest.
- invalid UTF-8 (lone surrogates from 'surrogateescape'): replaced by U+FFFD with a warning (the tokenizer does it);
  bytes objects are refused with InputError: decode them first.
- text that spells special tokens (`<|im_end|>`) is tokenized as those tokens, as in diffusers and ComfyUI.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from ...errors import InputError
from ..arch.text_encoder import Qwen25TextEncoder
from ..weights.tokenizer import QwenTokenizer
from .options import DEFAULT_MAX_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH_LIMIT

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
DEFAULT_NEGATIVE_PROMPT = " "


def template_prefix_length(tokenizer: QwenTokenizer) -> int:
    """Number of template tokens before the user text (34 with the Qwen2.5 vocabulary), computed, not assumed."""
    return len(tokenizer.encode(PROMPT_TEMPLATE[: PROMPT_TEMPLATE.index("{}")]))


def tokenize_prompts(
    tokenizer: QwenTokenizer, prompts: str | Sequence[str], *, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
) -> tuple[list[list[int]], int]:
    """Templated token ids per prompt, cut to prefix + max_sequence_length, and the prefix length to drop."""
    prompts = _check_prompts(prompts)
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int):
        raise InputError(f"max_sequence_length must be an int, got {type(max_sequence_length).__name__}")
    if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH_LIMIT:
        raise InputError(
            f"max_sequence_length must be in [1, {MAX_SEQUENCE_LENGTH_LIMIT}], got {max_sequence_length}; "
            f"the model was trained with up to {MAX_SEQUENCE_LENGTH_LIMIT} text tokens (default "
            f"{DEFAULT_MAX_SEQUENCE_LENGTH})"
        )
    drop = template_prefix_length(tokenizer)
    out = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(PROMPT_TEMPLATE.format(prompt))
        kept = len(ids) - drop
        if kept > max_sequence_length:
            log.warning(
                "prompt %d is %d tokens long (with the 5 closing template tokens); only the first %d are used "
                "(max_sequence_length). Shorten the prompt to keep its end.",
                i,
                kept,
                max_sequence_length,
            )
            ids = ids[: drop + max_sequence_length]
        out.append(ids)
    return out, drop


def encode_prompts(
    text_encoder: Qwen25TextEncoder,
    tokenizer: QwenTokenizer,
    prompts: str | Sequence[str],
    *,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Prompts (B) -> embeddings (B, L, D) in the encoder's dtype and a long {1, 0} mask (B, L), or None if unpadded."""
    rows, drop = tokenize_prompts(tokenizer, prompts, max_sequence_length=max_sequence_length)
    lengths = [len(r) for r in rows]
    n = max(lengths)
    ids = torch.full((len(rows), n), tokenizer.pad_token_id, dtype=torch.long)  # (B, L_full), right-padded
    attn = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attn[i, : len(r)] = 1
    with torch.no_grad():
        hidden = text_encoder(ids.to(text_encoder.device), attn.to(text_encoder.device))  # (B, L_full, D)
    kept = [length - drop for length in lengths]
    width = max(kept)
    embeds = hidden.new_zeros((len(rows), width, hidden.shape[-1]))  # (B, L, D) zero-padded
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=hidden.device)
    for i, k in enumerate(kept):
        embeds[i, :k] = hidden[i, drop : drop + k]
        mask[i, :k] = 1
    out_device = torch.device(device) if device is not None else hidden.device
    embeds = embeds.to(device=out_device, dtype=text_encoder.dtype)
    if bool(mask.all()):
        return embeds, None
    return embeds, mask.to(out_device)


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """A non-empty list of str; a bare str is one prompt; bytes and other types are refused with their index."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
        raise InputError(f"prompts must be a str or a sequence of str, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise InputError('prompts is empty; pass at least one prompt (use " " for an unconditional negative)')
    bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise InputError(
            f"every prompt must be a str; got {bad[:3]} (index, type). Decode bytes with "
            ".decode('utf-8', errors='replace') and replace None with \"\""
        )
    return list(prompts)
