"""PNG-per-layer export (and a ZIP of them) and the way back into a `LayerStack`.

Files are named bottom first, `{prefix}_{index}_{name}.png` with a zero-padded 0-based index (the same index
`LayerStack` uses) and a file-name-safe version of the layer name. Each PNG is 8-bit RGBA with RGB zeroed
under fully transparent pixels (smaller, faster files; no hidden colour) and carries the layer's name, offset,
opacity, blend mode and visibility in PNG text chunks, so `read_layer_pngs` restores the stack exactly.
A set of PNGs is written as one group (`fsutil.write_group`): an existing file is never replaced unless asked,
and a failure anywhere leaves every file as it was. Reading checks each record and the sizes first, so damaged
or hostile files give one InputError naming the file.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, PngImagePlugin

from ..errors import InputError, OutputPathError
from ..fsutil import atomic_write, atomic_write_bytes, check_output_name, safe_name, write_group
from ..resources import check_allocation, format_bytes
from .image_file import read_rgba
from .stack import BLEND_MODES, MAX_CANVAS_SIDE, Layer, LayerStack

_META_KEY = "qil:layer"  # PNG text chunk holding the layer's JSON record
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 2**20  # a manifest of 20 layers is a few KB; read no more than this
MAX_MEMBER_BYTES = 4 * 2**30  # one layer PNG inside a ZIP


def quantize_rgba8(pixels: np.ndarray) -> np.ndarray:
    """(..., 3|4) float straight colour 0..1 -> uint8 (round half up, clipped); RGB zeroed where alpha is 0.

    The one 8-bit quantisation of every PNG the pack writes (zeroed RGB under alpha 0 keeps files small).
    """
    q: np.ndarray = np.empty(pixels.shape, np.uint8)  # numpy 2.4 stubs infer a 0-d shape from tuple[Any, ...]
    np.copyto(q, np.clip(pixels, 0, 1) * np.float32(255) + np.float32(0.5), casting="unsafe")
    if q.shape[-1] == 4:
        q[..., :3] *= q[..., 3:4] != 0
    return q


def write_png(rgba: np.ndarray, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write (H, W, 4) float straight RGBA as an 8-bit PNG atomically (RGB when fully opaque); returns the path.

    NaN or infinite pixels are refused (nothing is written): they have no colour, and no NaN may reach a file.
    """
    bad = int(rgba.size - np.count_nonzero(np.isfinite(rgba)))
    if bad:
        raise InputError(
            f"cannot write {os.fspath(path)!r}: the image holds {bad} NaN or infinite values (a damaged "
            "input, e.g. a 32-bit PSD with invalid floats); nothing was written. Repair the input"
        )
    px = quantize_rgba8(rgba)
    img = Image.fromarray(px[..., :3], "RGB") if bool((px[..., 3] == 255).all()) else Image.fromarray(px, "RGBA")

    def write(f: BinaryIO) -> None:
        img.save(f, format="PNG", compress_level=6)

    return atomic_write(path, write, overwrite=overwrite)


def _to_rgba8(layer: Layer, width: int, height: int, full_canvas: bool) -> np.ndarray:
    """The layer as 8-bit straight RGBA: on the canvas at its offset (clipped) or its own cropped pixels."""
    if not np.isfinite(layer.pixels).all():
        raise InputError(f"layer {layer.name!r}: pixels contain NaN or infinity; fix the image before exporting")
    q = quantize_rgba8(layer.pixels)
    if not full_canvas:
        return q if q.size else np.zeros((1, 1, 4), np.uint8)
    out = np.zeros((height, width, 4), np.uint8)
    x0, y0 = max(layer.x, 0), max(layer.y, 0)
    x1, y1 = min(layer.x + layer.width, width), min(layer.y + layer.height, height)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = q[y0 - layer.y : y1 - layer.y, x0 - layer.x : x1 - layer.x]
    return out


def _record(layer: Layer, index: int, file: str, stack: LayerStack, full_canvas: bool) -> dict:
    """The JSON record of one exported layer (also stored inside its PNG)."""
    return {
        "index": index,
        "file": file,
        "name": layer.name,
        "x": layer.x,
        "y": layer.y,
        "width": layer.width,
        "height": layer.height,
        "opacity": layer.opacity,
        "blend_mode": layer.blend_mode,
        "visible": layer.visible,
        "canvas": [stack.width, stack.height],
        "full_canvas": full_canvas,
    }


