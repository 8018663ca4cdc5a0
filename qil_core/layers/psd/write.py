"""Fast PSD writer: an RGBA document with one cropped pixel layer per `Layer` and a real merged image.

Follows the rules of robustness.md section 2 (each number below is a rule there):
- RGB colour mode with 4 channels and a *negative* layer count, so the 4th merged channel is the composite's
  transparency, never a spare alpha channel (1, 2). The merged image is always written (3).
- Layer names as `luni` (UTF-16) plus a legacy Pascal name of at most 31 bytes (4). The Pascal name is plain
  ASCII (a subset of MacRoman): accents are dropped ("façade" -> "facade") and anything else becomes '?'.
  Only readers without `luni` show it (ImageMagick, OIIO, Pillow), and they decode those bytes as UTF-8 or
  Latin-1, not MacRoman, so MacRoman accents would come out as other characters there; ASCII reads the same
  everywhere.
- Channels -1, 0, 1, 2 in that order (6); each channel-info length is exactly 2 + its data (5).
- Layers are cropped to their alpha bounding box after quantisation; a fully transparent layer is kept as a
  legal 0x0 layer with compression-only channels, as Photoshop writes it, so layer indices never shift (7).
  Offsets may be negative or past the canvas (8). Canvases over 30,000 px per side are refused (9).
- 16-bit documents embed an sRGB ICC profile (10); blend keys come from blend.py, flat structure (11).
- Atomic through `fsutil.atomic_write`; an existing file is never replaced by default (12).
- Validation (13): NaN/inf pixels raise InputError; values outside 0..1 are clamped with one warning; names
  over 255 characters are truncated, control characters (NUL, newlines) become spaces, each with a warning;
  duplicate names are kept; empty names become "Layer N" (1-based from the bottom, Photoshop's default).
  A stack with no layers is refused (a PSD is written for its layers; save a flat image as PNG instead).

Speed: pixels are quantised in cache-sized row bands, layers are encoded on worker threads (numpy releases
the GIL) while the main thread streams finished layers to the file, and section/channel lengths are patched
in place afterwards, so memory stays at a few layers in flight. RGB under fully transparent pixels is zeroed
before encoding, which makes those rows collapse to repeat packets.
"""

from __future__ import annotations

import logging
import os
import struct
import unicodedata
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ...errors import InputError, PSDError
from ...fsutil import atomic_write
from ...resources import available_ram_bytes, check_allocation
from ..blend import PSD_APPROXIMATE_MODES, PSD_BLEND_KEYS
from ..stack import MAX_CANVAS_SIDE, Layer, LayerStack
from .icc import srgb_profile
from .packbits import encode_rows

log = logging.getLogger(__name__)

MAX_LAYERS = 8000  # Photoshop's own limit; the field is int16
MAX_NAME_CHARS = 255  # psd-tools' name setter raises at 256 (robustness.md rule 4)
PASCAL_NAME_BYTES = 31  # Photoshop keeps the legacy name to 31 bytes
COMPRESSIONS = {"raw": 0, "rle": 1}
_BAND_PIXELS = 1 << 16  # pixels per quantisation band: 1 MiB of float32 RGBA, stays in cache
_BLENDING_RANGES = b"\x00\x00\xff\xff" * 10  # composite + 4 channels, each source and destination 0..65535


@dataclass
class _Encoded:
    """One layer ready to write: its rectangle and the bytes of channels -1, 0, 1, 2."""

    top: int
    left: int
    bottom: int
    right: int
    channels: list[list[bytes | np.ndarray]]  # per channel: pieces (compression, row table, data)

    def lengths(self) -> list[int]:
        """Channel-info lengths: compression field + data, per channel."""
        return [sum(len(p) if isinstance(p, bytes) else p.nbytes for p in ch) for ch in self.channels]


def _clean_name(name: str, index: int, warn: Callable[[str], None]) -> str:
    """The layer name as written: control characters to spaces, at most 255 characters, a default if empty."""
    text = str(name)
    cleaned = "".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text)
    cleaned = cleaned.encode("utf-16-be", "replace").decode("utf-16-be")  # lone surrogates -> '?'
    if cleaned != text:
        warn(f"layer {index} name {text[:40]!r}: control characters (NUL, newline, ...) replaced by spaces")
    if len(cleaned) > MAX_NAME_CHARS:
        warn(f"layer {index} name is {len(cleaned)} characters; truncated to {MAX_NAME_CHARS} (Photoshop's limit)")
        cleaned = cleaned[:MAX_NAME_CHARS]
    return cleaned if cleaned else f"Layer {index + 1}"


