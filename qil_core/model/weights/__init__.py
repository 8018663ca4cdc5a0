"""Weight files: reading checkpoints into the networks of `arch`, and writing tiny random ones.

- `checkpoint.py`: opening safetensors files, sharded folders and pipeline subfolders.
- what kind of file a checkpoint is: `arch/identify.py` (`identify_checkpoint`), beside the networks whose key
  names it knows, so that `arch/config.py` can use it too.
- `loading.py`: strict memory-mapped loading of the transformer and the RGBA-VAE (`load_transformer`, `load_vae`).
- `text_loading.py`: loading the text encoder from a diffusers folder or a ComfyUI single file.
- `vae_keys.py`: VAE key names, diffusers <-> ComfyUI/Wan.
- `text_keys.py`: text encoder key names, and which tensors are skipped.
- `quant.py`: fp8 weights (`Fp8Linear`, quantise on load).
- `tokenizer.py`: the Qwen2 BPE tokenizer from vocab.json + merges.txt.
- `tiny.py`: tiny RANDOM weights in the real file layouts (demo, tests).
"""
