"""Layer Transform, Layer Recolor, Composite Layers, Select Layers and the stack-edit nodes, called as ComfyUI
calls them (keyword arguments, LAYERS documents in and out), including bad values arriving through links."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comfy_harness import check_value, pack_module

core = pack_module("qil_core.layers")
errors = pack_module("qil_core.errors")
common = pack_module("nodes.common")
layer_nodes = pack_module("nodes.layer_nodes")
stack_nodes = pack_module("nodes.stack_nodes")

IDENTITY = {
    "dx": 0.0,
    "dy": 0.0,
    "scale_x": 1.0,
    "scale_y": 1.0,
    "rotation": 0.0,
    "flip_h": False,
    "flip_v": False,
    "opacity": 1.0,
    "pivot": "selection center",
    "interpolation": "lanczos",
}
NO_RECOLOR = {
    "hue_shift": 0.0,
    "saturation": 0.0,
    "lightness": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
    "tint": "",
    "tint_strength": 0.5,
    "replace_color": "",
    "replace_with": "",
    "tolerance": 0.1,
    "invert": False,
}


def _solid(h: int, w: int, rgba: tuple[float, float, float, float]) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgba, np.float32), (h, w, 4)).copy()


def _doc() -> dict:
    """A 20x10 canvas: opaque blue background, a red 4x2 block at (2, 3), a green 2x2 block at (12, 5)."""
    stack = core.LayerStack(
        20,
        10,
        [
            core.Layer(_solid(10, 20, (0, 0, 1, 1)), name="background"),
            core.Layer(_solid(2, 4, (1, 0, 0, 1)), x=2, y=3, name="red"),
            core.Layer(_solid(2, 2, (0, 1, 0, 1)), x=12, y=5, name="green"),
        ],
    )
    return common.to_document(stack)


def _boxes(doc: dict) -> dict[str, tuple[int, int, int, int]]:
    return {it["name"]: (it["x"], it["y"], it["w"], it["h"]) for it in doc["layers"]}


def _transform(doc: dict, layer: str, **changes: object) -> dict:
    (out,) = layer_nodes.QILLayerTransform().transform(doc, layer, **{**IDENTITY, **changes})
    check_value("LAYERS", out, "transform")
    return out


def test_transform_moves_and_scales_only_the_chosen_layer() -> None:
    doc = _doc()
    moved = _transform(doc, "red", dx=5.0, dy=-1.0)
    assert _boxes(moved) == {**_boxes(doc), "red": (7, 2, 4, 2)}
    scaled = _transform(doc, "1", scale_x=2.0, pivot="layer center")
    assert _boxes(scaled)["red"] == (0, 3, 8, 2)
    assert torch.equal(scaled["layers"][0]["image"], doc["layers"][0]["image"])  # background untouched


def test_group_rotation_and_flip_use_the_common_pivot() -> None:
    doc = _doc()
    # Red spans x 2..6, green x 12..14: the pair's box is x 2..14, y 3..7, centre (8, 5).
    flipped = _transform(doc, "1-2", flip_h=True)
    assert _boxes(flipped)["red"] == (10, 3, 4, 2) and _boxes(flipped)["green"] == (2, 5, 2, 2)
    own = _transform(doc, "1-2", flip_h=True, pivot="layer center")
    assert _boxes(own)["red"] == (2, 3, 4, 2)  # each about its own centre: places unchanged
    turned = _transform(doc, "1, 2", rotation=180.0)
    assert _boxes(turned)["red"] == (10, 5, 4, 2) and _boxes(turned)["green"] == (2, 3, 2, 2)
    quarter = _transform(doc, "red", rotation=90.0, interpolation="nearest")
    assert _boxes(quarter)["red"][2:] == (2, 4)


def test_transform_opacity_multiplies() -> None:
    half = _transform(_doc(), "green", opacity=0.5)
    twice = _transform(half, "green", opacity=0.5)
    assert [it["opacity"] for it in twice["layers"]] == [1.0, 1.0, 0.25]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"dx": float("nan")}, "'dx' must be a finite number"),
        ({"rotation": float("inf")}, "'rotation' must be a finite number"),
        ({"scale_x": 0.0}, "scale_x"),
        ({"scale_y": -2.0}, "'scale_y' must be in 0..100"),
        ({"opacity": 1.5}, "'opacity' must be in 0..1"),
        ({"interpolation": "cubic"}, "interpolation must be one of"),
        ({"pivot": "middle"}, "'pivot' must be one of"),
    ],
)
def test_transform_rejects_bad_linked_values(bad: dict, match: str) -> None:
    with pytest.raises(errors.InputError, match=match):
        _transform(_doc(), "all", **bad)


def test_unknown_layers_are_reported_with_what_exists() -> None:
    with pytest.raises(errors.LayerIndexError, match="layer 5 requested, 3 available"):
        _transform(_doc(), "5")
    with pytest.raises(errors.LayerIndexError, match="'sky' not found"):
        _transform(_doc(), "sky")
    with pytest.raises(errors.InputError, match="'layer' is empty"):
        _transform(_doc(), " ")


def test_recolor_changes_colour_never_alpha() -> None:
    stack = core.LayerStack(
        6,
        6,
        [
            core.Layer(
                np.dstack(
                    [np.full((6, 6), 1.0), np.zeros((6, 6)), np.zeros((6, 6)), np.linspace(0, 1, 36).reshape(6, 6)]
                ).astype(np.float32)
            )
        ],
    )
    doc = common.to_document(stack)
    (out,) = layer_nodes.QILLayerRecolor().recolor(doc, "all", **{**NO_RECOLOR, "hue_shift": 120.0})
    before, after = doc["layers"][0]["image"], out["layers"][0]["image"]
    assert torch.equal(before[..., 3], after[..., 3])
    visible = after[0][after[0, ..., 3] > 0]
    assert torch.allclose(visible[:, :3], torch.tensor([0.0, 1.0, 0.0]).expand_as(visible[:, :3]), atol=1e-5)
    (inv,) = layer_nodes.QILLayerRecolor().recolor(doc, "0", **{**NO_RECOLOR, "invert": True, "tint": " "})
    assert torch.equal(inv["layers"][0]["image"][..., 3], before[..., 3])


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"tint": "#zzz"}, "not understood"),
        ({"replace_color": "red"}, "must be given together"),
        ({"saturation": float("nan")}, "'saturation' must be a finite number"),
        ({"contrast": 2.0}, "'contrast' must be in -1..1"),
    ],
)
def test_recolor_rejects_bad_values(bad: dict, match: str) -> None:
    with pytest.raises(errors.InputError, match=match):
        layer_nodes.QILLayerRecolor().recolor(_doc(), "all", **{**NO_RECOLOR, **bad})


def test_composite_hand_computed_pixels_background_and_hidden_layers() -> None:
    doc = _doc()
    doc["layers"][1]["opacity"] = 0.5  # red at 50 % over blue
    doc["layers"][2]["visible"] = False
    image, mask = layer_nodes.QILCompositeLayers().flatten(doc)
    check_value("IMAGE", image, "image")
    assert image.shape == (1, 10, 20, 4) and mask.shape == (1, 10, 20)
    assert torch.allclose(image[0, 3, 2], torch.tensor([0.5, 0.0, 0.5, 1.0]), atol=1e-6)
    assert torch.allclose(image[0, 5, 12], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # hidden green left out
    assert torch.all(mask == 0)
    only_red = {**doc, "layers": [doc["layers"][1]]}
    image, mask = layer_nodes.QILCompositeLayers().flatten(only_red)
    assert float(mask[0, 0, 0]) == 1.0 and float(mask[0, 3, 2]) == pytest.approx(0.5)
    image, mask = layer_nodes.QILCompositeLayers().flatten(only_red, background="#ffffff")
    assert torch.allclose(image[0, 3, 2], torch.tensor([1.0, 0.5, 0.5, 1.0]), atol=1e-6)
    assert torch.all(mask == 0)
    with pytest.raises(errors.InputError, match="not understood"):
        layer_nodes.QILCompositeLayers().flatten(doc, background="paper")


def test_select_layers_keeps_listed_order_and_outputs_frames() -> None:
    layers, image, mask = layer_nodes.QILSelectLayer().pick(_doc(), "green, 0")
    assert [it["name"] for it in layers["layers"]] == ["green", "background"]
    assert layers["canvas"] == (20, 10)
    assert image.shape == (2, 10, 20, 4) and mask.shape == (2, 10, 20)
    assert float(image[0, 5, 12, 1]) == 1.0 and float(mask[0, 0, 0]) == 1.0
    top, _, _ = layer_nodes.QILSelectLayer().pick(_doc(), "-1")
    assert [it["name"] for it in top["layers"]] == ["green"]


def _names(doc: dict) -> list[str]:
    return [it["name"] for it in doc["layers"]]


def test_stack_edit_operations() -> None:
    edit = stack_nodes.QILLayerStackEdit().edit
    assert _names(edit(_doc(), "delete", "red")[0]) == ["background", "green"]
    assert _names(edit(_doc(), "keep only", "green, red")[0]) == ["red", "green"]
    assert _names(edit(_doc(), "duplicate", "1-2")[0]) == ["background", "red", "red copy", "green", "green copy"]
    assert _names(edit(_doc(), "move to", "background", to_index=-1)[0]) == ["red", "green", "background"]
    merged = edit(_doc(), "merge down", "green")[0]
    assert _names(merged) == ["background", "red"]
    assert _boxes(merged)["red"] == (2, 3, 12, 4)  # green was painted into red, the layer below it
    assert torch.allclose(merged["layers"][1]["image"][0, 2, 10], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    doc = _doc()
    doc["layers"][1]["image"] = torch.zeros((1, 2, 4, 4))
    assert _names(edit(doc, "drop empty", "ignored")[0]) == ["background", "green"]
    with pytest.raises(errors.InputError, match="bottom layer"):
        edit(_doc(), "merge down", "0")
    with pytest.raises(errors.InputError, match="moves one layer"):
        edit(_doc(), "move to", "all", to_index=0)
    with pytest.raises(errors.InputError, match="to_index"):
        edit(_doc(), "move to", "red", to_index=7)


def test_set_layer_properties_and_combine() -> None:
    (doc,) = stack_nodes.QILSetLayerProperties().apply(
        _doc(), "1-2", name="レイヤー", opacity=0.25, blend_mode="multiply", visible="hide"
    )
    assert [(it["name"], it["opacity"], it["blend_mode"], it["visible"]) for it in doc["layers"][1:]] == [
        ("レイヤー 1", 0.25, "multiply", False),
        ("レイヤー 2", 0.25, "multiply", False),
    ]
    (kept,) = stack_nodes.QILSetLayerProperties().apply(
        doc, "1", name="", opacity=-1.0, blend_mode="keep", visible="keep"
    )
    assert kept["layers"][1]["opacity"] == 0.25 and kept["layers"][1]["blend_mode"] == "multiply"
    with pytest.raises(errors.InputError, match="'opacity' must be a finite number"):
        stack_nodes.QILSetLayerProperties().apply(_doc(), "0", "", float("nan"), "keep", "keep")
    small = common.to_document(core.LayerStack(30, 4, [core.Layer(_solid(1, 1, (1, 1, 1, 1)), name="dot")]))
    (both,) = stack_nodes.QILCombineLayers().combine(_doc(), small, canvas="union")
    assert _names(both) == ["background", "red", "green", "dot"] and both["canvas"] == (30, 10)
    (kept_canvas,) = stack_nodes.QILCombineLayers().combine(_doc(), small)
    assert kept_canvas["canvas"] == (20, 10)
