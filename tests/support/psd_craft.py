"""A byte-level PSD builder for reader tests: files with exactly the fields, depths and damage a test needs.

Written from the Adobe file-format specification; it checks nothing, so tests can build broken files too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

_DT = {8: np.dtype(np.uint8), 16: np.dtype(">u2"), 32: np.dtype(">f4")}


def raw_channel(plane: np.ndarray, depth: int = 8) -> bytes:
    """A raw (compression 0) channel body: the 2-byte compression field, then the samples."""
    return b"\x00\x00" + np.ascontiguousarray(plane, _DT[depth]).tobytes()


def rle_rows(plane: np.ndarray) -> list[bytes]:
    """PackBits rows of an 8-bit plane, literal runs only (valid, if not small)."""
    rows = []
    for row in np.asarray(plane, np.uint8):
        data = row.tobytes()
        out = b"".join(bytes([len(data[i : i + 128]) - 1]) + data[i : i + 128] for i in range(0, len(data), 128))
        rows.append(out)
    return rows


def rle_channel(plane: np.ndarray, table: list[int] | None = None, tail: bytes = b"") -> bytes:
    """An RLE (compression 1) channel body of an 8-bit plane; `table` overrides the row byte counts."""
    rows = rle_rows(plane)
    counts = [len(r) for r in rows] if table is None else table
    return b"\x00\x01" + struct.pack(f">{len(counts)}H", *counts) + b"".join(rows) + tail


@dataclass
class CraftLayer:
    """One layer record and its channel bodies (each body starts with its compression field)."""

    name: str
    rect: tuple[int, int, int, int]  # top, left, bottom, right
    channels: list[tuple[int, bytes]]
    blend: bytes = b"norm"
    opacity: int = 255
    clipping: int = 0
    hidden: bool = False
    mask: bytes = b""  # layer mask data block (without its length)
    blocks: list[tuple[bytes, bytes]] = field(default_factory=list)  # tagged blocks (key, data)


def rgba_layer(name: str, top: int, left: int, rgba: np.ndarray, depth: int = 8, **kw) -> CraftLayer:
    """A layer from an (h, w, 4) array in the depth's sample type, raw channels."""
    h, w = rgba.shape[:2]
    chans = [(-1, raw_channel(rgba[..., 3], depth))] + [(c, raw_channel(rgba[..., c], depth)) for c in range(3)]
    return CraftLayer(name, (top, left, top + h, left + w), chans, **kw)


def mask_block(
    top: int,
    left: int,
    bottom: int,
    right: int,
    default: int = 0,
    disabled: bool = False,
    density: int | None = None,
    feather: float | None = None,
) -> bytes:
    """A user-mask data block; density / feather add a parameters byte (flags bit 4)."""
    flags = (2 if disabled else 0) | (16 if density is not None or feather is not None else 0)
    out = struct.pack(">4iBB", top, left, bottom, right, default, flags)
    if flags & 16:
        bits = (1 if density is not None else 0) | (2 if feather is not None else 0)
        out += bytes([bits])
        if density is not None:
            out += bytes([density])
        if feather is not None:
            out += struct.pack(">d", feather)
    return out + b"\x00" * (-len(out) % 4 if len(out) < 20 else 0)


def _pascal(name: str) -> bytes:
    raw = name.encode("latin-1", "replace")[:255]
    out = bytes([len(raw)]) + raw
    return out + b"\x00" * (-len(out) % 4)


def _record(layer: CraftLayer, version: int) -> bytes:
    top, left, bottom, right = layer.rect
    out = struct.pack(">4iH", top, left, bottom, right, len(layer.channels))
    for cid, body in layer.channels:
        out += struct.pack(">hI" if version == 1 else ">hQ", cid, len(body))
    flags = 2 if layer.hidden else 0
    out += b"8BIM" + layer.blend + struct.pack(">BBBB", layer.opacity, layer.clipping, flags, 0)
    extra = struct.pack(">I", len(layer.mask)) + layer.mask + struct.pack(">I", 0) + _pascal(layer.name)
    for key, data in layer.blocks:
        data = data + b"\x00" * (len(data) % 2)
        extra += b"8BIM" + key + struct.pack(">I", len(data)) + data
    return out + struct.pack(">I", len(extra)) + extra


