"""The loaded model as one value: transformer, RGBA-VAE and (optionally) the text encoder with its tokenizer.

`load_model` takes either a diffusers pipeline folder (`model_index.json`, `transformer/`, `vae/`,
`text_encoder/`, `tokenizer/`) or single files in ComfyUI's layout (`models/diffusion_models/...`,
`models/vae/...`, `models/text_encoders/...`), or a folder plus single-file overrides. Loading is strict and
all-or-nothing: a failing component raises a typed error and nothing loaded before it is kept.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputError, ModelFileNotFoundError, ModelMismatchError
from .arch.text_encoder import Qwen25TextEncoder
from .arch.transformer import QwenImageLayeredTransformer
from .arch.vae import RGBAVAE
from .weights.checkpoint import RANDOM_WEIGHTS_KEY
from .weights.loading import check_dtype, load_transformer, load_vae
from .weights.text_loading import load_text_encoder
from .weights.tokenizer import QwenTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@dataclass
class QwenLayeredModel:
    """Everything a pipeline needs: transformer, RGBA-VAE, optional text encoder + tokenizer, dtype, device."""

    transformer: QwenImageLayeredTransformer
    vae: RGBAVAE
    text_encoder: Qwen25TextEncoder | None = None
    tokenizer: QwenTokenizer | None = None
    dtype: torch.dtype = torch.bfloat16
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sources: dict[str, str] = field(default_factory=dict)  # component -> the path it came from
    random_weights: bool = False  # True for tiny random test/demo weights (never meaningful output)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.text_encoder is not None:
            check_text_width(self.transformer, self.text_encoder, self.sources.get("text_encoder", "text encoder"))

    @property
    def can_encode_prompts(self) -> bool:
        """True when prompt strings can be encoded (text encoder and tokenizer both loaded)."""
        return self.text_encoder is not None and self.tokenizer is not None

    def describe(self) -> str:
        """One line for logs: sizes, dtype, device and where each component came from."""
        cfg = self.transformer.config
        parts = [
            f"transformer {cfg.num_layers} blocks x {cfg.inner_dim}",
            f"dtype {str(self.dtype).split('.')[-1]}",
            f"device {self.device}",
        ]
        parts += [f"{k} {v}" for k, v in self.sources.items()]
        text = "Qwen-Image-Layered: " + ", ".join(parts)
        return text + (" [RANDOM WEIGHTS: test/demo model, output is noise]" if self.random_weights else "")


def check_text_width(transformer: QwenImageLayeredTransformer, text_encoder: Qwen25TextEncoder, source: str) -> None:
    """Refuse a text encoder whose hidden width is not the transformer's text width (joint_attention_dim)."""
    want = transformer.config.joint_attention_dim
    got = text_encoder.config.hidden_size if hasattr(text_encoder, "config") else None
    if got is not None and got != want:
        raise ModelMismatchError(
            f"{source}: the text encoder has hidden size {got}, but the transformer expects {want}-wide text "
            "embeddings; use the Qwen2.5-VL-7B text encoder that belongs to Qwen-Image-Layered"
        )


def _default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _is_random(path: Path) -> bool:
    """True when a weights file (or the first .safetensors in a folder) says it holds random weights."""
    if path.is_dir():
        files = sorted(path.rglob("*.safetensors"))
        if not files:
            return False
        path = files[0]
    if not path.is_file() or path.suffix.lower() not in (".safetensors", ".sft"):
        return False
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(RANDOM_WEIGHTS_KEY) == "true"


def component_path(model_dir: Path | None, given: PathLike | None, sub: str, required: bool) -> Path | None:
    """The path of one component: the explicit one, else `model_dir/sub`, else None (or an error if required)."""
    if given is not None:
        p = Path(given)
        if not p.exists():
            raise ModelFileNotFoundError(f"{sub} weights not found: {p}; check the path")
        return p
    if model_dir is not None and (model_dir / sub).exists():
        return model_dir / sub
    if required:
        where = f"{model_dir / sub} does not exist" if model_dir is not None else "no path was given"
        raise ModelFileNotFoundError(
            f"the {sub} is needed: {where}. Pass a diffusers model folder (with {sub}/) or the {sub} file"
        )
    return None


