"""The 26 blend modes as Photoshop applies them to 8-bit sRGB documents, and their PSD blend keys.

Colours are gamma-encoded sRGB values in 0..1 (what the file stores), never linear light: Photoshop, GIMP's
"perceptual" blending, psd-tools and the W3C compositing spec all blend the encoded values for 8-bit RGB.
Every function `B(Cb, Cs)` takes the straight (not premultiplied) backdrop and source colours, arrays of
shape (..., 3) float32, and returns the blended colour; `source_over` then mixes it with alpha the way the
W3C "Compositing and Blending Level 1" spec does (section 5.8 / 9.1): Cs' = (1 - ab)·Cs + ab·B(Cb, Cs).

Separable modes follow the PDF 1.7 / W3C formulas; hue, saturation, color and luminosity use the
non-separable PDF helpers Lum / SetLum / ClipColor / Sat / SetSat (Lum weights 0.30, 0.59, 0.11).

Choices where readers disagree (documented so nobody re-derives them):
- soft-light: the W3C/PDF formula (Adobe's own spec), with D(Cb) = ((16Cb - 12)Cb + 4)Cb for Cb <= 0.25
  and sqrt(Cb) above. psd-tools 1.26 uses the same formula. The "Photoshop" formula quoted on Wikipedia
  uses sqrt(Cb) everywhere: it differs only where Cs > 0.5 and Cb <= 0.25 (by at most 0.09 at Cs = 1,
  Cb ~ 0.07). GIMP 2.10 renders 'sLit' with its own Pegtop-style formula (1 - 2Cs)Cb² + 2CsCb, which
  differs more widely, so a soft-light layer looks different in GIMP than here, in psd-tools or Photoshop.
- vivid-light: the source extremes win (Cs = 0 gives 0, Cs = 1 gives 1 whatever Cb), unlike the
  backdrop special cases of plain color-burn / color-dodge (as psd-tools pins against Photoshop).
- hard-mix: 1 where Cb + Cs > 1; on the tie Cb + Cs == 1 (within 1e-6), 1 only where Cb > 0.5.
- divide: Cb / Cs clipped to 1; Cs == 0 gives 1 where Cb > 0 and 0 where Cb == 0 (as psd-tools).
- grain-extract (Cb - Cs + 0.5) and grain-merge (Cb + Cs - 0.5) are GIMP modes with no Photoshop key:
  our compositor renders them the GIMP way; in a PSD they are written as the nearest Photoshop mode,
  grain-merge as 'lLit' (linear light: Cb + 2(Cs - 0.5), same direction, exact on mid grey) and
  grain-extract as 'fsub' (subtract: Cb - Cs, same direction, 0.5 darker). `PSD_APPROXIMATE_MODES` lists
  them so the PSD writer can warn; a PSD read back gives linear-light / subtract.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InputError
from .stack import BLEND_MODES

BlendFunc = Callable[[np.ndarray, np.ndarray], np.ndarray]

# -- separable modes ----------------------------------------------------------------------------------------


def normal(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """B = Cs."""
    return cs


def multiply(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """B = Cb·Cs."""
    return cb * cs


def screen(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """B = Cb + Cs - Cb·Cs."""
    return cb + cs - cb * cs


def hard_light(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """Multiply by 2Cs where Cs <= 0.5, else screen with 2Cs - 1."""
    return np.where(cs <= 0.5, cb * (2 * cs), screen(cb, 2 * cs - 1))


def overlay(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """Hard light with the operands swapped (keyed on the backdrop)."""
    return hard_light(cs, cb)


def darken(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """B = min(Cb, Cs)."""
    return np.minimum(cb, cs)


def lighten(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """B = max(Cb, Cs)."""
    return np.maximum(cb, cs)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with den == 0 giving +inf for num > 0 and 0 for num == 0 (no warnings)."""
    out = np.full(np.broadcast(num, den).shape, np.inf, np.float32)
    np.divide(num, den, out=out, where=den != 0)
    return np.where((den == 0) & (num == 0), np.float32(0), out)


