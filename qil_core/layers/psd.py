"""PSD in and out for `LayerStack`: the public entry points (writer, reader, structural check).

The work lives in psd_write.py (our fast writer), psd_read.py (psd-tools parsing, our channel decoding),
psd_lint.py (the structural checker) and packbits.py (vectorised RLE).
"""

from __future__ import annotations

from .psd_lint import lint_psd
from .psd_read import PSDRead, load_psd, read_psd, read_psd_merged
from .psd_write import MAX_LAYERS, MAX_NAME_CHARS, PASCAL_NAME_BYTES, pascal_name, write_psd

__all__ = ["MAX_LAYERS", "MAX_NAME_CHARS", "PASCAL_NAME_BYTES", "PSDRead", "lint_psd", "load_psd", "pascal_name",
           "read_psd", "read_psd_merged", "write_psd"]
