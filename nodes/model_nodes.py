"""Load Qwen-Layered: the model files from ComfyUI's folders, wrapped so ComfyUI manages their memory.

The QIL_MODEL value is a `QILModel`: the loaded `QwenLayeredModel`, one ModelPatcher per component (ComfyUI
loads, offloads and unloads them like its own models) and the memory mode. The only cache is a weak one keyed
on the files' fingerprints (path, mtime, size): a second loader with the same files gets the same model while
ComfyUI still holds it, a changed file loads again, and "Unload models" / a cleared cache really frees it.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

import torch

from ..qil_core.checks import check_choice
from ..qil_core.errors import InputError, ModelFileNotFoundError, WeightsError
from ..qil_core.model.policy import LoadPolicy
from ..qil_core.options import spec_of
from . import host
from .common import CATEGORY
from .model_runtime import HOLDERS, MODEL_TYPE, QILModel
from .widgets import widget

log = logging.getLogger(__name__)

NONE = "none"
# weight_dtype choices that quantise a bf16 transformer while loading (with the default compute dtype) -> the
# LoadPolicy quant format they mean.
QUANTIZE = {"fp8_e4m3fn": "fp8", "int8_convrot": "int8-convrot"}
WEIGHT_DTYPES = (*spec_of(LoadPolicy, "dtype")[1].choices, *QUANTIZE)
WIDGETS = {"dtype": "weight_dtype", "memory": "memory_mode"}  # LoadPolicy field -> widget name
# Widget values of saved workflows from before a choice was renamed -> today's spelling (one table, read here only).
LEGACY = {"memory_mode": {"block swap": "block_swap"}}
DTYPE_TIP = (
    f"{spec_of(LoadPolicy, 'dtype')[1].help} fp8_e4m3fn / int8_convrot quantise a bf16 transformer's blocks while "
    "loading (half the VRAM, slightly different output; int8_convrot is closer to bf16)."
)

_LOADED: weakref.WeakValueDictionary[tuple, QILModel] = weakref.WeakValueDictionary()


def fingerprint(path: Path) -> tuple:
    """(path, mtime_ns, size) of a file, or of every weight/config/tokenizer file in a folder."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".txt"))
        return (str(path),) + tuple(fingerprint(p)[1:] + (str(p.relative_to(path)),) for p in files)
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size)


def resolve_files(transformer: str, vae: str, text_encoder: str, diffusers_folder: str = NONE) -> dict[str, Path]:
    """Paths of the chosen files (or {"model_dir": folder}); typed errors name the input and the folder (L1, L5)."""
    if diffusers_folder and diffusers_folder != NONE:
        return {"model_dir": host.find_model("diffusers", str(diffusers_folder))}
    out = {}
    for name, kind, value in (
        ("transformer", "diffusion_models", transformer),
        ("vae", "vae", vae),
        ("text_encoder", "text_encoders", text_encoder),
    ):
        if not value or value == NONE:
            raise ModelFileNotFoundError(
                f"input {name!r} is empty: put the file into models/{kind} and refresh, or choose a diffusers_folder"
            )
        out[name] = host.find_model(kind, str(value))
    return out


def load_policy(weight_dtype: Any, memory_mode: Any) -> LoadPolicy:
    """The loader's widgets as the library's LoadPolicy (old spellings read through LEGACY); errors name them."""
    memory = LEGACY["memory_mode"].get(memory_mode, memory_mode) if isinstance(memory_mode, str) else memory_mode
    quant = QUANTIZE.get(check_choice("input 'weight_dtype'", weight_dtype, WEIGHT_DTYPES))
    dtype = spec_of(LoadPolicy, "dtype")[0].default if quant else weight_dtype
    values = {"dtype": dtype, "quant": quant, "memory": memory}
    return LoadPolicy.build(values, lambda n: f"input {WIDGETS.get(n, n)!r}")


def _file_list(kind: str) -> list[str]:
    return host.list_models(kind)


