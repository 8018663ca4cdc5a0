"""A small ICC v2 sRGB display profile, built from the published sRGB constants (no file, no colour library).

Embedded in 16-bit PSDs so readers do not assume linear data (robustness.md rule 10). Version 2.1 rather than
Pillow/LittleCMS's v4 profile, because v2 is the version every PSD reader and older Photoshop accept.
"""

from __future__ import annotations

import struct
from functools import lru_cache

import numpy as np

from .color import srgb_decode

# IEC 61966-2-1 primaries adapted to the ICC D50 connection space (Bradford), as in the ICC's own sRGB profiles.
_D50 = (0.9642, 1.0, 0.8249)
_PRIMARIES = {
    b"rXYZ": (0.4360747, 0.2225045, 0.0139322),
    b"gXYZ": (0.3850649, 0.7168786, 0.0971045),
    b"bXYZ": (0.1430804, 0.0606169, 0.7141733),
}
_CURVE_POINTS = 1024


def _s15f16(values: tuple[float, ...]) -> bytes:
    """ICC s15Fixed16Number values, big-endian."""
    return b"".join(struct.pack(">i", int(round(v * 65536))) for v in values)


def _srgb_curve() -> np.ndarray:
    """The sRGB decoding curve (electro-optical transfer) sampled at 1024 points as uint16."""
    return np.round(srgb_decode(np.linspace(0.0, 1.0, _CURVE_POINTS)) * 65535).astype(">u2")


@lru_cache(maxsize=1)
def srgb_profile() -> bytes:
    """Bytes of an ICC v2.1 RGB display profile for sRGB (matrix/TRC, D50 PCS, about 2.6 KB)."""
    text = b"sRGB IEC61966-2.1 (qil_core)"
    desc = (
        b"desc\x00\x00\x00\x00"
        + struct.pack(">I", len(text) + 1)
        + text
        + b"\x00"
        + struct.pack(">II", 0, 0)
        + struct.pack(">HB", 0, 0)
        + b"\x00" * 67
    )
    tags: list[tuple[bytes, bytes]] = [
        (b"desc", desc),
        (b"cprt", b"text\x00\x00\x00\x00" + b"No copyright, use freely\x00"),
        (b"wtpt", b"XYZ \x00\x00\x00\x00" + _s15f16(_D50)),
        *((sig, b"XYZ \x00\x00\x00\x00" + _s15f16(xyz)) for sig, xyz in _PRIMARIES.items()),
    ]
    curve = b"curv\x00\x00\x00\x00" + struct.pack(">I", _CURVE_POINTS) + _srgb_curve().tobytes()
    table_end = 128 + 4 + 12 * (len(tags) + 3)
    body = b""
    entries = []
    offset = table_end
    for sig, data in tags:
        entries.append(struct.pack(">4sII", sig, offset, len(data)))
        padded = data + b"\x00" * (-len(data) % 4)
        body += padded
        offset += len(padded)
    for sig in (b"rTRC", b"gTRC", b"bTRC"):  # the three curves share one tag body
        entries.append(struct.pack(">4sII", sig, offset, len(curve)))
    body += curve + b"\x00" * (-len(curve) % 4)
    size = table_end + len(body)
    header = (
        struct.pack(">I", size)
        + b"\x00" * 4
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + struct.pack(">6H", 2024, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"\x00" * 24
        + struct.pack(">I", 0)
        + _s15f16(_D50)
        + b"\x00" * 4
        + b"\x00" * 16
        + b"\x00" * 28
    )
    return header + struct.pack(">I", len(entries)) + b"".join(entries) + body
