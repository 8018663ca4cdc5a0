"""Random LoRAs for the tests: made and saved by diffusers/PEFT, then rewritten into the kohya and ComfyUI layouts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Every kind of Linear the transformer has: attention (both streams), MLPs, modulation, embeddings, output.
TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
    "img_mod.1",
    "txt_mod.1",
    "img_in",
    "txt_in",
    "proj_out",
    "norm_out.linear",
    "timestep_embedder.linear_1",
    "timestep_embedder.linear_2",
]


def make_peft_lora(
    transformer: torch.nn.Module,
    folder: Path,
    *,
    seed: int,
    rank: int = 4,
    alpha: float = 8.0,
    weight_name: str = "lora.safetensors",
    targets: list[str] | None = None,
    amplitude: float = 0.3,
) -> Path:
    """Add a random PEFT adapter to a diffusers transformer, save it with save_lora_weights, remove it again."""
    from diffusers import QwenImageLayeredPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or TARGETS, init_lora_weights=False)
    name = f"tmp{seed}"
    transformer.add_adapter(config, adapter_name=name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * amplitude)
    layers = get_peft_model_state_dict(transformer, adapter_name=name)
    meta = transformer.peft_config[name].to_dict()
    QwenImageLayeredPipeline.save_lora_weights(
        folder, transformer_lora_layers=layers, weight_name=weight_name, transformer_lora_adapter_metadata=meta
    )
    transformer.delete_adapters(name)
    return Path(folder) / weight_name


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    return tensors, {k.removeprefix("transformer."): v for k, v in meta.items()}


def to_layout(path: Path, out: Path, layout: str) -> Path:
    """Rewrite a diffusers LoRA file as 'kohya' (lora_unet_ + lora_down/up + alpha) or 'comfyui' (diffusion_model.)."""
    tensors, meta = _read(path)
    alpha = float(meta["lora_alpha"])
    result: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        module, _, suffix = key.removeprefix("transformer.").rpartition(".lora_")
        half = "lora_down.weight" if suffix.startswith("A") else "lora_up.weight"
        name = "lora_unet_" + module.replace(".", "_") if layout == "kohya" else "diffusion_model." + module
        result[f"{name}.{half}"] = t.contiguous()
        result[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(result, str(out))
    return out


LIGHTNING_NAME = "Qwen-Image-Lightning-8steps-V1.1.safetensors"  # the file the LoRA workflow loads


def write_tiny_lora(path: Path, transformer: torch.nn.Module, *, seed: int = 0, rank: int = 4) -> Path:
    """A random LoRA for `transformer` in lightx2v's layout (bare module names, lora_down/lora_up/alpha)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks."):
            tensors[f"{name}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.1
            tensors[f"{name}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.1
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
