"""Layer Transform and resize_stack: geometry, exact right angles, fringe-free resampling, T1-T3, T6-T8."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from qil_core.errors import InputError
from qil_core.layers import INTERPOLATIONS, Layer, LayerStack, composite, resize_stack, transform_layer
from qil_core.layers.resample import premultiply, unpremultiply


def banded_layer() -> Layer:
    """Rows of 0/128/255 alpha bands: opaque red | red at alpha 128 | green RGB under alpha 0."""
    px = np.zeros((12, 18, 4), np.float32)
    px[:, :6] = [1, 0, 0, 1]
    px[:, 6:12] = [1, 0, 0, 128 / 255]
    px[:, 12:] = [0, 1, 0, 0]  # invisible green that a straight-alpha resampler would smear in
    return Layer(px, x=10, y=20, name="bands")


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale_x": 2.3, "scale_y": 1.7},
        {"scale_x": 0.45, "scale_y": 0.6},
        {"rotation": 33.0},
        {"rotation": -71.0, "scale_x": 0.7, "scale_y": 1.9},
        {"dx": 0.4, "dy": 0.3, "rotation": 0.01},
    ],
)
def test_no_colour_fringe_at_alpha_edges_t8(interpolation: str, kwargs: dict) -> None:
    out = transform_layer(banded_layer(), interpolation=interpolation, **kwargs)
    assert out.pixels.size
    visible = out.pixels[..., 3] > 0
    # No green can appear anywhere: it only ever sat under alpha 0.
    assert out.pixels[..., 1][visible].max() <= 1e-6
    assert out.pixels[..., 0][visible].min() >= 1 - 1e-5  # every visible pixel stays pure red
    assert (out.pixels[..., :3][~visible] == 0).all()


def test_straight_alpha_resampling_would_fringe() -> None:
    # Control for the test above: the same band scaled with straight alpha shows green at the edge.
    from qil_core.layers.resample import resample_box

    px = banded_layer().pixels
    straight = resample_box(px, (0, 0, 18, 12), (41, 12), "bilinear")
    edge = straight[..., 3] > 0.01
    assert straight[..., 1][edge].max() > 0.05


def test_premultiply_round_trip_within_one_step_t7() -> None:
    rng = np.random.default_rng(0)
    px = np.round(rng.random((32, 32, 4), dtype=np.float32) * 255) / 255
    px[..., 3] = np.where(px[..., 3] < 1 / 255, 0, px[..., 3])
    back = unpremultiply(premultiply(px))
    keep = px[..., 3] > 0
    assert np.abs(back[keep] - px[keep]).max() <= 1 / 255
    assert (back[..., 3] == px[..., 3]).all()


def test_all_zero_alpha_layer_stays_transparent_t6() -> None:
    px = np.zeros((8, 8, 4), np.float32)
    px[..., 1] = 1  # colour under alpha 0
    with np.errstate(divide="raise", invalid="raise"):
        for kw in ({"scale_x": 3.0}, {"rotation": 45.0}, {"dx": 5}):
            out = transform_layer(Layer(px, x=2, y=2), **kw)
            assert out.pixels.size == 0 or not out.pixels.any()
        assert not unpremultiply(premultiply(px)).any()


def test_pure_move_rounds_and_keeps_pixels() -> None:
    layer = banded_layer()
    out = transform_layer(layer, dx=3.4, dy=-2.6)
    assert (out.x, out.y) == (13, 17)
    assert np.array_equal(out.pixels, layer.cropped().pixels)


def test_right_angles_are_exact_and_clockwise() -> None:
    px = np.zeros((2, 4, 4), np.float32)
    px[..., 3] = 1
    px[0, 3, :3] = [1, 0, 0]  # marker top right
    layer = Layer(px, x=10, y=10)  # centre (12, 11)
    out = transform_layer(layer, rotation=90)
    assert out.pixels.shape == (4, 2, 4)
    assert np.array_equal(out.pixels, np.rot90(px, k=-1))
    assert (out.pixels[3, 1, :3] == [1, 0, 0]).all()  # clockwise: top right -> bottom right
    assert (out.x, out.y) == (11, 9)  # centre kept: 4 tall and 2 wide around (12, 11)
    assert np.array_equal(transform_layer(layer, rotation=180).pixels, px[::-1, ::-1])
    assert np.array_equal(transform_layer(layer, rotation=-90).pixels, np.rot90(px, k=1))
    same = transform_layer(layer, rotation=720)
    assert np.array_equal(same.pixels, px) and (same.x, same.y) == (10, 10)


def test_flips_are_exact() -> None:
    rng = np.random.default_rng(1)
    px = rng.random((5, 7, 4), dtype=np.float32)
    px[..., 3] = 1
    layer = Layer(px, x=3, y=4)
    assert np.array_equal(transform_layer(layer, flip_h=True).pixels, px[:, ::-1])
    assert np.array_equal(transform_layer(layer, flip_v=True).pixels, px[::-1])
    out = transform_layer(layer, flip_h=True, flip_v=True)
    assert np.array_equal(out.pixels, px[::-1, ::-1]) and (out.x, out.y) == (3, 4)


def test_nearest_integer_scale_repeats_pixels_about_the_centre() -> None:
    px = np.zeros((2, 2, 4), np.float32)
    px[..., 3] = 1
    px[0, 0, :3] = 1
    layer = Layer(px, x=4, y=4)  # centre (5, 5)
    out = transform_layer(layer, scale_x=3, scale_y=2, interpolation="nearest")
    assert out.pixels.shape == (4, 6, 4)
    assert np.array_equal(out.pixels, np.repeat(np.repeat(px, 2, 0), 3, 1))
    assert (out.x, out.y) == (2, 3)
    tl = transform_layer(layer, scale_x=2, scale_y=2, interpolation="nearest", pivot="top-left")
    assert (tl.x, tl.y) == (4, 4) and tl.pixels.shape == (4, 4, 4)


def test_opaque_layer_scaled_keeps_hard_opaque_interior() -> None:
    px = np.zeros((10, 10, 4), np.float32)
    px[..., 0] = 1
    px[..., 3] = 1
    out = transform_layer(Layer(px), scale_x=2.5, scale_y=2.5)  # centre (5, 5) -> block [-7.5, 17.5)
    assert out.pixels.shape == (25, 25, 4) and (out.x, out.y) == (-7, -7)  # snapped to whole pixels
    np.testing.assert_allclose(out.pixels[..., 3], 1, atol=1e-5)
    np.testing.assert_allclose(out.pixels[..., 0], 1, atol=1e-5)


def test_rotation_grows_the_layer_and_keeps_mass() -> None:
    px = np.zeros((20, 20, 4), np.float32)
    px[..., 2] = 1
    px[..., 3] = 1
    out = transform_layer(Layer(px, x=50, y=50), rotation=45, interpolation="bilinear")
    diag = 20 * math.sqrt(2)
    assert diag - 1 <= out.width <= diag + 3 and diag - 1 <= out.height <= diag + 3
    assert out.pixels[..., 3].sum() == pytest.approx(400, rel=0.01)  # area preserved
    cx = out.x + (out.pixels[..., 3].sum(0) * (np.arange(out.width) + 0.5)).sum() / out.pixels[..., 3].sum()
    assert cx == pytest.approx(60, abs=0.05)  # rotated about the centre (60, 60)


def test_rotation_direction_clockwise_on_screen() -> None:
    px = np.zeros((3, 21, 4), np.float32)
    px[..., 3] = 1
    px[:, 15:, 0] = 1  # red on the right end of a horizontal bar centred at (40.5, 40.5)
    out = transform_layer(Layer(px, x=30, y=39), rotation=80, interpolation="bilinear")
    red = out.pixels[..., 0] * out.pixels[..., 3]
    ys = (red.sum(1) * (np.arange(out.height) + 0.5)).sum() / red.sum() + out.y
    assert ys > 45  # the right end swung down


def test_subpixel_move_with_rotation_is_exact() -> None:
    px = np.zeros((1, 4, 4), np.float32)
    px[..., 3] = 1
    out = transform_layer(Layer(px, x=0, y=0), dx=0.5, rotation=1e-5, interpolation="bilinear")
    # Block [0, 4) moved to [0.5, 4.5): half coverage at both ends.
    assert out.x == 0 and out.width == 5
    np.testing.assert_allclose(out.pixels[0, :, 3], [0.5, 1, 1, 1, 0.5], atol=1e-3)


def test_opacity_option() -> None:
    out = transform_layer(banded_layer(), opacity=0.25)
    assert out.opacity == 0.25
    with pytest.raises(InputError, match="opacity"):
        transform_layer(banded_layer(), opacity=1.5)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), 1e6])
@pytest.mark.parametrize("name", ["scale_x", "scale_y"])
def test_bad_scale_t1(name: str, bad: float) -> None:
    with pytest.raises(InputError, match=rf"{name} must be"):
        transform_layer(banded_layer(), **{name: bad})


def test_scale_to_under_one_pixel_or_over_the_limit_t1() -> None:
    tiny = Layer(np.ones((2, 2, 4), np.float32))
    with pytest.raises(InputError, match="smaller than 1 px"):
        transform_layer(tiny, scale_x=0.1)
    wide = Layer(np.ones((1, 1000, 4), np.float32))
    with pytest.raises(InputError, match="30000 px per side"):
        transform_layer(wide, scale_x=50)


def test_rotation_validation_t2() -> None:
    layer = banded_layer()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(InputError, match="rotation must be a finite number"):
            transform_layer(layer, rotation=bad)
    big = transform_layer(layer, rotation=1e9)  # 1e9 mod 360 = 280
    same = transform_layer(layer, rotation=280)
    assert np.array_equal(big.pixels, same.pixels) and big.bbox() == same.bbox()


def test_offsets_clamped_and_off_canvas_warned_t3(caplog: pytest.LogCaptureFixture) -> None:
    layer = banded_layer()
    with caplog.at_level(logging.WARNING):
        out = transform_layer(layer, dx=2.0**40, dy=-(2.0**40))
    assert (out.x, out.y) == (2**31 - 1, -(2**31))
    assert "int32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = transform_layer(layer, dx=-200, canvas=(64, 64))
    assert out.x == -190 and "fully outside" in caplog.text
    with pytest.raises(InputError, match="dx must be a finite number"):
        transform_layer(layer, dx=float("nan"))


def test_bad_interpolation_and_pivot() -> None:
    with pytest.raises(InputError, match="interpolation must be one of"):
        transform_layer(banded_layer(), scale_x=2, interpolation="cubic-spline")
    with pytest.raises(InputError, match="pivot"):
        transform_layer(banded_layer(), rotation=10, pivot="middle")


def test_empty_layer_moves_without_pixels() -> None:
    empty = Layer(np.zeros((0, 0, 4), np.float32), x=3, y=3)
    out = transform_layer(empty, dx=2, rotation=30, scale_x=2)
    assert out.pixels.size == 0 and out.x == 5


def test_resize_stack_maps_layers_and_offsets() -> None:
    bg = Layer(np.broadcast_to(np.float32([0, 0, 1, 1]), (40, 60, 4)).copy(), name="bg")
    sprite = Layer(np.broadcast_to(np.float32([1, 0, 0, 1]), (10, 10, 4)).copy(), x=20, y=10, name="sprite")
    stack = LayerStack(60, 40, [bg, sprite])
    big = resize_stack(stack, 120, 80)
    assert big.size == (120, 80)
    assert big[0].bbox() == (0, 0, 120, 80)  # full-canvas layers stay full canvas, edges opaque
    np.testing.assert_allclose(big[0].pixels[..., 3], 1, atol=1e-5)
    assert big[1].bbox() == (40, 20, 60, 40) and big[1].name == "sprite"
    small = resize_stack(stack, 30, 20, "bilinear")
    assert small[1].bbox() == (10, 5, 15, 10)
    flat = composite(resize_stack(big, 60, 40, "bilinear"))
    np.testing.assert_allclose(flat, composite(stack), atol=1e-4)
    with pytest.raises(InputError, match="width must be an int"):
        resize_stack(stack, 0, 10)
    with pytest.raises(InputError, match="height must be an int"):
        resize_stack(stack, 10, 40_000)
