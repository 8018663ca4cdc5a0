"""Qwen-Image-Layered in plain PyTorch, in four rooms plus the loader that joins them.

- `arch/`: the networks (MMDiT transformer, RoPE, RGBA-VAE, Qwen2.5 text encoder) and their configs.
- `weights/`: weight files: safetensors checkpoints, key maps, fp8, tokenizer files, tiny random models.
- `runtime/`: where weights live while a job runs: memory checks and plan, placements, offload, VAE tiling.
- `pipeline/`: the jobs (decompose, text-to-layers, decompose-layer), their checks, prompt, schedule, denoise loop.
- `loader.py`: `load_model` and `QwenLayeredModel`, the loaded model as one value.
- `policy.py`: `LoadPolicy`, how to load and place it (dtype, fp8, memory mode, device), for the CLI and nodes.

Arrows point one way (tests/test_architecture.py checks them): pipeline -> loader, weights, runtime, arch;
loader -> weights, arch; weights -> runtime (memory checks), arch; runtime -> arch; arch -> no other room.
"""
