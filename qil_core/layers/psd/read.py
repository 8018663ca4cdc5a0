"""PSD reader: psd-tools parses the structure; pixel layers are decoded straight from their channel data.

psd-tools' own `numpy()`/`topil()` path re-checks budgets and converts through several float copies per layer;
decoding each channel with psd-tools' C PackBits decoder and stacking the planes once is several times faster
and gives the same pixels. psd-tools parses from a memory map of the file whose large pixel-data reads are
views, not copies, and RLE channels are decoded a band of rows at a time into a small reused buffer: fresh
memory (page faults dominate on VMs) is then little more than the float32 output itself.
Groups are flattened (their children kept in order, with the group's visibility
and opacity folded in, and one warning); text, shape and smart-object layers are read from the raster preview
Photoshop stores with them, with a warning; layers with no pixels at all (adjustments, empty fills) are
skipped with a warning.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ...errors import PSDError
from ..blend import blend_mode_from_psd_key
from ..stack import BLEND_MODES, Layer, LayerStack

log = logging.getLogger(__name__)

_SCALE = {8: 255.0, 16: 65535.0, 32: 1.0}
_DTYPE = {8: np.dtype(np.uint8), 16: np.dtype(">u2"), 32: np.dtype(">f4")}
_BAND_PIXELS = 1 << 16  # pixels per conversion band (stays in cache)
_VIEW_MIN = 1 << 20  # reads this large in the pixel-data regions come back as views of the mapped file


class _MappedReader:
    """Seekable read-only file object over a memory map that hands out large pixel-data reads without copying.

    psd-tools reads every channel into its own bytes object (the whole file again, in fresh memory); reads of
    at least `_VIEW_MIN` bytes that start inside the layer-info block or the merged-image section come back as
    memoryviews of the map instead. All other reads (headers, records, descriptors, embedded files) are bytes,
    so psd-tools' parsing sees exactly what it sees from a real file.
    """

    def __init__(self, mm: mmap.mmap, regions: list[tuple[int, int]]) -> None:
        self._mm = mm
        self._mv = memoryview(mm)
        self._pos = 0
        self._regions = regions
        self._views: list[memoryview] = []

    def read(self, size: int = -1) -> bytes | memoryview:
        """Up to `size` bytes from the current position (all that remain when negative)."""
        start = min(self._pos, len(self._mv))
        end = len(self._mv) if size is None or size < 0 else min(len(self._mv), start + size)
        self._pos = end
        if end - start >= _VIEW_MIN and any(lo <= start < hi for lo, hi in self._regions):
            view = self._mv[start:end]
            self._views.append(view)
            return view
        return bytes(self._mv[start:end])

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move like a binary file's seek; returns the new position."""
        base = {0: 0, 1: self._pos, 2: len(self._mv)}[whence]
        if base + offset < 0:
            raise OSError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        """The current position."""
        return self._pos

    def readable(self) -> bool:
        """Always True (a read-only stream)."""
        return True

    def seekable(self) -> bool:
        """Always True."""
        return True

    def close(self) -> None:
        """Release the handed-out views and unmap the file (left to the collector if a view is still in use)."""
        for view in self._views:
            try:
                view.release()
            except BufferError:  # something still holds a buffer of this view: unmapped when that goes
                return
        self._views.clear()
        self._mv.release()
        try:
            self._mm.close()
        except BufferError:  # a view made from a handed-out one is still alive: unmapped when it goes
            pass


def _pixel_regions(head: mmap.mmap, size: int) -> list[tuple[int, int]]:
    """File ranges of the layer-info block and the merged image, from the section lengths; [] if inconsistent."""
    wide = head[4:6] == b"\x00\x02"  # PSB: 8-byte layer-and-mask lengths
    pos = 26
    for _ in range(2):  # colour-mode data, image resources: 4-byte length each
        if pos + 4 > len(head):
            return []
        pos += 4 + int.from_bytes(head[pos:pos + 4], "big")
    n = 8 if wide else 4
    if pos + 2 * n > len(head):
        return []
    lm_start = pos + n
    image_start = lm_start + int.from_bytes(head[pos:pos + n], "big")
    li_start = lm_start + n
    li_end = li_start + int.from_bytes(head[lm_start:lm_start + n], "big")
    if not li_start <= li_end <= image_start <= size:
        return []
    return [(li_start, li_end), (image_start, size)]


