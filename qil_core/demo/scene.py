"""A procedurally drawn, deterministic layered scene: the embedded default for `demo` and tests.

Nothing is loaded from disk: every layer is drawn with numpy from signed distances, so edges are antialiased
and the result is identical on every machine. The scene (bottom first): a sky gradient, a soft sun glow in
`screen` mode, the sun, far hills at reduced opacity, a near hill, a house shadow in `multiply` mode, the
house, and a "QIL" logo badge.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..layers.composite import composite
from ..layers.stack import MAX_CANVAS_SIDE, Layer, LayerStack

DEFAULT_SIZE: tuple[int, int] = (512, 384)
# Smaller than this the shapes collapse to a few pixels and the scene stops being a useful test subject.
MIN_SIDE = 32


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    """Validate a (width, height) pair for the sample scene."""
    try:
        w, h = (int(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise InputError(f"sample size must be (width, height) integers, got {size!r}") from exc
    if not (MIN_SIDE <= w <= MAX_CANVAS_SIDE and MIN_SIDE <= h <= MAX_CANVAS_SIDE):
        raise InputError(
            f"sample size must be {MIN_SIDE}..{MAX_CANVAS_SIDE} px per side, got {w}x{h}; pick e.g. 512x384"
        )
    return w, h


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Antialiased coverage (0..1) of a shape from its signed distance in pixels (negative = inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def _box_sdf(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, hw: float, hh: float, r: float = 0.0) -> np.ndarray:
    """Signed distance to an axis-aligned box centred at (cx, cy) with half sizes and corner radius r."""
    qx = np.abs(xx - cx) - (hw - r)
    qy = np.abs(yy - cy) - (hh - r)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    inside = np.minimum(np.maximum(qx, qy), 0.0)
    return outside + inside - r


def _rgba(color: tuple[float, float, float] | np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """A (H, W, 4) straight RGBA array from a colour (3,) or colour field (H, W, 3) and an alpha (H, W)."""
    h, w = alpha.shape
    out = np.empty((h, w, 4), np.float32)
    out[..., :3] = color
    out[..., 3] = alpha
    # Colour under alpha 0 is meaningless; zero it so exports and comparisons are canonical.
    out[alpha <= 0] = 0.0
    return out


def sample_stack(size: tuple[int, int] = DEFAULT_SIZE) -> LayerStack:
    """The layered sample scene at `size` = (width, height), bottom first, each layer cropped to content."""
    w, h = _check_size(size)
    s = min(w, h) / 384.0  # shape scale: the scene was designed at 512x384
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres, (H, W) each
    layers: list[Layer] = []

    # Sky: vertical gradient from deep blue at the top to a warm haze at the horizon, fully opaque.
    t = (yy / h)[..., None]  # (H, W, 1)
    sky = (1.0 - t) * np.array([0.18, 0.38, 0.78], np.float32) + t * np.array([0.98, 0.80, 0.62], np.float32)
    layers.append(Layer.from_canvas(_rgba(sky, np.ones((h, w), np.float32)), name="Sky"))

    sun_x, sun_y, sun_r = 0.72 * w, 0.30 * h, 34.0 * s
    d = np.hypot(xx - sun_x, yy - sun_y)
    # Glow: a Gaussian falloff drawn in screen mode so it brightens the sky without darkening anything.
    glow = np.exp(-((d / (2.6 * sun_r)) ** 2)).astype(np.float32)
    glow[glow < 1.0 / 512.0] = 0.0  # cut the invisible tail so the layer crops to a compact box
    layers.append(Layer.from_canvas(_rgba((1.0, 0.85, 0.45), glow), name="Sun glow", blend_mode="screen", opacity=0.8))
    layers.append(Layer.from_canvas(_rgba((1.0, 0.93, 0.55), _coverage(d - sun_r)), name="Sun"))

    # Hills: the region under a sum of sines; vertical distance is a good enough SDF for gentle slopes.
    far = 0.62 * h + 18.0 * s * np.sin(xx / (55.0 * s) + 1.3) + 10.0 * s * np.sin(xx / (23.0 * s))
    layers.append(Layer.from_canvas(_rgba((0.36, 0.50, 0.62), _coverage(far - yy)), name="Far hills", opacity=0.85))
    near = 0.74 * h + 22.0 * s * np.sin(xx / (90.0 * s) + 0.4)
    shade = np.clip((yy - near) / (0.3 * h), 0.0, 1.0)[..., None]  # darker towards the bottom edge
    grass = (1.0 - shade) * np.array([0.32, 0.62, 0.28], np.float32) + shade * np.array([0.16, 0.36, 0.14], np.float32)
    layers.append(Layer.from_canvas(_rgba(grass, _coverage(near - yy)), name="Near hill"))

    # House geometry, anchored on the near hill under its centre.
    hx, base = 0.30 * w, 0.80 * h
    bw, bh = 62.0 * s, 48.0 * s  # half width, full height of the walls
    walls = _box_sdf(xx, yy, hx, base - bh / 2, bw, bh / 2)
    # Roof: a triangle as the intersection of three half planes (two slopes and the eave line).
    apex_y, eave_y, over = base - bh - 42.0 * s, base - bh, 10.0 * s
    slope = (eave_y - apex_y) / (bw + over)
    norm = np.hypot(1.0, slope)
    left = ((apex_y - yy) - slope * (xx - hx)) / norm
    right = ((apex_y - yy) + slope * (xx - hx)) / norm
    roof = np.maximum(np.maximum(left, right), yy - eave_y)

    # Shadow: the house footprint sheared to the left (the sun is on the right), multiplied onto the grass.
    shear = (base - yy) * 0.9
    shadow_sdf = _box_sdf(xx + shear, yy, hx, base - bh * 0.25, bw, bh * 0.25)
    shadow = _coverage(shadow_sdf) * (yy <= base).astype(np.float32)
    layers.append(
        Layer.from_canvas(_rgba((0.25, 0.22, 0.35), shadow), name="House shadow", blend_mode="multiply", opacity=0.6)
    )

    wall_a, roof_a = _coverage(walls), _coverage(roof)
    door = _coverage(_box_sdf(xx, yy, hx + 0.35 * bw, base - 15.0 * s, 9.0 * s, 15.0 * s, 2.0 * s))
    window = _coverage(_box_sdf(xx, yy, hx - 0.4 * bw, base - 0.55 * bh, 11.0 * s, 9.0 * s, 1.5 * s))
    color = np.empty((h, w, 3), np.float32)
    color[:] = (0.93, 0.88, 0.78)  # walls
    for a, c in ((roof_a, (0.70, 0.22, 0.18)), (door, (0.42, 0.26, 0.16)), (window, (0.55, 0.78, 0.92))):
        color += a[..., None] * (np.asarray(c, np.float32) - color)
    layers.append(Layer.from_canvas(_rgba(color, np.maximum(wall_a, roof_a)), name="House"))

    # Logo: a rounded badge with the letters Q, I, L built from boxes and a ring (a text-like shape).
    lx, ly, u = 14.0 * s, 14.0 * s, 6.0 * s  # badge origin and stroke unit
    badge = _box_sdf(xx, yy, lx + 15 * u, ly + 6 * u, 15 * u, 6 * u, 2.0 * u)
    qc_x, qc_y = lx + 6 * u, ly + 6 * u
    ring = np.abs(np.hypot(xx - qc_x, yy - qc_y) - 3.0 * u) - 0.6 * u
    tail = _box_sdf(xx, yy, qc_x + 2.4 * u, qc_y + 2.4 * u, 1.2 * u, 0.6 * u)
    i_bar = _box_sdf(xx, yy, lx + 13 * u, ly + 6 * u, 0.6 * u, 3.6 * u)
    l_stem = _box_sdf(xx, yy, lx + 17 * u, ly + 6 * u, 0.6 * u, 3.6 * u)
    l_foot = _box_sdf(xx, yy, lx + 19 * u, ly + 9 * u, 2.6 * u, 0.6 * u)
    letters = _coverage(np.minimum.reduce([ring, tail, i_bar, l_stem, l_foot]))
    badge_a = _coverage(badge)
    logo_rgb = np.empty((h, w, 3), np.float32)
    logo_rgb[:] = (0.12, 0.14, 0.30)
    logo_rgb += letters[..., None] * (np.asarray((1.0, 0.78, 0.25), np.float32) - logo_rgb)
    layers.append(Layer.from_canvas(_rgba(logo_rgb, badge_a), name="Logo", opacity=0.92))

    return LayerStack(w, h, layers)


def sample_image(size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """The flattened sample scene, (H, W, 4) float32 straight RGBA; alpha is 1 everywhere (opaque sky)."""
    return composite(sample_stack(size))
