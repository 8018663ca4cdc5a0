"""The layer engine: the typed layer document and pure operations on it (no model, no ComfyUI).

- `stack.py`: `Layer` and the bottom-first `LayerStack`, blend-mode names, canvas limits.
- `blend.py`: the 26 blend modes and their PSD blend keys.
- `composite.py`: flattening a stack (`composite`), pasting one layer.
- `transform.py`: move, scale, rotate, flip, opacity of a layer (`transform_layer`) or of several layers as one
  group about a shared pivot (`transform_layers`: group box centre, canvas centre or a point); resizing a stack.
- `recolor.py`: hue, saturation, lightness, tint, colour replacement, invert.
- `resample.py`: premultiplied-alpha resizing and affine warps.
- `ops.py`: stack edits: select, delete, move, reorder, merge down, duplicate, set properties.
- `edit_steps.py`: edit steps run left to right (`LayerEdit`, `StackEdit`, `apply_edits`), as the CLI `edit` uses them.
- `document.py`: ComfyUI's LAYERS document and IMAGE/MASK batches <-> `LayerStack` (plain arrays, no ComfyUI).
- `export.py`: PNG-per-layer and ZIP export and import, 8-bit quantisation, `write_png`.
- `fullres.py`: bucket-size layers to full resolution, alpha guided by the original picture (`upsample_stack`).
- `recompose.py`: exact recomposition: the input's residual folded into layer colours (`fold_residual`).
- `replace.py`: a layer's pixels replaced by an edited picture, keeping its shape (`replace_layer_pixels`).
- `psd/`: PSD in and out: `write_psd`, `read_psd`, `lint_psd`.
"""

from .blend import (
    BLEND_MODE_FROM_PSD_KEY,
    PSD_APPROXIMATE_MODES,
    PSD_BLEND_KEYS,
    PSD_KEY_FALLBACKS,
    blend_function,
    blend_mode_from_psd_key,
    source_over,
)
from .composite import composite, composite_layers
from .document import (
    alpha_to_mask,
    mask_to_alpha,
    stack_from_document,
    stack_from_images,
    stack_to_document,
    stack_to_images,
)
from .ops import (
    delete_layers,
    drop_empty_layers,
    duplicate_layer,
    layer_indices,
    merge_down,
    move_layer,
    parse_layer_keys,
    reorder_layers,
    select_layers,
    set_layer_props,
)
from .recolor import parse_color, recolor_layer
from .recompose import RECOMPOSE_MODES, RecomposeReport, fold_residual, snap_alpha
from .replace import ALPHA_POLICIES, replace_layer_pixels
from .resample import INTERPOLATIONS
from .stack import BLEND_MODES, MAX_CANVAS_SIDE, Layer, LayerStack
from .transform import GROUP_PIVOTS, group_pivot, resize_stack, transform_layer, transform_layers

__all__ = [
    "ALPHA_POLICIES",
    "BLEND_MODES",
    "BLEND_MODE_FROM_PSD_KEY",
    "GROUP_PIVOTS",
    "INTERPOLATIONS",
    "MAX_CANVAS_SIDE",
    "PSD_APPROXIMATE_MODES",
    "RECOMPOSE_MODES",
    "RecomposeReport",
    "fold_residual",
    "replace_layer_pixels",
    "snap_alpha",
    "PSD_BLEND_KEYS",
    "PSD_KEY_FALLBACKS",
    "Layer",
    "LayerStack",
    "alpha_to_mask",
    "blend_function",
    "blend_mode_from_psd_key",
    "composite",
    "composite_layers",
    "delete_layers",
    "drop_empty_layers",
    "duplicate_layer",
    "group_pivot",
    "layer_indices",
    "mask_to_alpha",
    "merge_down",
    "move_layer",
    "parse_color",
    "parse_layer_keys",
    "recolor_layer",
    "reorder_layers",
    "resize_stack",
    "select_layers",
    "set_layer_props",
    "source_over",
    "stack_from_document",
    "stack_from_images",
    "stack_to_document",
    "stack_to_images",
    "transform_layer",
    "transform_layers",
]
