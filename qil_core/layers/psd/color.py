"""Colour of a PSD's pixels on read: 32-bit linear data and non-sRGB RGB profiles become sRGB.

- 32-bit documents store linear light (Photoshop shows them through the sRGB curve): the values are encoded
  with the sRGB transfer function, after a primaries conversion when the embedded profile is an RGB
  matrix/TRC profile other than sRGB (its tone curves do not apply to 32-bit data).
- 8/16-bit RGB documents with an embedded matrix/TRC profile other than sRGB (Adobe RGB, Display P3, ProPhoto,
  linear RGB...) are decoded through the profile's curves, converted to sRGB primaries through the D50
  connection space, and re-encoded; out-of-gamut colours are clipped. A profile that is not matrix/TRC (a
  LUT profile) cannot be converted this way: it is named in a warning and the values are kept.
Grayscale, CMYK, Lab, Indexed, Bitmap and Duotone documents are converted by psd-tools as before.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Warn = Callable[[str, str], None]

# sRGB primaries in the D50 connection space (Bradford-adapted), as every sRGB ICC profile stores them.
_SRGB_D50 = np.array(
    [[0.4360747, 0.3850649, 0.1430804], [0.2225045, 0.7168786, 0.0606169], [0.0139322, 0.0971045, 0.7141733]]
)


def srgb_encode(lin: np.ndarray) -> np.ndarray:
    """Linear light (clipped to 0..1) -> sRGB-encoded values, in place when float32."""
    np.clip(lin, 0.0, 1.0, out=lin)
    return np.where(lin <= 0.0031308, lin * 12.92, 1.055 * np.power(lin, 1 / 2.4) - 0.055).astype(np.float32)


def srgb_decode(v: np.ndarray) -> np.ndarray:
    """sRGB-encoded values -> linear light."""
    return np.where(v <= 0.04045, v / 12.92, np.power((v + 0.055) / 1.055, 2.4))


@dataclass
class _Profile:
    name: str
    space: bytes
    matrix: np.ndarray | None  # columns = rXYZ, gXYZ, bXYZ (D50)
    curves: list[Callable[[np.ndarray], np.ndarray]] | None


def _text(data: bytes, offset: int, size: int) -> str:
    """A 'desc' (v2) or 'mluc' (v4) tag's first string."""
    kind = data[offset : offset + 4]
    try:
        if kind == b"desc":
            (n,) = struct.unpack(">I", data[offset + 8 : offset + 12])
            return data[offset + 12 : offset + 12 + n].split(b"\x00")[0].decode("latin-1").strip()
        if kind == b"mluc":
            count, _rec = struct.unpack(">II", data[offset + 8 : offset + 16])
            if count:
                length, start = struct.unpack(">II", data[offset + 20 : offset + 28])
                return data[offset + start : offset + start + length].decode("utf-16-be").strip("\x00 ")
    except (struct.error, UnicodeDecodeError):
        pass
    return ""


