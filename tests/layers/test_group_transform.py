"""transform_layers: several layers transformed as one group about a shared pivot (group box, canvas, point)."""

from __future__ import annotations

import numpy as np
import pytest

from qil_core.errors import InputError
from qil_core.layers import GROUP_PIVOTS, Layer, LayerStack, group_pivot, transform_layer, transform_layers


def _ramp(h: int, w: int, colour: tuple[float, float, float]) -> np.ndarray:
    """Opaque pixels whose red rises left to right and green top to bottom, so flips show in the data."""
    px = np.ones((h, w, 4), np.float32)
    px[..., :3] = colour
    px[..., 0] = np.linspace(0.1, 0.9, w, dtype=np.float32)[None, :]
    px[..., 1] = np.linspace(0.2, 0.8, h, dtype=np.float32)[:, None]
    return px


def _stack() -> LayerStack:
    """20x10 canvas: background, a 4x2 block at (2, 3), a 2x2 block at (12, 5), an empty layer at (19, 9)."""
    return LayerStack(
        20,
        10,
        [
            Layer(np.ones((10, 20, 4), np.float32), name="background"),
            Layer(_ramp(2, 4, (0, 0, 0)), x=2, y=3, name="red"),
            Layer(_ramp(2, 2, (0, 0, 1)), x=12, y=5, name="green"),
            Layer(np.zeros((0, 0, 4), np.float32), x=19, y=9, name="empty"),
        ],
    )


def _boxes(stack: LayerStack) -> dict[str, tuple[int, int, int, int]]:
    return {layer.name: layer.bbox() for layer in stack.layers}


def test_the_pivots() -> None:
    stack = _stack()
    # red x 2..6, y 3..5 and green x 12..14, y 5..7: the common box is x 2..14, y 3..7; the empty layer is ignored
    assert group_pivot(stack, [1, 2, 3]) == (8.0, 5.0)
    assert group_pivot(stack, [3]) == (10.0, 5.0)  # only empty layers: the canvas centre
    assert group_pivot(stack, [1], "canvas") == (10.0, 5.0)
    assert group_pivot(stack, [1], (3, -4.5)) == (3.0, -4.5)
    assert group_pivot(stack, [1, 2], "layer") is None
    assert GROUP_PIVOTS == ("group", "layer", "canvas")
    for bad in ("middle", (1.0,), (1.0, float("nan"))):
        with pytest.raises(InputError, match="pivot"):
            group_pivot(stack, [1], bad)  # type: ignore[arg-type]


def test_a_group_flips_as_a_whole_about_its_box() -> None:
    stack = _stack()
    out = transform_layers(stack, [1, 2], flip_h=True)
    assert _boxes(out)["red"] == (10, 3, 14, 5) and _boxes(out)["green"] == (2, 5, 4, 7)
    assert np.array_equal(out.layers[1].pixels, stack.layers[1].pixels[:, ::-1])  # the pixels are mirrored too
    assert out.layers[0] is stack.layers[0] and out.layers[3] is stack.layers[3]  # others untouched
    both = transform_layers(stack, [1, 2], flip_h=True, flip_v=True)
    assert _boxes(both)["red"] == (10, 5, 14, 7)
    assert np.array_equal(both.layers[1].pixels, stack.layers[1].pixels[::-1, ::-1])


def test_rotation_and_scale_keep_the_group_shape() -> None:
    stack = _stack()
    turned = transform_layers(stack, [1, 2], rotation=180.0)
    assert _boxes(turned)["red"] == (10, 5, 14, 7) and _boxes(turned)["green"] == (2, 3, 4, 5)
    assert np.array_equal(turned.layers[1].pixels, stack.layers[1].pixels[::-1, ::-1])
    doubled = transform_layers(stack, [1, 2], scale_x=2.0, scale_y=2.0, interpolation="nearest")
    assert _boxes(doubled)["red"] == (-4, 1, 4, 5) and _boxes(doubled)["green"] == (16, 5, 20, 9)
    moved = transform_layers(stack, [1, 2, 3], dx=3, dy=-1, opacity=0.5)
    assert _boxes(moved)["red"] == (5, 2, 9, 4) and _boxes(moved)["empty"][:2] == (22, 8)
    assert [layer.opacity for layer in moved.layers] == [1.0, 0.5, 0.5, 0.5]


def test_canvas_point_and_own_centre_pivots() -> None:
    stack = _stack()
    canvas = transform_layers(stack, [1], flip_h=True, pivot="canvas")  # mirrored about x = 10
    assert _boxes(canvas)["red"] == (14, 3, 18, 5)
    point = transform_layers(stack, [1, 2], scale_x=2.0, scale_y=2.0, pivot=(0, 0), interpolation="nearest")
    assert _boxes(point)["red"] == (4, 6, 12, 10) and _boxes(point)["green"] == (24, 10, 28, 14)
    own = transform_layers(stack, [1, 2], flip_h=True, rotation=180.0, pivot="layer")
    assert _boxes(own)["red"] == (2, 3, 6, 5) and _boxes(own)["green"] == (12, 5, 14, 7)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"flip_h": True, "rotation": 90.0, "dx": -3, "dy": 2},
        {"scale_x": 1.5, "scale_y": 0.75, "rotation": 30.0, "flip_v": True},
    ],
)
def test_a_group_of_one_is_transform_layer(kwargs: dict) -> None:
    stack = _stack()
    one = transform_layers(stack, [1], **kwargs).layers[1]
    ref = transform_layer(stack.layers[1], **kwargs)
    assert one.bbox() == ref.bbox() and np.array_equal(one.pixels, ref.pixels)
