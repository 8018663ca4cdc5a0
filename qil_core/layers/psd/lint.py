"""Structural checker for PSD/PSB files: every length, table and count that readers trust (robustness.md 2.5).

GIMP and some web readers silently accept a wrong channel length that other readers reject, so opening a
file in one reader proves little; this walks the whole file instead. It reports problems as text (empty list
= structurally sound) and never raises on a malformed file.
"""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np

from ...errors import PSDError
from ..blend import PSD_BLEND_KEYS, PSD_KEY_FALLBACKS
from .packbits import decode_rows

_COLOR_MODES = {0: 1, 1: 1, 2: 1, 3: 3, 4: 4, 7: 1, 8: 1, 9: 3}  # mode -> colour channels (multichannel: 1)
# Every key we write plus the Photoshop keys we read (dissolve, pass-through, darker/lighter colour...).
_BLEND_KEYS = {k.encode("ascii") for k in (*PSD_BLEND_KEYS.values(), *PSD_KEY_FALLBACKS)}
# Tagged blocks whose length field is 8 bytes in PSB files.
_PSB_LONG_KEYS = {
    b"LMsk",
    b"Lr16",
    b"Lr32",
    b"Layr",
    b"Mt16",
    b"Mt32",
    b"Mtrn",
    b"Alph",
    b"FMsk",
    b"lnk2",
    b"FEid",
    b"FXid",
    b"PxSD",
    b"lnkE",
    b"pths",
    b"cinf",
}
_DECODE_LIMIT = 64 << 20  # decode every RLE row by default when the file is at most this big


class _Stop(Exception):
    """Raised inside the walk when the file ends early or a fatal problem makes further parsing meaningless."""


class _Reader:
    """A bounds-checked cursor over the file bytes that records problems."""

    def __init__(self, data: bytes | mmap.mmap) -> None:
        self.data = data
        self.pos = 0
        self.problems: list[str] = []

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise _Stop(
                f"offset {self.pos}: {what} needs {n} bytes but the file ends at {len(self.data)} "
                f"(truncated or a wrong length before this point)"
            )

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def fmt(self, f: str, what: str) -> tuple:
        return struct.unpack(">" + f, self.take(struct.calcsize(">" + f), what))

    def problem(self, msg: str, at: int | None = None) -> None:
        self.problems.append(f"offset {self.pos if at is None else at}: {msg}")


