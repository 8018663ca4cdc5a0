"""Tiny random Qwen2.5-VL reference models for the text-encoder tests (transformers is a test-only dependency)."""

from __future__ import annotations

import torch

from qil_core.model.arch.text_encoder import Qwen25TextEncoder, TextEncoderConfig

# hidden 64, 2 layers, 4 heads / 2 kv heads (head_dim 16), MLP 128; the real vocabulary so real token ids fit.
TINY = TextEncoderConfig(
    vocab_size=152064,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
)
LM_PREFIX = "model.language_model."


def build_reference(seed: int = 0):
    """A random `Qwen2_5_VLForConditionalGeneration` with the TINY text config and a one-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=TINY.vocab_size,
            hidden_size=TINY.hidden_size,
            intermediate_size=TINY.intermediate_size,
            num_hidden_layers=TINY.num_hidden_layers,
            num_attention_heads=TINY.num_attention_heads,
            num_key_value_heads=TINY.num_key_value_heads,
            rms_norm_eps=TINY.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": TINY.rope_theta, "mrope_section": [2, 3, 3]},
            max_position_embeddings=4096,
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0]
        ),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: randomise them so they are tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model


def language_state_dict(reference) -> dict[str, torch.Tensor]:
    """The reference's language-model tensors under our canonical names."""
    sd = reference.state_dict()
    return {k[len(LM_PREFIX) :]: v for k, v in sd.items() if k.startswith(LM_PREFIX)}


def tiny_encoder(reference) -> Qwen25TextEncoder:
    """Our encoder holding the same weights as `reference`, fp32, eval mode."""
    model = Qwen25TextEncoder(TINY)
    model.load_state_dict(language_state_dict(reference), strict=True)
    return model.eval()