def _open(path: Path):
    """(psd-tools' PSDImage for `path`, the mapped reader to close after use or None), errors as PSDError."""
    from psd_tools import PSDImage

    try:
        with open(path, "rb") as f:
            head = f.read(26)
            try:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if len(head) >= 26 else None
            except (OSError, ValueError):  # not mappable (a pipe, some network file systems): read normally
                mm = None
    except FileNotFoundError:
        raise PSDError(f"PSD file {os.fspath(path)!r} not found; check the path") from None
    except IsADirectoryError:
        raise PSDError(f"{os.fspath(path)!r} is a folder, not a PSD file") from None
    if head[:4] != b"8BPS" or len(head) < 26:
        if mm is not None:
            mm.close()
        if head[:4] != b"8BPS":
            raise PSDError(f"{os.fspath(path)!r} is not a PSD file (it starts with {head[:4]!r}, not b'8BPS'); "
                           f"open it as an image instead")
        raise PSDError(f"{os.fspath(path)!r} is truncated: {len(head)} bytes, shorter than a PSD header")
    reader = None
    if mm is not None:
        reader = _MappedReader(mm, _pixel_regions(mm, len(mm)))
    try:
        return PSDImage.open(reader if reader is not None else path), reader
    except (ValueError, OSError, EOFError, struct.error, IndexError, KeyError) as err:
        if reader is not None:
            reader.close()
        raise PSDError(f"{os.fspath(path)!r} is truncated or damaged and cannot be parsed "
                       f"({type(err).__name__}: {err}); re-export it from the application that made it") from err


def _check_image_data(psd, path: Path) -> None:
    """Refuse a file whose merged-image section is cut short (psd-tools reads whatever bytes remain)."""
    img = psd._record.image_data
    data = img.data or b""
    row_bytes = (psd.width * psd.depth + 7) // 8
    rows = psd.channels * psd.height
    if int(img.compression) == 0:
        ok = len(data) >= rows * row_bytes
    elif int(img.compression) == 1:
        cw = 2 if psd.version == 1 else 4
        ok = len(data) >= rows * cw and int(np.frombuffer(data, ">u2" if cw == 2 else ">u4", rows).sum(
            dtype=np.int64)) <= len(data) - rows * cw
    else:
        ok = len(data) > 0
    if not ok:
        raise PSDError(f"{os.fspath(path)!r} is truncated: its merged image ends early ({len(data)} bytes); "
                       f"re-export or re-download the file")


def _rle_rows(data, depth: int, version: int, w: int, h: int) -> tuple[memoryview, np.ndarray] | None:
    """(compressed bytes, row start offsets (h + 1,)) of an RLE channel whose row table adds up, else None."""
    if data.compression != 1:
        return None
    cw = 2 if version == 1 else 4
    buf = memoryview(data.data)  # slices of a memoryview are views: the compressed bytes are never copied
    if len(buf) < h * cw:
        return None
    table = np.frombuffer(buf, ">u2" if cw == 2 else ">u4", h)
    starts = np.empty(h + 1, np.int64)
    starts[0] = h * cw
    np.cumsum(table, dtype=np.int64, out=starts[1:])
    starts[1:] += h * cw
    if int(starts[-1]) != len(buf):
        return None
    return buf, starts


def _decode_plane(data, depth: int, version: int, w: int, h: int) -> np.ndarray:
    """One stored channel as a (h, w) array of its raw sample type (uint8, >u2 or >f4), decoded in one go."""
    from psd_tools.compression import decompress

    raw = decompress(bytes(data.data), data.compression, w, h, depth, version)  # psd-tools' tolerant per-row path
    return np.frombuffer(raw, _DTYPE[depth], w * h).reshape(h, w)


