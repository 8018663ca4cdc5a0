"""Read a PSD with readers nobody on the team wrote: psd-tools' public API, pytoshop, ImageMagick and Pillow.

Each reader returns plain data (names, rectangles, 8/16-bit RGBA pixels) so tests can compare them with what
was written. `check_readers` runs them all and asserts agreement with a LayerStack.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qil_core.layers import LayerStack
from qil_core.layers.psd import lint_psd, pascal_name

_IM_CONVERT = next(
    (c for c in ("/usr/bin/convert", shutil.which("magick"), shutil.which("convert")) if c and Path(c).exists()), None
)
_IM_IDENTIFY = next((c for c in ("/usr/bin/identify", shutil.which("identify")) if c and Path(c).exists()), None)
HAVE_IMAGEMAGICK = _IM_CONVERT is not None and _IM_IDENTIFY is not None
REQUIRE_SYSTEM_READERS = os.environ.get("QIL_REQUIRE_SYSTEM_READERS") == "1"


# Reasons for system-reader checks that a test could not run; conftest skips the test once its body has passed.
SKIPPED_READERS: list[str] = []


def missing_system_reader(program: str, install: str, *, now: bool = True) -> None:
    """Skip (or, with QIL_REQUIRE_SYSTEM_READERS=1 as in CI, fail) a check that needs a system program.

    `now=False` lets the rest of the test run first: the skip is raised by conftest after the test body passed.
    """
    reason = f"{program} is not installed: the independent-reader check needs it ({install})"
    if REQUIRE_SYSTEM_READERS:
        pytest.fail(reason + "; QIL_REQUIRE_SYSTEM_READERS=1 requires it")
    if now:
        pytest.skip(reason)
    SKIPPED_READERS.append(reason)


def _q(px: np.ndarray, depth: int = 8) -> np.ndarray:
    """Float straight RGBA -> integer samples the way the writer rounds them, RGB zeroed where alpha is 0."""
    scale = 255 if depth == 8 else 65535
    q = np.floor(np.clip(px, 0, 1) * np.float32(scale) + np.float32(0.5)).astype(np.int64)
    q[..., :3] *= q[..., 3:4] != 0
    return q


def matted(px: np.ndarray, depth: int = 8) -> np.ndarray:
    """Integer merged-image samples as stored: colour over white, c*a + (1 - a), then alpha."""
    scale = 255 if depth == 8 else 65535
    p = np.clip(px, 0, 1).astype(np.float32)
    out = p.copy()
    out[..., :3] = p[..., :3] * p[..., 3:4] + (1 - p[..., 3:4])
    return np.floor(out * np.float32(scale) + np.float32(0.5)).astype(np.int64)


def rematte(rgba: np.ndarray, depth: int = 8) -> np.ndarray:
    """Put a reader's un-matted (straight) merged image back over white, to compare without the noise that
    un-matting adds at low alpha."""
    scale = 255 if depth == 8 else 65535
    return matted(rgba.astype(np.float64) / scale, depth)


def expected_layers(stack: LayerStack, depth: int = 8) -> list[dict]:
    """What every reader should find per layer: integer pixels cropped to alpha > 0, and their rectangle."""
    out = []
    for layer in stack.layers:
        q = _q(layer.pixels, depth)
        a = q[..., 3] > 0 if q.size else np.zeros((0, 0), bool)
        if not a.any():
            out.append({"x": 0, "y": 0, "w": 0, "h": 0, "rgba": np.zeros((0, 0, 4), np.int64)})
            continue
        rows, cols = np.flatnonzero(a.any(1)), np.flatnonzero(a.any(0))
        t, b, l, r = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        out.append(
            {"x": layer.x + int(l), "y": layer.y + int(t), "w": int(r - l), "h": int(b - t), "rgba": q[t:b, l:r]}
        )
    return out


def read_psd_tools(path: Path) -> dict:
    """psd-tools' public API: layer names (luni), rectangles, opacity, visibility, blend key, pixels, merged."""
    from psd_tools import PSDImage

    psd = PSDImage.open(path)
    scale = 255 if psd.depth == 8 else 65535
    layers = []
    for layer in psd:
        arr = layer.numpy()
        rgba = np.zeros((0, 0, 4), np.int64) if arr is None else np.round(arr * scale).astype(np.int64)
        layers.append(
            {
                "name": layer.name,
                "x": layer.left,
                "y": layer.top,
                "w": layer.width,
                "h": layer.height,
                "opacity": layer.opacity,
                "visible": layer.visible,
                "blend": layer.blend_mode.value.decode("latin-1"),
                "rgba": rgba,
            }
        )
    merged = np.round(psd.numpy() * scale).astype(np.int64)
    count = psd._record.layer_and_mask_information.layer_info.layer_count
    return {
        "size": (psd.width, psd.height),
        "depth": psd.depth,
        "layers": layers,
        "merged": merged,
        "layer_count": count,
    }


