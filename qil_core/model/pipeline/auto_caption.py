"""Auto-captioning inside the jobs: when and how a decomposition writes its own prompt, as the reference does.

The reference (`QwenImageLayeredPipeline.__call__`) captions when the prompt is None, "" or " " (exactly those),
on the input image after its resize to the processing size, in English or Chinese. Here that is `auto_caption`
(default on) and `caption_language` ("en" default, the official app's choice; diffusers' own default is "zh").
The vision tower and LM head are loaded from the text encoder's file only when a caption is needed, on the
placement's device, and released right after; the text encoder goes through the placement like for prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...checks import check_choice
from ...errors import InputError
from ..loader import QwenLayeredModel
from ..runtime.placement import Placement
from ..weights.caption_loading import load_caption_model
from .caption import GenerationSettings, TokenCallback, caption_image
from .caption_inputs import ImageProcessorConfig
from .options import CAPTION_LANGUAGES, REFERENCE_MAX_NEW_TOKENS

logger = logging.getLogger(__name__)


def wants_caption(prompt: Any, prompt_embeds: Any, auto_caption: bool) -> bool:
    """True when the reference would caption: no embeddings and a prompt that is None, "" or " "."""
    return auto_caption and prompt_embeds is None and (prompt is None or prompt in ("", " "))


def config_folders(text_encoder: str | Path | None) -> tuple[Path | None, Path | None]:
    """(folder of the generation config, folder of the processor config) for a text encoder's file or folder:
    its own folder, and `processor/` beside it (diffusers layout), the folder itself, or the pipeline root."""
    if text_encoder is None:
        return None, None
    path = Path(text_encoder)
    if path.is_dir() and (path / "text_encoder").is_dir():
        path = path / "text_encoder"
    te_folder = path if path.is_dir() else path.parent
    root = te_folder.parent
    for folder in (root / "processor", te_folder, root):
        if (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file():
            return te_folder, folder
    return te_folder, None


def caption_images(
    model: QwenLayeredModel,
    placement: Placement,
    images: Sequence[np.ndarray],
    *,
    language: str = "en",
    max_new_tokens: int = REFERENCE_MAX_NEW_TOKENS,
    on_token: TokenCallback | None = None,
) -> list[str]:
    """One caption per RGBA uint8 image, written by the model's own Qwen2.5-VL (loaded parts released after).

    `on_token(done, total)` runs after every new token, counted over all images (image i's tokens start at
    i * max_new_tokens; total = images x max_new_tokens); it may raise to cancel (nothing stays loaded).
    """
    if not model.can_encode_prompts or "text_encoder" not in model.sources:
        raise InputError(
            "auto-captioning needs the Qwen2.5-VL text encoder loaded from its file: load the model with its text "
            "encoder, or type a prompt"
        )
    gen_folder, proc_folder = config_folders(model.sources["text_encoder"])
    settings = GenerationSettings.from_folder(gen_folder)
    processor = ImageProcessorConfig.from_folder(proc_folder)
    te_module = model.text_encoder
    assert te_module is not None and model.tokenizer is not None
    with placement.use("text_encoder", te_module) as te:
        captioner = load_caption_model(
            model.sources["text_encoder"],
            te,  # type: ignore[arg-type]
            dtype=model.dtype,
            device=placement.device,
        )
        try:
            captions = [
                caption_image(
                    captioner,
                    model.tokenizer,
                    im,
                    language=language,
                    max_new_tokens=max_new_tokens,
                    settings=settings,
                    processor=processor,
                    on_token=_offset(on_token, i * max_new_tokens, len(images) * max_new_tokens),
                )
                for i, im in enumerate(images)
            ]
        finally:
            del captioner  # the vision tower and LM head are freed here
    placement.release("text_encoder", te_module)
    for i, c in enumerate(captions):
        logger.info("auto-caption%s: %s", f" of image {i}" if len(captions) > 1 else "", c)
    return captions


def _offset(on_token: TokenCallback | None, start: int, total: int) -> TokenCallback | None:
    """One image's token callback reported on the whole job's count."""
    if on_token is None:
        return None
    report = on_token
    return lambda n, _most: report(start + n, total)


def caption_inputs_at(
    model: QwenLayeredModel,
    placement: Placement,
    image: Any,
    *,
    resolution: int | str = 640,
    max_side: int | None = None,
    mask: Any = None,
    language: str = "en",
    max_new_tokens: int = REFERENCE_MAX_NEW_TOKENS,
    on_token: TokenCallback | None = None,
) -> list[str]:
    """Captions of images in any input form, each first resized to the processing size of `resolution` as decompose
    does, so a caption equals the one decompose would write for an empty prompt."""
    from .imaging import bucket_size, prepare_images, resize_rgba
    from .options import check_size_mode

    language = check_choice("caption_language", language, CAPTION_LANGUAGES)
    mode, max_side = check_size_mode(resolution, max_side)
    images = [
        resize_rgba(im, bucket_size(im.shape[1], im.shape[0], mode, max_side)) for im in prepare_images(image, mask)
    ]
    return caption_images(model, placement, images, language=language, max_new_tokens=max_new_tokens, on_token=on_token)
