"""Replace a layer's pixels with an edited picture of it (from any image model), keeping its shape.

The usual round trip: Select Layers gives the layer as a canvas-sized RGBA frame, an image model (e.g.
Qwen-Image-Edit) edits it and returns an RGB picture at its own working size, and `replace_layer_pixels`
puts the result back into the layer. The picture is scaled back to the region it shows: the canvas or the
layer's own box ("auto" picks the one whose size, else aspect ratio, matches). Alpha policies:

- "keep" (default): the layer keeps its alpha bit for bit; only colours change. With exact recomposition
  this guarantees that every pixel outside the layer's footprint looks exactly as before.
- "image": the edited picture's own alpha becomes the layer's (the picture must have 4 channels).
- "difference": re-matte by difference against the unedited layer as the edit model saw it (straight RGB,
  black where transparent): pixels whose colour changed by more than `tolerance` (largest channel) become
  opaque, with a soft ramp up to twice the tolerance; elsewhere the old alpha stays. New content the edit
  painted outside the layer joins it; content the edit erased keeps its old alpha (an edit cannot tell
  "erased to black" from "painted black").

The layer keeps its name, opacity, blend mode and visibility; its offset changes only when its footprint does.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import InputError
from .composite import paste_layer
from .image_file import picture_rgba
from .resample import check_interpolation, premultiply, resample_box, unpremultiply
from .stack import Layer, LayerStack

logger = logging.getLogger(__name__)

ALPHA_POLICIES: tuple[str, ...] = ("keep", "image", "difference")
REGIONS: tuple[str, ...] = ("auto", "canvas", "layer")


def _picture(image: np.ndarray) -> np.ndarray:
    """An edited picture (h, w, 3|4) or a batch of one, float 0..1 or uint8/uint16 -> float32 RGBA (h, w, 4)."""
    arr = np.asarray(image)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            logger.warning("replace_layer_pixels: %d images given; using the first", arr.shape[0])
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or min(arr.shape[:2]) < 1:
        raise InputError(f"image must be an RGB or RGBA picture (h, w, 3|4), got shape {arr.shape}")
    return picture_rgba(arr, "image")


def _region(layer: Layer, canvas: tuple[int, int], size: tuple[int, int], region: str) -> tuple[int, int, int, int]:
    """The canvas rectangle (left, top, right, bottom) the picture shows."""
    box = layer.bbox()
    full = (0, 0, canvas[0], canvas[1])
    if region == "canvas" or (region == "auto" and layer.pixels.size == 0):
        return full
    if region == "layer":
        if layer.pixels.size == 0:
            raise InputError(f"layer {layer.name!r} is empty (0x0), so it has no box; use region 'canvas'")
        return box
    w, h = size
    if (w, h) == (box[2] - box[0], box[3] - box[1]):
        return box
    if (w, h) == canvas:
        return full

    def misfit(r: tuple[int, int, int, int]) -> float:
        return abs(np.log((w / h) / ((r[2] - r[0]) / (r[3] - r[1]))))

    return full if misfit(full) <= misfit(box) else box


def _fit(px: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """Scale straight RGBA (h, w, 4) to size (W, H), premultiplied (no fringe); unchanged when the size matches."""
    h, w = px.shape[:2]
    if (w, h) == size:
        return px
    logger.info("replace_layer_pixels: edited picture is %dx%d, scaling it back to %dx%d", w, h, *size)
    return unpremultiply(resample_box(premultiply(px), (0, 0, w, h), size, interpolation))


def replace_layer_pixels(
    stack: LayerStack,
    index: int | str,
    image: np.ndarray,
    *,
    alpha: str = "keep",
    region: str = "auto",
    tolerance: float = 0.1,
    interpolation: str = "lanczos",
) -> LayerStack:
    """A copy of `stack` whose layer `index` shows `image` (see the module docstring for the policies)."""
    if alpha not in ALPHA_POLICIES:
        raise InputError(f"alpha policy must be one of {', '.join(ALPHA_POLICIES)}, got {alpha!r}")
    if region not in REGIONS:
        raise InputError(f"region must be one of {', '.join(REGIONS)}, got {region!r}")
    tol = float(tolerance)
    if not 0 < tol <= 1:
        raise InputError(f"tolerance must be in (0, 1], got {tolerance!r}")
    check_interpolation(interpolation)
    i = stack.index_of(index)
    layer = stack.layers[i]
    pic = _picture(image)
    if alpha == "image" and np.asarray(image).shape[-1] != 4:
        raise InputError("alpha policy 'image' needs an RGBA picture (4 channels), got RGB; use 'keep' or 'difference'")
    if alpha == "keep" and layer.is_empty:
        raise InputError(
            f"layer {i} ({layer.name!r}) is fully transparent, so keeping its alpha shows nothing; "
            "use alpha policy 'image' or 'difference'"
        )
    rect = _region(layer, stack.size, (pic.shape[1], pic.shape[0]), region)
    l, t, r, b = rect
    pic = _fit(pic, (r - l, b - t), interpolation)
    old = paste_layer(np.zeros((b - t, r - l, 4), np.float32), layer, (l, t))  # the layer on the region
    new = pic.copy()
    if alpha == "keep":
        new[..., 3] = old[..., 3]
    elif alpha == "difference":
        seen = old[..., :3] * (old[..., 3:4] > 0)  # what the edit model was shown: straight RGB, black outside
        change = np.abs(pic[..., :3] - seen).max(axis=2)
        new[..., 3] = np.maximum(old[..., 3], np.clip((change - tol) / tol, 0, 1))
    new[..., :3] *= new[..., 3:4] > 0
    if alpha == "keep":  # exactly the old pixels block: colours replaced where it overlaps the region
        px = layer.pixels.copy()
        x0, y0 = max(l, layer.x), max(t, layer.y)
        x1, y1 = min(r, layer.x + layer.width), min(b, layer.y + layer.height)
        if x0 < x1 and y0 < y1:
            dst = px[y0 - layer.y : y1 - layer.y, x0 - layer.x : x1 - layer.x]
            src = new[y0 - t : y1 - t, x0 - l : x1 - l, :3]
            np.copyto(dst[..., :3], src, where=dst[..., 3:4] > 0)  # RGB under alpha 0 is left as it was
        out_layer = layer.replace(pixels=px)
    else:
        out_layer = layer.replace(pixels=new, x=l, y=t).cropped()
    out = stack.replace()
    out.layers[i] = out_layer
    return out
