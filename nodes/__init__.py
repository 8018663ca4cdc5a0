"""The pack's ComfyUI nodes, one module per family; this file only merges their registrations.

- `model_nodes.py`: Load Qwen-Layered (model files from ComfyUI's folders). `model_runtime.py`: the QIL_MODEL value.
- `sample_nodes.py`: Decompose Image, Text to Layers, Decompose Layer. `sample_inputs.py`: their shared inputs.
- `caption_nodes.py`: Caption Image (Qwen2.5-VL), the auto-caption as a STRING.
- `layer_nodes.py`: Layer Transform, Layer Recolor, Composite Layers, Select Layers.
- `stack_nodes.py`: delete, duplicate, merge down, move, drop empty, layer properties.
- `convert_nodes.py`: IMAGE + MASK batches <-> LAYERS.
- `io_nodes.py`: Save PSD, Load PSD, Save Layer PNGs, Preview Layers.
- `common.py`: helpers the families share. `widgets.py`: widgets generated from the library's options.
- `host.py`: the one module that touches ComfyUI.

Node ids are stored in users' saved workflows: they are a public contract, prefixed `QIL`, never renamed.
"""

from __future__ import annotations

from types import ModuleType

from . import (
    caption_nodes,
    convert_nodes,
    io_nodes,
    layer_nodes,
    lora_nodes,
    model_nodes,
    replace_nodes,
    sample_nodes,
    stack_nodes,
)

_FAMILIES: tuple[ModuleType, ...] = (
    model_nodes,
    lora_nodes,
    sample_nodes,
    caption_nodes,
    convert_nodes,
    layer_nodes,
    stack_nodes,
    io_nodes,
    replace_nodes,
)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _family in _FAMILIES:
    for _node_id, _cls in _family.NODE_CLASS_MAPPINGS.items():
        if _node_id in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"node id {_node_id} is registered twice ({_family.__name__})")
        NODE_CLASS_MAPPINGS[_node_id] = _cls
    NODE_DISPLAY_NAME_MAPPINGS.update(_family.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
