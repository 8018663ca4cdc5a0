"""Conversions at the boundary: ComfyUI's `LAYERS` document and IMAGE/MASK batches <-> `LayerStack`.

The `LAYERS` document (version 1, architecture.md) is what core's "Create Layered Image" / AddLayer nodes
pass around; IMAGE is float [B, H, W, C] and MASK is [B, H, W] with 1 = transparent. `mask_to_alpha` /
`alpha_to_mask` are the one place where that inversion happens.

Reading a document item (every key but `image` optional) follows what ComfyUI core's own layer nodes
(AddLayer, LayersFromBoundingBoxes, ImageCompositor) do with the same document:
- items are stacked by `z_index` (stable sort: equal values keep their list order; a missing z_index counts
  as 0), bottom first; a batch inside one item becomes consecutive layers named '<name> 1', '<name> 2', ...;
- the image batch sets the number of frames. Frame k takes mask[k]; a mask batch of 1 serves every frame,
  frames past the end of a longer mask batch stay unmasked and masks past the last frame are ignored;
- alpha = image alpha (4 channels, else 1) x (1 - mask): both apply when both are given. A mask of another
  size is resized to the image (LoadImage hands out a 64x64 all-zero mask for images without alpha);
- the image is resampled to the display size w x h when that differs (0 or missing: the native size), then
  flipped, then rotated by `rotation` radians (clockwise on screen, as CSS and the canvas 2D API) about the
  centre of the (x, y, w, h) box; the result is cropped to its content;
- without `canvas`, the canvas reaches from (0, 0) to the right and bottom edges of every item's box after
  rotation (whole pixels, at least 1x1);
- hand-written values are read leniently, with a warning: an unknown blend mode becomes 'normal' and an
  opacity outside 0..1 is clamped.
Writing: one item per layer, image = the cropped straight RGBA pixels [1, h, w, 4] float32 with w/h their size,
rotation 0, no flips, and no `mask` key (the alpha is in the image; writing both would apply it twice under
the rule above). z_index counts up to 0 at the top layer (-n+1 .. 0), so that a layer appended by core's
AddLayer (default z_index 0) lands on top. stack -> document -> stack is lossless.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..checks import check_number
from ..errors import InputError
from .composite import check_canvas, paste_layer, union_bbox
from .resample import premultiply, resample_box, resize_plane, unpremultiply
from .stack import BLEND_MODES, MAX_CANVAS_SIDE, Layer, LayerStack
from .transform import transform_layer

logger = logging.getLogger(__name__)

DOCUMENT_VERSION = 1


def mask_to_alpha(mask: Any) -> Any:
    """ComfyUI MASK (1 = transparent) -> alpha (1 = opaque); numpy or torch, same shape and type."""
    return 1 - mask


def alpha_to_mask(alpha: Any) -> Any:
    """Alpha (1 = opaque) -> ComfyUI MASK (1 = transparent); numpy or torch, same shape and type."""
    return 1 - alpha


def to_numpy(value: Any, what: str) -> np.ndarray:
    """A torch tensor or array-like -> float32 numpy (uint8 scaled by 1/255); NaN/inf raise, 0..1 is enforced."""
    if hasattr(value, "detach"):  # torch tensor, on any device and dtype (bf16 has no numpy twin)
        value = value.detach().to("cpu").float().numpy()
    arr = np.asarray(value)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255
    elif arr.dtype == bool:
        arr = arr.astype(np.float32)
    elif not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"{what} must hold float (0..1) or uint8 values, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if arr.size:
        lo, hi = float(arr.min()), float(arr.max())  # NaN and inf propagate into min/max: one pass each
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise InputError(f"{what} contains NaN or infinite values; fix the node that produced it")
        if lo < 0 or hi > 1:
            logger.warning("%s has values outside 0..1 (%.3g..%.3g); clamped", what, lo, hi)
            arr = np.clip(arr, 0, 1)
    return arr


def _image_batch(value: Any, what: str) -> np.ndarray:
    """IMAGE [B, H, W, C] (or [H, W, C]) with C in 1, 3, 4 -> float32 RGBA [B, H, W, 4], alpha 1 if absent."""
    img = to_numpy(value, what)
    if img.ndim == 3:
        img = img[None]
    if img.ndim != 4 or img.shape[-1] not in (1, 3, 4):
        raise InputError(f"{what} must be an IMAGE [B, H, W, C] with C = 1, 3 or 4, got shape {tuple(img.shape)}")
    b, h, w, c = img.shape
    out = np.empty((b, h, w, 4), np.float32)
    out[..., :3] = img[..., :1] if c == 1 else img[..., :3]  # grey expands to RGB
    out[..., 3] = img[..., 3] if c == 4 else 1
    return out


def _mask_batch(value: Any, what: str, size: tuple[int, int]) -> np.ndarray:
    """MASK [B, H, W] or [H, W] -> float32 [B, H, W] at `size` (H, W), resized (bilinear) when it differs."""
    mask = to_numpy(value, what)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3:
        raise InputError(f"{what} must be a MASK [B, H, W] or [H, W], got shape {tuple(mask.shape)}")
    if mask.shape[1:] != size:
        if mask.shape[0] == 0 or 0 in mask.shape[1:] or 0 in size:
            raise InputError(f"{what} of shape {tuple(mask.shape)} cannot be fitted to a {size[1]}x{size[0]} image")
        logger.info(
            "%s is %dx%d, the image %dx%d; resizing the mask", what, mask.shape[2], mask.shape[1], size[1], size[0]
        )
        mask = np.clip(np.stack([resize_plane(m, (size[1], size[0]), "bilinear") for m in mask]), 0, 1)
    return mask


def _frame_masks(n_img: int, mask: np.ndarray, what: str) -> list[np.ndarray | None]:
    """One mask (or None) per image frame, as core pairs them: mask[k], mask[0] for all if the batch is 1."""
    n_mask = mask.shape[0]
    if n_mask == 1:
        return [mask[0]] * n_img
    if n_mask != n_img:
        logger.warning(
            "%s: image batch %d with mask batch %d; frame k takes mask k (%s), as ComfyUI core does",
            what,
            n_img,
            n_mask,
            "extra masks ignored" if n_mask > n_img else "the frames past the masks stay unmasked",
        )
    return [mask[k] if k < n_mask else None for k in range(n_img)]


def _broadcast(n_img: int, n_mask: int, what: str) -> int:
    if n_mask in (1, n_img) or n_img == 1:
        return max(n_img, n_mask)
    raise InputError(f"{what}: image batch {n_img} and mask batch {n_mask} differ; use batches of equal size or 1")


def _scalar(v: Any) -> Any:
    """A 0-d torch tensor / numpy scalar -> its Python value; anything else unchanged."""
    # `.shape` rather than np.size: torch's `.size` is a method, so np.size missed 0-d tensors.
    return v.item() if hasattr(v, "item") and hasattr(v, "shape") and math.prod(tuple(v.shape)) == 1 else v


def _int(item: dict, key: str, default: int, what: str) -> int:
    """A whole-number field of an item; missing or None means `default`."""
    v = _scalar(item.get(key))
    return int(round(check_number(f"{what}.{key}", default if v is None else v)))


def _blend_mode(value: Any, what: str) -> str:
    mode = str(value).strip().lower().replace("_", "-").replace(" ", "-")
    if mode not in BLEND_MODES:
        logger.warning("%s.blend_mode %r is unknown; using 'normal' (known: %s)", what, value, ", ".join(BLEND_MODES))
        return "normal"
    return mode


def _opacity(value: Any, what: str) -> float:
    v = check_number(f"{what}.opacity", _scalar(value), hint=" (0..1)")
    if not 0 <= v <= 1:
        logger.warning("%s.opacity %r is outside 0..1; clamped", what, v)
    return min(max(float(v), 0.0), 1.0)


def _display_size(item: dict, key: str, native: int, what: str) -> int:
    """The item's display width or height: 0 or missing means the native size, as in core."""
    v = _int(item, key, 0, what)
    if v < 0:
        logger.warning("%s.%s = %d is negative; using the native size %d", what, key, v, native)
    if v > MAX_CANVAS_SIDE:
        raise InputError(f"{what}.{key} = {v} is outside 0..{MAX_CANVAS_SIDE}")
    return v if v > 0 else native


