"""Documents built the way ComfyUI core's layer nodes build them are read the way core's ImageCompositor reads them.

`add_layer` and `layers_from_boxes` below are small builders of our own that follow the documented behaviour of
core's AddLayer and LayersFromBoundingBoxes (comfy_extras/nodes_compositor.py, ComfyUI 0.25): an item holds only
the keys whose widget differs from its default, rotation is given in degrees and stored in radians, z_index
defaults to 0, LayersFromBoundingBoxes stacks its frames above the highest z_index present, and the previous
document's canvas is carried over when it has one. The expected numbers are worked out by hand in the comments.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from qil_core.layers import Layer, LayerStack, stack_from_document, stack_to_document, stack_to_images


def add_layer(
    layers: dict | None,
    image: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    name: str = "",
    x: int = 0,
    y: int = 0,
    opacity: float = 1.0,
    blend_mode: str = "normal",
    rotation: float = 0.0,
    width: int = 0,
    height: int = 0,
    z_index: int = 0,
) -> dict:
    """A document with one item appended, as core's AddLayer (widget defaults leave their keys out)."""
    item: dict = {"image": image, "type": "raster", "x": x, "y": y, "z_index": z_index}
    optional = {
        "mask": (mask, None),
        "name": (name, ""),
        "opacity": (opacity, 1.0),
        "blend_mode": (blend_mode, "normal"),
        "w": (width, 0),
        "h": (height, 0),
    }
    item.update({key: value for key, (value, default) in optional.items() if value is not None and value != default})
    if rotation:
        item["rotation"] = math.radians(rotation)
    doc: dict = {"version": 1, "layers": [*(layers or {}).get("layers", []), item]}
    canvas = (layers or {}).get("canvas")
    if isinstance(canvas, (list, tuple)) and len(canvas) == 2 and min(canvas) > 0:
        doc["canvas"] = tuple(canvas)
    return doc


def layers_from_boxes(layers: dict | None, image: torch.Tensor, boxes: list[tuple[int, int]]) -> dict:
    """One item per frame placed at its box, stacked above every z_index already present (core's rule)."""
    previous = list((layers or {}).get("layers", []))
    base = max((int(it.get("z_index") or 0) for it in previous), default=-1) + 1
    items = [
        {"image": image[k : k + 1], "type": "raster", "x": bx, "y": by, "z_index": base + k}
        for k, (bx, by) in enumerate(boxes)
    ]
    return {"version": 1, "layers": previous + items}


def solid(value: float, h: int = 4, w: int = 6, batch: int = 1) -> torch.Tensor:
    return torch.full((batch, h, w, 3), value)


def pack_document() -> dict:
    """What the pack hands out: a 3-layer stack on an 8x6 canvas."""
    layers = [
        Layer(np.full((6, 8, 4), 1.0, np.float32), name="Background"),
        Layer(np.full((2, 2, 4), 0.5, np.float32), x=1, y=1, name="Layer 1"),
        Layer(np.full((3, 3, 4), 0.25, np.float32), x=4, y=2, name="Layer 2", blend_mode="multiply"),
    ]
    return stack_to_document(LayerStack(8, 6, layers))


# ------------------------------------------------------------------ order
def test_a_layer_appended_by_core_lands_on_top_of_a_pack_document() -> None:
    doc = add_layer(pack_document(), solid(0.9), name="added")  # AddLayer's default z_index 0
    stack = stack_from_document(doc)
    assert [layer.name for layer in stack] == ["Background", "Layer 1", "Layer 2", "added"]
    assert stack.size == (8, 6)  # the pack's canvas travels through AddLayer
    below = add_layer(pack_document(), solid(0.9), name="under", z_index=-3)
    assert [layer.name for layer in stack_from_document(below)] == ["under", "Background", "Layer 1", "Layer 2"]
    boxes = layers_from_boxes(pack_document(), solid(0.9, batch=2), [(0, 0), (2, 2)])
    assert [layer.name for layer in stack_from_document(boxes)][-2:] == ["Layer 4", "Layer 5"]


def test_a_chain_of_addlayers_stacks_in_order_and_z_index_overrides() -> None:
    doc = add_layer(None, solid(0.1), name="first")
    doc = add_layer(doc, solid(0.2), name="second")
    doc = add_layer(doc, solid(0.3), name="raised", z_index=1)
    doc = add_layer(doc, solid(0.4), name="third")
    assert [layer.name for layer in stack_from_document(doc)] == ["first", "second", "third", "raised"]
    doc["layers"].append({"image": solid(0.5), "name": "no z", "z_index": None})  # hand-written: counts as 0
    doc["layers"].insert(0, {"image": solid(0.6), "name": "missing z"})
    assert [layer.name for layer in stack_from_document(doc)] == [
        "missing z",
        "first",
        "second",
        "third",
        "no z",
        "raised",
    ]


def test_pack_document_edited_in_core_round_trips_losslessly() -> None:
    original = stack_from_document(pack_document())
    doc = add_layer(pack_document(), solid(0.9), name="added", x=2, y=1)
    back = stack_from_document(stack_to_document(stack_from_document(doc)))
    assert [layer.name for layer in back] == [layer.name for layer in original] + ["added"]
    for a, b in zip(original, back):
        assert (a.x, a.y, a.blend_mode) == (b.x, b.y, b.blend_mode) and np.array_equal(a.pixels, b.pixels)
    assert back[-1].bbox() == (2, 1, 8, 5)


