"""Load what captioning adds to the text encoder: the vision tower (`visual.*`) and the LM head (`lm_head.weight`).

Both come from the same files as the text encoder: the diffusers `text_encoder/` shards (`visual.*` +
`lm_head.weight`, or transformers >= 4.52's `model.visual.*`) and ComfyUI's `qwen_2.5_vl_7b*.safetensors`
(`visual.*`; plain or fp8-scaled, fp8 Linear weights stay fp8 and are dequantised per layer when they run).
Nothing here is loaded until a caption is needed. A file without a vision tower or without the LM head (ComfyUI's
files may lack it) still encodes prompts; captioning then fails with `CaptionWeightsError` saying which file has
the missing part, or to type a prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ...errors import CaptionWeightsError
from ..arch.identify import VISION_PREFIXES
from ..arch.text_encoder import Qwen25TextEncoder
from ..arch.vision import VisionConfig, VisionTower
from ..arch.vl_decoder import DEFAULT_MROPE_SECTION, CaptionModel
from .checkpoint import PathLike, open_checkpoint, read_config
from .loading import check_dtype, load_into, plan_keys
from .text_loading import locate_source

log = logging.getLogger(__name__)

LM_HEAD = "lm_head.weight"
_WHERE = (
    "the diffusers Qwen-Image-Layered text_encoder/ folder (all shards) holds the vision tower and the LM head; "
    "ComfyUI's qwen_2.5_vl_7b*.safetensors holds the vision tower. Or type a prompt (captioning runs only for an "
    "empty prompt)"
)


class _Parts(nn.Module):
    """Container whose parameter names are the canonical `vision.*` and `lm_head.weight`."""

    def __init__(self, vision: VisionConfig, width: int, vocab: int) -> None:
        super().__init__()
        self.vision = VisionTower(vision)
        self.lm_head = nn.Linear(width, vocab, bias=False)


def _mrope_section(cfg: dict | None) -> tuple[int, ...]:
    """`mrope_section` from config.json (transformers 5 `rope_parameters`, 4.x `rope_scaling`), else the 7B one."""
    if not cfg:
        return DEFAULT_MROPE_SECTION
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    for scope in (text, cfg):
        for key in ("rope_parameters", "rope_scaling"):
            rope = scope.get(key) if isinstance(scope, dict) else None
            if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list):
                return tuple(int(s) for s in rope["mrope_section"])
    return DEFAULT_MROPE_SECTION


def load_caption_model(
    source: PathLike | Sequence[PathLike],
    decoder: Qwen25TextEncoder,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    mrope_section: Sequence[int] | None = None,
) -> CaptionModel:
    """The captioner around an already loaded `decoder`, reading the vision tower and LM head from `source` (the
    text encoder's file, shards or folder); `mrope_section` overrides config.json's (default: the 7B one).

    Raises CaptionWeightsError when the file lacks either part."""
    check_dtype(dtype)
    source, subfolder = locate_source(source)
    with open_checkpoint(source, subfolder=subfolder) as ckpt:
        keys = list(ckpt.keys())
        prefix = next((p for p in VISION_PREFIXES if any(k.startswith(p) for k in keys)), None)
        if prefix is None:
            raise CaptionWeightsError(
                f"{ckpt.source} has no vision tower (no visual.* tensors), so it cannot caption images: {_WHERE}"
            )
        if LM_HEAD not in keys:
            raise CaptionWeightsError(
                f"{ckpt.source} has no LM head ({LM_HEAD}), so it cannot write captions: {_WHERE}"
            )

        def rename(key: str) -> str | None:
            if key.startswith(prefix):
                return "vision." + key[len(prefix) :]
            return key if key == LM_HEAD else None

        plan = plan_keys(ckpt, rename)
        cfg_json = read_config(ckpt.folder)
        if cfg_json is not None and isinstance(cfg_json.get("vision_config"), dict):
            vision_cfg = VisionConfig.from_transformers_config(cfg_json)
        else:
            shapes = {k[len("vision.") :]: v for k, v in plan.shapes.items() if k.startswith("vision.")}
            vision_cfg = VisionConfig.from_shapes(shapes, source=ckpt.source)
        head_shape = plan.shapes[LM_HEAD]
        if vision_cfg.out_hidden_size != decoder.config.hidden_size or head_shape[1] != decoder.config.hidden_size:
            raise CaptionWeightsError(
                f"{ckpt.source}: the vision tower ({vision_cfg.out_hidden_size}) or LM head ({head_shape[1]}) width "
                f"does not match the text encoder's {decoder.config.hidden_size}; load them from the same model"
            )
        with torch.device("meta"):
            parts = _Parts(vision_cfg, int(head_shape[1]), int(head_shape[0]))
        load_into(parts, ckpt, plan, dtype=dtype, device=device, what="Qwen2.5-VL vision tower and LM head", fix=_WHERE)
        log.info(
            "loaded the captioner's vision tower (%d blocks, width %d) and LM head from %s",
            vision_cfg.depth,
            vision_cfg.hidden_size,
            ckpt.source,
        )
    section = tuple(mrope_section) if mrope_section is not None else _mrope_section(cfg_json)
    model = CaptionModel(decoder, parts.lm_head, parts.vision, section)
    return model.train(False)  # inference mode, as elsewhere in the package
