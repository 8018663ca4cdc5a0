"""PSD reader: psd-tools parses the structure; pixel layers are decoded straight from their channel data.

The work is split over small modules:
- open.py: header limits and plain-word errors, then psd-tools parses a memory map of the file;
- decode.py: channels to float32 (strict RLE row tables, finite 32-bit values, a RAM check per file);
- color.py: 32-bit linear data and non-sRGB RGB profiles to sRGB;
- masks.py: pixel and vector masks (density, feather, extent, default colour, disabled);
- groups.py: groups (kept or flattened as isolated groups), clipping masks, fill opacity, and one warning
  per feature that changes the picture but is not represented (effects, knockout, artboards, adjustments).
Here: which layers to decode (in parallel: numpy releases the GIL), the stored merged image (a flat file
gives one "Background" layer from it; `read_psd_merged` hands it out for "use merged"), and the warnings,
which are logged and also returned (`load_psd`) so the node and the CLI can show them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputError, PSDError
from ..blend import blend_mode_from_psd_key
from ..stack import BLEND_MODES, Layer, LayerStack
from .color import ColorConverter
from .decode import RGBA_BYTES, check_layers_fit, layer_rgba, make_finite
from .groups import GROUP_MODES, TreeReader
from .open import PARSE_ERRORS, open_psd, plain

log = logging.getLogger(__name__)


@dataclass
class PSDRead:
    """What `load_psd` found: the layers, the warnings (text, and feature -> count), the merged image if asked."""

    stack: LayerStack
    warnings: list[str] = field(default_factory=list)
    features: dict[str, int] = field(default_factory=dict)
    merged: np.ndarray | None = None


class _Notes:
    """Collects warnings once each, logs them with the file name, and counts them by feature."""

    def __init__(self, path: Path) -> None:
        self.path = os.fspath(path)
        self.messages: list[str] = []
        self.features: dict[str, int] = {}

    def __call__(self, feature: str, msg: str) -> None:
        if msg in self.messages:
            return
        self.messages.append(msg)
        self.features[feature] = self.features.get(feature, 0) + 1
        log.warning("%s: %s", self.path, msg)


def _merged_problem(psd) -> str | None:
    """Why the stored merged image cannot be decoded (cut short), or None when it is whole."""
    img = psd._record.image_data
    data = img.data or b""
    row_bytes = (psd.width * psd.depth + 7) // 8
    rows = psd.channels * psd.height
    comp = int(img.compression)
    if comp == 0:
        ok = len(data) >= rows * row_bytes
    elif comp == 1:
        cw = 2 if psd.version == 1 else 4
        ok = (
            len(data) >= rows * cw
            and int(np.frombuffer(data, ">u2" if cw == 2 else ">u4", rows).sum(dtype=np.int64)) <= len(data) - rows * cw
        )
    else:
        ok = len(data) > 0
    return None if ok else f"its merged image ends early ({len(data)} bytes)"


def _merged_rgba(psd, path: Path, colors: ColorConverter, warn) -> np.ndarray:
    """The stored merged image as straight RGBA float32 (H, W, 4) in sRGB."""
    problem = _merged_problem(psd)
    if problem is not None:
        raise PSDError(f"{os.fspath(path)!r} is truncated: {problem}; re-export or re-download the file")
    check_layers_fit(path, [], extra=psd.width * psd.height * RGBA_BYTES * 3)
    mode = int(psd.color_mode)
    if mode in (1, 3) and psd.depth in (8, 16, 32):  # grayscale / RGB at full precision
        from psd_tools.api.numpy_io import get_transparency_index, has_transparency

        planes = np.asarray(psd.numpy(), np.float32)  # decoded once: colour and transparency are its channels
        out = np.empty((psd.height, psd.width, 4), np.float32)
        out[..., :3] = planes[..., :1] if mode == 1 else planes[..., :3]
        out[..., 3] = planes[..., get_transparency_index(psd)] if has_transparency(psd) else 1.0
        if psd.depth == 32:
            make_finite(out, "merged image", warn)
        if mode == 3 or psd.depth == 32:
            colors.apply(out)
        return np.clip(out, 0, 1, out=out)
    img = psd.topil(apply_icc=True)  # Bitmap, Indexed, CMYK, Lab, Duotone, Multichannel: psd-tools converts
    if img is None:
        raise PSDError(f"{os.fspath(path)!r} has no merged image to read")
    return np.asarray(img.convert("RGBA"), np.float32) / np.float32(255.0)


def _raster_preview(layer, rgb: bool) -> np.ndarray | None:
    """Straight RGBA float32 of a non-pixel layer (or a non-RGB one) through psd-tools' own rendering, or None."""
    for data in layer._channels:  # psd-tools' own paths get bytes, as from a file it read itself
        if isinstance(data.data, memoryview):
            data.data = bytes(data.data)
    img = layer.topil(apply_icc=not rgb)
    if img is None:
        return None
    return np.asarray(img.convert("RGBA"), np.float32) / np.float32(255.0)


