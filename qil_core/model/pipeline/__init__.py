"""The jobs of the model, as pure functions over a loaded model and a placement.

- `decompose.py`: `decompose`, `text_to_layers` (the entry points); `layer_split.py`: `decompose_layer`.
- `options.py`: `DecomposeOptions`, `TextToLayersOptions`, `DecomposeLayerOptions`: every job option, once.
- `checks.py`: validation of the job inputs that are not options (model, device, embeddings).
- `imaging.py`: sizes, buckets and pixel <-> latent conversions of inputs and outputs.
- `prompt.py`: prompt -> text conditioning (template, tokenize, encode).
- `scheduler.py`: the flow-matching schedule and Euler step.
- `caption.py`: auto-captioning with Qwen2.5-VL (`caption_image`, `GenerationSettings`), as the reference does
  for an empty prompt.
- `caption_inputs.py`: the captioner's inputs: image -> patches (as transformers' processor), annotator prompts.
- `sampler_options.py`: schedule options for LoRAs and fine-tunes (fixed shift, exponential shift, sigmas).
- `denoise.py`: seeded noise, the denoising loop with true CFG, frame-wise VAE I/O.
"""
