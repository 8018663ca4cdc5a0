"""The one image-file reader of the pack: every command that reads an image file (compose, layers-to-psd, edit,
info, decompose) goes through `open_image` and `pil_array`, so they all see the same pixels.

- 16-bit grey ("I;16*", "I") is scaled by 1/65535 and float images ("F", e.g. float TIFFs) are taken as 0..1,
  instead of Pillow's `convert("RGBA")`, which clips them to white or black.
- The header is checked before any pixel is decoded: the size against Pillow's decompression-bomb limit, the
  canvas limit and the available RAM, so a small file claiming 60000² px is refused with one line.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError
from ..resources import check_allocation
from .stack import MAX_CANVAS_SIDE

logger = logging.getLogger(__name__)

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Bytes per pixel while decoding into float32 RGBA: the decoded image, its RGBA copy and the float32 result.
DECODE_BYTES_PER_PIXEL = 4 + 4 + 16


def _bomb_limit() -> int | None:
    """Pillow's decompression-bomb limit in pixels: it warns above MAX_IMAGE_PIXELS and refuses above twice that."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def _bomb_message(what: str, claimed: str, limit: int) -> str:
    return (
        f"cannot read {what}: its header claims {claimed}, over the decompression-bomb limit of {limit:,} px; "
        "it is corrupt or hostile, or too large: downscale it first"
    )


def check_header(width: int, height: int, what: str) -> None:
    """Refuse an image whose header size is absurd, before decoding it (bomb limit, side limit, RAM)."""
    limit = _bomb_limit()
    if limit is not None and width * height > limit:
        raise InputError(_bomb_message(what, f"{width}x{height} px ({width * height:,} px)", limit))
    if width > MAX_CANVAS_SIDE or height > MAX_CANVAS_SIDE:
        raise InputError(
            f"{what} is {width}x{height} px, over the {MAX_CANVAS_SIDE} px per side limit; downscale it first"
        )
    check_allocation(
        width * height * DECODE_BYTES_PER_PIXEL,
        f"decoding {what} ({width}x{height} px)",
        hint="downscale the image or free memory",
    )


def open_image(source: str | os.PathLike[str] | bytes, what: str, *, upright: bool = False) -> Image.Image:
    """Open and decode an image file (or its bytes) after checking its header; first frame only.

    `upright` applies the EXIF orientation (as viewers and ComfyUI's Load Image show photos).
    Raises InputError naming `what` for anything that is not a readable image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_header decides
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as im:
                check_header(im.width, im.height, what)
                im.load()
                out = ImageOps.exif_transpose(im) if upright else im
                return out if out is not im else im.copy()
    except Image.DecompressionBombError as err:  # Pillow refuses in Image.open, before check_header sees the size
        found = re.search(r"\((\d+) pixels\)", str(err))
        claimed = f"{int(found.group(1)):,} px" if found else "too many pixels"
        raise InputError(_bomb_message(what, claimed, _bomb_limit() or 0)) from None
    except FileNotFoundError:
        raise InputError(f"{what} not found; check the path") from None
    except IsADirectoryError:
        raise InputError(f"{what} is a folder; give an image file") from None
    except UnidentifiedImageError:
        raise InputError(
            f"cannot read {what}: it is not a readable PNG, JPEG, WebP or TIFF image (unknown format)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        if isinstance(err, InputError):
            raise
        reason = " ".join(str(err).split()) or type(err).__name__
        raise InputError(f"cannot read {what}: it is not a readable PNG, JPEG, WebP or TIFF image ({reason})") from None


def pil_array(im: Image.Image) -> np.ndarray:
    """A decoded image as (H, W, C): uint8 RGBA for 8-bit modes; float32 grey (H, W, 1) in 0..1 (not clipped
    yet) for 16-bit and float modes, which `convert("RGBA")` would clip to white or black."""
    if im.mode in _SIXTEEN_BIT:
        return (np.asarray(im, dtype=np.float64) / 65535.0).astype(np.float32)[..., None]
    if im.mode == "F":
        return np.asarray(im, dtype=np.float32)[..., None]
    return np.array(im.convert("RGBA"), dtype=np.uint8)


def float_rgba(arr: np.ndarray, what: str) -> np.ndarray:
    """`pil_array`'s result as straight RGBA float32 (H, W, 4) in 0..1; NaN/inf and out-of-range values are
    repaired with a warning, so no NaN travels on to a file."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    f = np.asarray(arr, np.float32)
    finite = np.isfinite(f)
    if not finite.all():
        logger.warning("%s contains %d NaN/inf values; NaN became 0, +inf 1 and -inf 0", what, int((~finite).sum()))
        f = np.nan_to_num(f, nan=0.0, posinf=1.0, neginf=0.0)
    outside = (f < 0) | (f > 1)
    if outside.any():
        logger.warning("%s has %d values outside 0..1; they were clamped", what, int(outside.sum()))
        f = np.clip(f, 0, 1)
    out = np.ones(f.shape[:2] + (4,), np.float32)
    out[..., :3] = f[..., :1] if f.shape[-1] in (1, 2) else f[..., :3]
    if f.shape[-1] in (2, 4):
        out[..., 3] = f[..., -1]
    return out


def picture_rgba(arr: np.ndarray, what: str) -> np.ndarray:
    """An (H, W, 3|4) picture, float 0..1 or uint8/uint16, as straight RGBA float32 (H, W, 4) clipped to 0..1
    (opaque when it has no alpha); InputError naming `what` when it holds NaN or infinite values."""
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / np.float32(255)
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / np.float32(65535)
    arr = np.asarray(arr, np.float32)
    if not np.isfinite(arr).all():
        raise InputError(f"{what} contains NaN or infinite values")
    out = np.ones(arr.shape[:2] + (4,), np.float32)
    out[..., : arr.shape[2]] = np.clip(arr, 0, 1)
    return out


def read_rgba(source: str | os.PathLike[str] | bytes, what: str) -> tuple[np.ndarray, dict]:
    """Read an image file as straight RGBA float32 (H, W, 4) in 0..1 plus its Pillow info (text chunks)."""
    im = open_image(source, what)
    try:
        return float_rgba(pil_array(im), what), dict(im.info)
    finally:
        im.close()