def _png_bytes(rgba: np.ndarray, record: dict, compress_level: int) -> bytes:
    """PNG bytes of an (h, w, 4) uint8 image with the layer record in an iTXt chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(_META_KEY, json.dumps(record, ensure_ascii=False))
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


def layer_file_names(stack: LayerStack, prefix: str = "layer") -> list[str]:
    """The PNG file names `export_pngs` uses for `stack`, bottom first."""
    digits = max(2, len(str(len(stack.layers) - 1)))
    names = [
        f"{prefix}_{i:0{digits}d}_{safe_name(layer.name, fallback='layer')}.png" for i, layer in enumerate(stack.layers)
    ]
    for name in names:
        check_output_name(name)
    return names


def png_items(
    stack: LayerStack,
    out_dir: str | os.PathLike[str],
    *,
    prefix: str = "layer",
    full_canvas: bool = True,
    compress_level: int = 6,
) -> list[tuple[Path, Callable[[Path], object]]]:
    """`(path, write)` items of the per-layer PNGs for `fsutil.write_group` (each PNG encoded when written), so
    callers can publish them together with other files (a manifest, a PSD) as one group."""
    if not stack.layers:
        raise InputError("the stack has no layers; nothing to export")
    out = Path(out_dir)
    items: list[tuple[Path, Callable[[Path], object]]] = []
    for i, (layer, name) in enumerate(zip(stack.layers, layer_file_names(stack, prefix))):

        def write(staged: Path, layer: Layer = layer, i: int = i, name: str = name) -> Path:
            data = _png_bytes(
                _to_rgba8(layer, stack.width, stack.height, full_canvas),
                _record(layer, i, name, stack, full_canvas),
                compress_level,
            )
            return atomic_write_bytes(staged, data)

        items.append((out / name, write))
    return items


def export_pngs(
    stack: LayerStack,
    out_dir: str | os.PathLike[str],
    *,
    prefix: str = "layer",
    full_canvas: bool = True,
    overwrite: bool = False,
    compress_level: int = 6,
) -> list[Path]:
    """Write one RGBA PNG per layer into `out_dir` (created if missing), bottom first; returns the paths.

    The set is written as one group (`fsutil.write_group`): all files appear, or replace their old versions,
    together; on any failure no file changes.
    """
    items = png_items(stack, out_dir, prefix=prefix, full_canvas=full_canvas, compress_level=compress_level)
    if not overwrite:
        taken = [p.name for p, _ in items if os.path.lexists(p)]
        if taken:
            raise OutputPathError(
                f"{len(taken)} of the PNG names already exist in {os.fspath(out_dir)!r} (first: "
                f"{taken[0]!r}); nothing was written; choose another prefix or folder"
            )
    return write_group(items, overwrite=overwrite, make_dirs=True)


def export_zip(
    stack: LayerStack,
    path: str | os.PathLike[str],
    *,
    full_canvas: bool = True,
    prefix: str = "layer",
    overwrite: bool = False,
    compress_level: int = 6,
) -> Path:
    """Write a ZIP holding the per-layer PNGs and manifest.json (names, offsets, opacity, blend); returns it."""
    if not stack.layers:
        raise InputError("the stack has no layers; nothing to export")
    names = layer_file_names(stack, prefix)
    records = [_record(layer, i, n, stack, full_canvas) for i, (layer, n) in enumerate(zip(stack.layers, names))]

    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:  # PNGs are compressed already
            for layer, rec in zip(stack.layers, records):
                z.writestr(
                    rec["file"],
                    _png_bytes(_to_rgba8(layer, stack.width, stack.height, full_canvas), rec, compress_level),
                )
            manifest = {"version": 1, "canvas": [stack.width, stack.height], "order": "bottom first", "layers": records}
            z.writestr(MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1))

    return atomic_write(path, write, overwrite=overwrite)


def _json_record(text: str | bytes, what: str) -> dict:
    """A layer record or manifest parsed from JSON; InputError naming `what` unless it is a JSON object."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise InputError(f"{what} is not valid JSON ({err}); export the layers again") from None
    if not isinstance(value, dict):
        raise InputError(
            f"{what} is a JSON {type(value).__name__}, not an object with layer fields; export the layers again"
        )
    return value


def _field(meta: dict, key: str, kind: type, default: object, what: str) -> Any:
    """One field of a layer record converted to `kind`; InputError naming the record when it cannot be."""
    value = meta.get(key, default)
    try:
        if kind is int and (isinstance(value, bool) or not float(value).is_integer()):
            raise ValueError(value)
        out = kind(value)
        if kind is float and not math.isfinite(out):
            raise ValueError(value)
        return out
    except (TypeError, ValueError, OverflowError):
        raise InputError(
            f"{what}: field {key!r} must be {'an integer' if kind is int else 'a number'}, "
            f"got {value!r}; export the layers again"
        ) from None


def _canvas(meta: dict, what: str) -> tuple[int, int] | None:
    """The record's canvas (width, height), None when it has none; InputError when it is malformed."""
    if "canvas" not in meta:
        return None
    c = meta["canvas"]
    if (
        not isinstance(c, (list, tuple))
        or len(c) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_CANVAS_SIDE for v in c)
    ):
        raise InputError(f"{what}: canvas must be [width, height] with each side 1..{MAX_CANVAS_SIDE}, got {c!r}")
    return int(c[0]), int(c[1])


