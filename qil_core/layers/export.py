"""PNG-per-layer export (and a ZIP of them) and the way back into a `LayerStack`.

Files are named bottom first, `{prefix}_{index}_{name}.png` with a zero-padded 0-based index (the same index
`LayerStack` uses) and a file-name-safe version of the layer name. Each PNG is 8-bit RGBA with RGB zeroed
under fully transparent pixels (smaller, faster files; no hidden colour) and carries the layer's name, offset,
opacity, blend mode and visibility in PNG text chunks, so `read_layer_pngs` restores the stack exactly.
Every file is written atomically and an existing file is never replaced unless asked; when one file of a set
fails, the files this call already wrote are removed again, so a set is either complete or absent.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, PngImagePlugin

from ..errors import InputError, OutputPathError
from ..fsutil import atomic_write, check_output_name, safe_name
from .stack import BLEND_MODES, Layer, LayerStack

_META_KEY = "qil:layer"  # PNG text chunk holding the layer's JSON record
MANIFEST = "manifest.json"


def quantize_rgba8(pixels: np.ndarray) -> np.ndarray:
    """(..., 3|4) float straight colour 0..1 -> uint8 (round half up, clipped); RGB zeroed where alpha is 0.

    The one 8-bit quantisation of every PNG the pack writes (zeroed RGB under alpha 0 keeps files small).
    """
    q = np.empty(pixels.shape, np.uint8)
    np.copyto(q, np.clip(pixels, 0, 1) * np.float32(255) + np.float32(0.5), casting="unsafe")
    if q.shape[-1] == 4:
        q[..., :3] *= q[..., 3:4] != 0
    return q


def write_png(rgba: np.ndarray, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write (H, W, 4) float straight RGBA as an 8-bit PNG atomically (RGB when fully opaque); returns the path."""
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
        out[y0:y1, x0:x1] = q[y0 - layer.y:y1 - layer.y, x0 - layer.x:x1 - layer.x]
    return out


def _record(layer: Layer, index: int, file: str, stack: LayerStack, full_canvas: bool) -> dict:
    """The JSON record of one exported layer (also stored inside its PNG)."""
    return {"index": index, "file": file, "name": layer.name, "x": layer.x, "y": layer.y,
            "width": layer.width, "height": layer.height, "opacity": layer.opacity,
            "blend_mode": layer.blend_mode, "visible": layer.visible, "canvas": [stack.width, stack.height],
            "full_canvas": full_canvas}


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
    names = [f"{prefix}_{i:0{digits}d}_{safe_name(layer.name, fallback='layer')}.png"
             for i, layer in enumerate(stack.layers)]
    for name in names:
        check_output_name(name)
    return names


def export_pngs(stack: LayerStack, out_dir: str | os.PathLike[str], *, prefix: str = "layer",
                full_canvas: bool = True, overwrite: bool = False, compress_level: int = 6) -> list[Path]:
    """Write one RGBA PNG per layer into `out_dir` (created if missing), bottom first; returns the paths."""
    if not stack.layers:
        raise InputError("the stack has no layers; nothing to export")
    out = Path(out_dir)
    names = layer_file_names(stack, prefix)
    if not overwrite:
        taken = [n for n in names if os.path.lexists(out / n)]
        if taken:
            raise OutputPathError(f"{len(taken)} of the PNG names already exist in {os.fspath(out)!r} (first: "
                                  f"{taken[0]!r}); nothing was written; choose another prefix or folder")
    written: list[Path] = []
    try:
        for i, (layer, name) in enumerate(zip(stack.layers, names)):
            data = _png_bytes(_to_rgba8(layer, stack.width, stack.height, full_canvas),
                              _record(layer, i, name, stack, full_canvas), compress_level)
            written.append(atomic_write(out / name, lambda f, d=data: f.write(d), overwrite=overwrite,
                                        make_dirs=True))
    except BaseException:
        for p in written:  # a set is complete or absent
            p.unlink(missing_ok=True)
        raise
    return written


