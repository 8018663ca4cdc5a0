"""Load LoRA (Qwen-Layered) and Sampler Settings (Qwen-Layered): model in, model out, chainable.

Neither node touches the loaded weights. Each returns a copy of the QIL_MODEL handle that records a LoRA (read
and checked against the transformer once, cached weakly on the file's fingerprint) or the sampler options; the
sampling nodes apply the recorded LoRAs for their run and take them off afterwards (model_runtime.run_placement),
so the loader's output and every other branch of the graph keep the base model.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any

from ..qil_core.errors import InputError, ModelFileNotFoundError, WeightsError
from ..qil_core.model.pipeline.sampler_options import TIME_SHIFTS
from . import host
from .common import CATEGORY, number
from .model_nodes import fingerprint
from .model_runtime import MODEL_TYPE, QILModel, check_model

log = logging.getLogger(__name__)

_READ: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()


class QILLoadLoRA:
    """Add a LoRA from models/loras to a Qwen-Layered model (chain several to stack them)."""

    DESCRIPTION = (
        "Adds a LoRA to the Qwen-Image-Layered transformer: files from models/loras trained on Qwen-Image-Layered "
        "or on Qwen-Image (the layers match), in the diffusers/PEFT, kohya/musubi-tuner or ComfyUI layout, "
        "including lightx2v's Qwen-Image-Lightning few-step LoRAs (use them with Sampler Settings: exponential, "
        "shift 1.0986, and 4 or 8 steps at cfg 1). Chain several to stack them, each with its own strength. The "
        "LoRA runs as a small extra branch next to each layer (exact with fp8 models, little memory, every memory "
        "mode); the base weights are never changed, so other branches of the graph keep the plain model. A file "
        "for another model (Flux, SDXL, Wan...) or with keys that match no layer is refused with the key list."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load Qwen-Layered (or another Load LoRA)."}),
                "lora_name": (host.list_models("loras"), {"tooltip": "A LoRA .safetensors in models/loras."}),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -10.0,
                        "max": 10.0,
                        "step": 0.05,
                        "tooltip": "1.0 = the LoRA as trained, 0 = off, negative values invert it.",
                    },
                ),
            },
        }

    @classmethod
    def IS_CHANGED(cls, lora_name: str, strength: float = 1.0, **_: Any) -> str:
        try:
            return repr((fingerprint(host.find_model("loras", str(lora_name))), strength))
        except (ModelFileNotFoundError, WeightsError) as e:
            return f"missing: {e}"

    def load(self, model: Any, lora_name: str, strength: float) -> tuple[QILModel]:
        from ..qil_core.model.weights.lora import read_lora

        handle = check_model(model)
        strength = number("strength", strength)  # finite; the range is the library's to check
        path = host.find_model("loras", str(lora_name))
        key = (fingerprint(path), handle.key, id(handle.model.transformer))  # checked against this model
        lora = _READ.get(key)
        if lora is None:
            lora = read_lora(path, handle.model.transformer, name=str(lora_name))
            _READ[key] = lora
        return (dataclasses.replace(handle, loras=(*handle.loras, (lora, float(strength)))),)


class QILSamplerSettings:
    """Noise-schedule options for LoRAs and fine-tunes trained for another schedule."""

    DESCRIPTION = (
        "Changes how the sampling nodes choose the noise levels, for LoRAs or fine-tunes trained with another "
        "schedule. Defaults (linear, shift 0, no sigmas) are the reference schedule. shift: a fixed mu instead of "
        "the automatic sqrt(image tokens / 256). time_shift exponential: the variant few-step distillations use "
        "(Qwen-Image-Lightning: exponential with shift 1.0986 = ln 3). sigmas: your own noise levels, one per step "
        "(e.g. '1, 0.75, 0.5, 0.25'; a final 0 is optional), overriding steps and shift; or connect a SIGMAS "
        "output. For no negative pass set cfg to 1 on the sampling node."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "From Load Qwen-Layered or Load LoRA."}),
                "time_shift": (
                    list(TIME_SHIFTS),
                    {
                        "default": "linear",
                        "tooltip": "linear: the reference. "
                        "exponential: e^mu instead of mu (Lightning and other distillations).",
                    },
                ),
                "shift": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 20.0,
                        "step": 0.01,
                        "tooltip": "0 = "
                        "automatic (sqrt(tokens/256)); otherwise a fixed mu (Lightning: 1.0986 with exponential).",
                    },
                ),
                "sigmas": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Optional noise levels, one per step, comma "
                        "separated (e.g. 1, 0.75, 0.5, 0.25); overrides steps and shift. Empty: from the shift.",
                    },
                ),
            },
            "optional": {
                "custom_sigmas": (
                    "SIGMAS",
                    {"tooltip": "Optional SIGMAS from a scheduler node; wins over the text field."},
                ),
            },
        }

    def apply(
        self, model: Any, time_shift: str, shift: float, sigmas: str = "", custom_sigmas: Any = None
    ) -> tuple[QILModel]:
        from ..qil_core.model.pipeline.sampler_options import SamplerOptions, check_sigmas, parse_sigmas

        handle = check_model(model)
        if time_shift not in TIME_SHIFTS:
            raise InputError(f"input 'time_shift' must be one of {', '.join(TIME_SHIFTS)}, got {time_shift!r}")
        shift = number("shift", shift, 0.0)  # 0 = automatic; NaN is refused, not taken for automatic
        chosen = check_sigmas(custom_sigmas) if custom_sigmas is not None else parse_sigmas(str(sigmas or ""))
        options = SamplerOptions(shift=float(shift) if shift > 0 else None, time_shift=time_shift, sigmas=chosen)
        log.info("Sampler Settings: %s", options.describe())
        return (dataclasses.replace(handle, sampler=None if options.is_reference else options),)


NODE_CLASS_MAPPINGS = {"QILLoadLoRA": QILLoadLoRA, "QILSamplerSettings": QILSamplerSettings}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QILLoadLoRA": "Load LoRA (Qwen-Layered)",
    "QILSamplerSettings": "Sampler Settings (Qwen-Layered)",
}
