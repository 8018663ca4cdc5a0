"""Blend modes: hand-computed pixels for all 26 modes, PSD key tables, W3C source-over with alpha."""

from __future__ import annotations

import numpy as np
import pytest

from qil_core.errors import InputError
from qil_core.layers import BLEND_MODES, Layer, LayerStack, composite
from qil_core.layers.blend import (
    BLEND_FUNCS,
    BLEND_MODE_FROM_PSD_KEY,
    PSD_APPROXIMATE_MODES,
    PSD_BLEND_KEYS,
    blend_function,
    blend_mode_from_psd_key,
    soft_light,
    source_over,
)

# (Cb, Cs) pairs, backdrop first; every expected value below was worked out by hand from the formula
# quoted in the comment (blend.py's module docstring names the source of each formula).
PAIRS = [(0.25, 0.5), (0.75, 0.25), (0.5, 1.0), (0.0, 0.75), (1.0, 0.0), (0.5, 0.75)]
SQRT_HALF = 0.7071067811865476

SEPARABLE = {
    "normal": [0.5, 0.25, 1.0, 0.75, 0.0, 0.75],  # Cs
    "multiply": [0.125, 0.1875, 0.5, 0.0, 0.0, 0.375],  # Cb·Cs
    "screen": [0.625, 0.8125, 1.0, 0.75, 1.0, 0.875],  # Cb + Cs - Cb·Cs
    "overlay": [0.25, 0.625, 1.0, 0.0, 1.0, 0.75],  # 2CbCs if Cb <= .5 else screen(Cs, 2Cb - 1)
    "darken": [0.25, 0.25, 0.5, 0.0, 0.0, 0.5],
    "lighten": [0.5, 0.75, 1.0, 0.75, 1.0, 0.75],
    "color-dodge": [0.5, 1.0, 1.0, 0.0, 1.0, 1.0],  # Cb=0 -> 0, Cs=1 -> 1, min(1, Cb/(1-Cs))
    "color-burn": [0.0, 0.0, 0.5, 0.0, 1.0, 1 / 3],  # Cb=1 -> 1, Cs=0 -> 0, 1 - min(1, (1-Cb)/Cs)
    "hard-light": [0.25, 0.375, 1.0, 0.5, 0.0, 0.75],  # 2CbCs if Cs <= .5 else screen(Cb, 2Cs - 1)
    "soft-light": [0.25, 0.65625, SQRT_HALF, 0.0, 1.0, 0.5 + 0.5 * (SQRT_HALF - 0.5)],
    "difference": [0.25, 0.5, 0.5, 0.75, 1.0, 0.25],
    "exclusion": [0.5, 0.625, 0.5, 0.75, 1.0, 0.5],  # Cb + Cs - 2CbCs
    "linear-dodge": [0.75, 1.0, 1.0, 0.75, 1.0, 1.0],
    "linear-burn": [0.0, 0.0, 0.5, 0.0, 0.0, 0.25],
    "vivid-light": [0.25, 0.5, 1.0, 0.0, 0.0, 1.0],  # burn 2Cs / dodge 2(Cs-.5); Cs=0 -> 0, Cs=1 -> 1
    "pin-light": [0.25, 0.5, 1.0, 0.5, 0.0, 0.5],
    "linear-light": [0.25, 0.25, 1.0, 0.5, 0.0, 1.0],  # clip(Cb + 2Cs - 1)
    "hard-mix": [0.0, 1.0, 1.0, 0.0, 1.0, 1.0],  # Cb + Cs > 1; tie (exactly 1) -> Cb > .5
    "subtract": [0.0, 0.5, 0.0, 0.0, 1.0, 0.0],
    "divide": [0.5, 1.0, 0.5, 0.0, 1.0, 2 / 3],  # min(1, Cb/Cs); Cs=0 and Cb>0 -> 1
    "grain-extract": [0.25, 1.0, 0.0, 0.0, 1.0, 0.25],  # clip(Cb - Cs + .5)
    "grain-merge": [0.25, 0.5, 1.0, 0.25, 0.5, 0.75],  # clip(Cb + Cs - .5)
}

# Non-separable modes on Cb = (0.5, 0.25, 0.25) (Lum .325, Sat .25) and Cs = (0, 0.5, 1) (Lum .405, Sat 1).
CB_RGB, CS_RGB = (0.5, 0.25, 0.25), (0.0, 0.5, 1.0)
NON_SEPARABLE = {
    # SetSat(Cs, .25) = (0, .125, .25), Lum .10125; + .22375 -> in gamut
    "hue": (0.22375, 0.34875, 0.47375),
    # SetSat(Cb, 1) = (1, 0, 0), Lum .3; + .025 -> (1.025, .025, .025); ClipColor scales by .675/.7 about .325
    "saturation": (1.0, 0.325 - 0.3 * 0.675 / 0.7, 0.325 - 0.3 * 0.675 / 0.7),
    # Cs - .08 = (-.08, .42, .92); ClipColor scales by .325/.405 about .325
    "color": (0.0, 0.325 + 0.095 * 0.325 / 0.405, 0.325 + 0.595 * 0.325 / 0.405),
    # Cb + .08, in gamut
    "luminosity": (0.58, 0.33, 0.33),
}