def _layer_from_png(
    data: bytes | Path, fallback_name: str, record: dict | None, what: str
) -> tuple[Layer, dict | None]:
    """One Layer from PNG bytes or a path, using its stored record (or `record`) when present."""
    px, info = read_rgba(data, what)
    meta = record
    if meta is None and _META_KEY in info:
        meta = _json_record(info[_META_KEY], f"the layer record in {what}")
    if meta is None:
        return Layer.from_canvas(px, name=fallback_name), None
    blend = meta.get("blend_mode", "normal")
    fields = {
        "name": str(meta.get("name", fallback_name)),
        "opacity": _field(meta, "opacity", float, 1.0, what),
        "blend_mode": blend if blend in BLEND_MODES else "normal",
        "visible": bool(meta.get("visible", True)),
    }
    if not 0 <= fields["opacity"] <= 1:
        raise InputError(f"{what}: opacity must be in 0..1, got {fields['opacity']!r}; export the layers again")
    if _field(meta, "width", int, 1, what) == 0 or _field(meta, "height", int, 1, what) == 0:
        return Layer(np.zeros((0, 0, 4), np.float32), 0, 0, **fields), meta
    if meta.get("full_canvas", True):
        return Layer(px, 0, 0, **fields).cropped(), meta
    return Layer(px, _field(meta, "x", int, 0, what), _field(meta, "y", int, 0, what), **fields), meta


def _fit_canvas(layers: Sequence[Layer], sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """A canvas holding every layer (and every image at the origin), for records that name none."""
    w = max([s[0] for s in sizes] + [layer.x + layer.width for layer in layers])
    h = max([s[1] for s in sizes] + [layer.y + layer.height for layer in layers])
    return max(1, w), max(1, h)


def read_layer_pngs(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> LayerStack:
    """A LayerStack from PNGs given bottom first, or from one ZIP written by `export_zip`."""
    items = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not items:
        raise InputError("no PNG files given; pass at least one, bottom layer first")
    if len(items) == 1 and zipfile.is_zipfile(items[0]):
        return _read_zip(items[0])
    layers, canvas, sizes = [], None, []
    for p in items:
        if not p.is_file():
            raise InputError(f"layer image {os.fspath(p)!r} not found; check the path")
        what = f"layer image {os.fspath(p)!r}"
        layer, meta = _layer_from_png(p, p.stem, None, what)
        layers.append(layer)
        with Image.open(p) as im:  # reads the header only
            sizes.append(im.size)
        if meta is not None and canvas is None:
            canvas = _canvas(meta, what)
    if canvas is None:  # plain PNGs (or records without one): large enough for every image and layer
        canvas = _fit_canvas(layers, sizes)
    return LayerStack(canvas[0], canvas[1], layers)


def _member(z: zipfile.ZipFile, name: object, path: Path, limit: int) -> bytes:
    """The bytes of one archive member named by the manifest, after checking the name and its size."""
    where = f"{os.fspath(path)!r}"
    parts = name.replace("\\", "/").split("/") if isinstance(name, str) else [""]
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or ".." in parts:
        raise InputError(
            f"the manifest of {where} names the member {name!r}, which is not a plain name inside "
            "the archive; export the layers again"
        )
    try:
        info = z.getinfo(name)
    except KeyError:
        raise InputError(
            f"the manifest of {where} names {name!r}, which the archive does not hold; export the layers again"
        ) from None
    if info.file_size > limit:
        raise InputError(
            f"{name!r} in {where} is {format_bytes(info.file_size)}, over the "
            f"{format_bytes(limit)} limit for this member; export the layers again"
        )
    check_allocation(info.file_size, f"reading {name!r} from {where}")
    with z.open(info) as f:
        return f.read(limit + 1)


def _read_zip(path: Path) -> LayerStack:
    """A LayerStack from an `export_zip` archive, following its manifest."""
    where = f"{os.fspath(path)!r}"
    try:
        with zipfile.ZipFile(path) as z:
            if MANIFEST not in z.namelist():
                raise InputError(f"{where} has no {MANIFEST}; it was not written by export_zip")
            manifest = _json_record(_member(z, MANIFEST, path, MAX_MANIFEST_BYTES), f"{MANIFEST} in {where}")
            records = manifest.get("layers")
            if not isinstance(records, list) or not records:
                raise InputError(f"{MANIFEST} in {where} has no list of layers; export the layers again")
            canvas = _canvas(manifest, f"{MANIFEST} in {where}")
            layers = []
            for i, rec in enumerate(records):
                if not isinstance(rec, dict):
                    raise InputError(
                        f"layer {i} of {MANIFEST} in {where} is a JSON {type(rec).__name__}, not an "
                        "object; export the layers again"
                    )
                data = _member(z, rec.get("file"), path, MAX_MEMBER_BYTES)
                layer, _ = _layer_from_png(data, Path(rec["file"]).stem, rec, f"{rec['file']!r} in {where}")
                layers.append(layer)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        EOFError,
        OSError,
        ValueError,
        zlib.error,
    ) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{where} is not a readable ZIP archive ({err}); export the layers again") from None
    if canvas is None:
        canvas = _fit_canvas(layers, [])
    return LayerStack(canvas[0], canvas[1], layers)
