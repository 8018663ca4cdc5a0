"""Caption Image (Qwen2.5-VL): the caption Decompose Image writes for an empty prompt, as a STRING to read and edit
(a thin adapter over qil_core.model.pipeline.auto_caption)."""

from __future__ import annotations

from typing import Any

from ..qil_core.model.pipeline.options import CAPTION_LANGUAGES, REFERENCE_MAX_NEW_TOKENS, DecomposeOptions
from . import host
from .common import CATEGORY, image_batch, integer
from .model_runtime import MODEL_TYPE, caption_placement, check_model
from .sample_inputs import SIZE, processing_size
from .widgets import options_from_widgets, widgets


class QILCaptionImage:
    """Caption an image with the model's Qwen2.5-VL text encoder, its vision tower and LM head."""

    DESCRIPTION = (
        "Writes the caption Qwen-Image-Layered's reference pipeline uses when the prompt is empty: the text encoder "
        "(Qwen2.5-VL) describes the image with the official annotator instruction. Connect it to Decompose Image's "
        "prompt (convert the widget to an input), or copy and edit it. Needs the full text-encoder file with its "
        "vision tower and lm_head (the diffusers text_encoder/ folder has both). A batch gives one caption per "
        "image, separated by blank lines."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("caption",)
    OUTPUT_TOOLTIPS = ("The caption (English or Chinese), stripped.",)
    FUNCTION = "caption"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load Qwen-Layered, with its text encoder."}),
                "image": ("IMAGE", {"tooltip": "The picture to describe."}),
                "language": (
                    list(CAPTION_LANGUAGES),
                    {"default": "en", "tooltip": "en: the official app's choice; zh: diffusers' default."},
                ),
                "max_new_tokens": (
                    "INT",
                    {
                        "default": REFERENCE_MAX_NEW_TOKENS,
                        "min": 1,
                        "max": 4096,
                        "tooltip": f"Most tokens to write ({REFERENCE_MAX_NEW_TOKENS} as the reference).",
                    },
                ),
                **widgets(DecomposeOptions, SIZE),  # as Decompose Image's: the same resize, the caption it would write
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def caption(
        self,
        model: Any,
        image: Any,
        language: str,
        max_new_tokens: int,
        resolution: str,
        max_side: int,
        unique_id: str | None = None,
    ) -> dict[str, Any]:
        from ..qil_core.model.pipeline.auto_caption import caption_inputs_at

        handle = check_model(model)
        img = image_batch(image)
        tokens = integer("max_new_tokens", max_new_tokens, 1, 4096)
        size = options_from_widgets(DecomposeOptions, {"resolution": resolution, "max_side": max_side})
        # planned at the size it captions (the processing size), like the sampling nodes
        with caption_placement(handle, *processing_size(int(img.shape[2]), int(img.shape[1]), size)) as pl:
            captions = caption_inputs_at(
                handle.model,
                pl,
                img,
                resolution=size.resolution,
                max_side=size.max_side,
                language=language,
                max_new_tokens=tokens,
                on_token=host.make_callback(tokens * img.shape[0], node_id=unique_id, label="Caption Image"),
            )
        text = "\n\n".join(captions)
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {"QILCaptionImage": QILCaptionImage}
NODE_DISPLAY_NAME_MAPPINGS = {"QILCaptionImage": "Caption Image (Qwen2.5-VL)"}