def _pytoshop_unicode(data: bytes) -> str:
    """Decode a PSD Unicode string by its count (pytoshop's own strips every trailing NUL byte, which cuts
    names ending in a character such as U+1F600 or U+4E00 whose low byte is 0; a pytoshop bug)."""
    (n,) = struct.unpack(">I", data[:4])
    return data[4 : 4 + 2 * n].decode("utf-16-be")


def read_pytoshop(path: Path) -> dict:
    """pytoshop: Pascal and Unicode names, rectangles, opacity, visibility, blend key, channel pixels."""
    import pytoshop
    import pytoshop.util

    pytoshop.util.decode_unicode_string = _pytoshop_unicode
    layers = []
    with open(path, "rb") as f:
        doc = pytoshop.read(f)
        info = doc.layer_and_mask_info.layer_info
        for rec in info.layer_records:
            h, w = rec.bottom - rec.top, rec.right - rec.left
            luni = [b.name for b in rec.blocks if type(b).__name__ == "UnicodeLayerName"]
            rgba = np.zeros((max(h, 0), max(w, 0), 4), np.int64)
            if h > 0 and w > 0:
                for i, cid in enumerate((0, 1, 2, -1)):
                    rgba[..., i] = rec.channels[cid].image
            name = rec.name.decode("mac_roman") if isinstance(rec.name, bytes) else rec.name
            blend = (
                rec.blend_mode.decode("latin-1")
                if isinstance(rec.blend_mode, bytes)
                else str(getattr(rec.blend_mode, "value", rec.blend_mode))
            )
            if isinstance(blend, bytes):
                blend = blend.decode("latin-1")
            layers.append(
                {
                    "pascal": name,
                    "name": luni[0] if luni else name,
                    "x": rec.left,
                    "y": rec.top,
                    "w": w,
                    "h": h,
                    "opacity": rec.opacity,
                    "visible": rec.visible,
                    "blend": blend,
                    "rgba": rgba,
                    "channel_ids": list(rec.channels.keys()),
                }
            )
        count = len(info.layer_records)
    return {"size": (doc.width, doc.height), "depth": doc.depth, "layers": layers, "count": count}


def _im(*args: str) -> bytes:
    """Run an ImageMagick command and return stdout."""
    if not HAVE_IMAGEMAGICK:
        missing_system_reader("ImageMagick", "apt-get install imagemagick; listed in .ci/apt-packages")
    return subprocess.run(list(args), check=True, capture_output=True, timeout=120).stdout


def read_imagemagick(path: Path, pixels: bool = True) -> dict:
    """ImageMagick: frame 0 is the merged image, then one frame per non-empty layer (Pascal names)."""
    text = _im(_IM_IDENTIFY, "-format", "%l\t%X\t%Y\t%w\t%h\t%z\n", str(path))
    frames = []
    for i, line in enumerate(text.splitlines()):
        label, x, y, w, h, depth = line.split(b"\t")  # the label is the Pascal name's raw bytes
        frame = {"name": label, "x": int(x), "y": int(y), "w": int(w), "h": int(h), "depth": int(depth)}
        if pixels:
            d = 16 if int(depth) == 16 else 8
            raw = _im(_IM_CONVERT, f"{path}[{i}]", "-depth", str(d), "-endian", "MSB", "rgba:-")
            dt = np.dtype(">u2") if d == 16 else np.dtype(np.uint8)
            frame["rgba"] = np.frombuffer(raw, dt).reshape(int(h), int(w), 4).astype(np.int64)
        frames.append(frame)
    return {"merged": frames[0], "layers": frames[1:]}


def read_pillow_merged(path: Path) -> np.ndarray:
    """Pillow's view of the file: the merged image only, as (H, W, 4) uint8."""
    with Image.open(path) as im:
        assert im.mode == "RGBA", f"Pillow opens the merged image as {im.mode}, expected RGBA"
        return np.asarray(im).astype(np.int64)


def assert_close(got: np.ndarray, want: np.ndarray, tol: int, what: str) -> None:
    """Integer pixel arrays equal within `tol`, with a helpful message."""
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    if got.size:
        err = int(np.abs(got - want).max())
        assert err <= tol, f"{what}: max pixel difference {err} > {tol}"


