"""Layer Recolor: hue, saturation, lightness, brightness, contrast, tint, colour replacement and invert.

Only RGB changes: alpha is copied bit for bit, and fully transparent pixels get RGB 0 (so exports stay small).
Steps run in a fixed order, each on straight gamma-encoded sRGB values in 0..1, clipped after every step:
invert -> replace colour -> hue / saturation (HSL) -> lightness -> brightness -> contrast -> tint.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from ..checks import check_number
from ..errors import InputError
from .blend import lum, set_lum
from .stack import Layer

ColorLike = str | Sequence[float]

# CSS basic colour keywords (CSS Color 3 section 4.1) plus a few common extras; lower-case lookup.
_NAMED = {
    "black": "#000000",
    "silver": "#c0c0c0",
    "gray": "#808080",
    "grey": "#808080",
    "white": "#ffffff",
    "maroon": "#800000",
    "red": "#ff0000",
    "purple": "#800080",
    "fuchsia": "#ff00ff",
    "magenta": "#ff00ff",
    "green": "#008000",
    "lime": "#00ff00",
    "olive": "#808000",
    "yellow": "#ffff00",
    "navy": "#000080",
    "blue": "#0000ff",
    "teal": "#008080",
    "aqua": "#00ffff",
    "cyan": "#00ffff",
    "orange": "#ffa500",
    "pink": "#ffc0cb",
    "brown": "#a52a2a",
    "gold": "#ffd700",
    "indigo": "#4b0082",
    "violet": "#ee82ee",
}
_HEX = re.compile(r"#?([0-9a-fA-F]{3}|[0-9a-fA-F]{6})")
_FUNC = re.compile(r"rgba?\((.*)\)", re.IGNORECASE)


def _from_numbers(values: Sequence[float], raw: object) -> tuple[float, float, float]:
    if len(values) not in (3, 4):
        raise InputError(f"colour {raw!r}: expected 3 (RGB) or 4 (RGBA) numbers, got {len(values)}")
    try:
        nums = [float(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"colour {raw!r}: components must be numbers") from None
    if not all(math.isfinite(v) for v in nums):
        raise InputError(f"colour {raw!r}: components must be finite numbers")
    rgb = nums[:3]
    if len(nums) == 4 and not 0 <= nums[3] <= 1:
        raise InputError(f"colour {raw!r}: alpha must be in 0..1, got {nums[3]:g}")
    if any(v < 0 for v in rgb):
        raise InputError(f"colour {raw!r}: components must not be negative")
    if all(v <= 1 for v in rgb):
        return rgb[0], rgb[1], rgb[2]
    if all(v <= 255 for v in rgb):
        return rgb[0] / 255, rgb[1] / 255, rgb[2] / 255
    raise InputError(f"colour {raw!r}: components must be in 0..1 or 0..255")


def parse_color(value: ColorLike) -> tuple[float, float, float]:
    """Parse '#RGB', '#RRGGBB', a CSS name, 'rgb(r, g, b)', 'r,g,b' or a 3/4-tuple into RGB floats in 0..1.

    Tuples whose RGB values are all <= 1 are read as 0..1, otherwise as 0..255. A 4th (alpha) value must be in
    0..1 and is ignored: recolouring never changes alpha.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise InputError("colour is empty; use '#RRGGBB', '#RGB', a name like 'red' or 'r,g,b'")
        if text.lower() in _NAMED:
            text = _NAMED[text.lower()]
        m = _HEX.fullmatch(text)
        if m and (text.startswith("#") or len(text) == 6):
            digits = m.group(1)
            if len(digits) == 3:
                digits = "".join(ch * 2 for ch in digits)
            return tuple(int(digits[i : i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]
        f = _FUNC.fullmatch(text)
        body = f.group(1) if f else text
        if "," in body:
            parts = [p.strip() for p in body.split(",")]
            try:
                return _from_numbers([float(p) for p in parts], value)
            except ValueError:
                pass
        raise InputError(
            f"colour {value!r} is not understood; use '#RRGGBB', '#RGB', a CSS name like 'red', "
            "'rgb(255, 0, 0)' or 'r,g,b'"
        )
    if isinstance(value, (tuple, list, np.ndarray)):
        return _from_numbers(list(np.asarray(value, dtype=object).reshape(-1)), value)
    raise InputError(f"colour must be a string or a tuple of numbers, got {type(value).__name__}")


def rgb_to_hsl(rgb: np.ndarray) -> np.ndarray:
    """RGB (..., 3) in 0..1 -> HSL (..., 3) with hue in 0..1."""
    mx, mn = rgb.max(-1), rgb.min(-1)
    light = (mx + mn) / 2
    delta = mx - mn
    den = 1 - np.abs(2 * light - 1)
    s = np.divide(delta, den, out=np.zeros_like(delta), where=(delta > 0) & (den > 0))
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(delta > 0, delta, 1)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = np.where(delta > 0, h / 6, 0)
    return np.stack([h, np.clip(s, 0, 1), light], -1)


def hsl_to_rgb(hsl: np.ndarray) -> np.ndarray:
    """HSL (..., 3) with hue in 0..1 -> RGB (..., 3) in 0..1."""
    h, s, light = hsl[..., 0], hsl[..., 1], hsl[..., 2]
    c = (1 - np.abs(2 * light - 1)) * s
    hp = (h % 1) * 6
    x = c * (1 - np.abs(hp % 2 - 1))
    zero = np.zeros_like(h)
    sector = np.minimum(hp.astype(np.int64), 5)
    r = np.choose(sector, [c, x, zero, zero, x, c])
    g = np.choose(sector, [x, c, c, x, zero, zero])
    b = np.choose(sector, [zero, zero, x, c, c, x])
    m = light - c / 2
    return np.stack([r + m, g + m, b + m], -1)


def recolor_layer(
    layer: Layer,
    *,
    hue_shift: float = 0,
    saturation: float = 0,
    lightness: float = 0,
    brightness: float = 0,
    contrast: float = 0,
    tint: ColorLike | None = None,
    tint_strength: float = 0,
    replace_color: ColorLike | None = None,
    replace_with: ColorLike | None = None,
    tolerance: float = 0.1,
    invert: bool = False,
) -> Layer:
    """Recolour one layer's RGB; alpha stays bit-identical and fully transparent pixels get RGB 0.

    hue_shift: degrees around the HSL wheel. saturation: -1 (grey) .. 1 (double), relative. lightness: -1
    (black) .. 1 (white), a mix towards black/white. brightness: -1..1 added to every channel. contrast:
    -1 (flat grey) .. 1 (threshold) about mid grey (GIMP's slope tan((c + 1)·π/4)). tint: a colour whose hue
    and saturation replace the pixel's at tint_strength 0..1, keeping its luminosity. replace_color ->
    replace_with: pixels within `tolerance` (0..1, RGB distance / √3) move by the colour difference, fully
    up to half the tolerance and fading out to it, so shading and anti-aliased edges survive.
    """
    hue_shift = check_number("hue_shift", hue_shift, None, None, loose=True)
    saturation = check_number("saturation", saturation, -1, 1, loose=True)
    lightness = check_number("lightness", lightness, -1, 1, loose=True)
    brightness = check_number("brightness", brightness, -1, 1, loose=True)
    contrast = check_number("contrast", contrast, -1, 1, loose=True)
    tint_strength = check_number("tint_strength", tint_strength, 0, 1, loose=True)
    tolerance = check_number("tolerance", tolerance, 0, 1, loose=True)
    tint_rgb = parse_color(tint) if tint is not None else None
    if (replace_color is None) != (replace_with is None):
        raise InputError("replace_color and replace_with must be given together (the colour to find and its new value)")
    src = parse_color(replace_color) if replace_color is not None else None
    dst = parse_color(replace_with) if replace_with is not None else None

    px = layer.pixels
    rgb = px[..., :3].astype(np.float32, copy=True)  # (h, w, 3) straight
    if invert:
        rgb = 1 - rgb
    if src is not None and dst is not None:
        dist = np.sqrt(((rgb - np.asarray(src, np.float32)) ** 2).sum(-1)) / np.float32(math.sqrt(3))
        if tolerance > 0:
            weight = np.clip((tolerance - dist) / (tolerance / 2), 0, 1)
        else:
            weight = (dist <= 1e-6).astype(np.float32)
        rgb = np.clip(rgb + weight[..., None] * (np.asarray(dst, np.float32) - np.asarray(src, np.float32)), 0, 1)
    turn = (float(hue_shift) % 360.0) / 360.0  # reduced first: 1e9 degrees must not eat float32's precision
    if turn or saturation:
        hsl = rgb_to_hsl(rgb)
        hsl[..., 0] = (hsl[..., 0] + np.float32(turn)) % np.float32(1.0)
        hsl[..., 1] = np.clip(hsl[..., 1] * (1 + saturation), 0, 1)
        rgb = np.clip(hsl_to_rgb(hsl), 0, 1)
    if lightness > 0:
        rgb = rgb + (1 - rgb) * lightness
    elif lightness < 0:
        rgb = rgb * (1 + lightness)
    if brightness:
        rgb = np.clip(rgb + brightness, 0, 1)
    if contrast:
        slope = math.tan((contrast + 1) * math.pi / 4)
        rgb = np.clip((rgb - 0.5) * slope + 0.5, 0, 1)
    if tint_rgb is not None and tint_strength > 0:
        target = np.broadcast_to(np.asarray(tint_rgb, np.float32), rgb.shape)
        tinted = set_lum(target, lum(rgb))  # the tint's hue and saturation at the pixel's luminosity
        rgb = rgb + (tinted - rgb) * np.float32(tint_strength)
    out = np.empty_like(px)
    out[..., :3] = np.clip(rgb, 0, 1)
    out[..., 3] = px[..., 3]  # bit-identical alpha
    out[..., :3][px[..., 3] == 0] = 0
    return layer.replace(pixels=out)
