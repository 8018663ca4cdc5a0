"""Channel decoding for the PSD reader: raw, RLE (banded, strict row table) and ZIP planes to float32.

Every decode names the layer and channel in its errors and warnings:
- an RLE row table whose counts exceed the data, or a raw / ZIP body too short for the rectangle, is a
  `PSDError` (the pixels would be garbage); a table that adds up to less than the data (trailing bytes) is
  decoded by the table with a warning;
- 32-bit float data is made finite: NaN becomes 0 and +-inf the nearest end of 0..1, with a warning, so no
  non-finite value can reach a composite or a file;
- before a layer is expanded to float32 its size is checked against the free RAM (`check_layers_fit`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from ...errors import PSDError
from ...resources import check_allocation

Warn = Callable[[str, str], None]  # (feature, message)

SCALE = {8: 255.0, 16: 65535.0, 32: 1.0}
DTYPE: dict[int, np.dtype] = {8: np.dtype(np.uint8), 16: np.dtype(">u2"), 32: np.dtype(">f4")}
CHANNEL_NAMES = {0: "red", 1: "green", 2: "blue", -1: "transparency", -2: "layer mask", -3: "real layer mask"}
_BAND_PIXELS = 1 << 16  # pixels per conversion band (stays in cache)
RGBA_BYTES = 16  # float32 RGBA per pixel


def channel_label(layer_name: str, cid: int) -> str:
    """'layer 'name' channel red' as used in messages."""
    return f"layer {layer_name!r} channel {CHANNEL_NAMES.get(cid, cid)}"


def rle_rows(data, version: int, h: int, where: str, warn: Warn) -> tuple[memoryview, np.ndarray]:
    """(compressed bytes, row start offsets (h + 1,)) of an RLE channel; PSDError when its row table is broken."""
    cw = 2 if version == 1 else 4
    buf = memoryview(data.data)  # slices of a memoryview are views: the compressed bytes are never copied
    if len(buf) < h * cw:
        raise PSDError(
            f"{where}: RLE data of {len(buf)} bytes cannot hold its {h}-row table of {cw}-byte counts; "
            f"the file is damaged, re-export it"
        )
    table = np.frombuffer(buf, ">u2" if cw == 2 else ">u4", h)
    starts = np.empty(h + 1, np.int64)
    starts[0] = h * cw
    np.cumsum(table, dtype=np.int64, out=starts[1:])
    starts[1:] += h * cw
    total, have = int(starts[-1]) - h * cw, len(buf) - h * cw
    if total > have:
        raise PSDError(
            f"{where}: the RLE row table counts {total} bytes but only {have} follow (truncated or "
            f"damaged); re-export the file"
        )
    if total < have:
        warn(
            "damaged data",
            f"{where}: the RLE row table counts {total} bytes but {have} follow; decoded by the "
            f"table, {have - total} trailing bytes ignored",
        )
    return buf, starts


def decode_rle_band(buf: memoryview, starts: np.ndarray, r0: int, r1: int, row_bytes: int) -> bytes:
    """Rows r0..r1 of an RLE channel decoded to raw bytes (psd-tools' C PackBits decoder)."""
    from psd_tools.compression import rle_impl

    return rle_impl.decode(buf[starts[r0] : starts[r1]], (r1 - r0) * row_bytes)


def decode_plane(data, depth: int, version: int, w: int, h: int, where: str, warn: Warn) -> np.ndarray:
    """One stored channel as a (h, w) array of its raw sample type (uint8, >u2 or >f4); PSDError when damaged."""
    from psd_tools.compression import decompress

    dtype = DTYPE[depth]
    need = w * h * dtype.itemsize
    comp = int(data.compression)
    if comp == 1:
        buf, starts = rle_rows(data, version, h, where, warn)
        raw: bytes | memoryview = decode_rle_band(buf, starts, 0, h, w * dtype.itemsize)
    elif comp == 0:
        raw = memoryview(data.data)
        if len(raw) < need:
            raise PSDError(
                f"{where}: raw data is {len(raw)} bytes, {w}x{h} px need {need}; the file is truncated "
                f"or damaged, re-export it"
            )
        if len(raw) > need:
            warn("damaged data", f"{where}: raw data has {len(raw) - need} bytes more than {w}x{h} px need; ignored")
    elif comp in (2, 3):
        try:
            raw = decompress(bytes(data.data), data.compression, w, h, depth, version)
        except (ValueError, OSError, EOFError) as err:
            raise PSDError(
                f"{where}: ZIP data cannot be decompressed ({type(err).__name__}); re-export the file"
            ) from err
        if len(raw) < need:
            raise PSDError(
                f"{where}: ZIP data inflates to {len(raw)} bytes, {w}x{h} px need {need}; re-export the file"
            )
    else:
        raise PSDError(f"{where}: compression {comp} is unknown (0 raw, 1 RLE, 2-3 ZIP)")
    return np.frombuffer(raw, dtype, w * h).reshape(h, w)


def make_finite(px: np.ndarray, where: str, warn: Warn) -> np.ndarray:
    """NaN -> 0, +inf -> 1, -inf -> 0 in place (float data only), with one warning naming `where` and the count."""
    bad = ~np.isfinite(px)
    n = int(np.count_nonzero(bad))
    if n:
        np.nan_to_num(px, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
        warn("non-finite values", f"{where}: {n} NaN or infinite 32-bit values replaced (NaN -> 0, inf -> 1)")
    return px


def layer_rgba(layer, depth: int, version: int, name: str, warn: Warn) -> np.ndarray | None:
    """Straight RGBA float32 (h, w, 4) of a raster layer from its stored channels, or None when it has none.

    32-bit values come back as stored (linear light, possibly outside 0..1), but always finite.
    """
    w, h = layer.width, layer.height
    if w <= 0 or h <= 0:
        return None
    if depth not in DTYPE:
        raise PSDError(f"layer {name!r}: {depth}-bit channels are not supported (8, 16 or 32 bit)")
    stored = {
        info.id: data for info, data in zip(layer._record.channel_info, layer._channels) if info.id in (-1, 0, 1, 2)
    }
    if any(c not in stored for c in (0, 1, 2)):
        return None
    dtype = DTYPE[depth]
    row_bytes = w * dtype.itemsize
    # Per channel: (buffer, row offsets) for RLE decoded band by band, a whole decoded plane for raw or ZIP, or
    # None for a missing alpha. Decoding RLE a band at a time keeps every temporary small (reused heap memory,
    # in cache) instead of a fresh full-size plane per channel, which costs page faults.
    sources: list = []
    for key in (0, 1, 2, -1):
        if key not in stored:
            sources.append(None)
            continue
        where = channel_label(name, key)
        if int(stored[key].compression) == 1:
            sources.append(rle_rows(stored[key], version, h, where, warn))
        else:
            sources.append(decode_plane(stored[key], depth, version, w, h, where, warn))
    out = np.empty((h, w, 4), np.float32)
    scale = np.float32(1.0 / SCALE[depth])
    rows = max(1, _BAND_PIXELS // w)
    band = np.empty((rows, w, 4), dtype.newbyteorder("="))
    for r0 in range(0, h, rows):  # interleave in cache-sized bands, then one contiguous convert
        r1 = min(h, r0 + rows)
        b = band[: r1 - r0]
        for c, src in enumerate(sources):
            if src is None:
                b[..., c] = 1 if depth == 32 else int(SCALE[depth])
            elif isinstance(src, np.ndarray):
                b[..., c] = src[r0:r1]
            else:
                buf, starts = src
                raw = decode_rle_band(buf, starts, r0, r1, row_bytes)
                b[..., c] = np.frombuffer(raw, dtype, (r1 - r0) * w).reshape(r1 - r0, w)
        np.multiply(b, scale, out=out[r0:r1])
    if depth == 32:
        make_finite(out, f"layer {name!r}", warn)
    return out


def check_layers_fit(path: str | os.PathLike[str], sizes: list[tuple[str, int, int]], extra: int = 0) -> None:
    """ResourceError naming the largest layer, the total and the free RAM when the float32 layers do not fit.

    `sizes` is (layer name, width, height) per layer to expand; `extra` adds other bytes (a merged image).
    """
    need = sum(w * h for _, w, h in sizes) * RGBA_BYTES + extra
    if not sizes and not extra:
        return
    if sizes:
        name, w, h = max(sizes, key=lambda s: s[1] * s[2])
        what = f"{os.fspath(path)!r}: reading {len(sizes)} layer(s) as float32 RGBA (largest {name!r}, {w}x{h} px)"
    else:
        what = f"{os.fspath(path)!r}: reading the merged image as float32 RGBA"
    check_allocation(need, what, hint="free memory, or crop / downscale the document in the application that made it")
