"""Qwen-Image-Layered in plain PyTorch: configs, transformer, RoPE, RGBA-VAE, text encoder, sampler, weights."""