# ------------------------------------------------------------------ canvas
def test_canvas_without_a_canvas_key_comes_from_the_rotated_bounds() -> None:
    # A 100x40 layer at (0, 0) turned 30 degrees about its centre (50, 20): it reaches
    # 50 + 50 cos 30 + 20 sin 30 = 103.30 to the right and 20 + 50 sin 30 + 20 cos 30 = 62.32 down,
    # so the canvas is 104 x 63 (whole pixels, rounded out). The unrotated box would give 100 x 40.
    image = torch.ones(1, 40, 100, 3)
    doc = add_layer(None, image, rotation=30)
    assert "canvas" not in doc
    stack = stack_from_document(doc)
    assert stack.size == (104, 63)
    layer = stack[0]
    assert (layer.x + layer.width, layer.y + layer.height) in ((103, 62), (104, 62), (103, 63), (104, 63))
    rgba, _ = stack_to_images(stack)
    assert rgba[0, :, -2:, 3].sum() > 0 and rgba[0, -2:, :, 3].sum() > 0  # reaches the right and bottom edges
    # The largest extent of every item counts, with its display size (w/h) when given.
    doc = add_layer(doc, torch.ones(1, 10, 10, 3), x=90, y=60, width=30, height=20)
    assert stack_from_document(doc).size == (120, 80)
    # A layer wholly left of or above the origin still leaves a 1x1 canvas at least.
    assert stack_from_document(add_layer(None, torch.ones(1, 4, 4, 3), x=-50, y=-50)).size == (1, 1)


def test_canvas_of_a_quarter_turn_swaps_the_box() -> None:
    # 60x20 at (10, 0) turned 90 degrees about (40, 10): x 30..50, y -20..40 -> canvas 50 x 40.
    stack = stack_from_document(add_layer(None, torch.ones(1, 20, 60, 3), x=10, rotation=90))
    assert stack.size == (50, 40)
    assert stack[0].bbox() == (30, -20, 50, 40)


# ------------------------------------------------------------------ masks
def _mask(batch: int, h: int = 4, w: int = 6) -> torch.Tensor:
    """Mask k leaves only pixel (k, k) opaque."""
    m = torch.ones(batch, h, w)
    for k in range(batch):
        m[k, k, k] = 0
    return m


def test_image_batch_1_with_mask_batch_2_is_one_frame_with_mask_0() -> None:
    stack = stack_from_document(add_layer(None, solid(0.5), mask=_mask(2), name="one"))
    assert [(layer.name, layer.bbox()) for layer in stack] == [("one", (0, 0, 1, 1))]


def test_image_batch_3_with_mask_batch_2_leaves_the_third_frame_unmasked() -> None:
    stack = stack_from_document(add_layer(None, solid(0.5, batch=3), mask=_mask(2), name="f"))
    assert [(layer.name, layer.bbox()) for layer in stack] == [
        ("f 1", (0, 0, 1, 1)),
        ("f 2", (1, 1, 2, 2)),
        ("f 3", (0, 0, 6, 4)),
    ]
    assert (stack[2].alpha == 1).all()


def test_one_mask_serves_every_frame_and_multiplies_the_image_alpha() -> None:
    image = torch.ones(2, 4, 6, 4)
    image[..., 3] = 0.5
    mask = torch.zeros(1, 4, 6)
    mask[0, :, 3:] = 1  # right half transparent
    stack = stack_from_document(add_layer(None, image, mask=mask))
    assert [layer.bbox() for layer in stack] == [(0, 0, 3, 4)] * 2
    assert np.allclose(stack[0].alpha, 0.5) and np.allclose(stack[1].alpha, 0.5)


# ------------------------------------------------------------------ lenient with hand-written documents
def test_hand_written_values_are_read_like_core(caplog: pytest.LogCaptureFixture) -> None:
    items = [
        {"image": solid(0.2), "name": "zero size", "w": 0, "h": 0},
        {"image": solid(0.3), "name": "glow", "blend_mode": "glow"},
        {"image": solid(0.4), "name": "loud", "opacity": 1.7},
        {"image": solid(0.5), "name": "quiet", "opacity": -0.2},
        {"image": solid(0.6), "name": "core name", "blend_mode": "soft-light"},
    ]
    with caplog.at_level(logging.WARNING):
        stack = stack_from_document({"version": 1, "canvas": (6, 4), "layers": items})
    assert [layer.name for layer in stack] == ["zero size", "glow", "loud", "quiet", "core name"]
    assert stack[0].bbox() == (0, 0, 6, 4)  # w/h 0: the native size
    assert stack[1].blend_mode == "normal" and "blend_mode 'glow' is unknown; using 'normal'" in caplog.text
    assert (stack[2].opacity, stack[3].opacity) == (1.0, 0.0)
    assert "opacity 1.7 is outside 0..1; clamped" in caplog.text and "opacity -0.2" in caplog.text
    assert stack[4].blend_mode == "soft-light"
