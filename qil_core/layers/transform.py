"""Layer Transform: move, scale (x and y), rotate (any angle, the layer grows to fit), flip, opacity.

Conventions (chosen to match Photoshop's Free Transform and CSS):
- `rotation` is in degrees, clockwise on screen positive (the canvas y axis points down), about `pivot`.
- Order: flips (about the layer's own centre), then scale and rotation about the pivot, then the move.
- Right-angle rotations and flips are exact pixel permutations; the rotated block is placed with its
  centre rounded to the pixel grid (at most half a pixel off when width and height differ in parity).
- Moves and scales land on whole pixels: dx/dy, the scaled size and its position are rounded (at most half
  a pixel), so opaque edges stay hard and pure moves never blur. Rotations by other angles than multiples of
  90° resample anyway and place the result exactly, fractions of a pixel included.
- Resampling happens on premultiplied alpha (resample.py), so colour under alpha 0 never bleeds in; the
  result is re-cropped to its content.
- Several layers transform as one group with `transform_layers`: scale and rotation about one shared pivot
  (`group_pivot`: their common box, the canvas centre or a point), flips mirroring each place about it too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np

from ..checks import check_number
from ..errors import InputError
from ..resources import check_allocation
from .composite import check_canvas, union_bbox
from .resample import check_interpolation, premultiply, resample_box, unpremultiply, warp_affine
from .stack import MAX_CANVAS_SIDE, Layer, LayerStack

logger = logging.getLogger(__name__)

MAX_SCALE = 100.0
_INT32 = (-(2**31), 2**31 - 1)
_EPS = 1e-6


def _check_scale(name: str, value: float) -> float:
    v = check_number(name, value, loose=True)
    if not 0 < v <= MAX_SCALE:
        raise InputError(f"{name} must be in (0, {MAX_SCALE:g}], got {value!r}; use 1 to keep the size")
    return v


def _snap(v: float) -> float:
    """Snap float noise (1e-12 off an integer) to the integer, so exact placements stay exact."""
    r = round(v)
    return float(r) if abs(v - r) < _EPS else v


def _clamp_offset(name: str, value: float) -> int:
    v = int(round(value))
    if not _INT32[0] <= v <= _INT32[1]:
        logger.warning("transform: %s offset %d clamped to the int32 range PSD can store", name, v)
        v = min(max(v, _INT32[0]), _INT32[1])
    return v


def _pivot(layer: Layer, pivot: str | tuple[float, float]) -> tuple[float, float]:
    if isinstance(pivot, str):
        if pivot == "center":
            return layer.x + layer.width / 2, layer.y + layer.height / 2
        if pivot == "top-left":
            return float(layer.x), float(layer.y)
        raise InputError(f"pivot must be 'center', 'top-left' or (x, y) canvas coordinates, got {pivot!r}")
    if len(pivot) != 2:
        raise InputError(f"pivot must be 'center', 'top-left' or (x, y) canvas coordinates, got {pivot!r}")
    return check_number("pivot x", pivot[0], loose=True), check_number("pivot y", pivot[1], loose=True)


def _check_result_size(width: float, height: float, what: str) -> None:
    if width < 1 or height < 1:
        raise InputError(f"{what} would be {width:.3g}x{height:.3g} px, smaller than 1 px; use a larger scale")
    if width > MAX_CANVAS_SIDE or height > MAX_CANVAS_SIDE:
        raise InputError(
            f"{what} would be {width:.0f}x{height:.0f} px, over the {MAX_CANVAS_SIDE} px per side limit; "
            "use a smaller scale"
        )
    check_canvas(math.ceil(width) + 8, math.ceil(height) + 8, what=what, count=3)


def _scale_only(
    layer: Layer,
    px: np.ndarray,
    sx: float,
    sy: float,
    p: tuple[float, float],
    d: tuple[float, float],
    interpolation: str,
) -> Layer:
    """Scale about pivot p plus a move d through Pillow (antialiased when shrinking), snapped to whole pixels."""
    h, w = px.shape[:2]
    ex0 = p[0] + sx * (layer.x - p[0]) + d[0]  # exact extent of the scaled block on the canvas
    ey0 = p[1] + sy * (layer.y - p[1]) + d[1]
    _check_result_size(w * sx, h * sy, f"layer {layer.name!r} after scaling")
    # Size and position are rounded (at most half a pixel) so an opaque layer keeps hard, opaque edges.
    out_w, out_h = max(1, round(_snap(w * sx))), max(1, round(_snap(h * sy)))
    x0 = math.floor(_snap(ex0 + (w * sx - out_w) / 2) + 0.5)
    y0 = math.floor(_snap(ey0 + (h * sy - out_h) / 2) + 0.5)
    out = resample_box(premultiply(px), (0, 0, w, h), (out_w, out_h), interpolation)
    return layer.replace(pixels=unpremultiply(out), x=_clamp_offset("x", x0), y=_clamp_offset("y", y0))


def _right_angle(
    layer: Layer, px: np.ndarray, quarter_turns: int, p: tuple[float, float], d: tuple[float, float]
) -> Layer:
    """Exact rotation by quarter_turns x 90° clockwise about p, then a move d (centre rounded to the grid)."""
    h, w = px.shape[:2]
    out = np.rot90(px, k=-quarter_turns)  # np.rot90 turns counter-clockwise on screen for k > 0
    cx, cy = layer.x + w / 2 - p[0], layer.y + h / 2 - p[1]
    c, s = (1, 0, -1, 0)[quarter_turns], (0, 1, 0, -1)[quarter_turns]
    ncx, ncy = p[0] + c * cx - s * cy + d[0], p[1] + s * cx + c * cy + d[1]
    nh, nw = out.shape[:2]
    x = _clamp_offset("x", math.floor(_snap(ncx - nw / 2) + 0.5))
    y = _clamp_offset("y", math.floor(_snap(ncy - nh / 2) + 0.5))
    return layer.replace(pixels=np.ascontiguousarray(out), x=x, y=y)


def _general(
    layer: Layer,
    px: np.ndarray,
    sx: float,
    sy: float,
    theta: float,
    p: tuple[float, float],
    d: tuple[float, float],
    interpolation: str,
) -> Layer:
    """Any scale and rotation: shrink with Pillow first (antialiasing), then one affine warp."""
    h, w = px.shape[:2]
    _check_result_size(w * sx, h * sy, f"layer {layer.name!r} after scaling")
    prem = premultiply(px)
    # Pre-shrink the axes that get smaller, so the warp only rotates and magnifies (no aliasing).
    px_x, px_y = min(sx, 1.0), min(sy, 1.0)
    if px_x < 1 or px_y < 1:
        iw, ih = math.ceil(w * px_x - _EPS), math.ceil(h * px_y - _EPS)
        prem = resample_box(prem, (0, 0, iw / px_x, ih / px_y), (iw, ih), interpolation)
    rx, ry = sx / px_x, sy / px_y  # scale left for the warp (>= 1)
    cos, sin = math.cos(theta), math.sin(theta)
    # Forward, intermediate coords -> canvas: q = p + R·diag(rx, ry)·(o + i) + d, o = layer origin - p in the
    # pre-shrunk frame. R is clockwise on screen: (1, 0) -> (cos, sin) with y pointing down.
    a = np.array([[cos * rx, -sin * ry], [sin * rx, cos * ry]])
    o = np.array([(layer.x - p[0]) * px_x, (layer.y - p[1]) * px_y])
    t = np.array(p) + a @ o + np.array(d)
    ih, iw = prem.shape[:2]
    corners = np.array([[0, 0], [iw, 0], [0, ih], [iw, ih]], np.float64) @ a.T + t
    margin = 4  # kernel support (<= 3 px for Lanczos) past the exact footprint
    X0, Y0 = (int(v) - margin for v in np.floor(corners.min(0)))
    X1, Y1 = (int(v) + margin for v in np.ceil(corners.max(0)))
    _check_result_size(X1 - X0, Y1 - Y0, f"layer {layer.name!r} after rotation")
    a_inv = np.linalg.inv(a)
    # Output pixel (X, Y) local to (X0, Y0) -> intermediate source coords: a_inv·((X + X0, Y + Y0) - t).
    inverse = np.hstack([a_inv, (a_inv @ (np.array([X0, Y0], np.float64) - t))[:, None]])
    out = warp_affine(prem, inverse, (X1 - X0, Y1 - Y0), interpolation)
    return layer.replace(pixels=unpremultiply(out), x=_clamp_offset("x", X0), y=_clamp_offset("y", Y0))


def transform_layer(
    layer: Layer,
    *,
    dx: float = 0,
    dy: float = 0,
    scale_x: float = 1,
    scale_y: float = 1,
    rotation: float = 0,
    flip_h: bool = False,
    flip_v: bool = False,
    opacity: float | None = None,
    interpolation: str = "lanczos",
    pivot: str | tuple[float, float] = "center",
    canvas: tuple[int, int] | None = None,
) -> Layer:
    """Move / scale / rotate (degrees, clockwise) / flip / set opacity of one layer; result cropped to content.

    `canvas` (width, height), when given, only enables a warning for a layer moved fully off the canvas.
    """
    ddx, ddy = check_number("dx", dx, loose=True), check_number("dy", dy, loose=True)
    sx, sy = _check_scale("scale_x", scale_x), _check_scale("scale_y", scale_y)
    rot = check_number("rotation", rotation, loose=True) % 360.0
    check_interpolation(interpolation)
    if opacity is not None:
        op = check_number("opacity", opacity, loose=True)
        if not 0 <= op <= 1:
            raise InputError(f"opacity must be in 0..1, got {opacity!r}")
    p = _pivot(layer, pivot)
    px = layer.pixels
    if flip_h:
        px = px[:, ::-1]
    if flip_v:
        px = px[::-1]
    quarter = rot / 90.0
    right_angle = abs(quarter - round(quarter)) < 1e-9
    quarter_turns = int(round(quarter)) % 4
    d = (ddx, ddy)
    if px.size == 0:
        out = layer.replace(x=_clamp_offset("x", layer.x + ddx), y=_clamp_offset("y", layer.y + ddy))
    elif right_angle and sx == 1 and sy == 1:
        if quarter_turns:
            out = _right_angle(layer, px, quarter_turns, p, d)
        else:
            out = layer.replace(
                pixels=np.ascontiguousarray(px),
                x=_clamp_offset("x", layer.x + ddx),
                y=_clamp_offset("y", layer.y + ddy),
            )
    elif right_angle and quarter_turns == 0:
        out = _scale_only(layer, px, sx, sy, p, d, interpolation)
    else:
        out = _general(layer, px, sx, sy, math.radians(rot), p, d, interpolation)
    if opacity is not None:
        out = out.replace(opacity=op)
    out = out.cropped()
    if canvas is not None and out.pixels.size:
        cw, ch = int(canvas[0]), int(canvas[1])
        l, t, r, b = out.bbox()
        if r <= 0 or b <= 0 or l >= cw or t >= ch:
            logger.warning(
                "transform: layer %r now lies fully outside the %dx%d canvas (at %d, %d)", out.name, cw, ch, l, t
            )
    return out


_RESIZE_WORK_BYTES_PER_PX = 48  # resample output + one Pillow channel + unpremultiply's result and temporaries
Box = tuple[float, float, float, float]


def _resize_plan(layer: Layer, sx: float, sy: float) -> tuple[tuple[int, int, int, int], Box] | None:
    """((X0, X1, Y0, Y1) output pixels, source box) of one layer scaled by (sx, sy); None for an empty layer."""
    if layer.pixels.size == 0:
        return None
    ex0, ex1 = _snap(layer.x * sx), _snap((layer.x + layer.width) * sx)
    ey0, ey1 = _snap(layer.y * sy), _snap((layer.y + layer.height) * sy)
    X0, X1 = math.floor(ex0), max(math.ceil(ex1), math.floor(ex0) + 1)
    Y0, Y1 = math.floor(ey0), max(math.ceil(ey1), math.floor(ey0) + 1)
    return (X0, X1, Y0, Y1), ((X0 - ex0) / sx, (Y0 - ey0) / sy, (X1 - ex0) / sx, (Y1 - ey0) / sy)


def resize_stack(stack: LayerStack, width: int, height: int, interpolation: str = "lanczos") -> LayerStack:
    """Map a whole stack onto a width x height canvas: every layer and offset scaled by the canvas ratio."""
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= MAX_CANVAS_SIDE:
            raise InputError(f"resize_stack: {name} must be an int in 1..{MAX_CANVAS_SIDE}, got {v!r}")
    check_interpolation(interpolation)
    check_canvas(int(width), int(height), what="resized canvas")
    sx, sy = width / stack.width, height / stack.height
    plans = [_resize_plan(layer, sx, sy) for layer in stack.layers]
    sizes = [(x1 - x0) * (y1 - y0) for x0, x1, y0, y1 in (p[0] for p in plans if p is not None)]
    if sizes:  # every result is kept, plus the temporaries of the largest one (out, per-channel, unpremultiply)
        check_allocation(
            sum(sizes) * 16 + max(sizes) * _RESIZE_WORK_BYTES_PER_PX,
            f"resizing {len(stack.layers)} layers to {width}x{height} px",
            hint="choose a smaller size, or delete or crop layers first",
        )
    layers = []
    for layer, plan in zip(stack.layers, plans):
        if plan is None:
            layers.append(layer.replace(x=math.floor(layer.x * sx), y=math.floor(layer.y * sy)))
            continue
        (X0, X1, Y0, Y1), box = plan
        out = resample_box(premultiply(layer.pixels), box, (X1 - X0, Y1 - Y0), interpolation)
        layers.append(layer.replace(pixels=unpremultiply(out), x=X0, y=Y0).cropped())
    return LayerStack(int(width), int(height), layers)


# Pivots shared by a group of layers: the group's bounding box centre, each layer's own centre, the canvas centre.
GROUP_PIVOTS = ("group", "layer", "canvas")
_PIVOT_HELP = "'group', 'layer', 'canvas' or (x, y) canvas coordinates"


def group_pivot(
    stack: LayerStack, indices: Sequence[int], pivot: str | tuple[float, float] = "group"
) -> tuple[float, float] | None:
    """The shared pivot of the layers at `indices` (canvas px), or None for "layer" (each about its own centre).

    "group" is the centre of the layers' common bounding box (the canvas centre when all of them are empty).
    """
    if isinstance(pivot, str):
        if pivot == "layer":
            return None
        if pivot == "canvas":
            return stack.width / 2, stack.height / 2
        if pivot == "group":
            box = union_bbox([stack.layers[i] for i in indices]) or (0, 0, stack.width, stack.height)
            return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        raise InputError(f"pivot must be {_PIVOT_HELP}, got {pivot!r}")
    if len(pivot) != 2:
        raise InputError(f"pivot must be {_PIVOT_HELP}, got {pivot!r}")
    return check_number("pivot x", pivot[0], loose=True), check_number("pivot y", pivot[1], loose=True)


def transform_layers(
    stack: LayerStack,
    indices: Iterable[int],
    *,
    pivot: str | tuple[float, float] = "group",
    dx: float = 0,
    dy: float = 0,
    scale_x: float = 1,
    scale_y: float = 1,
    rotation: float = 0,
    flip_h: bool = False,
    flip_v: bool = False,
    opacity: float | None = None,
    interpolation: str = "lanczos",
) -> LayerStack:
    """Transform several layers together, as one group, about a shared pivot (see `group_pivot`).

    Scale and rotation turn every layer about the pivot, so the group keeps its shape; flips mirror each layer's
    pixels and its place about the pivot, so the group flips as a whole. With pivot "layer" every layer is
    transformed about its own centre (flips in place), as `transform_layer` does. Other layers are untouched.
    """
    chosen = sorted(set(indices))
    centre = group_pivot(stack, chosen, pivot)
    out = list(stack.layers)
    for i in chosen:
        item = out[i]
        fh, fv = bool(flip_h), bool(flip_v)
        if (fh or fv) and centre is not None and item.pixels.size:
            # transform_layer flips about the layer's own centre; mirror its place about the group pivot too
            shift_x = 2 * centre[0] - (2 * item.x + item.width) if fh else 0
            shift_y = 2 * centre[1] - (2 * item.y + item.height) if fv else 0
            if shift_x or shift_y:  # (a layer centred on the pivot flips in place, in the one call below)
                item = transform_layer(item, dx=shift_x, dy=shift_y, flip_h=fh, flip_v=fv)
                fh = fv = False
        out[i] = transform_layer(
            item,
            dx=dx,
            dy=dy,
            scale_x=scale_x,
            scale_y=scale_y,
            rotation=rotation,
            flip_h=fh,
            flip_v=fv,
            opacity=opacity,
            interpolation=interpolation,
            pivot=centre if centre is not None else "center",
            canvas=stack.size,
        )
    return stack.replace(layers=out)
