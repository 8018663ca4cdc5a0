"""Full-resolution layers: guided alpha upsampling and colour from the original (qil_core.layers.fullres)."""

from __future__ import annotations

import numpy as np
import pytest

from qil_core.errors import InputError
from qil_core.layers import composite, resize_stack
from qil_core.layers.composite import paste_layer
from qil_core.layers.fullres import box_mean, fill_colour, upsample_stack
from qil_core.layers.resample import premultiply, resample_box, unpremultiply
from qil_core.layers.stack import Layer, LayerStack

BIG, SMALL = 384, 96


def _truth() -> LayerStack:
    """A textured opaque background, a hard-edged disc and a thin bar (analytic 1 px antialiasing)."""
    yy, xx = np.mgrid[0:BIG, 0:BIG].astype(np.float32) + 0.5
    bg = np.empty((BIG, BIG, 4), np.float32)
    bg[..., 0], bg[..., 1], bg[..., 2], bg[..., 3] = 0.3 + 0.2 * xx / BIG, 0.5 + 0.05 * np.sin(yy / 3), 0.6, 1
    disc = np.zeros_like(bg)
    disc[..., 3] = np.clip(0.3 * BIG - np.hypot(xx - 0.4 * BIG, yy - 0.5 * BIG) + 0.5, 0, 1)
    disc[..., :3] = [0.95, 0.4, 0.1]
    bar = np.zeros_like(bg)
    bar[..., 3] = np.clip(np.minimum(5 - np.abs(xx - 0.8 * BIG), np.minimum(yy - 40, 300 - yy)) + 0.5, 0, 1)
    bar[..., :3] = [0.05, 0.1, 0.4]
    return LayerStack(BIG, BIG, [Layer.from_canvas(p, name=n) for p, n in ((bg, "Bg"), (disc, "Disc"), (bar, "Bar"))])


def _down(stack: LayerStack, size: int) -> LayerStack:
    out = []
    for layer in stack.layers:
        canvas = paste_layer(np.zeros((stack.height, stack.width, 4), np.float32), layer)
        small = resample_box(premultiply(canvas), (0, 0, stack.width, stack.height), (size, size), "bilinear")
        out.append(Layer.from_canvas(unpremultiply(small), name=layer.name, opacity=layer.opacity))
    return LayerStack(size, size, out)


def _alpha(layer: Layer, n: int) -> np.ndarray:
    return paste_layer(np.zeros((n, n, 4), np.float32), layer)[..., 3]


def test_sharper_than_lanczos_and_colour_from_the_original() -> None:
    truth = _truth()
    original = np.round(composite(truth) * 255).astype(np.uint8)
    low = _down(truth, SMALL)
    guided = upsample_stack(low, original)
    lanczos = resize_stack(low, BIG, BIG, "lanczos")
    assert guided.size == (BIG, BIG) and [x.name for x in guided] == ["Bg", "Disc", "Bar"]
    for i in (1, 2):
        want = _alpha(truth.layers[i], BIG)
        band = box_mean(((want > 0) & (want < 1)).astype(np.float32), 4) > 0
        err_g = np.abs(_alpha(guided.layers[i], BIG) - want)[band].mean()
        err_l = np.abs(_alpha(lanczos.layers[i], BIG) - want)[band].mean()
        assert err_g < 0.6 * err_l, (i, err_g, err_l)
    # flat parts stay exact: the background is opaque everywhere, the disc's centre too
    assert np.all(_alpha(guided.layers[0], BIG) == 1)
    assert _alpha(guided.layers[1], BIG)[192, 150] == 1
    # where the background is the only visible layer, its colour is the original's pixels
    bg = paste_layer(np.zeros((BIG, BIG, 4), np.float32), guided.layers[0])
    others = np.maximum(_alpha(guided.layers[1], BIG), _alpha(guided.layers[2], BIG))
    sole = others == 0
    assert sole.mean() > 0.3
    np.testing.assert_array_equal(bg[..., :3][sole], original[..., :3][sole].astype(np.float32) / 255)
    # the composite of the upsampled layers is closer to the original than Lanczos' is, at the edges
    band = box_mean((others > 0).astype(np.float32) - (others == 1), 3) > 0
    ref = original[..., :3].astype(np.float32) / 255
    e_g = np.abs(composite(guided)[..., :3] - ref)[band].mean()
    e_l = np.abs(composite(lanczos)[..., :3] - ref)[band].mean()
    assert e_g < e_l


def test_keeps_properties_offsets_and_empty_layers() -> None:
    low = LayerStack(
        40,
        20,
        [
            Layer(np.full((20, 40, 4), [0.2, 0.3, 0.4, 1.0], np.float32), name="Bg"),
            Layer(
                np.full((4, 6, 4), [1.0, 0.0, 0.0, 0.5], np.float32),
                x=30,
                y=10,
                name="Tag",
                opacity=0.7,
                blend_mode="screen",
            ),
            Layer(np.zeros((0, 0, 4), np.float32), x=5, y=5, name="Empty"),
            Layer(np.full((5, 5, 4), [0.0, 1.0, 0.0, 1.0], np.float32), x=2, y=2, name="Hidden", visible=False),
        ],
        metadata={"k": 1},
    )
    guide = np.zeros((60, 120, 3), np.uint8)
    guide[...] = [51, 77, 102]
    out = upsample_stack(low, guide)
    assert out.size == (120, 60) and out.metadata == {"k": 1}
    tag = out.layers[1]
    assert (tag.name, tag.opacity, tag.blend_mode) == ("Tag", 0.7, "screen")
    assert 86 <= tag.x <= 90 and 28 <= tag.y <= 30 and tag.x + tag.width <= 120
    assert out.layers[2].pixels.size == 0 and (out.layers[2].x, out.layers[2].y) == (15, 15)
    hidden = out.layers[3]
    assert not hidden.visible and hidden.pixels.size and np.allclose(hidden.pixels[hidden.alpha > 0.99, 1], 1)
    with pytest.raises(InputError, match="guide must be an RGB"):
        upsample_stack(low, np.zeros((60, 120), np.uint8))


def test_fill_colour_extends_into_transparency() -> None:
    colour = np.zeros((3, 8, 8), np.float32)
    colour[0, 2:4, 2:4] = 0.8
    alpha = np.zeros((8, 8), np.float32)
    alpha[2:4, 2:4] = 1
    filled = fill_colour(colour, alpha)
    assert np.allclose(filled[0], 0.8) and np.allclose(filled[1:], 0)
    assert fill_colour(colour, np.zeros((8, 8), np.float32)) is colour
