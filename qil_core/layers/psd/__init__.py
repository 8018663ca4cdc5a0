"""PSD in and out for `LayerStack`: the public entry points (writer, reader, structural check).

- `write.py`: our fast writer (`write_psd`), one cropped pixel layer per `Layer` plus a real merged image.
- `read.py`: the reader (`read_psd`): psd-tools parses the structure, our code decodes the channels.
- `lint.py`: the structural checker (`lint_psd`) for every length, table and count readers trust.
- `packbits.py`: vectorised PackBits (RLE) for PSD channels.
- `icc.py`: the embedded sRGB ICC profile.
"""

from __future__ import annotations

from .lint import lint_psd
from .read import read_psd
from .write import MAX_LAYERS, MAX_NAME_CHARS, PASCAL_NAME_BYTES, pascal_name, write_psd

__all__ = ["MAX_LAYERS", "MAX_NAME_CHARS", "PASCAL_NAME_BYTES", "lint_psd", "pascal_name", "read_psd", "write_psd"]
