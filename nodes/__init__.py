"""The pack's ComfyUI nodes, one module per family; this file only merges their registrations.

Node ids are stored in users' saved workflows: they are a public contract, prefixed `QIL`, never renamed.
"""

from __future__ import annotations

from types import ModuleType

from . import convert_nodes, io_nodes, layer_nodes, model_nodes, replace_nodes, sample_nodes, stack_nodes

_FAMILIES: tuple[ModuleType, ...] = (model_nodes, sample_nodes, convert_nodes, layer_nodes, stack_nodes, io_nodes,
                                     replace_nodes)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _family in _FAMILIES:
    for _node_id, _cls in _family.NODE_CLASS_MAPPINGS.items():
        if _node_id in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"node id {_node_id} is registered twice ({_family.__name__})")
        NODE_CLASS_MAPPINGS[_node_id] = _cls
    NODE_DISPLAY_NAME_MAPPINGS.update(_family.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
