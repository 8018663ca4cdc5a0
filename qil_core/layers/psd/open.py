"""Opening a PSD/PSB for the reader: header limits checked first, then psd-tools parses a memory map of the file.

psd-tools parses from a memory map whose large pixel-data reads are views, not copies. The header is checked
here before psd-tools sees it (signature, version, channels, size limits of 30,000 px for PSD and 300,000 for
PSB, depth, colour mode), so errors name the file and the problem in plain words, never a library's repr.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from pathlib import Path

from ...errors import PSDError

_VIEW_MIN = 1 << 20  # reads this large in the pixel-data regions come back as views of the mapped file
_MODES = {0: "Bitmap", 1: "Grayscale", 2: "Indexed", 3: "RGB", 4: "CMYK", 7: "Multichannel", 8: "Duotone", 9: "Lab"}
PARSE_ERRORS = (ValueError, OSError, EOFError, struct.error, IndexError, KeyError, TypeError, AssertionError)


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
        pos += 4 + int.from_bytes(head[pos : pos + 4], "big")
    n = 8 if wide else 4
    if pos + 2 * n > len(head):
        return []
    lm_start = pos + n
    image_start = lm_start + int.from_bytes(head[pos : pos + n], "big")
    li_start = lm_start + n
    li_end = li_start + int.from_bytes(head[lm_start : lm_start + n], "big")
    if not li_start <= li_end <= image_start <= size:
        return []
    return [(li_start, li_end), (image_start, size)]


def plain(err: BaseException) -> str:
    """A library exception as short plain text: its type and first words, never an attrs/record repr."""
    text = re.split(r"Attribute\(|<|\n", str(err), maxsplit=1)[0].strip().rstrip(":,")
    text = re.sub(r"'?\{?name\}?'? must be in range \[\]", "a value is out of range", text)
    if len(text) > 120:
        text = text[:117] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def check_header(head: bytes, path: Path) -> None:
    """PSDError naming the file and the field when the 26-byte header is not a PSD/PSB header we can read."""
    name = os.fspath(path)
    if head[:4] != b"8BPS":
        raise PSDError(
            f"{name!r} is not a PSD file (it starts with {head[:4]!r}, not b'8BPS'); open it as an image instead"
        )
    if len(head) < 26:
        raise PSDError(f"{name!r} is truncated: {len(head)} bytes, shorter than a PSD header")
    version, channels, height, width, depth, mode = struct.unpack(">H6xHIIHH", head[4:26])
    if version not in (1, 2):
        raise PSDError(f"{name!r}: header version {version} is neither 1 (PSD) nor 2 (PSB); the file is damaged")
    limit = 30_000 if version == 1 else 300_000
    kind = "PSD" if version == 1 else "PSB"
    if not (1 <= width <= limit and 1 <= height <= limit):
        raise PSDError(
            f"{name!r} declares a {width}x{height} px canvas; a {kind} file holds 1..{limit:,} px per "
            f"side, so the header is damaged" + (" (save large documents as PSB)" if version == 1 else "")
        )
    if not 1 <= channels <= 56:
        raise PSDError(f"{name!r}: header declares {channels} channels (a PSD holds 1..56); the file is damaged")
    if depth not in (1, 8, 16, 32):
        raise PSDError(
            f"{name!r}: header declares {depth} bits per channel (1, 8, 16 or 32 are valid); the file is damaged"
        )
    if mode not in _MODES:
        raise PSDError(
            f"{name!r}: header declares colour mode {mode}, which is not a Photoshop colour mode; the file is damaged"
        )


def open_psd(path: Path):
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
    try:
        check_header(head, path)
    except PSDError:
        if mm is not None:
            mm.close()
        raise
    reader = None
    if mm is not None:
        reader = _MappedReader(mm, _pixel_regions(mm, len(mm)))
    try:
        return PSDImage.open(reader if reader is not None else path), reader  # type: ignore[arg-type]
    except PARSE_ERRORS as err:
        if reader is not None:
            reader.close()
        raise PSDError(
            f"{os.fspath(path)!r} is truncated or damaged and cannot be parsed ({plain(err)}); "
            f"re-export it from the application that made it"
        ) from err