def lint_psd(source: str | os.PathLike[str] | bytes, *, decode: bool | None = None) -> list[str]:
    """Problems found in a PSD/PSB file (path or bytes); an empty list means it is structurally sound.

    `decode` also decodes every RLE row strictly (default: when the file is at most 64 MiB).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _lint_bytes(bytes(source), decode)
    with open(source, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return ["offset 0: the file is empty"]
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # no copy of large files
            return _lint_bytes(data, decode)


def _lint_bytes(data: bytes | mmap.mmap, decode: bool | None) -> list[str]:
    """Walk the file bytes and collect problems."""
    r = _Reader(data)
    if decode is None:
        decode = len(data) <= _DECODE_LIMIT
    try:
        _walk(r, decode)
    except _Stop as stop:
        r.problems.append(str(stop))
    return r.problems


def _walk(r: _Reader, decode: bool) -> None:
    """Check header, colour-mode data, resources, layer and mask info and image data in order."""
    sig, version, reserved, channels, height, width, depth, mode = r.fmt("4sH6sHIIHH", "file header")
    if sig != b"8BPS":
        raise _Stop(f"offset 0: not a PSD file (signature {sig!r}, expected b'8BPS')")
    if version not in (1, 2):
        raise _Stop(f"offset 4: version {version}, expected 1 (PSD) or 2 (PSB)")
    if reserved != b"\x00" * 6:
        r.problem("header reserved bytes are not zero", 6)
    limit = 30_000 if version == 1 else 300_000
    if not 1 <= channels <= 56:
        r.problem(f"header channel count {channels} outside 1..56", 12)
    if not (1 <= width <= limit and 1 <= height <= limit):
        r.problem(f"canvas {width}x{height} outside 1..{limit} px for version {version}", 14)
    if depth not in (1, 8, 16, 32):
        raise _Stop(f"offset 22: depth {depth}, expected 1, 8, 16 or 32")
    if mode not in _COLOR_MODES:
        r.problem(f"colour mode {mode} unknown", 24)
    (cm_len,) = r.fmt("I", "colour-mode data length")
    if mode == 3 and cm_len != 0 and depth != 32:
        r.problem(f"RGB document with {cm_len} bytes of colour-mode data, expected 0")
    r.take(cm_len, "colour-mode data")
    _check_resources(r)
    layer_count = _check_layers(r, version, depth, decode)
    _check_image_data(r, version, channels, height, width, depth, decode)
    extra_channels = channels - _COLOR_MODES.get(mode, channels)
    if layer_count is not None and layer_count > 0 and extra_channels > 0:
        r.problem(
            f"positive layer count ({layer_count}) with {extra_channels} extra merged channel(s): readers "
            f"take channel {_COLOR_MODES[mode] + 1} as a spare alpha channel, not transparency; "
            f"write a negative layer count (robustness.md rule 2)",
            0,
        )


def _check_resources(r: _Reader) -> None:
    """Image resource blocks must tile their section exactly."""
    (length,) = r.fmt("I", "image resources length")
    end = r.pos + length
    r.need(length, "image resources")
    while r.pos < end:
        start = r.pos
        sig, _rid, name_len = r.fmt("4sHB", "image resource header")
        if sig not in (b"8BIM", b"MeSa", b"AgHg", b"PHUT", b"DCSR"):
            raise _Stop(f"offset {start}: image resource signature {sig!r}, expected b'8BIM'")
        r.take(name_len + (name_len + 1) % 2, "resource name")
        (size,) = r.fmt("I", "resource size")
        r.take(size + size % 2, "resource data")
        if r.pos > end:
            raise _Stop(f"offset {start}: image resource runs {r.pos - end} bytes past its section")


def _check_layers(r: _Reader, version: int, depth: int, decode: bool) -> int | None:
    """Layer and mask information; returns the signed layer count (None when there is no layer info)."""
    lfmt = "I" if version == 1 else "Q"
    (lm_len,) = r.fmt(lfmt, "layer and mask info length")
    lm_start = r.pos
    lm_end = lm_start + lm_len
    r.need(lm_len, "layer and mask info")
    if lm_len == 0:
        return None
    (li_len,) = r.fmt(lfmt, "layer info length")
    li_start = r.pos
    li_end = li_start + li_len
    if li_end > lm_end:
        raise _Stop(f"offset {li_start}: layer info length {li_len} runs past the layer and mask section")
    if li_len % 2:
        r.problem(f"layer info length {li_len} is odd; it must be rounded up to an even number", li_start)
    count = None
    if li_len:
        (count,) = r.fmt("h", "layer count")
        layers = [_check_record(r, i, version) for i in range(abs(count))]
        if r.pos > li_end:
            raise _Stop(f"offset {li_start}: layer records run {r.pos - li_end} bytes past the layer info length")
        for i, (rect, chans) in enumerate(layers):
            for cid, clen in chans:
                _check_channel(r, i, cid, clen, rect, version, depth, decode, li_end)
        pad = li_end - r.pos
        if pad < 0:
            raise _Stop(f"offset {li_start}: channel data runs {-pad} bytes past the layer info length")
        if pad > 3 or r.take(pad, "layer info padding").strip(b"\x00"):
            r.problem(f"layer info has {pad} unexplained bytes after the channel data (padding is 0-3 zero bytes)")
    r.pos = li_end
    if r.pos + 4 <= lm_end and r.data[r.pos : r.pos + 4] not in (b"8BIM", b"8B64"):
        (gm_len,) = r.fmt("I", "global layer mask length")
        if r.pos + gm_len > lm_end:
            raise _Stop(f"offset {r.pos}: global layer mask length {gm_len} runs past the layer and mask section")
        r.take(gm_len, "global layer mask")
    while r.pos + 12 <= lm_end:
        _check_tagged_block(r, version, lm_end, "global tagged block")
    if lm_end - r.pos > 3 or r.data[r.pos : lm_end].strip(b"\x00"):
        r.problem(f"{lm_end - r.pos} unexplained bytes at the end of the layer and mask section")
    r.pos = lm_end
    return count


def _check_record(r: _Reader, index: int, version: int) -> tuple[tuple[int, int, int, int], list[tuple[int, int]]]:
    """One layer record; returns its rectangle and (channel id, length) list."""
    start = r.pos
    top, left, bottom, right, nch = r.fmt("4iH", f"layer {index} record")
    if bottom < top or right < left:
        r.problem(f"layer {index}: rectangle top={top} left={left} bottom={bottom} right={right} is inverted", start)
    if nch > 56:
        raise _Stop(f"offset {start}: layer {index} has {nch} channels (at most 56)")
    chans = [r.fmt("hI" if version == 1 else "hQ", f"layer {index} channel info") for _ in range(nch)]
    ids = [c for c, _ in chans]
    if -1 in ids and ids[0] != -1:
        r.problem(f"layer {index}: transparency channel -1 is not first (order {ids}; rule 6)", start)
    sig, key, _opacity, clipping, _flags, filler = r.fmt("4s4sBBBB", f"layer {index} blend fields")
    if sig != b"8BIM":
        raise _Stop(f"offset {r.pos - 12}: layer {index} blend signature {sig!r}, expected b'8BIM'")
    if key not in _BLEND_KEYS:
        r.problem(f"layer {index}: unknown blend key {key!r}")
    if clipping not in (0, 1) or filler != 0:
        r.problem(f"layer {index}: clipping {clipping} / filler {filler} not 0/1 and 0")
    (extra_len,) = r.fmt("I", f"layer {index} extra data length")
    extra_end = r.pos + extra_len
    r.need(extra_len, f"layer {index} extra data")
    (mask_len,) = r.fmt("I", f"layer {index} mask data length")
    r.take(mask_len, f"layer {index} mask data")
    (br_len,) = r.fmt("I", f"layer {index} blending ranges length")
    r.take(br_len, f"layer {index} blending ranges")
    (name_len,) = r.fmt("B", f"layer {index} name")
    r.take(name_len + (-(name_len + 1) % 4), f"layer {index} name")
    if r.pos > extra_end:
        raise _Stop(f"offset {start}: layer {index} fixed extra data runs past its extra length {extra_len}")
    while r.pos + 12 <= extra_end:
        _check_tagged_block(r, version, extra_end, f"layer {index} tagged block")
    if extra_end - r.pos > 3 or r.data[r.pos : extra_end].strip(b"\x00"):
        r.problem(f"layer {index}: {extra_end - r.pos} unexplained bytes at the end of its extra data")
    r.pos = extra_end
    return (top, left, bottom, right), chans


def _check_tagged_block(r: _Reader, version: int, end: int, what: str) -> None:
    """One additional-layer-information block: signature, key and a length that stays inside its container."""
    start = r.pos
    sig, key = r.fmt("4s4s", what)
    if sig not in (b"8BIM", b"8B64"):
        raise _Stop(f"offset {start}: {what} signature {sig!r}, expected b'8BIM' or b'8B64'")
    (length,) = r.fmt("Q" if version == 2 and key in _PSB_LONG_KEYS else "I", f"{what} {key!r} length")
    if r.pos + length > end:
        raise _Stop(f"offset {start}: {what} {key!r} length {length} runs past its container")
    if key == b"luni":
        (units,) = struct.unpack(">I", r.data[r.pos : r.pos + 4])
        if 4 + 2 * units > length:
            r.problem(f"{what} 'luni' counts {units} UTF-16 units but holds only {length - 4} bytes")
    r.pos += length


def _check_channel(
    r: _Reader,
    index: int,
    cid: int,
    length: int,
    rect: tuple[int, int, int, int],
    version: int,
    depth: int,
    decode: bool,
    limit: int,
) -> None:
    """One channel's data: compression, then rows matching the rectangle; its length must be exact."""
    start = r.pos
    if start + length > limit:
        raise _Stop(f"offset {start}: layer {index} channel {cid} length {length} runs past the layer info")
    if length < 2:
        r.problem(f"layer {index} channel {cid}: length {length} cannot hold the 2-byte compression field")
        r.pos = start + length
        return
    (comp,) = r.fmt("H", "channel compression")
    top, left, bottom, right = rect
    h, w = bottom - top, right - left
    if cid < -1:  # user/real masks: their rectangle lives in the mask data, not checked here
        r.pos = start + length
        return
    row_bytes = (w * depth + 7) // 8
    body = length - 2
    what = f"layer {index} channel {cid}"
    if comp == 0:
        if body != h * row_bytes:
            r.problem(f"{what}: raw data is {body} bytes, expected {h}x{row_bytes} = {h * row_bytes}", start)
    elif comp == 1:
        _check_rle(r, what, h, row_bytes, body, version, decode, start)
    elif comp not in (2, 3):
        r.problem(f"{what}: compression {comp} unknown (0 raw, 1 RLE, 2 ZIP, 3 ZIP with prediction)", start)
    r.pos = start + length


