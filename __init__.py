"""ComfyUI entry of the Qwen-Image-Layered pack: registers the nodes (V1 API) and does nothing else.

No I/O, no downloads and no model loading happen at import; every node imports and runs without ComfyUI too.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
