"""ComfyUI entry of the Qwen-Image-Layered pack: registers the nodes (V1 API) and does nothing else.

No I/O, no downloads and no model loading happen at import; every node imports and runs without ComfyUI too.
"""

if __package__:  # imported as a package: by ComfyUI's loader, or by the tests' harness
    from . import nodes as _nodes

    NODE_CLASS_MAPPINGS: dict[str, type] = _nodes.NODE_CLASS_MAPPINGS
    NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = _nodes.NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a plain module: pytest imports a checkout's top-level __init__.py by itself when the folder's
    # name is not a Python identifier (a clone named ComfyUI-Qwen-Layered). There is nothing to register then.
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
