"""Caption one image straight from the text encoder's files (the `caption` command): no transformer or VAE loaded."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...errors import InputError
from ..loader import component_path, load_text_parts
from ..weights.caption_loading import load_caption_model
from .auto_caption import config_folders
from .caption import GenerationSettings, TokenCallback, caption_image
from .caption_inputs import ImageProcessorConfig
from .options import REFERENCE_MAX_NEW_TOKENS

logger = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]


def text_encoder_source(model_dir: PathLike | None, text_encoder: PathLike | None) -> Path:
    """The text encoder's path: the given file or folder, else `model_dir/text_encoder`."""
    if model_dir is None and text_encoder is None:
        raise InputError("captioning needs the Qwen2.5-VL text encoder: give a model folder or the text-encoder file")
    path = component_path(None if model_dir is None else Path(model_dir), text_encoder, "text_encoder", True)
    assert path is not None  # required: found or raised
    return path


def caption_from_files(
    image: Image.Image | np.ndarray,
    *,
    model_dir: PathLike | None = None,
    text_encoder: PathLike | None = None,
    tokenizer: PathLike | None = None,
    language: str = "en",
    max_new_tokens: int = REFERENCE_MAX_NEW_TOKENS,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    on_token: TokenCallback | None = None,
) -> str:
    """The reference's caption of `image`, loading only the text encoder, vision tower, LM head and tokenizer;
    `on_token(n, max_new_tokens)` runs after every new token."""
    te_path = text_encoder_source(model_dir, text_encoder)
    decoder, tok = load_text_parts(te_path, tokenizer, None if model_dir is None else Path(model_dir), dtype, device)
    model = load_caption_model(te_path, decoder, dtype=dtype, device=device)
    gen_folder, proc_folder = config_folders(te_path)
    return caption_image(
        model,
        tok,
        image,
        language=language,
        max_new_tokens=max_new_tokens,
        settings=GenerationSettings.from_folder(gen_folder),
        processor=ImageProcessorConfig.from_folder(proc_folder),
        on_token=on_token,
    )
