"""Layer Recolor: each adjustment by hand-computed pixels, alpha bit-identical, strict colours (T5-T7)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qil_core.errors import InputError
from qil_core.layers import Layer, parse_color, recolor_layer


def pixel(rgb: tuple[float, float, float], a: float = 1.0) -> Layer:
    return Layer(np.array([[list(rgb) + [a]]], np.float32))


def rgb_of(layer: Layer) -> np.ndarray:
    return layer.pixels[0, 0, :3]


@pytest.fixture()
def noisy() -> Layer:
    rng = np.random.default_rng(0)
    px = rng.random((16, 16, 4), dtype=np.float32)
    px[:4, :, 3] = 0  # fully transparent rows with colour under them
    px[4:8, :, 3] = 1
    return Layer(px, x=3, y=-2, name="noisy", opacity=0.8, blend_mode="screen")


ALL_OPTIONS = [
    {"hue_shift": 77},
    {"saturation": -0.6},
    {"saturation": 1},
    {"lightness": 0.4},
    {"lightness": -0.3},
    {"brightness": 0.2},
    {"contrast": 0.7},
    {"contrast": -1},
    {"tint": "#3366ff", "tint_strength": 0.5},
    {"replace_color": "red", "replace_with": "blue", "tolerance": 0.5},
    {"invert": True},
    {
        "hue_shift": -30,
        "saturation": 0.2,
        "lightness": 0.1,
        "brightness": -0.1,
        "contrast": 0.3,
        "tint": (1, 0.5, 0),
        "tint_strength": 1,
        "invert": True,
    },
]


@pytest.mark.parametrize("kwargs", ALL_OPTIONS)
def test_alpha_bit_identical_and_transparent_rgb_zeroed_t7(noisy: Layer, kwargs: dict) -> None:
    out = recolor_layer(noisy, **kwargs)
    assert np.array_equal(out.pixels[..., 3].view(np.uint32), noisy.pixels[..., 3].view(np.uint32))
    assert (out.pixels[:4, :, :3] == 0).all()
    assert out.pixels.min() >= 0 and out.pixels.max() <= 1
    assert (out.x, out.y, out.name, out.opacity, out.blend_mode) == (3, -2, "noisy", 0.8, "screen")
    assert out.pixels is not noisy.pixels and not np.shares_memory(out.pixels, noisy.pixels)


def test_all_zero_alpha_layer_t6() -> None:
    px = np.zeros((4, 4, 4), np.float32)
    px[..., :3] = 0.7
    with np.errstate(all="raise"):
        out = recolor_layer(Layer(px), hue_shift=40, saturation=0.5, tint="red", tint_strength=1)
    assert not out.pixels.any()


def test_hue_shift_moves_around_the_wheel() -> None:
    np.testing.assert_allclose(rgb_of(recolor_layer(pixel((1, 0, 0)), hue_shift=120)), [0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(rgb_of(recolor_layer(pixel((1, 0, 0)), hue_shift=-120)), [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(rgb_of(recolor_layer(pixel((0.2, 0.5, 0.9)), hue_shift=360)), [0.2, 0.5, 0.9], atol=1e-6)
    # HSL hue of (1, .5, 0) is 30°; +30° gives 60° = (1, 1, 0) at the same lightness/saturation.
    np.testing.assert_allclose(rgb_of(recolor_layer(pixel((1, 0.5, 0)), hue_shift=30)), [1, 1, 0], atol=1e-6)


def test_saturation() -> None:
    grey = rgb_of(recolor_layer(pixel((0.8, 0.4, 0.2)), saturation=-1))
    np.testing.assert_allclose(grey, [0.5, 0.5, 0.5], atol=1e-6)  # HSL lightness (0.8 + 0.2) / 2
    # HSL (h, s=.6, l=.5) -> s = .9 with +50 %: (.8, .4, .2) -> max .95, min .05, mid at the same hue.
    more = rgb_of(recolor_layer(pixel((0.8, 0.4, 0.2)), saturation=0.5))
    np.testing.assert_allclose(more, [0.95, 0.35, 0.05], atol=1e-6)


def test_lightness_brightness_contrast() -> None:
    np.testing.assert_allclose(rgb_of(recolor_layer(pixel((0.2, 0.4, 0.6)), lightness=1)), [1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(rgb_of(recolor_layer(pixel((0.2, 0.4, 0.6)), lightness=-1)), [0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(rgb_of(recolor_layer(pixel((0.2, 0.4, 0.6)), lightness=0.5)), [0.6, 0.7, 0.8], atol=1e-6)
    np.testing.assert_allclose(
        rgb_of(recolor_layer(pixel((0.2, 0.4, 0.9)), brightness=0.25)), [0.45, 0.65, 1], atol=1e-6
    )
    np.testing.assert_allclose(rgb_of(recolor_layer(pixel((0.2, 0.4, 0.9)), contrast=-1)), [0.5, 0.5, 0.5], atol=1e-6)
    slope = math.tan(0.75 * math.pi / 2)  # contrast .5 -> tan(1.5·π/4) = 2.414
    np.testing.assert_allclose(
        rgb_of(recolor_layer(pixel((0.6, 0.4, 0.5)), contrast=0.5)),
        [0.5 + 0.1 * slope, 0.5 - 0.1 * slope, 0.5],
        atol=1e-6,
    )
    np.testing.assert_allclose(rgb_of(recolor_layer(pixel((0.6, 0.4, 0.5)), contrast=1)), [1, 0, 0.5], atol=1e-6)


def test_tint_keeps_luminosity() -> None:
    # Grey .5 tinted fully red: SetLum((1, 0, 0), .5) = (1.2, .2, .2) -> ClipColor about .5 by .5/.7.
    out = rgb_of(recolor_layer(pixel((0.5, 0.5, 0.5)), tint="red", tint_strength=1))
    np.testing.assert_allclose(out, [1, 0.5 - 0.3 * 0.5 / 0.7, 0.5 - 0.3 * 0.5 / 0.7], atol=1e-6)
    half = rgb_of(recolor_layer(pixel((0.5, 0.5, 0.5)), tint="red", tint_strength=0.5))
    np.testing.assert_allclose(half, (np.float32([0.5] * 3) + out) / 2, atol=1e-6)
    assert np.array_equal(
        rgb_of(recolor_layer(pixel((0.3, 0.2, 0.1)), tint="red", tint_strength=0)), np.float32([0.3, 0.2, 0.1])
    )


def test_replace_color_with_tolerance_keeps_shading() -> None:
    px = np.float32([[[1, 0, 0, 1], [0.9, 0, 0, 1], [0, 1, 0, 1], [0.6, 0, 0, 1]]])
    out = recolor_layer(Layer(px), replace_color="#ff0000", replace_with="#0000ff", tolerance=0.3)
    np.testing.assert_allclose(out.pixels[0, 0, :3], [0, 0, 1], atol=1e-6)
    # .1 away (distance .1/√3 = .0577 < .15): fully moved by (-1, 0, +1), shading kept.
    np.testing.assert_allclose(out.pixels[0, 1, :3], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(out.pixels[0, 2, :3], [0, 1, 0], atol=1e-6)  # far: untouched
    # .4 away: distance .231, weight (.3 - .231) / .15 = .4619 -> R .6 - .4619, B .4619.
    w = (0.3 - 0.4 / math.sqrt(3)) / 0.15
    np.testing.assert_allclose(out.pixels[0, 3, :3], [0.6 - w, 0, w], atol=1e-5)
    exact = recolor_layer(Layer(px), replace_color="#ff0000", replace_with="#00ff00", tolerance=0)
    np.testing.assert_allclose(exact.pixels[0, :2, :3], [[0, 1, 0], [0.9, 0, 0]], atol=1e-6)
    with pytest.raises(InputError, match="given together"):
        recolor_layer(Layer(px), replace_color="red")


def test_invert() -> None:
    np.testing.assert_allclose(rgb_of(recolor_layer(pixel((0.2, 0.4, 1.0)), invert=True)), [0.8, 0.6, 0], atol=1e-6)


@pytest.mark.parametrize(
    "name,bad",
    [
        ("hue_shift", float("nan")),
        ("saturation", float("nan")),
        ("lightness", float("inf")),
        ("saturation", 1.5),
        ("contrast", -2),
        ("tint_strength", 2),
        ("tolerance", -0.1),
        ("brightness", "x"),
    ],
)
def test_bad_numbers_t5(name: str, bad: object) -> None:
    with pytest.raises(InputError, match=name):
        recolor_layer(pixel((0.5, 0.5, 0.5)), **{name: bad})


def test_parse_color_accepts() -> None:
    assert parse_color("#FFF") == (1.0, 1.0, 1.0)
    assert parse_color("#ff8000") == (1.0, 128 / 255, 0.0)
    assert parse_color("00ff00") == (0.0, 1.0, 0.0)
    assert parse_color("Red") == (1.0, 0.0, 0.0)
    assert parse_color("rgb(0, 0, 255)") == (0.0, 0.0, 1.0)
    assert parse_color("255,128,0") == (1.0, 128 / 255, 0.0)
    assert parse_color((1, 0.5, 0)) == (1.0, 0.5, 0.0)
    assert parse_color((255, 0, 0)) == (1.0, 0.0, 0.0)
    assert parse_color((0.1, 0.2, 0.3, 0.5)) == pytest.approx((0.1, 0.2, 0.3))


@pytest.mark.parametrize(
    "bad",
    [
        "#zzz",
        "",
        "   ",
        "#ff00",
        "#12345",
        "reddish",
        "rgb(1, 2)",
        (1, 2),
        (0.5, 0.5, 0.5, 1.5),
        (300, 0, 0),
        (-1, 0, 0),
        (float("nan"), 0, 0),
        7,
    ],
)
def test_parse_color_strict_t5(bad: object) -> None:
    with pytest.raises(InputError, match="colour"):
        parse_color(bad)  # type: ignore[arg-type]
