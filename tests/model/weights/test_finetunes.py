"""Full fine-tunes of Qwen-Image-Layered in the key layouts they are published in load as the transformer.

Tiny stand-ins of: DiffSynth-Studio/Qwen-Image-Layered-Control (a diffusers `transformer/` folder of shards
with an index), DiffSynth-Studio and musubi-tuner full fine-tune outputs (one file, bare diffusers keys, e.g.
playrix/Qwen-Image-Layered), and a ComfyUI-style single file (`model.diffusion_model.` prefix). Each must load
strictly and run exactly like the source weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qil_core.errors import ModelMismatchError
from qil_core.model.weights.loading import load_transformer
from qil_core.model.weights.tiny import build_tiny_modules

pytestmark = pytest.mark.slow  # each test decomposes or loads models: seconds on a CPU


def _forward(model: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(
            torch.randn(1, 12, 64, generator=gen),
            torch.randn(1, 5, 128, generator=gen),
            None,
            torch.tensor([0.4]),
            [(1, 2, 2)] * 3,
        )


def _shards(sd: dict[str, torch.Tensor], folder: Path) -> Path:
    """A diffusers transformer/ folder: two shards, the index and a config.json like the release."""
    folder.mkdir(parents=True)
    keys = sorted(sd)
    half = len(keys) // 2
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, part in zip(names, (keys[:half], keys[half:]), strict=True):
        save_file({k: sd[k].contiguous() for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("layout", ["layered-control folder", "full fine-tune file", "comfyui file"])
def test_fine_tune_layouts_load_and_run_like_their_weights(layout: str, tmp_path: Path) -> None:
    source = build_tiny_modules(seed=8)[0].eval()  # stands in for a fine-tune: weights differ from the release
    sd = source.state_dict()
    if layout == "layered-control folder":
        path = _shards(sd, tmp_path / "Qwen-Image-Layered-Control" / "transformer")
    elif layout == "full fine-tune file":
        path = tmp_path / "epoch-1.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "qwen_image_layered_finetune_bf16.safetensors"
        save_file({"model.diffusion_model." + k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = load_transformer(path, dtype=torch.float32, device="cpu").eval()
    assert list(loaded.state_dict()) == list(sd)
    torch.testing.assert_close(_forward(loaded), _forward(source), rtol=1e-5, atol=1e-5)


def test_a_plain_qwen_image_checkpoint_is_not_taken_for_a_layered_fine_tune(tmp_path: Path) -> None:
    """Qwen-Image (no addition_t_embedding) is another model: refused with a reason, never half-loaded."""
    sd = {k: v for k, v in build_tiny_modules(seed=8)[0].state_dict().items() if "addition_t_embedding" not in k}
    path = tmp_path / "qwen_image_bf16.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(ModelMismatchError):
        load_transformer(path, dtype=torch.float32, device="cpu")


def test_single_layer_extraction_mode_runs_one_frame(tmp_path: Path) -> None:
    """decompose(extract=True): one noisy frame plus the condition, returned as one visible layer (Layered-Control)."""
    import numpy as np

    from qil_core.model.loader import load_model
    from qil_core.model.pipeline.decompose import EXTRACTED_NAME, decompose
    from qil_core.model.weights.tiny import write_tiny_model

    paths = write_tiny_model(tmp_path / "control", layout="diffusers", seed=3)
    model = load_model(model_dir=paths["model_dir"], dtype=torch.float32, device="cpu")
    seen: list[tuple] = []
    hook = model.transformer.register_forward_hook(lambda _m, a, _o: seen.append((tuple(a[0].shape), list(a[4]))))
    img = np.zeros((48, 64, 4), np.uint8)
    img[..., 3], img[8:40, 10:50, :3] = 255, (200, 40, 40)
    try:
        (stack,) = decompose(
            model, img, prompt="the red box", extract=True, steps=2, cfg=1.0, resolution="custom", max_side=64
        )
    finally:
        hook.remove()
    assert [layer.name for layer in stack] == [EXTRACTED_NAME] and stack.layers[0].visible
    assert len(seen) == 2 and seen[0] == ((1, 32, 64), [(1, 4, 4)] * 2)  # one generated frame + the condition
    (again,) = decompose(model, img, prompt="the red box", layers=1, steps=2, cfg=1.0, resolution="custom", max_side=64)
    assert [layer.name for layer in again] == ["Background"]  # layers >= 1 unchanged