def pascal_name(name: str) -> bytes:
    """The legacy layer name: ASCII with accents dropped, '?' for other characters, at most 31 bytes."""
    base = "".join(c for c in unicodedata.normalize("NFKD", name) if unicodedata.category(c) != "Mn")
    return unicodedata.normalize("NFC", base).encode("ascii", "replace")[:PASCAL_NAME_BYTES]


def _unicode_block(name: str) -> bytes:
    """The `luni` tagged block: UTF-16BE units with their count, data padded to a multiple of 4."""
    units = name.encode("utf-16-be")
    data = struct.pack(">I", len(units) // 2) + units
    data += b"\x00" * (-len(data) % 4)
    return b"8BIMluni" + struct.pack(">I", len(data)) + data


def _layer_record(
    rect: tuple[int, int, int, int], lengths: list[int], layer: Layer, name: str, blend_key: str, layer_id: int
) -> bytes:
    """One layer record: rectangle (top, left, bottom, right), channel table, blend, opacity, flags, extra data."""
    out = [struct.pack(">4iH", *rect, 4)]
    for cid, length in zip((-1, 0, 1, 2), lengths):
        out.append(struct.pack(">hI", cid, length))
    flags = 0x08 | (0 if layer.visible else 0x02)  # bit 3: Photoshop 5+; bit 1: hidden
    opacity = int(round(layer.opacity * 255))
    out.append(b"8BIM" + blend_key.encode("ascii") + struct.pack(">BBBB", opacity, 0, flags, 0))
    pas = pascal_name(name)
    pas_field = bytes([len(pas)]) + pas
    pas_field += b"\x00" * (-len(pas_field) % 4)
    extra = (
        struct.pack(">I", 0)  # no layer mask
        + struct.pack(">I", len(_BLENDING_RANGES))
        + _BLENDING_RANGES
        + pas_field
        + _unicode_block(name)
        + b"8BIMlyid"
        + struct.pack(">II", 4, layer_id)
    )
    extra += b"\x00" * (len(extra) % 2)
    out.append(struct.pack(">I", len(extra)) + extra)
    return b"".join(out)


def _quantize(
    px: np.ndarray,
    depth: int,
    what: str,
    warn: Callable[[str], None],
    *,
    matte: bool = False,
    pool: ThreadPoolExecutor | None = None,
) -> np.ndarray:
    """Float straight RGBA (h, w, 4) -> planar (4, h, w) uint8/uint16, rounded.

    Layers get RGB zeroed where alpha is 0. The merged image (`matte`) is stored the way Photoshop stores it
    and psd-tools/ImageMagick undo it: colour composited over white, c·a + (1 - a), with its alpha.
    With a `pool`, row chunks are converted on its threads.
    """
    h, w = px.shape[:2]
    planes = np.empty((4, h, w), np.uint8 if depth == 8 else np.uint16)
    if h == 0 or w == 0:
        return planes
    if pool is None or h < 64:
        clamped = _quantize_rows(px, planes, 0, h, depth, what, matte)
    else:
        step = -(-h // 16)  # 16 row chunks: enough to keep any small pool busy
        jobs = [
            pool.submit(_quantize_rows, px, planes, r, min(h, r + step), depth, what, matte) for r in range(0, h, step)
        ]
        clamped = any([j.result() for j in jobs])
    if clamped:
        warn(f"{what}: pixel values outside 0..1 were clamped")
    return planes


def _quantize_rows(
    px: np.ndarray, planes: np.ndarray, start: int, stop: int, depth: int, what: str, matte: bool
) -> bool:
    """Convert rows start..stop of `px` into `planes` in cache-sized bands; True when values were clamped."""
    w = px.shape[1]
    scale = np.float32(255 if depth == 8 else 65535)
    rows = max(1, _BAND_PIXELS // w)
    tmp = np.empty((rows, w, 4), np.float32)
    clamped = False
    for r0 in range(start, stop, rows):
        r1 = min(stop, r0 + rows)
        t = tmp[: r1 - r0]
        np.multiply(px[r0:r1], scale, out=t)
        lo, hi = float(t.min()), float(t.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise InputError(
                f"{what}: pixels contain NaN or infinity (rows {r0}..{r1 - 1}); "
                "fix the upstream image, e.g. np.nan_to_num, before saving"
            )
        if lo < 0 or hi > scale:
            np.clip(t, 0, scale, out=t)
            clamped = True
        if matte:  # per channel: 2-D strided loops, not a broadcast with an inner axis of length 3
            a = t[..., 3]
            gain = a * np.float32(1 / scale)
            offset = scale - a
            for c in range(3):
                tc = t[..., c]
                np.multiply(tc, gain, out=tc)
                np.add(tc, offset, out=tc)
        t += np.float32(0.5)
        band = planes[:, r0:r1]
        np.copyto(band.transpose(1, 2, 0), t, casting="unsafe")  # floor(x*scale + 0.5) per channel
        if not matte:
            band[:3] *= band[3] != 0  # zero RGB under fully transparent pixels
    return clamped


def _encode_planes(planes: np.ndarray, depth: int, compression: int) -> list[list[bytes | np.ndarray]]:
    """Planar RGBA (4, h, w) -> per channel in file order -1 (alpha), 0, 1, 2: [compression, row table, data]."""
    out: list[list[bytes | np.ndarray]] = []
    for plane in (planes[3], planes[0], planes[1], planes[2]):
        rows = plane if depth == 8 else plane.astype(">u2").view(np.uint8)  # (h, w*bytes)
        if compression == 0 or plane.size == 0:
            out.append([struct.pack(">H", 0 if plane.size == 0 else compression), np.ascontiguousarray(rows)])
            continue
        counts, data = encode_rows(rows)
        out.append([struct.pack(">H", 1), counts.astype(">u2"), data])
    return out


def _encode_layer(layer: Layer, index: int, depth: int, compression: int, warn: Callable[[str], None]) -> _Encoded:
    """Quantise, crop to the alpha bounding box and encode one layer."""
    planes = _quantize(layer.pixels, depth, f"layer {index} ({layer.name!r})", warn)
    alpha = planes[3]
    rows = np.flatnonzero(alpha.any(axis=1)) if alpha.size else np.zeros(0, np.int64)
    if rows.size == 0:  # fully transparent: a legal 0x0 layer (rule 7)
        return _Encoded(0, 0, 0, 0, _encode_planes(np.zeros((4, 0, 0), planes.dtype), depth, compression))
    cols = np.flatnonzero(alpha[rows[0] : rows[-1] + 1].any(axis=0))
    t, b, l, r = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if (t, b, l, r) != (0, alpha.shape[0], 0, alpha.shape[1]):
        planes = planes[:, t:b, l:r]
    top, left = layer.y + t, layer.x + l
    return _Encoded(top, left, top + (b - t), left + (r - l), _encode_planes(planes, depth, compression))


def _write_pieces(f: BinaryIO, pieces: list[bytes | np.ndarray]) -> None:
    """Write byte strings and arrays without joining them first."""
    for p in pieces:
        if isinstance(p, bytes):
            f.write(p)
        elif p.size:
            f.write(np.ascontiguousarray(p).reshape(-1).view(np.uint8).data)


def _image_resources(icc: bytes | None) -> bytes:
    """Resolution (72 dpi), version info (real merged data) and the ICC profile when given."""

    def block(rid: int, data: bytes) -> bytes:
        return (
            b"8BIM"
            + struct.pack(">H", rid)
            + b"\x00\x00"
            + struct.pack(">I", len(data))
            + data
            + b"\x00" * (len(data) % 2)
        )

    res = struct.pack(">IHHIHH", 72 << 16, 1, 1, 72 << 16, 1, 1)
    app = "qil_core".encode("utf-16-be")
    version = (
        struct.pack(">IB", 1, 1)
        + struct.pack(">I", len(app) // 2)
        + app
        + struct.pack(">I", len(app) // 2)
        + app
        + struct.pack(">I", 1)
    )
    out = block(0x03ED, res) + block(0x0421, version)
    if icc:
        out += block(0x040F, icc)
    return out


def _validate(stack: LayerStack, depth: int, compression: str, merged: np.ndarray | None) -> int:
    """Checks that need no pixel pass; returns the numeric compression."""
    if not isinstance(stack, LayerStack):
        raise InputError(f"write_psd expects a LayerStack, got {type(stack).__name__}")
    if depth not in (8, 16):
        raise PSDError(f"depth must be 8 or 16 bits per channel, got {depth!r}")
    if compression not in COMPRESSIONS:
        raise PSDError(f"compression must be one of {sorted(COMPRESSIONS)}, got {compression!r}")
    w, h = stack.width, stack.height
    if w > MAX_CANVAS_SIDE or h > MAX_CANVAS_SIDE:
        raise PSDError(
            f"canvas {w}x{h} px is over {MAX_CANVAS_SIDE} px per side, which needs the large-document "
            f"format (PSB) that Photoshop's PSD reader, GIMP 2.10 and ImageMagick refuse; "
            f"scale or crop the stack below {MAX_CANVAS_SIDE} px per side"
        )
    n = len(stack.layers)
    if n == 0:
        raise PSDError(
            "the stack has no layers, so there is nothing to put in a PSD; add a layer, or save the flat image as PNG"
        )
    if n > MAX_LAYERS:
        raise PSDError(
            f"the stack has {n} layers; a PSD holds at most {MAX_LAYERS} (Photoshop's limit); "
            f"merge or drop layers first"
        )
    for i, layer in enumerate(stack.layers):
        lh, lw = layer.pixels.shape[:2]
        if lw > MAX_CANVAS_SIDE or lh > MAX_CANVAS_SIDE:
            raise PSDError(
                f"layer {i} ({layer.name!r}) is {lw}x{lh} px, over {MAX_CANVAS_SIDE} px per side; "
                f"crop it to the canvas first"
            )
        if not (-(2**31) <= layer.x and layer.x + lw < 2**31 and -(2**31) <= layer.y and layer.y + lh < 2**31):
            raise PSDError(f"layer {i} ({layer.name!r}) offset ({layer.x}, {layer.y}) does not fit in 32 bits")
        if layer.blend_mode not in PSD_BLEND_KEYS:
            raise PSDError(f"layer {i} ({layer.name!r}) blend mode {layer.blend_mode!r} has no PSD key")
    if merged is not None:
        m = np.asarray(merged)
        if m.shape != (h, w, 4):
            raise InputError(f"merged image must be (H, W, 4) = ({h}, {w}, 4) straight RGBA, got {m.shape}")
    _check_memory(stack, depth)
    return COMPRESSIONS[compression]


def _check_memory(stack: LayerStack, depth: int) -> None:
    """Refuse before writing when the merged image and its encoding clearly cannot fit in RAM."""
    px = stack.width * stack.height
    need = px * (16 + 2 * 4 * depth // 8)  # float32 RGBA composite + planar integer copy + encoded data
    check_allocation(
        need,
        f"writing a {stack.width}x{stack.height} PSD ({px / 1e6:.0f} MP)",
        available=_available_memory(),
        hint="use a smaller canvas or free memory",
    )


def _available_memory() -> int | None:
    """Available RAM in bytes (reclaimable cache included), or None where the OS does not say."""
    return available_ram_bytes()


def _encoded_in_order(
    stack: LayerStack,
    depth: int,
    compression: int,
    warn: Callable[[str], None],
    pool: ThreadPoolExecutor | None,
    ahead: int,
) -> Iterator[_Encoded]:
    """Encode layers on the pool, yielding them in order with a bounded number in flight."""
    layers = stack.layers
    if pool is None:
        for i, layer in enumerate(layers):
            yield _encode_layer(layer, i, depth, compression, warn)
        return
    futures: list[Future[_Encoded]] = []
    try:
        for i in range(len(layers)):
            while len(futures) < ahead and i + len(futures) < len(layers):
                j = i + len(futures)
                futures.append(pool.submit(_encode_layer, layers[j], j, depth, compression, warn))
            yield futures.pop(0).result()
    finally:
        for fut in futures:
            fut.cancel()


def _merged_pieces(
    merged: np.ndarray, depth: int, compression: int, warn: Callable[[str], None], pool: ThreadPoolExecutor | None
) -> list[bytes | np.ndarray]:
    """The image-data section: compression, then (RLE) all channels' row tables, then all channels' data."""
    planes = _quantize(np.asarray(merged, np.float32), depth, "merged image", warn, matte=True, pool=pool)
    if compression == 0:
        return [struct.pack(">H", 0), planes.astype(">u2") if depth == 16 else planes]

    def enc(c: int) -> tuple[np.ndarray, np.ndarray]:
        rows = planes[c] if depth == 8 else planes[c].astype(">u2").view(np.uint8)
        return encode_rows(rows)

    results = list(pool.map(enc, range(4))) if pool is not None else [enc(c) for c in range(4)]
    return [struct.pack(">H", 1), *(c.astype(">u2") for c, _ in results), *(d for _, d in results)]


def write_psd(
    stack: LayerStack,
    path: str | os.PathLike[str],
    *,
    depth: int = 8,
    compression: str = "rle",
    overwrite: bool = False,
    merged: np.ndarray | None = None,
    icc_profile: bytes | None = None,
    workers: int | None = None,
    verify: bool = False,
) -> Path:
    """Write `stack` as a layered RGBA PSD at `path` (atomic, never overwrites unless asked) and return the path.

    `merged` (H, W, 4) straight RGBA float is the composite to store; by default it is
    `qil_core.layers.composite.composite(stack)`. 16-bit files embed `icc_profile` or, by default, sRGB.
    `verify` re-opens the finished temporary file and runs the structural check before publishing it
    (robustness.md rule 12; costs one read of the file).
    """
    comp = _validate(stack, depth, compression, merged)
    if merged is None:
        from ..composite import composite

        merged = composite(stack)
    if icc_profile is None and depth == 16:
        icc_profile = srgb_profile()
    warned: set[str] = set()

    def warn(msg: str) -> None:
        if msg not in warned:
            warned.add(msg)
            log.warning("%s: %s", os.fspath(path), msg)

    names = [_clean_name(layer.name, i, warn) for i, layer in enumerate(stack.layers)]
    for mode in sorted({layer.blend_mode for layer in stack.layers} & set(PSD_APPROXIMATE_MODES)):
        warn(f"blend mode {mode!r}: {PSD_APPROXIMATE_MODES[mode]}")
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)

    def write(f: BinaryIO) -> None:
        f.write(b"8BPS" + struct.pack(">H6xHIIHH", 1, 4, stack.height, stack.width, depth, 3))
        f.write(struct.pack(">I", 0))  # no colour-mode data (RGB)
        res = _image_resources(icc_profile)
        f.write(struct.pack(">I", len(res)) + res)
        lm_pos = f.tell()
        f.write(struct.pack(">II", 0, 0))  # layer-and-mask length, layer-info length: patched below
        f.write(struct.pack(">h", -len(stack.layers)))  # negative: merged channel 4 is transparency (rule 2)
        pool = ThreadPoolExecutor(n_workers) if n_workers > 1 else None
        try:
            rec_pos: list[int] = []
            for i, layer in enumerate(stack.layers):  # placeholders of the same size, patched below
                rec_pos.append(f.tell())
                f.write(_layer_record((0, 0, 0, 0), [0] * 4, layer, names[i], PSD_BLEND_KEYS[layer.blend_mode], i + 1))
            written: list[tuple[tuple[int, int, int, int], list[int]]] = []
            for enc in _encoded_in_order(stack, depth, comp, warn, pool, n_workers + 1):
                for ch in enc.channels:
                    _write_pieces(f, ch)
                written.append(((enc.top, enc.left, enc.bottom, enc.right), enc.lengths()))
            li_end = f.tell()
            pad = -(li_end - (lm_pos + 8)) % 4  # layer info padded to 4, as Photoshop and psd-tools write it
            f.write(b"\x00" * pad)
            f.write(struct.pack(">I", 0))  # empty global layer mask info
            lm_end = f.tell()
            merged_pieces = _merged_pieces(merged, depth, comp, warn, pool)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        _write_pieces(f, merged_pieces)
        end = f.tell()
        for i, layer in enumerate(stack.layers):  # patch rectangles and channel lengths
            f.seek(rec_pos[i])
            rect, lengths = written[i]
            f.write(_layer_record(rect, lengths, layer, names[i], PSD_BLEND_KEYS[layer.blend_mode], i + 1))
        f.seek(lm_pos)
        f.write(struct.pack(">II", lm_end - (lm_pos + 4), li_end + pad - (lm_pos + 8)))
        f.seek(end)

    def check(tmp: Path) -> None:
        from .lint import lint_psd

        problems = lint_psd(tmp, decode=False)
        if problems:
            raise PSDError(
                f"the PSD written for {os.fspath(path)!r} failed the structural check ({problems[0]}); "
                f"nothing was saved; please report this with the stack that caused it"
            )

    return atomic_write(path, write, overwrite=overwrite, check=check if verify else None)
