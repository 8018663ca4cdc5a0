"""PSD in and out for `LayerStack`: the public entry points (writer, reader, structural check).

- `write.py`: our fast writer (`write_psd`), one cropped pixel layer per `Layer` plus a real merged image.
- `read.py`: the reader (`read_psd`, `load_psd` with its warnings, `read_psd_merged`): psd-tools parses the
  structure, our code decodes the channels; its parts: `open.py` (header limits, plain errors), `decode.py`
  (channels, strict RLE tables, RAM check), `color.py` (32-bit and profiles to sRGB), `masks.py` (pixel and
  vector masks), `groups.py` (groups, clipping, fill opacity, warnings per feature).
- `lint.py`: the structural checker (`lint_psd`) for every length, table and count readers trust.
- `packbits.py`: vectorised PackBits (RLE) for PSD channels.
- `icc.py`: the embedded sRGB ICC profile.
"""

from __future__ import annotations

from .lint import lint_psd
from .read import PSDRead, load_psd, read_psd, read_psd_merged
from .write import MAX_LAYERS, MAX_NAME_CHARS, PASCAL_NAME_BYTES, pascal_name, write_psd

__all__ = [
    "MAX_LAYERS",
    "MAX_NAME_CHARS",
    "PASCAL_NAME_BYTES",
    "PSDRead",
    "lint_psd",
    "load_psd",
    "pascal_name",
    "read_psd",
    "read_psd_merged",
    "write_psd",
]