def _curve(data: bytes, offset: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """A 'curv' or 'para' tag as a decoding function (encoded value -> linear), or None when unreadable."""
    kind = data[offset : offset + 4]
    if kind == b"curv":
        (n,) = struct.unpack(">I", data[offset + 8 : offset + 12])
        if n == 0:
            return lambda v: v
        if n == 1:
            gamma = struct.unpack(">H", data[offset + 12 : offset + 14])[0] / 256.0
            return lambda v: np.power(np.clip(v, 0, None), gamma)
        table = np.frombuffer(data, ">u2", n, offset + 12).astype(np.float64) / 65535.0
        grid = np.linspace(0.0, 1.0, n)
        return lambda v: np.interp(v, grid, table)
    if kind == b"para":
        (fn,) = struct.unpack(">H", data[offset + 8 : offset + 10])
        count = {0: 1, 1: 3, 2: 4, 3: 5, 4: 7}.get(fn)
        if count is None:
            return None
        p = [x / 65536.0 for x in struct.unpack(f">{count}i", data[offset + 12 : offset + 12 + 4 * count])]
        g, a, b, c, d, e, f = (p + [0.0] * 7)[:7] if count > 1 else (p[0], 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        if fn == 1:
            return lambda v: np.where(v >= -b / a, np.power(np.clip(a * v + b, 0, None), g), 0.0)
        if fn == 2:
            return lambda v: np.where(v >= -b / a, np.power(np.clip(a * v + b, 0, None), g) + c, c)
        if fn == 4:
            return lambda v: np.where(v >= d, np.power(np.clip(a * v + b, 0, None), g) + e, c * v + f)
        if fn == 3:
            return lambda v: np.where(v >= d, np.power(np.clip(a * v + b, 0, None), g), c * v)
        return lambda v: np.power(np.clip(v, 0, None), g)
    return None


def parse_profile(data: bytes) -> _Profile | None:
    """The parts of an ICC profile we use (name, colour space, matrix/TRC), or None when it is not a profile."""
    if len(data) < 132 or data[36:40] != b"acsp":
        return None
    space = data[16:20]
    (count,) = struct.unpack(">I", data[128:132])
    tags: dict[bytes, int] = {}
    for i in range(min(count, 200)):
        at = 132 + 12 * i
        if at + 12 > len(data):
            break
        sig, off, size = struct.unpack(">4sII", data[at : at + 12])
        if off + min(size, 12) <= len(data):
            tags[sig] = off
    name = _text(data, tags[b"desc"], 0) if b"desc" in tags else ""
    matrix = curves = None
    if all(k in tags for k in (b"rXYZ", b"gXYZ", b"bXYZ", b"rTRC", b"gTRC", b"bTRC")):
        cols = [
            np.array(struct.unpack(">3i", data[tags[k] + 8 : tags[k] + 20])) / 65536.0
            for k in (b"rXYZ", b"gXYZ", b"bXYZ")
        ]
        matrix = np.stack(cols, axis=1)
        got = [_curve(data, tags[k]) for k in (b"rTRC", b"gTRC", b"bTRC")]
        curves = None if any(c is None for c in got) else [c for c in got if c is not None]
    return _Profile(name or "unnamed profile", space, matrix, curves)


def _is_srgb(p: _Profile) -> bool:
    if p.matrix is None or p.curves is None:
        return "srgb" in p.name.lower()
    if np.abs(p.matrix - _SRGB_D50).max() > 2e-3:
        return False
    x = np.linspace(0, 1, 33)
    return all(float(np.abs(c(x) - srgb_decode(x)).max()) < 2e-3 for c in p.curves)


class ColorConverter:
    """Turns one document's stored RGB values into sRGB-encoded values (identity when nothing is needed)."""

    def __init__(self, depth: int, rgb: bool, icc: bytes | None, warn: Warn) -> None:
        self.linear = depth == 32
        self.matrix: np.ndarray | None = None
        self.curves: list | None = None
        self.active = self.linear
        profile = parse_profile(icc) if icc else None
        if icc and profile is None and rgb:
            warn("colour profile", "the embedded ICC profile cannot be read; colours are taken as sRGB")
        if profile is None or not rgb or profile.space != b"RGB " or _is_srgb(profile):
            return
        if profile.matrix is None or (profile.curves is None and not self.linear):
            warn(
                "colour profile",
                f"the embedded profile {profile.name!r} is not a matrix/TRC RGB profile and "
                f"cannot be converted to sRGB here; colours are taken as sRGB and will look different",
            )
            return
        self.matrix = np.linalg.solve(_SRGB_D50, profile.matrix).astype(np.float32)  # profile RGB -> sRGB, linear
        self.curves = profile.curves
        self.active = True
        self.name = profile.name

    def apply(self, px: np.ndarray) -> np.ndarray:
        """Convert the RGB of straight RGBA float32 (h, w, 4) in place, in row bands; alpha is clipped to 0..1."""
        if not self.active or px.size == 0:
            return px
        rows = max(1, (1 << 16) // px.shape[1])
        for r0 in range(0, px.shape[0], rows):
            band = px[r0 : r0 + rows]
            rgb = band[..., :3]
            if self.linear:
                lin = rgb.astype(np.float32, copy=True)
            else:
                lin = np.stack([c(rgb[..., i]) for i, c in enumerate(self.curves or [])], -1).astype(np.float32)
            if self.matrix is not None:
                lin = lin @ self.matrix.T
            rgb[...] = srgb_encode(lin)
            np.clip(band[..., 3], 0, 1, out=band[..., 3])
        return px
