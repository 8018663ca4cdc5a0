"""From psd-tools' layer tree to our flat, bottom-first layer list: groups, clipping, masks, fill opacity, warnings.

Each layer's pixel and vector masks are multiplied into its alpha; fill opacity is folded into opacity (the
reader draws no effects, and fill differs from opacity only in how it scales effects).

Groups (`groups="keep"`, the default):
- a pass-through group at 100 % opacity without a mask keeps its children, in order, hidden when it is hidden;
- any other group (a blend mode of its own, opacity below 100 %, a mask) is composited as an isolated group,
  the way Photoshop does, and read as one layer named after the group (with its blend mode, opacity and
  mask), with a warning.
`groups="flatten"` turns every group into one layer that way.

Clipping masks: the layers clipped to a base are composited onto the base's colour and take the base's
alpha (Photoshop's "blend clipped layers as group"). With `groups="keep"`, when the base is a plain layer
(normal blend, 100 %, no soft edge), the clipped layers stay separate layers with their alpha cut by the
base's alpha, which composes the same; otherwise they are merged into the base, with a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..composite import composite_layers, union_bbox
from ..stack import Layer
from .masks import mask_coverage, paste_plane

Warn = Callable[[str, str], None]
GROUP_MODES = ("keep", "flatten")
_EFFECT_NAMES = {
    "DropShadow": "drop shadow",
    "InnerShadow": "inner shadow",
    "OuterGlow": "outer glow",
    "InnerGlow": "inner glow",
    "ColorOverlay": "colour overlay",
    "GradientOverlay": "gradient overlay",
    "PatternOverlay": "pattern overlay",
    "Stroke": "stroke",
    "BevelEmboss": "bevel and emboss",
    "Satin": "satin",
}


@dataclass
class TreeReader:
    """Builds layers from psd-tools items.

    `pixels` maps id(item) -> (straight RGBA in sRGB, x, y, whether its masks are already applied) or None.
    """

    depth: int
    version: int
    warn: Warn
    blend_name: Callable[[object], str]
    pixels: dict[int, tuple[np.ndarray, int, int, bool] | None] = field(default_factory=dict)
    groups: str = "keep"

    def build(self, items: list) -> list[Layer]:
        """Layers of one container's items (bottom first), with clipping groups resolved."""
        out: list[Layer] = []
        claimed: set[int] = set()
        for item in items:
            if id(item) in claimed:
                continue
            layers = self.node(item)
            clips = [] if item.clipping else list(item.clip_layers)
            if clips:
                claimed.update(id(c) for c in clips)
                layers = self._clip(item, layers, clips)
            out.extend(layers)
        return out

    def node(self, item) -> list[Layer]:
        """The layers one item contributes (one for a leaf or an isolated group, the children of a kept group)."""
        self._note_features(item)
        if item.is_group():
            return self._group(item)
        found = self.pixels.get(id(item))
        if found is None:
            return []
        px, x, y, masked = found
        x, y = (x, y) if px.size else (0, 0)
        if px.size:
            cov = mask_coverage(item, (x, y, x + px.shape[1], y + px.shape[0]), self.depth, self.version, self.warn)
            # A shape or fill layer's mask is often its own shape channel again: applying it would square the
            # edge coverage, so it is skipped when it equals the stored alpha.
            repeats = item.kind != "pixel" and cov is not None and np.allclose(cov, px[..., 3], atol=1.5 / 255)
            if cov is not None and not repeats and not masked:
                px[..., 3] *= cov
        fill = float(item.fill_opacity) / 255.0
        return [
            Layer(
                pixels=px,
                x=x,
                y=y,
                name=item.name,
                opacity=item.opacity / 255.0 * fill,
                blend_mode=self.blend_name(item),
                visible=item.visible,
            )
        ]

    def _group(self, item) -> list[Layer]:
        has_mask = (item.mask is not None and not item.mask.disabled) or (
            item.vector_mask is not None and not item.vector_mask.disabled
        )
        passthrough = self._is_passthrough(item)
        children = self.build(list(item))
        if self.groups == "keep" and passthrough and item.opacity == 255 and not has_mask:
            return [c if item.visible else c.replace(visible=False) for c in children]
        if self.groups == "keep" and passthrough and any(c.blend_mode != "normal" for c in children):
            return self._fade_children(item, children, has_mask)
        why = [] if passthrough else [f"blend mode {self.blend_name(item)}"]
        if item.opacity < 255:
            why.append(f"opacity {item.opacity / 2.55:.0f} %")
        if has_mask:
            why.append("a mask")
        if self.groups == "keep":
            self.warn(
                "group",
                f"group {item.name!r} ({', '.join(why)}) is composited as an isolated group and "
                f"read as one layer; its {len(children)} layers are merged",
            )
        elif passthrough and any(c.blend_mode != "normal" for c in children):
            self.warn(
                "group",
                f"group {item.name!r} is pass-through: flattening it isolates its layers' blend "
                f"modes from what lies below, which changes the picture",
            )
        layer = self._flatten(children, item.name)
        if layer.pixels.size:
            cov = mask_coverage(item, layer.bbox(), self.depth, self.version, self.warn)
            if cov is not None:
                layer.pixels[..., 3] *= cov
        return [
            layer.replace(
                opacity=item.opacity / 255.0,
                visible=item.visible,
                blend_mode="normal" if passthrough else self.blend_name(item),
            )
        ]

    def _fade_children(self, item, children: list[Layer], has_mask: bool) -> list[Layer]:
        """A pass-through group with opacity or a mask whose layers blend with what lies below: each child keeps
        its blend mode, with the group's opacity and mask folded into its own (exact where children do not
        overlap; isolating the group would change how they blend)."""
        self.warn(
            "group",
            f"group {item.name!r} is pass-through with opacity or a mask: they are applied to each "
            f"of its layers (approximate where its layers overlap)",
        )
        out = []
        for c in children:
            px = c.pixels
            if has_mask and px.size:
                cov = mask_coverage(item, c.bbox(), self.depth, self.version, self.warn)
                if cov is not None:
                    px = px.copy()
                    px[..., 3] *= cov
            out.append(
                c.replace(pixels=px, opacity=c.opacity * item.opacity / 255.0, visible=c.visible and item.visible)
            )
        return out

    @staticmethod
    def _is_passthrough(item) -> bool:
        raw = item.blend_mode
        key = raw.value if hasattr(raw, "value") else raw
        return (key.decode("latin-1") if isinstance(key, bytes) else str(key)) == "pass"

    @staticmethod
    def _flatten(layers: list[Layer], name: str) -> Layer:
        """One layer holding the isolated composite of `layers` over their union box."""
        shown = [layer for layer in layers if layer.visible]
        box = union_bbox(shown)
        if box is None or box[2] <= box[0] or box[3] <= box[1]:
            return Layer(np.zeros((0, 0, 4), np.float32), name=name)
        return Layer(composite_layers(shown, box), x=box[0], y=box[1], name=name)

    def _clip(self, base_item, base_layers: list[Layer], clips: list) -> list[Layer]:
        clipped = [layer for c in clips for layer in self.node(c)]
        names = ", ".join(repr(c.name) for c in clips)
        if not base_layers or not clipped:
            if clipped:
                self.warn(
                    "clipping mask",
                    f"layers {names} are clipped to {base_item.name!r}, which has no pixels; they are hidden",
                )
            return base_layers + [c.replace(visible=False) for c in clipped]
        if len(base_layers) > 1:
            base = self._flatten(base_layers, base_item.name).replace(visible=base_item.visible)
        else:
            base = base_layers[0]
        if base.pixels.size == 0:
            return [base] + [c.replace(visible=False) for c in clipped]
        alpha = base.pixels[..., 3]
        plain = base.blend_mode == "normal" and base.opacity >= 1.0 and bool(np.all((alpha == 0) | (alpha == 1)))
        if self.groups == "keep" and plain and len(base_layers) == 1:
            return [base] + [self._cut(c, base) for c in clipped]
        self.warn(
            "clipping mask",
            f"layer {base.name!r}: its clipped layers {names} are merged into it (clipping "
            f"mask{'' if self.groups == 'flatten' else ' on a base with soft edges, opacity or a blend mode'})",
        )
        opaque = base.pixels.copy()
        opaque[..., 3] = 1.0
        shown = [c for c in clipped if c.visible]
        px = composite_layers(
            [base.replace(pixels=opaque, opacity=1.0, blend_mode="normal", visible=True), *shown], base.bbox()
        )
        px[..., 3] = alpha
        return [base.replace(pixels=px)]

    @staticmethod
    def _cut(layer: Layer, base: Layer) -> Layer:
        """`layer` with its alpha multiplied by the base's alpha (0 outside the base), hidden when the base is."""
        visible = layer.visible and base.visible
        if layer.pixels.size == 0:
            return layer.replace(visible=visible)
        px = layer.pixels.copy()
        px[..., 3] *= paste_plane(layer.bbox(), base.pixels[..., 3], base.bbox(), 0.0)  # 0 outside the base
        return layer.replace(pixels=px, visible=visible)

    def _note_features(self, item) -> None:
        """One warning per feature that changes the picture but is not represented."""
        name = item.name
        try:
            if item.has_effects():
                kinds = sorted(
                    {
                        _EFFECT_NAMES.get(type(e).__name__, type(e).__name__)
                        for e in item.effects
                        if getattr(e, "enabled", True)
                    }
                )
                self.warn("layer effects", f"layer {name!r}: layer effects ({', '.join(kinds)}) are not drawn")
        except (ValueError, KeyError, AttributeError, TypeError):
            self.warn("layer effects", f"layer {name!r}: layer effects cannot be read and are not drawn")
        from psd_tools.constants import Tag

        if item.tagged_blocks is not None and item.tagged_blocks.get_data(Tag.KNOCKOUT_SETTING, 0):
            self.warn("knockout", f"layer {name!r}: knockout is not applied")
        if item.kind == "artboard":
            self.warn("artboard", f"artboard {name!r}: its clip to the artboard and its background are not applied")