def _check_rle(
    r: _Reader, what: str, rows: int, row_bytes: int, body: int, version: int, decode: bool, start: int
) -> None:
    """An RLE body: a table of `rows` byte counts (2 bytes each in PSD, 4 in PSB) that sums to the data."""
    cw = 2 if version == 1 else 4
    if rows == 0 or row_bytes == 0:
        if body != 0:
            r.problem(f"{what}: empty rectangle but {body} bytes of RLE data", start)
        return
    if body < rows * cw:
        r.problem(
            f"{what}: {body} bytes cannot hold a {rows}-row RLE table of {cw}-byte counts "
            f"(truncated, or a wrong length before it)",
            start,
        )
        return
    table = np.frombuffer(r.data, ">u2" if cw == 2 else ">u4", rows, r.pos).astype(np.int64)
    data_len = body - rows * cw
    if int(table.sum()) != data_len:
        short = " (truncated)" if int(table.sum()) > data_len else ""
        r.problem(
            f"{what}: RLE row table sums to {int(table.sum())} bytes but {data_len} bytes follow "
            f"({cw}-byte counts; rule 5){short}",
            start,
        )
        return
    if decode:
        data_at = r.pos + rows * cw
        try:
            decode_rows(r.data[data_at : data_at + data_len], table, row_bytes)
        except PSDError as err:
            r.problem(f"{what}: {err}", start)


def _check_image_data(
    r: _Reader, version: int, channels: int, height: int, width: int, depth: int, decode: bool
) -> None:
    """The merged image: compression, then all channels; must end exactly at the end of the file."""
    if r.pos == len(r.data):
        raise _Stop(f"offset {r.pos}: no image data section (no-image-data): the merged image is missing")
    start = r.pos
    (comp,) = r.fmt("H", "image data compression")
    row_bytes = (width * depth + 7) // 8
    body = len(r.data) - r.pos
    if comp == 0:
        if body != channels * height * row_bytes:
            short = " (truncated)" if body < channels * height * row_bytes else ""
            r.problem(
                f"merged image: raw data is {body} bytes, expected {channels}x{height}x{row_bytes} = "
                f"{channels * height * row_bytes}{short}",
                start,
            )
    elif comp == 1:
        _check_rle(r, "merged image", channels * height, row_bytes, body, version, decode, start)
    elif comp not in (2, 3):
        r.problem(f"merged image: compression {comp} unknown", start)
    r.pos = len(r.data)