def export_zip(stack: LayerStack, path: str | os.PathLike[str], *, full_canvas: bool = True,
               prefix: str = "layer", overwrite: bool = False, compress_level: int = 6) -> Path:
    """Write a ZIP holding the per-layer PNGs and manifest.json (names, offsets, opacity, blend); returns it."""
    if not stack.layers:
        raise InputError("the stack has no layers; nothing to export")
    names = layer_file_names(stack, prefix)
    records = [_record(layer, i, n, stack, full_canvas) for i, (layer, n) in enumerate(zip(stack.layers, names))]

    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:  # PNGs are compressed already
            for layer, rec in zip(stack.layers, records):
                z.writestr(rec["file"], _png_bytes(_to_rgba8(layer, stack.width, stack.height, full_canvas), rec,
                                                   compress_level))
            manifest = {"version": 1, "canvas": [stack.width, stack.height], "order": "bottom first",
                        "layers": records}
            z.writestr(MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1))

    return atomic_write(path, write, overwrite=overwrite)


def _layer_from_png(data: bytes | Path, fallback_name: str, record: dict | None) -> tuple[Layer, dict | None]:
    """One Layer from PNG bytes or a path, using its stored record (or `record`) when present."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            info = dict(img.info)
            rgba = img.convert("RGBA")
    except (OSError, SyntaxError) as err:
        raise InputError(f"{fallback_name!r} is not a readable PNG image ({err}); export it again") from err
    meta = record
    if meta is None and _META_KEY in info:
        meta = json.loads(info[_META_KEY])
    px = np.asarray(rgba, np.float32) / np.float32(255.0)
    if meta is None:
        return Layer.from_canvas(px, name=fallback_name), None
    blend = meta.get("blend_mode", "normal")
    fields = {"name": meta.get("name", fallback_name), "opacity": float(meta.get("opacity", 1.0)),
              "blend_mode": blend if blend in BLEND_MODES else "normal", "visible": bool(meta.get("visible", True))}
    if meta.get("width", 1) == 0 or meta.get("height", 1) == 0:
        return Layer(np.zeros((0, 0, 4), np.float32), 0, 0, **fields), meta
    if meta.get("full_canvas", True):
        layer = Layer(px, 0, 0, **fields).cropped()
        return layer, meta
    return Layer(px, int(meta.get("x", 0)), int(meta.get("y", 0)), **fields), meta


def read_layer_pngs(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> LayerStack:
    """A LayerStack from PNGs given bottom first, or from one ZIP written by `export_zip`."""
    items = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not items:
        raise InputError("no PNG files given; pass at least one, bottom layer first")
    if len(items) == 1 and zipfile.is_zipfile(items[0]):
        return _read_zip(items[0])
    layers, canvas = [], None
    for p in items:
        if not p.is_file():
            raise InputError(f"layer image {os.fspath(p)!r} not found; check the path")
        layer, meta = _layer_from_png(p, p.stem, None)
        layers.append(layer)
        if meta is not None and canvas is None:
            canvas = tuple(meta["canvas"])
    if canvas is None:  # plain PNGs: the canvas is the largest image, every layer placed at (0, 0)
        sizes = []
        for p in items:
            with Image.open(p) as im:  # reads the header only
                sizes.append(im.size)
        canvas = (max(s[0] for s in sizes), max(s[1] for s in sizes))
    return LayerStack(canvas[0], canvas[1], layers)


def _read_zip(path: Path) -> LayerStack:
    """A LayerStack from an `export_zip` archive, following its manifest."""
    with zipfile.ZipFile(path) as z:
        try:
            manifest = json.loads(z.read(MANIFEST))
        except KeyError:
            raise InputError(f"{os.fspath(path)!r} has no {MANIFEST}; it was not written by export_zip") from None
        layers = []
        for rec in manifest["layers"]:
            layer, _ = _layer_from_png(z.read(rec["file"]), Path(rec["file"]).stem, rec)
            layers.append(layer)
    w, h = manifest["canvas"]
    return LayerStack(int(w), int(h), layers)