class QILLoadModel:
    """Load Qwen-Image-Layered (transformer, RGBA VAE, Qwen2.5-VL text encoder) for the decomposition nodes."""

    DESCRIPTION = (
        "Loads Qwen-Image-Layered from ComfyUI's model folders: the transformer from models/diffusion_models "
        "(qwen_image_layered_bf16.safetensors, 40.9 GB, or qwen_image_layered_fp8mixed.safetensors, 20.5 GB), the "
        "RGBA VAE from models/vae (qwen_image_layered_vae.safetensors, 254 MB) and the text encoder from "
        "models/text_encoders (qwen_2.5_vl_7b_fp8_scaled.safetensors, 9.4 GB); or everything from a diffusers "
        "folder in models/diffusers. Only .safetensors files are read; a wrong or damaged file is named in the "
        "error. ComfyUI manages the memory like its own models (Unload models frees it); the same files are "
        "loaded once, a changed file loads again. Memory mode: auto keeps the components on the GPU when each "
        "step of a run fits (ComfyUI swapping them as needed) and otherwise streams the transformer's blocks; "
        "offload copies a component to the GPU when it runs, keeps it only while there is room and drops it "
        "after the run; block_swap streams the transformer's blocks, as many staying on the GPU as fit (least "
        "VRAM, slowest)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "transformer": (
                    _file_list("diffusion_models"),
                    {
                        "tooltip": "The Qwen-Image-Layered transformer in "
                        "models/diffusion_models: qwen_image_layered_int8_convrot or _fp8mixed (20.5 GB), or "
                        "_bf16 (40.9 GB); ComfyUI's int8/mxfp8/nvfp4 files are read as they are."
                    },
                ),
                "vae": (
                    _file_list("vae"),
                    {
                        "tooltip": "The RGBA VAE in models/vae: qwen_image_layered_vae.safetensors "
                        "(not the RGB qwen_image_vae)."
                    },
                ),
                "text_encoder": (
                    _file_list("text_encoders"),
                    {
                        "tooltip": "Qwen2.5-VL-7B in models/text_encoders, e.g. "
                        "qwen_2.5_vl_7b_fp8_scaled.safetensors (the one Qwen-Image uses)."
                    },
                ),
                "weight_dtype": (list(WEIGHT_DTYPES), widget(LoadPolicy, "dtype", tooltip=DTYPE_TIP)[1]),
                "memory_mode": widget(LoadPolicy, "memory"),
            },
            "optional": {
                "diffusers_folder": (
                    [NONE, *_file_list("diffusers")],
                    {
                        "default": NONE,
                        "tooltip": "A diffusers "
                        "Qwen-Image-Layered folder in models/diffusers; when set, the three files above "
                        "are ignored.",
                    },
                ),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(
        cls, transformer: str, vae: str, text_encoder: str, diffusers_folder: str = NONE, memory_mode: str = "auto"
    ) -> bool | str:
        # memory_mode is taken here so that ComfyUI accepts the old spellings of saved workflows (LEGACY).
        try:
            load_policy("default", memory_mode)
            resolve_files(transformer, vae, text_encoder, diffusers_folder)
        except (InputError, ModelFileNotFoundError, WeightsError) as e:
            return str(e)
        return True

    @classmethod
    def IS_CHANGED(
        cls,
        transformer: str,
        vae: str,
        text_encoder: str,
        weight_dtype: str = "default",
        memory_mode: str = "auto",
        diffusers_folder: str = NONE,
    ) -> str:
        try:
            files = resolve_files(transformer, vae, text_encoder, diffusers_folder)
        except (ModelFileNotFoundError, WeightsError) as e:
            return f"missing: {e}"  # the run then fails with this message
        return repr(sorted((k, fingerprint(p)) for k, p in files.items()))

    def load(
        self,
        transformer: str,
        vae: str,
        text_encoder: str,
        weight_dtype: str = "default",
        memory_mode: str = "auto",
        diffusers_folder: str = NONE,
    ) -> tuple[QILModel]:
        policy = load_policy(weight_dtype, memory_mode)
        files = resolve_files(transformer, vae, text_encoder, diffusers_folder)
        key = (tuple(sorted((k, fingerprint(p)) for k, p in files.items())), policy)
        handle = _LOADED.get(key)
        if handle is not None:
            log.info("Load Qwen-Layered: these files are already loaded; reusing them")
            return (handle,)
        handle = load_handle(files, policy, key)
        _LOADED[key] = handle
        return (handle,)


def load_handle(files: dict[str, Path], policy: LoadPolicy, key: tuple = ()) -> QILModel:
    """Load the model onto the CPU (ComfyUI's offload device) and wrap every component in a ModelPatcher.

    The device is ComfyUI's choice (the host adapter), which overrides the policy's own (it has none set here).
    """
    device = torch.device(host.get_torch_device())
    model = policy.load(device, **{k: files.get(k) for k in ("model_dir", "transformer", "vae", "text_encoder")})
    offload = torch.device("cpu")
    patchers = {
        name: host.wrap_model_patcher(HOLDERS[name](module), device, offload)
        for name, module in (
            ("transformer", model.transformer),
            ("vae", model.vae),
            ("text_encoder", model.text_encoder),
        )
        if module is not None
    }
    return QILModel(model, patchers, policy.memory, device, key, files={k: str(v) for k, v in files.items()})


NODE_CLASS_MAPPINGS = {"QILLoadModel": QILLoadModel}
NODE_DISPLAY_NAME_MAPPINGS = {"QILLoadModel": "Load Qwen-Layered"}