def _rotation(item: dict, what: str) -> float:
    return check_number(f"{what}.rotation", _scalar(item.get("rotation", 0.0)) or 0.0, hint=" (radians)")


def _placed_right_bottom(x: int, y: int, w: int, h: int, rot: float) -> tuple[int, int]:
    """Right and bottom edge (whole pixels) of the (x, y, w, h) box rotated by `rot` radians about its centre."""
    cx, cy = x + w / 2, y + h / 2
    c, s = abs(math.cos(rot)), abs(math.sin(rot))
    half_w, half_h = (w * c + h * s) / 2, (w * s + h * c) / 2
    left, top = math.floor(cx - half_w), math.floor(cy - half_h)
    # A box always covers at least one pixel, also when it is empty.
    return max(left + 1, math.ceil(cx + half_w)), max(top + 1, math.ceil(cy + half_h))


def _canvas(doc: dict, items: Sequence[dict]) -> tuple[int, int]:
    canvas = doc.get("canvas")
    if canvas is None:
        if not items:
            raise InputError("LAYERS document has no 'canvas' and no layers; give canvas (width, height)")
        right, bottom = 1, 1
        for i, it in enumerate(items):
            shape = np.shape(it.get("image", ()))
            if len(shape) not in (3, 4):
                raise InputError(f"layers[{i}].image must be an IMAGE [B, H, W, C], got shape {tuple(shape)}")
            what = f"layers[{i}]"
            r, b = _placed_right_bottom(
                _int(it, "x", 0, what),
                _int(it, "y", 0, what),
                _display_size(it, "w", shape[-2], what),
                _display_size(it, "h", shape[-3], what),
                _rotation(it, what),
            )
            right, bottom = max(right, r), max(bottom, b)
        canvas = (right, bottom)
        logger.info("LAYERS document has no canvas; using %dx%d from its layers", *canvas)
    try:
        w, h = (int(v) for v in canvas)
    except (TypeError, ValueError):
        raise InputError(f"LAYERS canvas must be (width, height), got {canvas!r}") from None
    if not (1 <= w <= MAX_CANVAS_SIDE and 1 <= h <= MAX_CANVAS_SIDE):
        raise InputError(f"LAYERS canvas {w}x{h} is outside 1..{MAX_CANVAS_SIDE} px per side")
    return w, h