def _solid_fill(item, size: tuple[int, int]) -> np.ndarray | None:
    """A solid-colour fill layer drawn over the canvas (its masks cut it later), or None when unreadable."""
    data = item.data
    try:
        rgb = [float(data[k]) / 255.0 for k in (b"Rd  ", b"Grn ", b"Bl  ")]
    except (KeyError, TypeError, ValueError):
        return None
    out = np.empty((size[1], size[0], 4), np.float32)
    out[...] = [*np.clip(rgb, 0, 1), 1.0]
    return out


def _blend_name(layer, warn) -> str:
    """The core blend-mode name of a psd-tools layer (nearest mode, with a warning, for unknown keys)."""
    raw = layer.blend_mode
    key = raw.value if hasattr(raw, "value") else raw
    key = key.decode("latin-1") if isinstance(key, bytes) else str(key)
    if key == "pass":
        return "normal"
    mode, exact = blend_mode_from_psd_key(key)
    if not exact:
        feature = "dissolve" if key == "diss" else "blend mode"
        warn(feature, f"layer {layer.name!r}: blend mode {key!r} has no exact core mode; read as {mode!r}")
    return mode if mode in BLEND_MODES else "normal"


def _leaves(items) -> list:
    """Every non-group item under `items`, in tree order."""
    out = []
    for item in items:
        out.extend(_leaves(list(item)) if item.is_group() else [item])
    return out


def read_psd(
    path: str | os.PathLike[str], *, workers: int | None = None, groups: str = "keep", warnings: list[str] | None = None
) -> LayerStack:
    """Read a PSD's layers (bottom first) with names, offsets, opacity, blend mode and visibility.

    `groups` is "keep" (keep the children of pass-through groups) or "flatten" (every group one layer); the
    warnings are logged and, when `warnings` is a list, appended to it.
    """
    result = load_psd(path, workers=workers, groups=groups)
    if warnings is not None:
        warnings.extend(result.warnings)
    return result.stack


def read_psd_merged(path: str | os.PathLike[str], *, warnings: list[str] | None = None) -> np.ndarray:
    """Photoshop's stored merged image of a PSD as straight RGBA float32 (H, W, 4) in sRGB."""
    path = Path(path)
    notes = _Notes(path)
    psd, reader = open_psd(path)
    try:
        colors = ColorConverter(psd.depth, int(psd.color_mode) == 3, _icc(psd), notes)
        return _merged_rgba(psd, path, colors, notes)
    except PARSE_ERRORS as err:
        if isinstance(err, PSDError):
            raise
        raise PSDError(f"{os.fspath(path)!r}: the merged image is damaged ({plain(err)}); re-export the file") from err
    finally:
        if warnings is not None:
            warnings.extend(notes.messages)
        if reader is not None:
            reader.close()


def load_psd(
    path: str | os.PathLike[str], *, workers: int | None = None, groups: str = "keep", merged: bool = False
) -> PSDRead:
    """Read a PSD into a `PSDRead`: the layer stack, the warnings, and the stored merged image when `merged`."""
    if groups not in GROUP_MODES:
        raise InputError(f"groups must be one of {', '.join(GROUP_MODES)}, got {groups!r}")
    path = Path(path)
    psd, reader = open_psd(path)
    try:
        return _load(psd, path, workers, groups, merged)
    except PARSE_ERRORS as err:
        if isinstance(err, PSDError):
            if os.fspath(path) in str(err):
                raise
            raise PSDError(f"{os.fspath(path)!r}: {err}") from err
        raise PSDError(f"{os.fspath(path)!r}: layer data is damaged ({plain(err)}); re-export the file") from err
    finally:
        if reader is not None:
            reader.close()


