"""The networks of Qwen-Image-Layered, as plain `nn.Module`s (no file I/O here).

- `config.py`: `TransformerConfig`, from config.json or from tensor shapes.
- `identify.py`: `identify_checkpoint(keys)`, what a file holds (transformer, VAE, text encoder, Flux, UNet, ...)
  from its key names; every loader's "this is not the right file" message comes from it.
- `transformer.py`: the MMDiT (`QwenImageLayeredTransformer`) and its blocks.
- `attention.py`: the transformer's small math: RMS norm, modulation, joint attention, timestep embedding.
- `rope.py`: the Layer3D rotary position embedding.
- `vae.py`: the RGBA-VAE (`RGBAVAE`, `VAEConfig`, latent statistics).
- `vae_blocks.py`: the VAE's encoder and decoder blocks.
- `text_encoder.py`: the Qwen2.5-VL language model used as text encoder (`Qwen25TextEncoder`).
"""