def _decode_channels(psd, layer) -> np.ndarray | None:
    """Straight RGBA float32 (h, w, 4) of a raster layer from its stored channels, or None when it has none."""
    from psd_tools.compression import rle_impl

    w, h = layer.width, layer.height
    if w <= 0 or h <= 0:
        return None
    depth = psd.depth
    if depth not in _DTYPE:
        raise PSDError(f"layer {layer.name!r}: {depth}-bit channels are not supported (8, 16 or 32 bit)")
    stored = {info.id: data for info, data in zip(layer._record.channel_info, layer._channels)
              if info.id in (-1, 0, 1, 2)}
    if any(c not in stored for c in (0, 1, 2)):
        return None
    dtype = _DTYPE[depth]
    row_bytes = w * dtype.itemsize
    # Per channel: (buffer, row offsets) for RLE decoded band by band, a whole decoded plane for raw, ZIP or a
    # damaged row table, or None for a missing alpha. Decoding RLE a band at a time keeps every temporary small
    # (reused heap memory, in cache) instead of a fresh full-size plane per channel, which costs page faults.
    sources = [None if key not in stored else (_rle_rows(stored[key], depth, psd.version, w, h)
                                               or _decode_plane(stored[key], depth, psd.version, w, h))
               for key in (0, 1, 2, -1)]
    out = np.empty((h, w, 4), np.float32)
    scale = np.float32(1.0 / _SCALE[depth])
    rows = max(1, _BAND_PIXELS // w)
    band = np.empty((rows, w, 4), dtype.newbyteorder("="))
    for r0 in range(0, h, rows):  # interleave in cache-sized bands, then one contiguous convert
        r1 = min(h, r0 + rows)
        b = band[: r1 - r0]
        for c, src in enumerate(sources):
            if src is None:
                b[..., c] = 1 if depth == 32 else int(_SCALE[depth])
            elif isinstance(src, np.ndarray):
                b[..., c] = src[r0:r1]
            else:
                buf, starts = src
                raw = rle_impl.decode(buf[starts[r0]:starts[r1]], (r1 - r0) * row_bytes)
                b[..., c] = np.frombuffer(raw, dtype, (r1 - r0) * w).reshape(r1 - r0, w)
        np.multiply(b, scale, out=out[r0:r1])
    return out


def _raster_preview(layer) -> np.ndarray | None:
    """Straight RGBA float32 of a non-pixel layer through psd-tools' own rendering, or None."""
    for data in layer._channels:  # psd-tools' own paths get bytes, as from a file it read itself
        if isinstance(data.data, memoryview):
            data.data = bytes(data.data)
    img = layer.topil()
    if img is None:
        return None
    return np.asarray(img.convert("RGBA"), np.float32) / np.float32(255.0)


def _blend_name(layer, warn) -> str:
    """The core blend-mode name of a psd-tools layer (nearest mode, with a warning, for unknown keys)."""
    raw = layer.blend_mode
    key = (raw.value if hasattr(raw, "value") else raw)
    key = key.decode("latin-1") if isinstance(key, bytes) else str(key)
    mode, exact = blend_mode_from_psd_key(key)
    if not exact:
        warn(f"layer {layer.name!r}: blend key {key!r} has no exact core mode; read as {mode!r}")
    return mode if mode in BLEND_MODES else "normal"


def read_psd(path: str | os.PathLike[str], *, workers: int | None = None) -> LayerStack:
    """Read a PSD's raster layers (bottom first) with names, offsets, opacity, blend mode and visibility."""
    path = Path(path)
    psd, reader = _open(path)
    try:
        return _read_layers(psd, path, workers)
    finally:
        if reader is not None:
            reader.close()


def _read_layers(psd, path: Path, workers: int | None) -> LayerStack:
    """The layers of an opened PSD (see read_psd)."""
    rgb = int(psd.color_mode) == 3
    if not rgb:
        log.warning("%s: colour mode %s is not RGB; layers are converted to RGBA by psd-tools", path,
                    getattr(psd.color_mode, "name", psd.color_mode))
    warned: set[str] = set()

    def warn(msg: str) -> None:
        if msg not in warned:
            warned.add(msg)
            log.warning("%s: %s", os.fspath(path), msg)

    leaves: list[tuple[object, bool, float]] = []  # (psd-tools layer, visible, opacity), bottom first

    def visit(items, visible: bool, opacity: float) -> None:
        for item in items:
            if item.is_group():
                warn("layer groups are flattened: their children are kept in order, with the group's "
                     "visibility and opacity folded in")
                visit(list(item), visible and item.visible, opacity * item.opacity / 255.0)
            else:
                leaves.append((item, visible and item.visible, opacity * item.opacity / 255.0))

    def pixels(item) -> np.ndarray | None:
        if item.kind == "pixel":  # an empty (0x0) pixel layer is kept, so indices stay as written
            px = _decode_channels(psd, item) if rgb else _raster_preview(item)
            return np.zeros((0, 0, 4), np.float32) if px is None else px
        px = _raster_preview(item) if item.has_pixels() else None
        if px is None:
            warn(f"layer {item.name!r} ({item.kind}) has no pixels and was skipped")
        else:
            warn(f"layer {item.name!r} is a {item.kind} layer; read as its stored raster image")
        return px

    _check_image_data(psd, path)
    layers: list[Layer] = []
    try:
        visit(list(psd), True, 1.0)
        n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
        if n_workers > 1 and len(leaves) > 1:  # numpy releases the GIL: layers convert while others decode
            with ThreadPoolExecutor(n_workers) as pool:
                decoded = list(pool.map(pixels, [item for item, _, _ in leaves]))
        else:
            decoded = [pixels(item) for item, _, _ in leaves]
        for (item, visible, opacity), px in zip(leaves, decoded):
            if px is None:
                continue
            layers.append(Layer(pixels=px, x=item.left if px.size else 0, y=item.top if px.size else 0,
                                name=item.name, opacity=opacity, blend_mode=_blend_name(item, warn),
                                visible=visible))
    except (ValueError, OSError, EOFError, struct.error, IndexError) as err:
        if isinstance(err, PSDError):
            raise
        raise PSDError(f"{os.fspath(path)!r}: layer data is damaged ({type(err).__name__}: {err}); "
                       f"re-export the file") from err
    return LayerStack(psd.width, psd.height, layers)
