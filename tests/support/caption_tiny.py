"""Tiny random Qwen2.5-VL captioners: the transformers reference, our CaptionModel with the same weights, and the
reference processor built without torchvision (test-only helpers)."""

from __future__ import annotations

import torch
from torch import nn

from qil_core.model.arch.text_encoder import Qwen25TextEncoder, TextEncoderConfig
from qil_core.model.arch.vision import VisionConfig, VisionTower
from qil_core.model.arch.vl_decoder import CaptionModel

TEXT = dict(
    vocab_size=152064,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
    max_position_embeddings=4096,
)
# Windows of 2x2 merged patches (56 px) so small images have several windows, edge windows included.
VISION = dict(
    depth=3,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    out_hidden_size=64,
    fullatt_block_indexes=[1],
    window_size=56,
)


# Shaped like the 7B tower where a single file's config is inferred: 80-wide heads, full attention every 8th block.
VISION_80 = dict(
    depth=2,
    hidden_size=80,
    intermediate_size=96,
    num_heads=1,
    out_hidden_size=64,
    fullatt_block_indexes=[],
    window_size=112,
)


def build_reference(seed: int = 0, vision: dict | None = None):
    """A random `Qwen2_5_VLForConditionalGeneration` (norms and biases randomised too), fp32, eval."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(text_config=TEXT, vision_config=vision or VISION)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif "lm_head" in name or "embed_tokens" in name:
                p.normal_(0.0, 1.0)
    return model


def our_model(reference) -> CaptionModel:
    """Our CaptionModel holding the reference's weights."""
    cfg = reference.config.to_dict()
    sd = reference.state_dict()
    decoder = Qwen25TextEncoder(TextEncoderConfig.from_transformers_config(cfg))
    decoder.load_state_dict(
        {k[len("model.language_model.") :]: v for k, v in sd.items() if k.startswith("model.language_model.")},
        strict=True,
    )
    vision = VisionTower(VisionConfig.from_transformers_config(cfg))
    vision.load_state_dict(
        {k[len("model.visual.") :]: v for k, v in sd.items() if k.startswith("model.visual.")}, strict=True
    )
    head = nn.Linear(decoder.config.hidden_size, decoder.config.vocab_size, bias=False)
    head.weight.data.copy_(sd["lm_head.weight"])
    return CaptionModel(decoder, head, vision, TEXT["rope_parameters"]["mrope_section"]).eval()


def reference_processor(tokenizer_dir):
    """transformers' own `Qwen2VLProcessor` with its PIL image processor, built without torchvision.

    transformers 5 requires a video processor, whose class needs torchvision (not installable next to the pinned
    torch). Only the type check of that unused component is skipped; prompt expansion, image processing and
    decoding are transformers' code.
    """
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):  # type: ignore[no-untyped-def]
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return ImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tok, video_processor=None)
