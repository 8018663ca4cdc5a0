"""The typed layer document: Layer validation, cropping, addressing (T4) and copies."""

from __future__ import annotations

import numpy as np
import pytest

from qil_core.errors import InputError, LayerIndexError
from qil_core.layers import BLEND_MODES, MAX_CANVAS_SIDE, Layer, LayerStack


def test_layer_validates_shape_opacity_and_mode() -> None:
    with pytest.raises(InputError, match=r"\(h, w, 4\) RGBA, got shape \(2, 2, 3\)"):
        Layer(np.zeros((2, 2, 3), np.float32))
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(InputError, match="opacity must be in 0..1"):
            Layer(np.zeros((1, 1, 4), np.float32), opacity=bad)
    with pytest.raises(InputError, match="unknown blend mode 'glow'"):
        Layer(np.zeros((1, 1, 4), np.float32), blend_mode="glow")
    layer = Layer(np.zeros((1, 1, 4), np.float64), x=2.0, y=-3.0)  # type: ignore[arg-type]
    assert layer.pixels.dtype == np.float32 and (layer.x, layer.y) == (2, -3)
    assert len(BLEND_MODES) == 26 and MAX_CANVAS_SIDE == 30_000


def test_crop_to_content_and_bbox() -> None:
    px = np.zeros((6, 8, 4), np.float32)
    px[2:4, 3:7, 3] = 0.5
    layer = Layer.from_canvas(px, name="spot")
    assert layer.bbox() == (3, 2, 7, 4) and (layer.width, layer.height) == (4, 2)
    assert layer.cropped() is layer  # already tight
    empty = Layer(np.zeros((3, 3, 4), np.float32), x=5, y=5).cropped()
    assert empty.pixels.shape == (0, 0, 4) and empty.is_empty
    assert not layer.is_empty and layer.alpha.shape == (2, 4)


def test_index_of_by_index_negative_and_name_t4() -> None:
    a, b = Layer(np.ones((1, 1, 4), np.float32), name="a"), Layer(np.ones((1, 1, 4), np.float32), name="b")
    stack = LayerStack(4, 4, [a, b, a.replace(name="a")])
    assert stack.index_of(-1) == 2 and stack.index_of("b") == 1 and stack.index_of("a") == 0
    assert stack.index_of("1") == 1  # digit strings are indices (CLI input)
    assert stack[-2] is b
    with pytest.raises(LayerIndexError, match="layer 3 requested, 3 available"):
        stack.index_of(3)
    with pytest.raises(LayerIndexError, match="layer -4 requested"):
        stack.index_of(-4)
    with pytest.raises(LayerIndexError, match="not found; layers are: 'a', 'b', 'a'"):
        stack.index_of("c")
    with pytest.raises(LayerIndexError, match="the stack has no layers"):
        LayerStack(2, 2).index_of(0)


def test_stack_size_and_copies() -> None:
    with pytest.raises(InputError, match="at least 1x1"):
        LayerStack(0, 5)
    stack = LayerStack(3, 2, [Layer(np.ones((1, 1, 4), np.float32))])
    copy = stack.replace()
    copy.layers.append(Layer(np.ones((1, 1, 4), np.float32)))
    assert len(stack) == 1 and len(copy) == 2 and stack.size == (3, 2)
    moved = stack[0].replace(x=4)
    assert moved.pixels is stack[0].pixels and stack[0].x == 0
