"""The typed layer document: `Layer` records in a bottom-first `LayerStack`.

Pixels are float32 RGBA with straight (not premultiplied) alpha in 0..1, 1 = opaque, cropped to the layer's
content and placed on the canvas at (x, y). Every operation in `qil_core.layers` takes and returns these.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError, LayerIndexError

# ComfyUI core's 26 blend-mode names (architecture.md); every one maps to a PSD blend key in blend.py.
BLEND_MODES: tuple[str, ...] = (
    "normal",
    "multiply",
    "screen",
    "overlay",
    "darken",
    "lighten",
    "color-dodge",
    "color-burn",
    "hard-light",
    "soft-light",
    "difference",
    "exclusion",
    "linear-dodge",
    "linear-burn",
    "vivid-light",
    "pin-light",
    "linear-light",
    "hard-mix",
    "subtract",
    "divide",
    "grain-extract",
    "grain-merge",
    "hue",
    "saturation",
    "color",
    "luminosity",
)

# Largest canvas side any writer in this pack accepts (PSD v1 limit; robustness.md S8).
MAX_CANVAS_SIDE = 30_000


@dataclass
class Layer:
    """One raster layer: `pixels` (h, w, 4) float32 straight RGBA placed at canvas offset (x, y)."""

    pixels: np.ndarray
    x: int = 0
    y: int = 0
    name: str = ""
    opacity: float = 1.0
    blend_mode: str = "normal"
    visible: bool = True

    def __post_init__(self) -> None:
        px = np.asarray(self.pixels)
        if px.ndim != 3 or px.shape[2] != 4:
            raise InputError(f"layer {self.name!r}: pixels must be (h, w, 4) RGBA, got shape {px.shape}")
        if px.dtype != np.float32:
            px = px.astype(np.float32)
        self.pixels = px
        self.x, self.y = int(self.x), int(self.y)
        op = float(self.opacity)
        if not math.isfinite(op) or not 0.0 <= op <= 1.0:
            raise InputError(f"layer {self.name!r}: opacity must be in 0..1, got {self.opacity!r}")
        self.opacity = op
        if self.blend_mode not in BLEND_MODES:
            raise InputError(
                f"layer {self.name!r}: unknown blend mode {self.blend_mode!r}; use one of {', '.join(BLEND_MODES)}"
            )
        self.name = str(self.name)
        self.visible = bool(self.visible)

    @property
    def width(self) -> int:
        """Width of the stored pixel block."""
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        """Height of the stored pixel block."""
        return int(self.pixels.shape[0])

    @property
    def alpha(self) -> np.ndarray:
        """Straight alpha (h, w), 1 = opaque (a view, not a copy)."""
        return self.pixels[..., 3]

    @property
    def is_empty(self) -> bool:
        """True when the layer has no pixel with alpha > 0."""
        return self.pixels.size == 0 or not bool((self.pixels[..., 3] > 0).any())

    def bbox(self) -> tuple[int, int, int, int]:
        """Canvas rectangle (left, top, right, bottom) of the stored pixels."""
        return self.x, self.y, self.x + self.width, self.y + self.height

    def replace(self, **changes: Any) -> Layer:
        """A copy with some fields changed (pixels are shared unless replaced)."""
        return dataclasses.replace(self, **changes)

    def cropped(self) -> Layer:
        """This layer cropped to the bounding box of alpha > 0 (a 0x0 layer when fully transparent)."""
        a = self.pixels[..., 3] > 0
        if not a.any():
            return self.replace(pixels=np.zeros((0, 0, 4), np.float32))
        rows = np.flatnonzero(a.any(axis=1))
        cols = np.flatnonzero(a.any(axis=0))
        t, b, l, r = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        if (t, l, b, r) == (0, 0, self.height, self.width):
            return self
        return self.replace(pixels=self.pixels[t:b, l:r], x=self.x + l, y=self.y + t)

    @classmethod
    def from_canvas(cls, rgba: np.ndarray, **fields: Any) -> Layer:
        """A layer from a full-canvas (H, W, 4) straight RGBA array, cropped to its content."""
        return cls(pixels=np.asarray(rgba, dtype=np.float32), x=0, y=0, **fields).cropped()


@dataclass
class LayerStack:
    """A canvas of `width` x `height` and its layers, index 0 = bottom.

    `metadata` holds plain JSON-friendly facts about how the stack was made (e.g. "recompose": the residual
    report of exact recomposition); it travels in the LAYERS document and is dropped by operations that
    build a new stack.
    """

    width: int
    height: int
    layers: list[Layer] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.width, self.height = int(self.width), int(self.height)
        if self.width < 1 or self.height < 1:
            raise InputError(f"canvas must be at least 1x1 px, got {self.width}x{self.height}")
        self.layers = list(self.layers)
        self.metadata = dict(self.metadata or {})

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the canvas."""
        return self.width, self.height

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, i: int) -> Layer:
        return self.layers[self.index_of(i)]

    def index_of(self, key: int | str) -> int:
        """Resolve a layer index (negative counts from the top) or an exact layer name to an index."""
        n = len(self.layers)
        if isinstance(key, str) and not key.lstrip("-").isdigit():
            hits = [i for i, layer in enumerate(self.layers) if layer.name == key]
            if not hits:
                names = ", ".join(repr(layer.name) for layer in self.layers) or "none"
                raise LayerIndexError(f"layer named {key!r} not found; layers are: {names}")
            return hits[0]
        i = int(key)
        if n == 0:
            raise LayerIndexError(f"layer {i} requested, but the stack has no layers")
        if not -n <= i < n:
            raise LayerIndexError(f"layer {i} requested, {n} available (0..{n - 1}, or -1 for the top)")
        return i % n

    def replace(self, **changes: Any) -> LayerStack:
        """A shallow copy with some fields changed (the layer list itself is copied)."""
        out = dataclasses.replace(self, **changes)
        out.layers = list(out.layers)
        out.metadata = dict(out.metadata)
        return out
