"""`decompose_layer`: recursive decomposition, one layer of a stack split into sub-layers in place.

The layer's own pixels (with its alpha, padded with transparency to the model's minimum side and aspect) go
through `run_decompose` as one image at its own size; the sub-layers are clipped to the parent's alpha, folded to
its colours (recompose "exact") and spliced where it was, with its offset, opacity, blend mode and visibility.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import InputError
from ...layers.composite import paste_layer
from ...layers.recompose import recompose_exact, snap_alpha
from ...layers.stack import Layer, LayerStack
from ..loader import QwenLayeredModel
from . import checks as chk
from .decompose import JobInputs, run_decompose, split_options
from .imaging import MAX_ASPECT, MIN_INPUT_SIDE, bucket_size
from .options import DecomposeLayerOptions, DecomposeOptions


def decompose_layer(
    model: QwenLayeredModel,
    stack: LayerStack,
    index: int | str,
    *,
    options: DecomposeLayerOptions | None = None,
    **kw: Any,
) -> LayerStack:
    """Decompose one layer of `stack` into `layers` sub-layers and splice them in its place (bottom first).

    The layer's pixels (with its alpha) are the input; the result is mapped back to the layer's own size and
    offset. Each sub-layer's alpha is clipped to the parent's alpha (min): no sub-layer paints where the parent
    is transparent or more opaque than it (multiplying instead would fade the parent's soft edges twice, since
    the model already reproduces them). With recompose "exact" (the default) the sub-layers' colours are then
    folded so that, composited normally among themselves, they show the parent's colour wherever they are
    visible (report in `metadata["recompose_split"][parent name]`). Sub-layers inherit opacity, blend mode and
    visibility and are named "<parent> / 1" (bottom) .. "<parent> / N". Keywords: any `DecomposeLayerOptions`
    field (layers, default 2; steps, cfg, resolution, recompose, ...) and any `JobInputs` field, as for `decompose`.
    """
    if not isinstance(stack, LayerStack):
        raise InputError(f"stack must be a LayerStack, got {type(stack).__name__}")
    if {"output_size", "image", "mask", "keep_composite"} & set(kw):
        raise InputError(
            "decompose_layer takes the layer from the stack; do not pass image, mask, output_size or keep_composite"
        )
    model = chk.check_model(model)
    opts, given = split_options(DecomposeLayerOptions, options, kw)
    return run_decompose_layer(model, stack, index, opts, given)


def split_target(stack: LayerStack, index: int | str) -> int:
    """The index of the layer `index` names (an index or an exact name); InputError when it is fully transparent."""
    i = stack.index_of(index)
    if stack.layers[i].is_empty:
        raise InputError(f"layer {i} ({stack.layers[i].name!r}) is fully transparent; there is nothing to decompose")
    return i


def run_decompose_layer(
    model: QwenLayeredModel, stack: LayerStack, index: int | str, opts: DecomposeLayerOptions, given: JobInputs
) -> LayerStack:
    """`decompose_layer` with its options object and inputs already split."""
    i = split_target(stack, index)
    parent = stack.layers[i].cropped()
    block, (ox, oy) = _pad_block(parent.pixels)
    whole = DecomposeOptions(
        **{k: v for k, v in opts.values().items() if k != "recompose"}, output_size="original", recompose="model"
    )
    sub = run_decompose(model, block, whole, given)[0]
    if opts.recompose == "exact":
        sub = snap_alpha(sub)  # before the clip below, so that no sub-layer ends up more opaque than the parent
    limit = np.zeros(block.shape[:2], np.float32)  # the parent's alpha on the padded block
    limit[oy : oy + parent.height, ox : ox + parent.width] = parent.alpha
    cuts = []
    for n, layer in enumerate(sub.layers, 1):
        px = paste_layer(np.zeros_like(block), layer)  # (H, W, 4) on the block
        px[..., 3] = np.minimum(px[..., 3], limit)
        cuts.append(Layer.from_canvas(px, name=f"{parent.name} / {n}", visible=parent.visible))
    out = stack.replace()
    if "caption" in sub.metadata:
        out.metadata["caption"] = sub.metadata["caption"]
    if opts.recompose == "exact":  # folded as a plain normal-mode group on the block, before the parent's properties
        group, report = recompose_exact(
            LayerStack(block.shape[1], block.shape[0], cuts), block, f"layer {i} ({parent.name!r})", snap=False
        )
        cuts = group.layers
        out.metadata["recompose_split"] = {**out.metadata.get("recompose_split", {}), parent.name: report.as_dict()}
    out.layers[i : i + 1] = [
        cut.replace(
            x=cut.x + parent.x - ox, y=cut.y + parent.y - oy, opacity=parent.opacity, blend_mode=parent.blend_mode
        )
        for cut in cuts
    ]
    return out


def split_size(stack: LayerStack, index: int | str, opts: DecomposeLayerOptions) -> tuple[int, int]:
    """The processing (width, height) `decompose_layer` runs that layer at (its padded block, bucketed): what the
    front ends plan memory for."""
    layer = stack.layers[split_target(stack, index)].cropped()
    return bucket_size(*_block_size(layer.width, layer.height), opts.resolution, opts.max_side)


def _block_size(w: int, h: int) -> tuple[int, int]:
    """(W, H) of a w x h layer padded to >= 32 px per side and <= 8:1 (the model's input limits)."""
    W = max(w, MIN_INPUT_SIDE, int(np.ceil(h / MAX_ASPECT)))
    H = max(h, MIN_INPUT_SIDE, int(np.ceil(W / MAX_ASPECT)))
    return max(W, int(np.ceil(H / MAX_ASPECT))), H


def _pad_block(px: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad a layer's pixels (h, w, 4) float with transparency to >= 32 px per side and <= 8:1; returns offset."""
    h, w = px.shape[:2]
    W, H = _block_size(w, h)
    if (W, H) == (w, h):
        return px, (0, 0)
    out = np.zeros((H, W, 4), np.float32)
    ox, oy = (W - w) // 2, (H - h) // 2
    out[oy : oy + h, ox : ox + w] = px
    return out, (ox, oy)
