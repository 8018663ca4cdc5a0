"""qil_core: Qwen-Image-Layered in plain PyTorch, and the layer engine around it (no ComfyUI imports).

Where things live (each subpackage's docstring lists its modules, one line each):

- `layers/`: the layer document (`LayerStack`, `Layer`) and everything done to it: compositing, blend modes,
  transform, recolor, stack edits, PNG/ZIP export, full-resolution upsampling, exact recomposition, replacing a
  layer's pixels, and `layers/psd/` (PSD write, read, lint).
- `model/`: the network in four rooms: `arch/` (networks), `weights/` (files -> networks), `runtime/` (memory and
  placement), `pipeline/` (decompose, text-to-layers, decompose-layer), plus `loader.py` (`load_model`).
- `demo/`: the built-in demo scene (`scene.py`) and the demo job on it (`job.py`).
- `cli/`: the command line, `python -m qil_core` (a front end over the library).
- `options.py`: options as dataclass fields (default, range, choices, help written once); the CLI flags and the
  node widgets are generated from them. `checks.py`: number, int, choice and finite checks naming the input.
- `errors.py`: the typed errors every module raises. `fsutil.py`: safe, atomic output files.
- `assets/`: data shipped in the package (the Qwen2.5 tokenizer).

The names below are the public API. Importing `qil_core` loads numpy and Pillow only; the model names
(`load_model`, `decompose`, ...) import torch on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    InputError,
    LayerIndexError,
    ModelFileNotFoundError,
    ModelMismatchError,
    OutputExistsError,
    OutputPathError,
    PSDError,
    QILError,
    ResourceError,
    WeightsError,
)
from .layers import (
    BLEND_MODES,
    INTERPOLATIONS,
    Layer,
    LayerStack,
    composite,
    delete_layers,
    duplicate_layer,
    fold_residual,
    merge_down,
    move_layer,
    parse_color,
    recolor_layer,
    reorder_layers,
    replace_layer_pixels,
    resize_stack,
    select_layers,
    set_layer_props,
    transform_layer,
    transform_layers,
)
from .layers.edit_steps import LayerEdit, StackEdit, apply_edits
from .layers.export import export_pngs, export_zip, read_layer_pngs
from .layers.psd import lint_psd, read_psd, write_psd

if TYPE_CHECKING:
    from .model.loader import QwenLayeredModel, load_model
    from .model.pipeline.decompose import decompose, text_to_layers
    from .model.pipeline.layer_split import decompose_layer
    from .model.pipeline.options import DecomposeLayerOptions, DecomposeOptions, TextToLayersOptions
    from .model.policy import LoadPolicy

__version__ = "0.2.1"  # the same as pyproject.toml [project] version (tests/test_readme.py checks)

# Model names, imported on first use so that `import qil_core` does not load torch.
# Relative module names: inside ComfyUI this package is `<pack>.qil_core`, not `qil_core`.
_LAZY = {
    "load_model": ".model.loader",
    "QwenLayeredModel": ".model.loader",
    "decompose": ".model.pipeline.decompose",
    "text_to_layers": ".model.pipeline.decompose",
    "decompose_layer": ".model.pipeline.layer_split",
    "DecomposeOptions": ".model.pipeline.options",
    "TextToLayersOptions": ".model.pipeline.options",
    "DecomposeLayerOptions": ".model.pipeline.options",
    "LoadPolicy": ".model.policy",
}


def __getattr__(name: str) -> Any:
    """Import a model name (`load_model`, `decompose`, ...) on first access."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qil_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "BLEND_MODES",
    "DecomposeLayerOptions",
    "DecomposeOptions",
    "INTERPOLATIONS",
    "InputError",
    "Layer",
    "LayerEdit",
    "LayerIndexError",
    "LayerStack",
    "LoadPolicy",
    "ModelFileNotFoundError",
    "ModelMismatchError",
    "OutputExistsError",
    "OutputPathError",
    "PSDError",
    "QILError",
    "QwenLayeredModel",
    "ResourceError",
    "StackEdit",
    "TextToLayersOptions",
    "WeightsError",
    "__version__",
    "apply_edits",
    "composite",
    "decompose",
    "decompose_layer",
    "delete_layers",
    "duplicate_layer",
    "export_pngs",
    "export_zip",
    "fold_residual",
    "lint_psd",
    "load_model",
    "merge_down",
    "move_layer",
    "parse_color",
    "read_layer_pngs",
    "read_psd",
    "recolor_layer",
    "reorder_layers",
    "replace_layer_pixels",
    "resize_stack",
    "select_layers",
    "set_layer_props",
    "text_to_layers",
    "transform_layer",
    "transform_layers",
    "write_psd",
]