def _item_layers(item: dict, what: str, first: int, interpolation: str) -> list[Layer]:
    if "image" not in item:
        raise InputError(f"{what} has no 'image'")
    kind = item.get("type", "raster")
    if kind != "raster":
        raise InputError(f"{what} has type {kind!r}; only 'raster' layers are supported")
    rgba = _image_batch(item["image"], f"{what}.image")  # (B, H, W, 4)
    b, h, w = rgba.shape[:3]
    if item.get("mask") is not None:
        masks = _frame_masks(b, _mask_batch(item["mask"], f"{what}.mask", (h, w)), what)
        rgba = rgba.copy()
        for k, m in enumerate(masks):
            if m is not None:
                rgba[k, ..., 3] *= mask_to_alpha(m)
    x, y = _int(item, "x", 0, what), _int(item, "y", 0, what)
    dw, dh = _display_size(item, "w", w, what), _display_size(item, "h", h, what)
    rot = _rotation(item, what)
    name = item.get("name")
    common: dict[str, Any] = {
        "opacity": _opacity(item.get("opacity", 1.0), what),
        "visible": bool(_scalar(item.get("visible", True))),
        "blend_mode": _blend_mode(item.get("blend_mode", "normal"), what),
    }
    out = []
    for k in range(rgba.shape[0]):
        px = rgba[k]
        if (dw, dh) != (w, h) and px.size and dw and dh:
            px = unpremultiply(resample_box(premultiply(px), (0, 0, w, h), (dw, dh), interpolation))
        elif (dw, dh) != (w, h):
            px = np.zeros((0, 0, 4), np.float32)
        if name is None:
            label = f"Layer {first + k + 1}"
        else:
            label = str(name) if rgba.shape[0] == 1 else f"{name} {k + 1}"
        layer = Layer(np.ascontiguousarray(px), x=x, y=y, name=label, **common)
        if rot or item.get("flip_h") or item.get("flip_v"):
            layer = transform_layer(
                layer,
                rotation=math.degrees(rot),
                flip_h=bool(item.get("flip_h")),
                flip_v=bool(item.get("flip_v")),
                interpolation=interpolation,
            )
        out.append(layer.cropped())
    return out


def stack_from_document(doc: dict, *, interpolation: str = "lanczos") -> LayerStack:
    """ComfyUI `LAYERS` document (version 1) -> LayerStack, bottom first (see the module docstring)."""
    if not isinstance(doc, dict):
        raise InputError(f"LAYERS must be a dict with 'version', 'canvas' and 'layers', got {type(doc).__name__}")
    version = doc.get("version", DOCUMENT_VERSION)
    if version != DOCUMENT_VERSION:
        raise InputError(f"LAYERS document version {version!r} is not supported (expected {DOCUMENT_VERSION})")
    items = doc.get("layers") or []
    if not isinstance(items, (list, tuple)) or not all(isinstance(it, dict) for it in items):
        raise InputError("LAYERS 'layers' must be a list of dicts, one per layer item")
    width, height = _canvas(doc, items)
    order = sorted(range(len(items)), key=lambda i: (_int(items[i], "z_index", 0, f"layers[{i}]"), i))
    layers: list[Layer] = []
    for i in order:
        layers.extend(_item_layers(items[i], f"layers[{i}]", len(layers), interpolation))
    meta = doc.get("metadata")
    return LayerStack(width, height, layers, metadata=dict(meta) if isinstance(meta, dict) else {})