def imagemagick_result(out: dict) -> dict:
    """ImageMagick's reading from a `check_readers` result; skips (fails in CI) where ImageMagick is absent."""
    if "imagemagick" not in out:
        missing_system_reader("ImageMagick", "apt-get install imagemagick; listed in .ci/apt-packages")
    return out["imagemagick"]


def check_readers(
    path: Path,
    stack: LayerStack,
    *,
    depth: int = 8,
    names: list[str] | None = None,
    merged: np.ndarray | None = None,
    imagemagick: bool = True,
    pytoshop: bool = True,
) -> dict:
    """Lint the file and compare names, offsets and pixels from psd-tools, pytoshop and ImageMagick.

    Without ImageMagick every other reader is still checked and the test goes on; once it has passed it is
    reported as skipped (failed when QIL_REQUIRE_SYSTEM_READERS=1), so the summary shows the check that did not run.
    """
    imagemagick_missing = imagemagick and not HAVE_IMAGEMAGICK
    imagemagick = imagemagick and HAVE_IMAGEMAGICK
    problems = lint_psd(path)
    assert problems == [], f"{path.name}: structural problems: {problems}"
    want = expected_layers(stack, depth)
    names = names if names is not None else [layer.name for layer in stack.layers]
    tol = 1 if depth == 8 else 257
    pt = read_psd_tools(path)
    assert pt["size"] == stack.size and pt["depth"] == depth
    assert pt["layer_count"] == -len(stack.layers), "layer count must be negative (merged alpha, rule 2)"
    assert len(pt["layers"]) == len(stack.layers)
    for i, (got, exp, layer) in enumerate(zip(pt["layers"], want, stack.layers)):
        assert got["name"] == names[i], f"psd-tools layer {i} name {got['name']!r}, expected {names[i]!r}"
        assert (got["x"], got["y"], got["w"], got["h"]) == (exp["x"], exp["y"], exp["w"], exp["h"]), i
        assert got["opacity"] == round(layer.opacity * 255)
        assert got["visible"] == layer.visible
        assert_close(got["rgba"], exp["rgba"], tol, f"psd-tools layer {i}")
    out = {"psd_tools": pt}
    if pytoshop:
        ps = read_pytoshop(path)
        assert ps["size"] == stack.size and ps["depth"] == depth
        for i, (got, exp) in enumerate(zip(ps["layers"], want)):
            assert got["name"] == names[i], f"pytoshop layer {i} name {got['name']!r}, expected {names[i]!r}"
            assert got["pascal"] == pascal_name(names[i]).decode("ascii")
            assert got["channel_ids"] == [-1, 0, 1, 2], got["channel_ids"]
            assert (got["x"], got["y"], got["w"], got["h"]) == (exp["x"], exp["y"], exp["w"], exp["h"]), i
            assert_close(got["rgba"], exp["rgba"], tol, f"pytoshop layer {i}")
        out["pytoshop"] = ps
    if imagemagick:
        im = read_imagemagick(path)
        kept = [(i, e) for i, e in enumerate(want) if e["w"] > 0]  # ImageMagick drops 0x0 layers (rule 7)
        assert len(im["layers"]) == len(kept)
        for frame, (i, exp) in zip(im["layers"], kept):
            assert frame["name"] == pascal_name(names[i]), (frame["name"], names[i])
            assert (frame["x"], frame["y"], frame["w"], frame["h"]) == (exp["x"], exp["y"], exp["w"], exp["h"])
            want_im = exp["rgba"].copy()  # ImageMagick folds the layer opacity into the frame's alpha
            op = round(stack.layers[i].opacity * 255)
            want_im[..., 3] = np.round(want_im[..., 3] * op / 255)
            assert_close(frame["rgba"], want_im, tol, f"ImageMagick layer {i}")
        out["imagemagick"] = im
    if merged is not None:  # psd-tools and ImageMagick un-matte the white background; Pillow does not
        want_m = matted(merged, depth)
        assert_close(rematte(pt["merged"], depth), want_m, tol, "psd-tools merged image")
        if imagemagick:
            assert_close(rematte(out["imagemagick"]["merged"]["rgba"], depth), want_m, tol, "ImageMagick merged image")
        if depth == 8:
            assert_close(read_pillow_merged(path), want_m, tol, "Pillow merged image")
    if imagemagick_missing:
        missing_system_reader("ImageMagick", "apt-get install imagemagick; listed in .ci/apt-packages", now=False)
    return out
