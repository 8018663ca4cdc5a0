"""Weight files: reading checkpoints into the networks of `arch`, and writing tiny random ones.

- `checkpoint.py`: opening safetensors files, sharded folders and pipeline subfolders.
- what kind of file a checkpoint is: `arch/identify.py` (`identify_checkpoint`), beside the networks whose key
  names it knows, so that `arch/config.py` can use it too.
- `loading.py`: strict memory-mapped loading of the transformer and the RGBA-VAE (`load_transformer`, `load_vae`).
- `text_loading.py`: loading the text encoder from a diffusers folder or a ComfyUI single file.
- `vae_keys.py`: VAE key names, diffusers <-> ComfyUI/Wan.
- `text_keys.py`: text encoder key names, and which tensors are skipped.
- `quant.py`: quantised Linear weights (`Fp8Linear` = `QuantLinear`, every ComfyUI format), quantise on load.
- `quant_formats.py`: ComfyUI's fp8 / int8 (ConvRot) / mxfp8 / nvfp4 layouts: dequantise and quantise.
- `quant_load.py`: reading the `comfy_quant` markers and quantised layers; saving in ComfyUI's layout.
- `quant_kernels.py`: comfy-kitchen's quantised matmuls on CUDA, with the portable path as the fallback.
- `tokenizer.py`: the Qwen2 BPE tokenizer from vocab.json + merges.txt.
- `tiny.py`: tiny RANDOM weights in the real file layouts (demo, tests).
- `lora.py`: LoRA files (PEFT, kohya, ComfyUI, bare, full deltas) read and checked against the transformer.
- `lora_apply.py`: applying, stacking and removing LoRAs (`load_lora`, `remove_loras`), on the fly or merged.
"""