def psd_bytes(
    width: int,
    height: int,
    layers: list[CraftLayer],
    *,
    depth: int = 8,
    version: int = 1,
    mode: int = 3,
    channels: int | None = None,
    merged: np.ndarray | None = None,
    resources: list[tuple[int, bytes]] | None = None,
    merged_cut: int = 0,
) -> bytes:
    """A PSD (version 1) or PSB (2): header, resources, layer records and channels, then a raw merged image.

    `merged` is (H, W, C) in the depth's sample type (default: zeros with C = `channels`); `merged_cut` drops
    that many bytes from the end of the file.
    """
    n_chan = channels if channels is not None else (4 if layers else 3)
    head = b"8BPS" + struct.pack(">H6xHIIHH", version, n_chan, height, width, depth, mode)
    res = b""
    for rid, data in resources or []:
        data = data + b"\x00" * (len(data) % 2)
        res += b"8BIM" + struct.pack(">H", rid) + b"\x00\x00" + struct.pack(">I", len(data)) + data
    body = head + struct.pack(">I", 0) + struct.pack(">I", len(res)) + res
    lw = ">I" if version == 1 else ">Q"
    if layers:
        info = struct.pack(">h", -len(layers)) + b"".join(_record(lay, version) for lay in layers)
        info += b"".join(b for lay in layers for _, b in lay.channels)
        info += b"\x00" * (len(info) % 2)
        section = struct.pack(lw, len(info)) + info + struct.pack(">I", 0)
        body += struct.pack(lw, len(section)) + section
    else:
        body += struct.pack(lw, 0)
    if merged is None:
        merged = np.zeros((height, width, n_chan), _DT[depth])
    planes = np.ascontiguousarray(np.moveaxis(np.asarray(merged, _DT[depth]), -1, 0))
    data = body + b"\x00\x00" + planes.tobytes()
    return data[: len(data) - merged_cut] if merged_cut else data


def matrix_profile(name: str, rgb_xyz: list[tuple[float, float, float]], gamma: float) -> bytes:
    """A minimal ICC v2 RGB matrix/TRC display profile with one gamma for all channels (D50 white)."""

    def s15(vals):
        return b"".join(struct.pack(">i", int(round(v * 65536))) for v in vals)

    text = name.encode("ascii")
    desc = b"desc\x00\x00\x00\x00" + struct.pack(">I", len(text) + 1) + text + b"\x00" + b"\x00" * 79
    curve = b"curv\x00\x00\x00\x00" + struct.pack(">IH", 1, int(round(gamma * 256))) + b"\x00\x00"
    tags = [(b"desc", desc), (b"wtpt", b"XYZ \x00\x00\x00\x00" + s15((0.9642, 1.0, 0.8249)))]
    tags += [(k, b"XYZ \x00\x00\x00\x00" + s15(v)) for k, v in zip((b"rXYZ", b"gXYZ", b"bXYZ"), rgb_xyz)]
    tags += [(k, curve) for k in (b"rTRC", b"gTRC", b"bTRC")]
    offset = 128 + 4 + 12 * len(tags)
    table, blob = b"", b""
    for sig, data in tags:
        data = data + b"\x00" * (-len(data) % 4)
        table += struct.pack(">4sII", sig, offset + len(blob), len(data))
        blob += data
    size = offset + len(blob)
    header = (
        struct.pack(">I", size)
        + b"\x00" * 4
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + b"\x00" * 12
        + b"acsp"
        + b"\x00" * 24
        + struct.pack(">I", 0)
        + s15((0.9642, 1.0, 0.8249))
        + b"\x00" * 48
    )
    return header + struct.pack(">I", len(tags)) + table + blob


def group_layers(
    name: str,
    children: list[CraftLayer],
    *,
    blend: bytes = b"pass",
    opacity: int = 255,
    mask: tuple[bytes, bytes] | None = None,
) -> list[CraftLayer]:
    """A group, bottom first: its end marker, the children, then the group record ('lsct' section dividers).

    `mask` is (mask data block, mask channel body) for a group mask.
    """
    empty = [(c, b"\x00\x00") for c in (-1, 0, 1, 2)]
    end = CraftLayer("</Layer group>", (0, 0, 0, 0), list(empty), blocks=[(b"lsct", struct.pack(">I", 3))])
    head = CraftLayer(
        name,
        (0, 0, 0, 0),
        list(empty),
        blend=b"norm" if blend == b"pass" else blend,
        opacity=opacity,
        blocks=[(b"lsct", struct.pack(">I", 1) + b"8BIM" + blend)],
    )
    if mask is not None:
        head.mask = mask[0]
        head.channels.append((-2, mask[1]))
    return [end, *children, head]


def rect_vector_mask(left: float, top: float, right: float, bottom: float, *, disabled: bool = False) -> bytes:
    """A 'vmsk' block body: one closed rectangle path, corners as fractions of the canvas (0..1)."""

    def knot(y: float, x: float) -> bytes:
        point = struct.pack(">ii", int(round(y * (1 << 24))), int(round(x * (1 << 24))))
        return struct.pack(">H", 1) + point * 3  # linked knot: both control points on the anchor

    records = struct.pack(">H", 6) + b"\x00" * 24  # path fill rule
    records += struct.pack(">HH", 8, 0) + b"\x00" * 22  # initial fill rule: start empty
    records += struct.pack(">HH", 0, 4) + b"\x00" * 22  # closed subpath of 4 knots
    records += knot(top, left) + knot(top, right) + knot(bottom, right) + knot(bottom, left)
    return struct.pack(">II", 3, 4 if disabled else 0) + records  # flag bit 2: disabled
