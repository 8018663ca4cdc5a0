"""Images to Layers / Layers to Images: IMAGE + MASK batches <-> LAYERS, as ComfyUI hands them over."""

from __future__ import annotations

import pytest
import torch
from comfy_harness import check_value, pack_module

convert = pack_module("nodes.convert_nodes")
InputError = pack_module("qil_core.errors").InputError


def _rgba_batch() -> torch.Tensor:
    """Two 6x8 RGBA frames: a red square at (1, 2) size 3x2 and a half-transparent blue column."""
    img = torch.zeros((2, 6, 8, 4))
    img[0, 2:4, 1:4] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    img[1, :, 6] = torch.tensor([0.0, 0.0, 1.0, 0.5])
    return img


def test_images_to_layers_crops_names_and_round_trips() -> None:
    (doc,) = convert.QILImagesToLayers().convert(_rgba_batch(), names="red\nblue")
    check_value("LAYERS", doc, "output")
    assert doc["canvas"] == (8, 6)
    assert [(it["name"], it["x"], it["y"], it["w"], it["h"], it["z_index"]) for it in doc["layers"]] == [
        ("red", 1, 2, 3, 2, -1),
        ("blue", 6, 0, 1, 6, 0),
    ]  # z_index up to 0 at the top: AddLayer appends on top
    images, masks = convert.QILLayersToImages().convert(doc, full_canvas=True)
    check_value("IMAGE", images, "images")
    check_value("MASK", masks, "masks")
    assert images.shape == (2, 6, 8, 4) and masks.shape == (2, 6, 8)
    assert torch.equal(images, _rgba_batch())
    assert torch.equal(masks, 1 - _rgba_batch()[..., 3])


def test_mask_means_transparent_and_broadcasts() -> None:
    rgb = torch.full((2, 4, 4, 3), 0.5)
    mask = torch.zeros((1, 4, 4))
    mask[0, :, :2] = 1.0  # left half transparent, for both images
    (doc,) = convert.QILImagesToLayers().convert(rgb, mask=mask, names="a, b")
    assert [(it["name"], it["x"], it["w"]) for it in doc["layers"]] == [("a", 2, 2), ("b", 2, 2)]
    assert torch.all(doc["layers"][0]["image"][..., 3] == 1)


def test_loadimage_placeholder_mask_and_unbatched_grey_input() -> None:
    grey = torch.full((5, 7, 1), 0.25)  # [H, W, 1]: no batch dimension, one channel
    placeholder = torch.zeros((1, 64, 64))  # LoadImage's mask for images without alpha
    (doc,) = convert.QILImagesToLayers().convert(grey, mask=placeholder)
    (layer,) = doc["layers"]
    assert (layer["name"], layer["w"], layer["h"]) == ("Layer 1", 7, 5)
    assert torch.allclose(layer["image"][0, 0, 0], torch.tensor([0.25, 0.25, 0.25, 1.0]))


def test_bad_inputs_name_the_input() -> None:
    node = convert.QILImagesToLayers()
    with pytest.raises(InputError, match="'names' lists 1 names for 2 layers"):
        node.convert(_rgba_batch(), names="only one")
    with pytest.raises(InputError, match=r"expected IMAGE \[B, H, W, C\]"):
        node.convert(torch.zeros((1, 4, 4, 2)))
    with pytest.raises(InputError, match="NaN"):
        node.convert(torch.full((1, 2, 2, 3), float("nan")))
    with pytest.raises(InputError, match="connect a LAYERS output"):
        convert.QILLayersToImages().convert(None)


def test_core_addlayer_style_document_is_accepted() -> None:
    # Core's AddLayer builds full-size items with a MASK and z_index; items are stacked by z_index.
    top = torch.zeros((1, 4, 6, 3))
    top[..., 0] = 1.0
    top_mask = torch.ones((1, 4, 6))
    top_mask[0, 1:3, 2:4] = 0.0  # only a 2x2 square is visible
    doc = {
        "version": 1,
        "canvas": (6, 4),
        "layers": [
            {"type": "raster", "image": top, "mask": top_mask, "name": "top", "z_index": 5},
            {"type": "raster", "image": torch.full((1, 4, 6, 3), 0.2), "name": "base", "z_index": 0},
        ],
    }
    images, masks = convert.QILLayersToImages().convert(doc, full_canvas=True)
    assert images.shape == (2, 4, 6, 4)
    assert torch.all(images[0, ..., 3] == 1)  # "base" is the bottom frame
    assert torch.equal(masks[1], top_mask[0])
    assert torch.equal(images[1, 1, 2], torch.tensor([1.0, 0.0, 0.0, 1.0]))


def test_layers_off_canvas_and_empty_stacks() -> None:
    img = torch.zeros((1, 4, 4, 4))
    img[0, 0, 0] = 1.0
    (doc,) = convert.QILImagesToLayers().convert(img)
    doc["layers"][0]["x"] = -3
    clipped, _ = convert.QILLayersToImages().convert(doc, full_canvas=True)
    whole, _ = convert.QILLayersToImages().convert(doc, full_canvas=False)
    assert clipped.shape == (1, 4, 4, 4) and float(clipped[..., 3].sum()) == 0.0  # moved off the canvas
    assert whole.shape == (1, 1, 1, 4) and float(whole[0, 0, 0, 3]) == 1.0
    empty = {"version": 1, "canvas": (3, 2), "layers": []}
    frames, masks = convert.QILLayersToImages().convert(empty, full_canvas=True)
    assert frames.shape == (1, 2, 3, 4) and torch.all(masks == 1)  # never an empty batch