def color_dodge(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """0 where Cb == 0, 1 where Cs == 1, else min(1, Cb / (1 - Cs))."""
    out = np.minimum(1, _safe_div(cb, 1 - cs))
    out = np.where(cs >= 1, np.float32(1), out)
    return np.where(cb <= 0, np.float32(0), out).astype(np.float32)


def color_burn(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """1 where Cb == 1, 0 where Cs == 0, else 1 - min(1, (1 - Cb) / Cs)."""
    out = 1 - np.minimum(1, _safe_div(1 - cb, cs))
    out = np.where(cs <= 0, np.float32(0), out)
    return np.where(cb >= 1, np.float32(1), out).astype(np.float32)


def soft_light(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """W3C/PDF soft light (see the module docstring for how readers differ)."""
    d = np.where(cb <= 0.25, ((16 * cb - 12) * cb + 4) * cb, np.sqrt(np.maximum(cb, 0)))
    low = cb - (1 - 2 * cs) * cb * (1 - cb)
    high = cb + (2 * cs - 1) * (d - cb)
    return np.where(cs <= 0.5, low, high)


def difference(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """B = |Cb - Cs|."""
    return np.abs(cb - cs)


def exclusion(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """B = Cb + Cs - 2·Cb·Cs."""
    return cb + cs - 2 * cb * cs


def linear_dodge(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """B = min(1, Cb + Cs) (Photoshop's "Linear Dodge (Add)")."""
    return np.minimum(1, cb + cs)


def linear_burn(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """B = max(0, Cb + Cs - 1)."""
    return np.maximum(0, cb + cs - 1)


def vivid_light(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """Burn with 2Cs where Cs <= 0.5, dodge with 2(Cs - 0.5) above; the source extremes win."""
    burn = 1 - np.minimum(1, _safe_div(1 - cb, 2 * cs))
    dodge = np.minimum(1, _safe_div(cb, 2 * (1 - cs)))
    out = np.where(cs <= 0.5, burn, dodge)
    out = np.where(cs <= 0, np.float32(0), out)
    return np.where(cs >= 1, np.float32(1), out).astype(np.float32)


def linear_light(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """B = clip(Cb + 2Cs - 1)."""
    return np.clip(cb + 2 * cs - 1, 0, 1)


def pin_light(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """min(Cb, 2Cs) where Cs <= 0.5, else max(Cb, 2Cs - 1)."""
    return np.where(cs <= 0.5, np.minimum(cb, 2 * cs), np.maximum(cb, 2 * cs - 1))


def hard_mix(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """1 where Cb + Cs > 1 (ties: where Cb > 0.5), else 0."""
    total = cb + cs
    tie = np.abs(total - 1) <= 1e-6
    return np.where((total > 1 + 1e-6) | (tie & (cb > 0.5)), np.float32(1), np.float32(0))


def subtract(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """B = max(0, Cb - Cs)."""
    return np.maximum(0, cb - cs)


def divide(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """B = min(1, Cb / Cs); Cs == 0 gives 1 where Cb > 0 and 0 where Cb == 0."""
    return np.minimum(1, _safe_div(cb, cs)).astype(np.float32)


def grain_extract(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """GIMP grain extract: B = clip(Cb - Cs + 0.5)."""
    return np.clip(cb - cs + 0.5, 0, 1)


def grain_merge(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """GIMP grain merge: B = clip(Cb + Cs - 0.5)."""
    return np.clip(cb + cs - 0.5, 0, 1)


# -- non-separable helpers (PDF 1.7, section 11.3.5.3) ---------------------------------------------------------


def lum(c: np.ndarray) -> np.ndarray:
    """Lum(C) = 0.3R + 0.59G + 0.11B, shape (..., 1)."""
    return 0.3 * c[..., 0:1] + 0.59 * c[..., 1:2] + 0.11 * c[..., 2:3]


def clip_color(c: np.ndarray) -> np.ndarray:
    """ClipColor: pull out-of-gamut colours towards their luminosity, keeping it."""
    l_ = lum(c)
    n = c.min(axis=-1, keepdims=True)
    x = c.max(axis=-1, keepdims=True)
    den = l_ - n
    low = l_ + (c - l_) * l_ / np.where(den > 0, den, 1)
    c = np.where(n < 0, low, c)
    den = x - l_
    high = l_ + (c - l_) * (1 - l_) / np.where(den > 0, den, 1)
    c = np.where(x > 1, high, c)
    return np.clip(c, 0, 1)


def set_lum(c: np.ndarray, target: np.ndarray) -> np.ndarray:
    """SetLum(C, L): shift C to luminosity L, then ClipColor."""
    return clip_color(c + (target - lum(c)))


def sat(c: np.ndarray) -> np.ndarray:
    """Sat(C) = max - min, shape (..., 1)."""
    return c.max(axis=-1, keepdims=True) - c.min(axis=-1, keepdims=True)


def set_sat(c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """SetSat(C, s): max -> s, min -> 0, mid scaled between (all 0 for a grey C)."""
    cmin = c.min(axis=-1, keepdims=True)
    rng = c.max(axis=-1, keepdims=True) - cmin
    # (C - Cmin)·s/(Cmax - Cmin) maps max to s, min to 0 and the middle channel as the PDF formula does.
    return np.where(rng > 0, (c - cmin) * s / np.where(rng > 0, rng, 1), np.float32(0))


def hue(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """Hue of the source, saturation and luminosity of the backdrop."""
    return set_lum(set_sat(cs, sat(cb)), lum(cb))


def saturation(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """Saturation of the source, hue and luminosity of the backdrop."""
    return set_lum(set_sat(cb, sat(cs)), lum(cb))


def color(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """Hue and saturation of the source, luminosity of the backdrop."""
    return set_lum(cs, lum(cb))


def luminosity(cb: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """Luminosity of the source, hue and saturation of the backdrop."""
    return set_lum(cb, lum(cs))


# -- tables -----------------------------------------------------------------------------------------------------

BLEND_FUNCS: dict[str, BlendFunc] = {
    "normal": normal,
    "multiply": multiply,
    "screen": screen,
    "overlay": overlay,
    "darken": darken,
    "lighten": lighten,
    "color-dodge": color_dodge,
    "color-burn": color_burn,
    "hard-light": hard_light,
    "soft-light": soft_light,
    "difference": difference,
    "exclusion": exclusion,
    "linear-dodge": linear_dodge,
    "linear-burn": linear_burn,
    "vivid-light": vivid_light,
    "pin-light": pin_light,
    "linear-light": linear_light,
    "hard-mix": hard_mix,
    "subtract": subtract,
    "divide": divide,
    "grain-extract": grain_extract,
    "grain-merge": grain_merge,
    "hue": hue,
    "saturation": saturation,
    "color": color,
    "luminosity": luminosity,
}

# Core blend-mode name -> 4-byte PSD blend key (Photoshop's "Blend mode key", PSD spec layer record).
PSD_BLEND_KEYS: dict[str, str] = {
    "normal": "norm",
    "multiply": "mul ",
    "screen": "scrn",
    "overlay": "over",
    "darken": "dark",
    "lighten": "lite",
    "color-dodge": "div ",
    "color-burn": "idiv",
    "hard-light": "hLit",
    "soft-light": "sLit",
    "difference": "diff",
    "exclusion": "smud",
    "linear-dodge": "lddg",
    "linear-burn": "lbrn",
    "vivid-light": "vLit",
    "pin-light": "pLit",
    "linear-light": "lLit",
    "hard-mix": "hMix",
    "subtract": "fsub",
    "divide": "fdiv",
    "grain-extract": "fsub",
    "grain-merge": "lLit",
    "hue": "hue ",
    "saturation": "sat ",
    "color": "colr",
    "luminosity": "lum ",
}

# Modes whose PSD key only approximates them (the writer should warn once per file).
PSD_APPROXIMATE_MODES: dict[str, str] = {
    "grain-extract": "GIMP's grain extract has no Photoshop equivalent; written as 'fsub' (subtract), "
    "which renders 0.5 darker",
    "grain-merge": "GIMP's grain merge has no Photoshop equivalent; written as 'lLit' (linear light), "
    "which doubles the deviation of the layer from mid grey",
}

# PSD key -> core name, for the keys that stand for exactly one core mode.
BLEND_MODE_FROM_PSD_KEY: dict[str, str] = {
    key: mode for mode, key in PSD_BLEND_KEYS.items() if mode not in PSD_APPROXIMATE_MODES
}

# Photoshop keys with no core name, read as the nearest core mode (the PSD reader should warn).
PSD_KEY_FALLBACKS: dict[str, str] = {
    "pass": "normal",  # pass-through (groups only)
    "diss": "normal",  # dissolve (random dither of alpha)
    "dkCl": "darken",  # darker color (whole-pixel choice)
    "lgCl": "lighten",  # lighter color (whole-pixel choice)
}


def blend_function(mode: str) -> BlendFunc:
    """The `B(Cb, Cs)` function of a core blend-mode name."""
    try:
        return BLEND_FUNCS[mode]
    except KeyError:
        raise InputError(f"unknown blend mode {mode!r}; use one of {', '.join(BLEND_MODES)}") from None


def blend_mode_from_psd_key(key: str) -> tuple[str, bool]:
    """(core mode, exact) for a PSD blend key; unknown keys give ('normal', False)."""
    if key in BLEND_MODE_FROM_PSD_KEY:
        return BLEND_MODE_FROM_PSD_KEY[key], True
    return PSD_KEY_FALLBACKS.get(key, "normal"), False


def source_over(backdrop: np.ndarray, source: np.ndarray, mode: str = "normal", opacity: float = 1.0) -> np.ndarray:
    """Composite straight RGBA `source` (..., 4) over straight RGBA `backdrop` (..., 4) with a blend mode.

    Returns straight RGBA (..., 4) float32: W3C source-over with Cs' = (1 - ab)·Cs + ab·B(Cb, Cs).
    """
    bd = np.asarray(backdrop, np.float32)
    sc = np.asarray(source, np.float32)
    ab = bd[..., 3:4]
    as_ = sc[..., 3:4] * np.float32(opacity)
    cb, cs = bd[..., :3], sc[..., :3]
    mixed = cs if mode == "normal" else (1 - ab) * cs + ab * blend_function(mode)(cb, cs)
    ao = as_ + ab * (1 - as_)
    co = as_ * mixed + (1 - as_) * ab * cb  # premultiplied result
    rgb = np.where(ao > 0, co / np.where(ao > 0, ao, 1), np.float32(0))
    return np.concatenate([np.clip(rgb, 0, 1), ao], axis=-1).astype(np.float32)