def test_every_core_mode_has_a_function_and_a_psd_key() -> None:
    assert set(BLEND_FUNCS) == set(BLEND_MODES) == set(PSD_BLEND_KEYS)
    assert len(BLEND_MODES) == 26
    assert set(SEPARABLE) | set(NON_SEPARABLE) == set(BLEND_MODES)
    assert all(len(k) == 4 and k.isascii() for k in PSD_BLEND_KEYS.values())


def test_psd_keys_match_photoshop_and_inverse_is_exact() -> None:
    assert PSD_BLEND_KEYS["normal"] == "norm" and PSD_BLEND_KEYS["multiply"] == "mul "
    assert PSD_BLEND_KEYS["color-dodge"] == "div " and PSD_BLEND_KEYS["color-burn"] == "idiv"
    assert PSD_BLEND_KEYS["exclusion"] == "smud" and PSD_BLEND_KEYS["luminosity"] == "lum "
    for mode, key in PSD_BLEND_KEYS.items():
        if mode in PSD_APPROXIMATE_MODES:
            assert BLEND_MODE_FROM_PSD_KEY[key] != mode
        else:
            assert BLEND_MODE_FROM_PSD_KEY[key] == mode
            assert blend_mode_from_psd_key(key) == (mode, True)
    assert set(PSD_APPROXIMATE_MODES) == {"grain-extract", "grain-merge"}
    assert blend_mode_from_psd_key("dkCl") == ("darken", False)
    assert blend_mode_from_psd_key("????") == ("normal", False)


@pytest.mark.parametrize("mode", sorted(SEPARABLE))
def test_separable_mode_hand_computed(mode: str) -> None:
    cb = np.array([[p[0]] * 3 for p in PAIRS], np.float32)  # (6, 3): grey pixels
    cs = np.array([[p[1]] * 3 for p in PAIRS], np.float32)
    got = blend_function(mode)(cb, cs)
    want = np.repeat(np.array(SEPARABLE[mode], np.float32)[:, None], 3, axis=1)
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=mode)


@pytest.mark.parametrize("mode", sorted(NON_SEPARABLE))
def test_non_separable_mode_hand_computed(mode: str) -> None:
    got = blend_function(mode)(np.array([CB_RGB], np.float32), np.array([CS_RGB], np.float32))
    np.testing.assert_allclose(got[0], NON_SEPARABLE[mode], atol=1e-6, err_msg=mode)


def test_soft_light_uses_the_w3c_polynomial_for_dark_backdrops() -> None:
    # Cb = .125, Cs = 1: D(Cb) = ((16·.125 - 12)·.125 + 4)·.125 = .34375; the sqrt variant would give .35355.
    got = soft_light(np.float32([0.125]), np.float32([1.0]))
    assert got[0] == pytest.approx(0.34375, abs=1e-7)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(InputError, match="unknown blend mode 'glow'"):
        blend_function("glow")


def test_source_over_partial_alpha_w3c() -> None:
    # Backdrop grey .5 at alpha .5, multiply source .25 at alpha .5: B = .125, Cs' = .5·.25 + .5·.125 = .1875,
    # ao = .75, co = .5·.1875 + .5·.5·.5 = .21875 -> Co = .291666...
    out = source_over(np.float32([0.5, 0.5, 0.5, 0.5]), np.float32([0.25, 0.25, 0.25, 0.5]), "multiply")
    np.testing.assert_allclose(out, [0.21875 / 0.75] * 3 + [0.75], atol=1e-6)
    # Over a transparent backdrop every mode is plain normal (ab = 0 -> Cs' = Cs).
    for mode in BLEND_MODES:
        out = source_over(np.float32([0.9, 0.1, 0.3, 0.0]), np.float32([0.2, 0.4, 0.6, 0.5]), mode)
        np.testing.assert_allclose(out, [0.2, 0.4, 0.6, 0.5], atol=1e-6, err_msg=mode)


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_composite_applies_each_mode_over_an_opaque_backdrop(mode: str) -> None:
    # One row of 6 px: opaque backdrop Cb, opaque source Cs -> the composite equals B(Cb, Cs) exactly.
    if mode in SEPARABLE:
        cb = np.array([[[p[0]] * 3 + [1.0] for p in PAIRS]], np.float32)
        cs = np.array([[[p[1]] * 3 + [1.0] for p in PAIRS]], np.float32)
        want = np.array(SEPARABLE[mode], np.float32)[:, None].repeat(3, 1)
    else:
        cb = np.array([[list(CB_RGB) + [1.0]]], np.float32)
        cs = np.array([[list(CS_RGB) + [1.0]]], np.float32)
        want = np.array([NON_SEPARABLE[mode]], np.float32)
    stack = LayerStack(cb.shape[1], 1, [Layer(cb), Layer(cs, blend_mode=mode)])
    out = composite(stack)
    np.testing.assert_allclose(out[0, :, :3], want, atol=2e-6, err_msg=mode)
    assert (out[..., 3] == 1).all()


def test_blend_outputs_stay_in_range_on_a_grid() -> None:
    v = np.linspace(0, 1, 18, dtype=np.float32)
    cb, cs = np.meshgrid(v, v)
    cb3, cs3 = np.stack([cb, np.roll(cb, 3), cs], -1), np.stack([cs, cb, np.roll(cs, 5)], -1)
    with np.errstate(all="raise"):
        for mode in BLEND_MODES:
            out = blend_function(mode)(cb3, cs3)
            assert out.shape == cb3.shape and np.isfinite(out).all(), mode
            assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6, mode
