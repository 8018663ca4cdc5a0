"""qil_core: Qwen-Image-Layered in plain PyTorch, and the layer engine around it (no ComfyUI imports)."""

__version__ = "0.1.0"