def _icc(psd) -> bytes | None:
    from psd_tools.constants import Resource

    data = psd.image_resources.get_data(Resource.ICC_PROFILE)
    return bytes(data) if data else None


def _load(psd, path: Path, workers: int | None, groups: str, want_merged: bool) -> PSDRead:
    """The layers of an opened PSD (see load_psd)."""
    from psd_tools.api.adjustments import SolidColorFill
    from psd_tools.api.layers import AdjustmentLayer

    notes = _Notes(path)
    rgb = int(psd.color_mode) == 3
    if not rgb:
        notes(
            "colour mode",
            f"colour mode {getattr(psd.color_mode, 'name', psd.color_mode)} is not RGB; layers are "
            f"converted to RGBA by psd-tools",
        )
    colors = ColorConverter(psd.depth, rgb, _icc(psd), notes)
    items = list(psd)
    leaves = _leaves(items)
    check_layers_fit(path, [(it.name, it.width, it.height) for it in leaves if it.width > 0 and it.height > 0])

    def pixels(item) -> tuple[np.ndarray, int, int, bool] | None:
        x, y = item.left, item.top
        if isinstance(item, AdjustmentLayer):
            notes("adjustment layer", f"adjustment layer {item.name!r} ({item.kind}) is not applied")
            return None
        if item.kind == "pixel":  # an empty (0x0) pixel layer is kept, so indices stay as written
            deep = rgb and psd.depth in (8, 16, 32)
            px = layer_rgba(item, psd.depth, psd.version, item.name, notes) if deep else _raster_preview(item, rgb)
            px = np.zeros((0, 0, 4), np.float32) if px is None else px
        elif isinstance(item, SolidColorFill) and rgb:
            px = _solid_fill(item, (psd.width, psd.height))
            if px is None:
                notes("fill layer", f"fill layer {item.name!r}: its colour cannot be read; skipped")
                return None
            x = y = 0  # a fill covers the canvas; its masks cut it
        else:
            px = _raster_preview(item, rgb) if item.has_pixels() else None
            if px is None:
                notes("no pixels", f"layer {item.name!r} ({item.kind}) stores no pixels and was skipped")
                return None
            notes(item.kind, f"layer {item.name!r} is a {item.kind} layer; read as its stored raster image")
        return (colors.apply(px) if rgb or psd.depth == 32 else px), x, y, False

    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if n_workers > 1 and len(leaves) > 1:  # numpy releases the GIL: layers convert while others decode
        with ThreadPoolExecutor(n_workers) as pool:
            decoded = list(pool.map(pixels, leaves))
    else:
        decoded = [pixels(item) for item in leaves]
    tree = TreeReader(
        psd.depth,
        psd.version,
        notes,
        lambda it: _blend_name(it, notes),
        {id(it): px for it, px in zip(leaves, decoded)},
        groups,
    )
    layers = tree.build(items)
    problem = _merged_problem(psd)
    merged = None
    if not any(layer.pixels.size for layer in layers) and items and problem is not None:
        notes("merged image", f"no layer has pixels and {problem}; the document is read as empty")
    elif not any(layer.pixels.size for layer in layers):
        if leaves:
            notes(
                "no raster layers",
                f"none of the {len(leaves)} layers has pixels the reader can draw; the stored "
                f"merged image is read as one 'Background' layer",
            )
        else:
            log.info("%s: no layer records (a flat file); the merged image is one 'Background' layer", path)
        merged = _merged_rgba(psd, path, colors, notes)
        layers = [Layer(merged.copy(), name="Background")]
    elif problem is not None:
        notes("merged image", f"{problem}; it is ignored, the layers are intact")
    if want_merged and merged is None:
        merged = _merged_rgba(psd, path, colors, notes)
    return PSDRead(LayerStack(psd.width, psd.height, layers), notes.messages, notes.features, merged)
