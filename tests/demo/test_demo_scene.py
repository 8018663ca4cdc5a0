"""The procedurally drawn sample scene: deterministic, layered, cropped, and a sensible composite."""

from __future__ import annotations

import numpy as np
import pytest

from qil_core.demo.scene import DEFAULT_SIZE, sample_image, sample_stack
from qil_core.errors import InputError
from qil_core.layers.composite import composite
from qil_core.layers.stack import BLEND_MODES, LayerStack

SIZE = (256, 192)
NAMES = ["Sky", "Sun glow", "Sun", "Far hills", "Near hill", "House shadow", "House", "Logo"]


@pytest.fixture(scope="module")
def stack() -> LayerStack:
    return sample_stack(SIZE)


def test_layers_named_bottom_first(stack: LayerStack) -> None:
    assert stack.size == SIZE
    assert [layer.name for layer in stack] == NAMES


def test_deterministic(stack: LayerStack) -> None:
    again = sample_stack(SIZE)
    for a, b in zip(stack, again):
        assert (a.x, a.y, a.name, a.opacity, a.blend_mode) == (b.x, b.y, b.name, b.opacity, b.blend_mode)
        assert np.array_equal(a.pixels, b.pixels)


def test_properties_are_varied(stack: LayerStack) -> None:
    modes = {layer.blend_mode for layer in stack}
    assert modes - {"normal"}, "at least one non-normal blend mode"
    assert modes <= set(BLEND_MODES)
    assert any(layer.opacity < 1 for layer in stack)
    assert all(layer.visible for layer in stack)


def test_layers_cropped_inside_canvas(stack: LayerStack) -> None:
    w, h = SIZE
    for layer in stack:
        assert layer.width > 0 and layer.height > 0, layer.name
        l, t, r, b = layer.bbox()
        assert 0 <= l < r <= w and 0 <= t < b <= h, layer.name
        # Cropped to content: every border row and column holds some alpha.
        a = layer.alpha
        assert a[0].any() and a[-1].any() and a[:, 0].any() and a[:, -1].any(), layer.name
        assert np.isfinite(layer.pixels).all() and layer.pixels.min() >= 0 and layer.pixels.max() <= 1
        assert not layer.pixels[..., :3][a == 0].any(), f"{layer.name}: RGB under alpha 0 must be zero"
    assert stack[0].bbox() == (0, 0, w, h) and bool((stack[0].alpha == 1).all()), "opaque sky background"
    assert all(layer.width * layer.height < w * h for layer in stack.layers[2:]), "foreground layers are cropped"


def test_sample_image_is_the_composite(stack: LayerStack) -> None:
    img = sample_image(SIZE)
    assert img.shape == (SIZE[1], SIZE[0], 4) and img.dtype == np.float32
    assert np.array_equal(img, composite(stack))
    assert bool((img[..., 3] == 1).all())
    # The sun is yellow, the ground green, the top of the sky blue.
    sun = stack[2]
    cy, cx = sun.y + sun.height // 2, sun.x + sun.width // 2
    r, g, b = img[cy, cx, :3]
    assert r > 0.9 and g > 0.8 and b < 0.7
    r, g, b = img[SIZE[1] - 3, SIZE[0] - 3, :3]
    assert g > r and g > b
    r, g, b = img[1, SIZE[0] // 2 - 40, :3]
    assert b > r and b > g


def test_scales_with_size() -> None:
    small, big = sample_stack((128, 96)), sample_stack((512, 384))
    assert big[2].width == pytest.approx(4 * small[2].width, abs=4)  # the sun's diameter scales
    assert DEFAULT_SIZE == (512, 384)


@pytest.mark.parametrize("size", [(0, 100), (16, 16), (40_000, 100), ("a", 3), (10,)])
def test_bad_size(size: object) -> None:
    with pytest.raises(InputError, match="sample size"):
        sample_stack(size)  # type: ignore[arg-type]