def stack_to_document(stack: LayerStack) -> dict:
    """LayerStack -> ComfyUI `LAYERS` document v1 with every key written (images [1, h, w, 4] float32 torch)."""
    import torch  # the document carries torch tensors; the rest of qil_core.layers runs without torch

    items = []
    top = len(stack.layers) - 1
    for i, layer in enumerate(stack.layers):
        items.append(
            {
                "type": "raster",
                "image": torch.from_numpy(np.ascontiguousarray(layer.pixels[None], np.float32).copy()),
                "name": layer.name,
                "x": layer.x,
                "y": layer.y,
                "z_index": i - top,
                "opacity": layer.opacity,
                "blend_mode": layer.blend_mode,
                "visible": layer.visible,
                "w": layer.width,
                "h": layer.height,
                "rotation": 0.0,
                "flip_h": False,
                "flip_v": False,
            }
        )
    doc = {"version": DOCUMENT_VERSION, "canvas": (stack.width, stack.height), "layers": items}
    if stack.metadata:
        doc["metadata"] = dict(stack.metadata)  # our key, e.g. the exact-recomposition report; others ignore it
    return doc


def stack_from_images(
    image: Any,
    mask: Any = None,
    *,
    names: Sequence[str] | None = None,
    x: int = 0,
    y: int = 0,
    canvas: tuple[int, int] | None = None,
) -> LayerStack:
    """IMAGE [B, H, W, C] (C = 1, 3, 4) + optional MASK [B, H, W] / [H, W] -> one layer per batch item, bottom first.

    A batch of 1 on either side broadcasts; each layer is cropped to its content and offset by (x, y); the
    canvas is the image size unless `canvas` (width, height) says otherwise.
    """
    rgba = _image_batch(image, "image")  # (B, H, W, 4)
    b, h, w = rgba.shape[:3]
    if mask is not None:
        m = _mask_batch(mask, "mask", (h, w))
        n = _broadcast(b, m.shape[0], "image/mask")
        rgba = np.broadcast_to(rgba, (n, h, w, 4)).copy()
        rgba[..., 3] *= mask_to_alpha(np.broadcast_to(m, (n, h, w)))
    n = rgba.shape[0]
    if names is not None and len(names) != n:
        raise InputError(f"names: {len(names)} names given for {n} layers; give one per batch item")
    for v, label in ((x, "x"), (y, "y")):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InputError(f"{label} must be an int offset in canvas pixels, got {v!r}")
    cw, ch = (w, h) if canvas is None else (int(canvas[0]), int(canvas[1]))
    if not (1 <= cw <= MAX_CANVAS_SIDE and 1 <= ch <= MAX_CANVAS_SIDE):
        raise InputError(f"canvas {cw}x{ch} is outside 1..{MAX_CANVAS_SIDE} px per side")
    layers = [
        Layer(rgba[i], x=int(x), y=int(y), name=str(names[i]) if names else f"Layer {i + 1}").cropped()
        for i in range(n)
    ]
    return LayerStack(cw, ch, layers)


def stack_to_images(stack: LayerStack, *, full_canvas: bool = True) -> tuple[Any, Any]:
    """LayerStack -> (RGBA [N, H, W, 4] float32, MASK [N, H, W] = 1 - alpha) torch tensors, one frame per layer.

    full_canvas=True places every layer on the stack's canvas (parts outside are clipped); False uses the
    union box of all layers instead (nothing clipped). RGB under alpha 0 is zeroed. A stack with no layers
    gives one transparent frame, since ComfyUI nodes cannot take an empty batch.
    """
    import torch

    if full_canvas:
        rect = (0, 0, stack.width, stack.height)
    else:
        rect = union_bbox(stack.layers) or (0, 0, stack.width, stack.height)
    l, t, r, b = rect
    n = max(1, len(stack.layers))
    check_canvas(r - l, b - t, what="layer frames", count=n * 5 // 4 + 1)
    frames = np.zeros((n, b - t, r - l, 4), np.float32)
    for i, layer in enumerate(stack.layers):
        paste_layer(frames[i], layer, (l, t))
    frames[..., :3] *= frames[..., 3:4] > 0
    rgba = torch.from_numpy(frames)
    return rgba, alpha_to_mask(rgba[..., 3]).contiguous()
