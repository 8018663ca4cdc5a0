"""Optional speed-ups, none required: compiled blocks, faster attention kernels when installed, fp8 x fp8 matmuls.

- `compile_blocks`: `torch.compile` of each block's forward. All 60 blocks share one compiled graph (parameters
  are graph inputs), and module hooks (block swap) stay outside the graph because only `forward` is compiled.
- `set_attention_backend`: flash-attn 2 (`flash_attn`), flash-attn 3 (`flash_attn_interface`) or SageAttention
  (`sageattention`) when that package is installed; each is used only where it applies (CUDA, fp16/bf16, no
  key mask) and SDPA (`attention.joint_attention`) runs otherwise. "auto" picks the first installed.
- `enable_fp8_matmul`: Fp8Linear layers multiply in fp8 with `torch._scaled_mm` (per-tensor dynamic activation
  scales) on GPUs that have fp8 tensor cores (compute capability 8.9+); less exact than dequantising.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from qil_core.errors import InputError
from qil_core.model.arch.attention import joint_attention
from qil_core.model.weights.quant import Fp8Linear

logger = logging.getLogger(__name__)

AttentionFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]
# name -> (module to import, function name, pip package); "auto" tries them in this order.
KERNELS: dict[str, tuple[str, str, str]] = {
    "flash_attn3": ("flash_attn_interface", "flash_attn_func", "flash-attn 3 (hopper build)"),
    "flash_attn": ("flash_attn", "flash_attn_func", "flash-attn"),
    "sageattention": ("sageattention", "sageattn", "sageattention"),
}
BACKENDS = ("auto", "sdpa", *KERNELS)


def _kernel(name: str) -> Callable | None:
    """The kernel function of an installed package, or None when it is not importable."""
    module_name, fn_name, _ = KERNELS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, fn_name, None)


def available_attention_backends() -> list[str]:
    """Attention backends usable here: "sdpa" always, plus every installed faster kernel."""
    return ["sdpa"] + [name for name in KERNELS if _kernel(name) is not None]


def _fast_path(q: Tensor, key_mask: Tensor | None) -> bool:
    """Whether the packaged kernels apply: CUDA, half precision, no key mask, head dim a multiple of 8 up to 256."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and key_mask is None
        and (q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)
    )


def attention_function(name: str = "auto") -> tuple[str, AttentionFn]:
    """(resolved name, function) for an attention backend; the function takes q, k, v [B, L, H, Dh] and a key
    mask [B, L] or None and returns [B, L, H*Dh]. Raises InputError for an unknown or uninstalled backend."""
    if name not in BACKENDS:
        raise InputError(f"attention backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        name = next((n for n in KERNELS if _kernel(n) is not None), "sdpa")
    if name == "sdpa":
        return name, joint_attention
    kernel = _kernel(name)
    if kernel is None:
        raise InputError(
            f"attention backend {name!r} needs the {KERNELS[name][2]} package, which is not installed here; "
            "install it or use attention='sdpa' (or 'auto')"
        )

    def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        if not _fast_path(q, key_mask):
            return joint_attention(q, k, v, key_mask)
        if name == "sageattention":
            out = kernel(q, k, v, tensor_layout="NHD", is_causal=False)
        else:
            out = kernel(q, k, v, causal=False)
        if isinstance(out, tuple):  # flash-attn 3 returns (out, softmax_lse) in some releases
            out = out[0]
        return out.flatten(2)  # (B, L, H, Dh) -> (B, L, H*Dh)

    attention.__name__ = f"{name}_attention"
    return name, attention


def set_attention_backend(model: nn.Module, backend: str | AttentionFn = "auto") -> str:
    """Make every joint-attention module of `model` use `backend` (a name or a function); returns its name."""
    if callable(backend):
        name, fn = getattr(backend, "__name__", "custom"), backend
    else:
        name, fn = attention_function(backend)
    targets = [m for m in model.modules() if hasattr(m, "attention_fn")]
    if not targets:
        raise InputError(f"{type(model).__name__} has no joint-attention modules with a pluggable attention_fn")
    for module in targets:
        module.attention_fn = fn
    logger.info("attention backend: %s on %d modules", name, len(targets))
    return name


def compile_blocks(model: nn.Module, *, blocks_attr: str = "transformer_blocks", **options: object) -> int:
    """torch.compile each block's forward (options go to torch.compile, e.g. mode="max-autotune-no-cudagraphs",
    backend="eager" for a check); returns the number of blocks. Undo with `uncompile_blocks`."""
    blocks = getattr(model, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise InputError(f"{type(model).__name__} has no nn.ModuleList {blocks_attr!r} to compile")
    for block in blocks:
        if "forward" not in vars(block):  # compile the class's forward once per block, never a compiled one
            block.forward = torch.compile(block.forward, **options)  # type: ignore[method-assign]
    return len(blocks)


def uncompile_blocks(model: nn.Module, *, blocks_attr: str = "transformer_blocks") -> None:
    """Restore the plain forwards replaced by `compile_blocks`."""
    for block in getattr(model, blocks_attr):
        vars(block).pop("forward", None)


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """True where `torch._scaled_mm` runs fp8 x fp8 on tensor cores: CUDA compute capability 8.9 or newer."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(dev) >= (8, 9)


def enable_fp8_matmul(
    model: nn.Module, enabled: bool = True, *, device: torch.device | str | None = None, force: bool = False
) -> int:
    """Switch Fp8Linear layers to fp8 x fp8 matmuls where `device` (default: the weights') supports them, or
    everywhere with `force`; returns the number of layers switched."""
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    where = torch.device(device) if device is not None else (layers[0].weight.device if layers else None)
    if enabled and not force and layers and not fp8_matmul_supported(where):  # type: ignore[arg-type]
        logger.info("fp8 matmul not supported on %s: fp8 weights are dequantised per layer", where)
        return 0
    for layer in layers:
        layer.use_scaled_mm = enabled
    return len(layers)


__all__ = [
    "BACKENDS", "attention_function", "available_attention_backends", "compile_blocks", "enable_fp8_matmul",
    "fp8_matmul_supported", "set_attention_backend", "uncompile_blocks",
]  # fmt: skip
