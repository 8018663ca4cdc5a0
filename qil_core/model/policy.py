"""How a model is loaded and placed: dtype, fp8, memory mode and device, one policy for the CLI and the nodes.

`LoadPolicy` is an options dataclass (`qil_core/options.py`): its fields carry the defaults, choices and help
that the CLI's model flags and the loader node's widgets are generated from. It owns the one dtype table,
the one device choice (CUDA, else Apple MPS, else CPU; ComfyUI may override it through the host adapter) and
the one fp8-after-load step. Torch is imported on use only, so building a parser stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..options import Options, option
from .runtime import MEMORY_MODES

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # name -> torch attribute
DEFAULT_DTYPE = "default"
# Quantise-on-load formats (the keys of weights.quant.QUANT_CHOICES; a test keeps the two equal) and the kernel
# backends of quantised layers (weights.quant_kernels.BACKENDS). Written here so that no torch loads for a parser.
QUANT_FORMATS = ("fp8", "int8-convrot", "int8", "mxfp8", "nvfp4")
QUANT_KERNELS = ("auto", "portable", "comfy-kitchen")


def best_device() -> Any:
    """The device to compute on when none is chosen: CUDA (the current one), else MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _device_text(name: str, value: Any) -> str:
    """A device name torch understands ('cuda', 'cuda:1', 'mps', 'cpu'), as text."""
    import torch

    try:
        return str(torch.device(value))
    except (RuntimeError, TypeError) as e:
        raise InputError(
            f"{name} must be a torch device such as 'cuda', 'cuda:1', 'mps' or 'cpu', got {value!r} ({e})"
        ) from None


@dataclass(frozen=True)
class LoadPolicy(Options):
    """Where and how the weights load: compute dtype, fp8 quantisation, memory mode and device."""

    dtype: str = option(
        DEFAULT_DTYPE,
        "Compute precision. default: bf16 on a CUDA GPU (fp16 where bf16 is not "
        "supported), fp16 on Apple MPS, fp32 on the CPU. fp8 files stay fp8.",
        choices=(DEFAULT_DTYPE, *DTYPES),
    )
    fp8: bool = option(
        False,
        "Quantise a bf16/fp16 transformer's blocks to fp8 (e4m3fn) while loading: half the "
        "memory, ~2-3% output difference (fp8 files stay fp8 without this); the same as quant fp8.",
    )
    quant: str | None = option(
        None,
        "Quantisation format applied to a bf16/fp16 transformer's blocks while loading, as ComfyUI's quantiser "
        "makes it: int8-convrot "
        "(INT8 with a Hadamard rotation, closest to bf16), fp8, int8, mxfp8 or nvfp4 (quantised files stay as they "
        "are without this).",
        kind=str,
        choices=QUANT_FORMATS,
    )
    quant_kernels: str = option(
        "auto",
        "Matmuls of quantised layers: auto uses comfy-kitchen's kernels on CUDA when installed; portable "
        "dequantises one layer at a time (any device).",
        choices=QUANT_KERNELS,
    )
    memory: str = option(
        "auto",
        "Where weights live while sampling. auto: resident when every step fits, else "
        "block_swap. resident: all on the device. offload: components on the device only while "
        "used. block_swap: stream the transformer's blocks (least VRAM, slowest; fits 24 GB "
        "cards). Results are identical in every mode.",
        choices=MEMORY_MODES,
    )
    device: str | None = option(
        None,
        "Torch device, e.g. cuda, cuda:1, mps or cpu (default: cuda if available, else mps, else cpu).",
        kind=str,
        check=_device_text,
    )

    def torch_device(self) -> Any:
        """The chosen device, or the best available one."""
        import torch

        return torch.device(self.device) if self.device is not None else best_device()

    def torch_dtype(self, device: Any) -> Any:
        """The compute dtype on `device`: the chosen one, or the default rule for that kind of device."""
        import torch

        if self.dtype in DTYPES:
            return getattr(torch, DTYPES[self.dtype])
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32

    def quant_format(self) -> str | None:
        """The quantise-on-load format asked for (`fp8` is the same as quant fp8), or None."""
        return self.quant or ("fp8" if self.fp8 else None)

    def check_together(self, shown: Any) -> None:
        if self.fp8 and self.quant not in (None, "fp8"):
            raise InputError(f"{shown('fp8')} and {shown('quant')} {self.quant} ask for two formats; choose one")

    def load(self, device: Any, **files: Any) -> Any:
        """Load the model (`files`: load_model's model_dir / transformer / vae / text_encoder / tokenizer)
        memory-mapped on the CPU in this policy's dtype for `device`, run `after_load`, and mark it for `device`:
        the memory plan then decides what goes there and when."""
        from .loader import load_model

        model = load_model(**files, dtype=self.torch_dtype(device), device="cpu")
        self.after_load(model, device)
        model.device = device
        return model

    def after_load(self, model: Any, device: Any) -> None:
        """The steps that follow loading: quantisation of the transformer's blocks when asked for, and the
        kernel backend of every quantised layer (comfy-kitchen's matmuls on CUDA, else the portable path)."""
        from .weights.quant import TRANSFORMER_FP8_SKIP, quantize_module_fp8
        from .weights.quant_kernels import enable_quant_kernels

        fmt = self.quant_format()
        if fmt is not None:
            quantize_module_fp8(model.transformer, skip=TRANSFORMER_FP8_SKIP, fmt=fmt)
        for module in (model.transformer, model.text_encoder):
            if module is not None:
                enable_quant_kernels(module, self.quant_kernels, device=device)
