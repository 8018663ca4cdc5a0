"""Captioning inputs: the image as Qwen2.5-VL patches and the annotator prompt as token ids.

The image path equals transformers' `Qwen2VLImageProcessor` (PIL backend, the one the reference pipeline's
`Qwen2VLProcessor` runs): transparency composited onto white, `smart_resize` to multiples of patch x merge
(28) inside [min_pixels, max_pixels], bicubic resize, rescale by 1/255 (computed in float64, stored float32),
normalise by the CLIP mean/std, then each 14x14 patch repeated over the temporal patch (2) and flattened,
patches ordered by 2x2 merge block. The prompt is the reference's annotator instruction (diffusers
`QwenImageLayeredPipeline.image_caption_prompt_en` / `_cn`) with `<|image_pad|>` repeated once per merged patch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ...errors import InputError, ModelMismatchError
from ..weights.tokenizer import QwenTokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_PAD = "<|image_pad|>"

_HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
_TAIL = "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
# The reference's annotator instructions, character for character (line breaks included: the reference writes
# them as triple-quoted strings whose source lines break inside the text).
CAPTION_PROMPTS = {
    "en": _HEAD
    + (
        "# Image Annotator\nYou are a professional\nimage annotator. Please write an image caption based on the input "
        "image:\n1. Write the caption using natural,\ndescriptive language without structured formats or rich text.\n"
        "2. Enrich caption details by including: \n - Object\nattributes, such as quantity, color, shape, size, "
        "material, state, position, actions, and so on\n - Vision Relations\nbetween objects, such as spatial "
        "relations, functional relations, possessive relations, attachment relations, action\nrelations, comparative "
        "relations, causal relations, and so on\n - Environmental details, such as weather, lighting,\ncolors, "
        "textures, atmosphere, and so on\n - Identify the text clearly visible in the image, without translation or"
        "\nexplanation, and highlight it in the caption with quotation marks\n3. Maintain authenticity and accuracy:"
        "\n - Avoid\ngeneralizations\n - Describe all visible information in the image, while do not add information "
        "not explicitly shown in\nthe image\n"
    )
    + _TAIL,
    "zh": _HEAD
    + (
        "# 图像标注器\n你是一个专业的图像标注器。请基于输入图像，撰写图注:\n1.\n"
        "使用自然、描述性的语言撰写图注，不要使用结构化形式或富文本形式。\n"
        "2. 通过加入以下内容，丰富图注细节：\n"
        " - 对象的属性：如数量、颜色、形状、大小、位置、材质、状态、动作等\n -\n"
        "对象间的视觉关系：如空间关系、功能关系、动作关系、从属关系、比较关系、因果关系等\n"
        " - 环境细节：例如天气、光照、颜色、纹理、气氛等\n"
        " - 文字内容：识别图像中清晰可见的文字，不做翻译和解释，用引号在图注中强调\n3.\n保持真实性与准确性：\n"
        " - 不要使用笼统的描述\n -\n描述图像中所有可见的信息，但不要加入没有在图像中出现的内容\n"
    )
    + _TAIL,
}
LANGUAGES = tuple(CAPTION_PROMPTS)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The processor settings that matter for one image (transformers' names and defaults)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = field(default=CLIP_MEAN)
    image_std: tuple[float, ...] = field(default=CLIP_STD)

    @classmethod
    def from_folder(cls, folder: Path | None) -> ImageProcessorConfig:
        """Read `preprocessor_config.json` (as released) or `processor_config.json` (transformers 5) in `folder`;
        defaults when neither exists."""
        if folder is None:
            return cls()
        for name in ("preprocessor_config.json", "processor_config.json"):
            path = Path(folder) / name
            if path.is_file():
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as e:
                    raise ModelMismatchError(f"{path} is not readable JSON ({e}); re-download it") from e
                return cls._from_dict(data.get("image_processor", data) if isinstance(data, dict) else {}, path)
        return cls()

    @classmethod
    def _from_dict(cls, d: dict, path: Path) -> ImageProcessorConfig:
        given = d.get("size")
        size: dict = given if isinstance(given, dict) else {}
        base = cls()
        try:
            return cls(
                min_pixels=int(d.get("min_pixels") or size.get("shortest_edge") or base.min_pixels),
                max_pixels=int(d.get("max_pixels") or size.get("longest_edge") or base.max_pixels),
                patch_size=int(d.get("patch_size", base.patch_size)),
                temporal_patch_size=int(d.get("temporal_patch_size", base.temporal_patch_size)),
                merge_size=int(d.get("merge_size", base.merge_size)),
                image_mean=tuple(float(x) for x in d.get("image_mean", base.image_mean)),
                image_std=tuple(float(x) for x in d.get("image_std", base.image_std)),
            )
        except (TypeError, ValueError) as e:
            raise ModelMismatchError(f"{path}: a size or mean/std field is not a number ({e}); re-download it") from e


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size the processor resizes to: multiples of `factor`, area in [min_pixels, max_pixels], aspect kept."""
    if min(height, width) < 1 or max(height, width) / min(height, width) > 200:
        raise InputError(f"an image of {width}x{height} cannot be captioned: the aspect ratio must be under 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the processor sees it: any transparency composited onto white, other modes converted."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def image_patches(image: Image.Image, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A PIL image -> flattened float32 patches (N, 3 * T * P * P) and the grid (1, h/P, w/P)."""
    rgb = to_rgb(image)
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    h, w = smart_resize(rgb.height, rgb.width, p * m, cfg.min_pixels, cfg.max_pixels)
    if (h, w) != (rgb.height, rgb.width):
        rgb = rgb.resize((w, h), Image.Resampling.BICUBIC)
    x = (np.asarray(rgb).transpose(2, 0, 1).astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(cfg.image_mean, np.float32)[:, None, None]
    x = (x - mean) / np.asarray(cfg.image_std, np.float32)[:, None, None]
    c, gh, gw = x.shape[0], h // p, w // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # (bh, bw, mh, mw, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p)), (1, gh, gw)


def caption_prompt(language: str) -> str:
    """The reference's annotator prompt for `language` ("en" or "zh")."""
    if language not in CAPTION_PROMPTS:
        raise InputError(f"caption language must be one of {list(LANGUAGES)}, got {language!r}")
    return CAPTION_PROMPTS[language]


def prompt_ids(tokenizer: QwenTokenizer, language: str, grid: tuple[int, int, int], merge: int) -> list[int]:
    """Token ids of the annotator prompt with its `<|image_pad|>` repeated once per merged patch of `grid`."""
    pad = tokenizer.token_to_id(IMAGE_PAD)
    count = grid[0] * grid[1] * grid[2] // (merge * merge)
    out: list[int] = []
    for i in tokenizer.encode(caption_prompt(language)):
        out.extend([pad] * count if i == pad else [i])
    return out
