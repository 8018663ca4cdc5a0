"""The layer engine: the typed layer document and pure operations on it (no model, no ComfyUI)."""

from .stack import BLEND_MODES, MAX_CANVAS_SIDE, Layer, LayerStack

__all__ = ["BLEND_MODES", "MAX_CANVAS_SIDE", "Layer", "LayerStack"]