def load_text_parts(
    te_path: Path, tokenizer: PathLike | None, root: Path | None, dtype: torch.dtype, device: torch.device | str
) -> tuple[Qwen25TextEncoder, QwenTokenizer]:
    """The text encoder and its tokenizer (the one named, else next to the encoder, in `root`, then the bundled
    one), checked to belong together: every tokenizer id has an embedding."""
    search = [root] if root is not None else []
    source = Path(tokenizer) if tokenizer is not None else te_path
    tok = load_tokenizer(source, search=search, bundled=tokenizer is None)  # a named one must exist
    te = load_text_encoder(te_path, dtype=dtype, device=device)
    if tok.vocab_size > te.config.vocab_size:
        raise ModelMismatchError(
            f"the tokenizer in {tok.folder} has {tok.vocab_size} ids but the text encoder {te_path} only "
            f"{te.config.vocab_size} embeddings; use the tokenizer that belongs to this text encoder"
        )
    return te, tok


def load_model(
    *,
    model_dir: PathLike | None = None,
    transformer: PathLike | None = None,
    vae: PathLike | None = None,
    text_encoder: PathLike | None = None,
    tokenizer: PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | None = None,
    vae_dtype: torch.dtype | None = None,
    load_text: bool = True,
) -> QwenLayeredModel:
    """Load Qwen-Image-Layered from a diffusers folder and/or single files (any of them overriding the folder).

    The text encoder is optional (`load_text=False` or none found: prompts must then be given as embeddings);
    its tokenizer is `tokenizer`, else found next to the text encoder, in `model_dir`, or in a ComfyUI install.
    Weights go straight to `device` (default: CUDA if available, else CPU) in `dtype` (fp8 files stay fp8).
    """
    check_dtype(dtype)
    if vae_dtype is not None:
        check_dtype(vae_dtype)
    dev = torch.device(device) if device is not None else _default_device()
    root = Path(model_dir) if model_dir is not None else None
    if root is not None and not root.is_dir():
        raise ModelFileNotFoundError(f"model folder not found: {root} (expected a diffusers Qwen-Image-Layered folder)")
    if root is None and (transformer is None or vae is None):
        raise InputError(
            "load_model needs model_dir (a diffusers folder) or both transformer= and vae= (single files); "
            f"got transformer={transformer!r}, vae={vae!r}"
        )
    tr_path = component_path(root, transformer, "transformer", True)
    vae_path = component_path(root, vae, "vae", True)
    te_path = component_path(root, text_encoder, "text_encoder", False) if load_text else None
    sources = {"transformer": str(tr_path), "vae": str(vae_path)}

    dit = load_transformer(tr_path, dtype=dtype, device=dev)  # type: ignore[arg-type]
    rgba_vae = load_vae(vae_path, dtype=vae_dtype or dtype, device=dev)  # type: ignore[arg-type]
    te = tok = None
    if te_path is not None:
        te, tok = load_text_parts(te_path, tokenizer, root, dtype, dev)
        check_text_width(dit, te, str(te_path))
        sources["text_encoder"] = str(te_path)
        sources["tokenizer"] = str(tok.folder)
    elif tokenizer is not None:
        logger.warning("a tokenizer was given but no text encoder; it is not used (pass text_encoder= too)")
    random = any(_is_random(Path(p)) for k, p in sources.items() if k != "tokenizer")
    model = QwenLayeredModel(dit, rgba_vae, te, tok, dtype, dev, sources, random)
    log = logger.warning if random else logger.info
    log("%s", model.describe())
    return model
