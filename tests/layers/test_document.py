"""LAYERS document and IMAGE/MASK conversions: lossless round trips, AddLayer-style input, validation."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from qil_core.errors import InputError
from qil_core.layers import (
    MAX_CANVAS_SIDE,
    Layer,
    LayerStack,
    alpha_to_mask,
    mask_to_alpha,
    stack_from_document,
    stack_from_images,
    stack_to_document,
    stack_to_images,
)

DOC_KEYS = {
    "type",
    "image",
    "name",
    "x",
    "y",
    "z_index",
    "opacity",
    "blend_mode",
    "visible",
    "w",
    "h",
    "rotation",
    "flip_h",
    "flip_v",
}


def random_stack(seed: int = 0) -> LayerStack:
    rng = np.random.default_rng(seed)
    layers = []
    for i, mode in enumerate(["normal", "multiply", "overlay", "luminosity"]):
        h, w = rng.integers(1, 9, size=2)
        px = rng.random((h, w, 4), dtype=np.float32)
        px[0, 0, 3] = 1.0  # crops stay as they are
        px[-1, -1, 3] = 1.0
        layers.append(
            Layer(
                px,
                x=int(rng.integers(-4, 12)),
                y=int(rng.integers(-4, 10)),
                name=f"レイヤー {i} 😀",
                opacity=float(rng.random()),
                blend_mode=mode,
                visible=i != 2,
            )
        )
    layers.append(Layer(np.zeros((0, 0, 4), np.float32), x=3, y=1, name="empty"))
    return LayerStack(12, 10, layers)


def assert_same(a: LayerStack, b: LayerStack) -> None:
    assert a.size == b.size and len(a) == len(b)
    for la, lb in zip(a, b):
        assert (la.name, la.x, la.y, la.opacity, la.blend_mode, la.visible) == (
            lb.name,
            lb.x,
            lb.y,
            lb.opacity,
            lb.blend_mode,
            lb.visible,
        )
        assert la.pixels.shape == lb.pixels.shape and np.array_equal(la.pixels, lb.pixels)


def test_document_round_trip_is_lossless() -> None:
    stack = random_stack()
    doc = stack_to_document(stack)
    assert doc["version"] == 1 and tuple(doc["canvas"]) == (12, 10)
    top = len(doc["layers"]) - 1
    for i, item in enumerate(doc["layers"]):
        # z_index counts up to 0 at the top, so that core's AddLayer (default z_index 0) appends on top.
        assert set(item) == DOC_KEYS and item["z_index"] == i - top and item["type"] == "raster"
        img = item["image"]
        assert isinstance(img, torch.Tensor) and img.dtype == torch.float32 and img.ndim == 4 and img.shape[0] == 1
        assert (item["w"], item["h"]) == (img.shape[2], img.shape[1])
        assert item["rotation"] == 0 and item["flip_h"] is False and item["flip_v"] is False
    assert_same(stack_from_document(doc), stack)
    # The document owns its tensors: editing them does not touch the stack.
    doc["layers"][0]["image"][...] = 0
    assert stack[0].pixels.any()


def test_addlayer_style_full_size_image_with_mask() -> None:
    h, w = 24, 32
    image = torch.zeros(1, h, w, 3)
    image[..., 0] = 1  # red everywhere, as AddLayer passes the whole canvas
    mask = torch.ones(1, h, w)  # 1 = transparent
    mask[0, 5:9, 10:20] = 0  # an opaque window
    mask[0, 9, 10:20] = 0.75  # a soft edge: alpha .25
    doc = {
        "version": 1,
        "canvas": (w, h),
        "layers": [
            {"type": "raster", "image": torch.ones(1, h, w, 3), "name": "white"},
            {
                "type": "raster",
                "image": image,
                "mask": mask,
                "name": "window",
                "opacity": 0.9,
                "blend_mode": "multiply",
            },
        ],
    }
    stack = stack_from_document(doc)
    assert [layer.name for layer in stack] == ["white", "window"]
    win = stack[1]
    assert win.bbox() == (10, 5, 20, 10) and win.opacity == pytest.approx(0.9) and win.blend_mode == "multiply"
    np.testing.assert_allclose(win.alpha[:4], 1)
    np.testing.assert_allclose(win.alpha[4], 0.25)
    assert stack[0].bbox() == (0, 0, w, h)


def test_z_index_stable_sort_and_batched_items() -> None:
    def item(v: float, z: int | None, b: int = 1, name: str | None = None) -> dict:
        d = {"image": torch.full((b, 2, 2, 3), v)}
        if z is not None:
            d["z_index"] = z
        if name is not None:
            d["name"] = name
        return d

    doc = {
        "canvas": (2, 2),
        "layers": [
            item(0.1, 2, name="c"),
            item(0.2, 0, name="a"),
            item(0.3, 1, b=3, name="b"),
            item(0.4, 0, name="a2"),
        ],
    }
    stack = stack_from_document(doc)
    assert [layer.name for layer in stack] == ["a", "a2", "b 1", "b 2", "b 3", "c"]
    assert stack[2].pixels[0, 0, 0] == pytest.approx(0.3)
    # Without z_index, items keep their list position; missing names become "Layer N" (1-based).
    plain = stack_from_document({"canvas": (2, 2), "layers": [item(0.5, None), item(0.6, None, b=2)]})
    assert [layer.name for layer in plain] == ["Layer 1", "Layer 2", "Layer 3"]
    # A missing z_index counts as 0 (as in core): below an item with z_index 1 that comes first in the list.
    mixed = stack_from_document(
        {
            "canvas": (2, 2),
            "layers": [item(0.1, 1, name="one"), item(0.2, None, name="none"), item(0.3, -1, name="minus")],
        }
    )
    assert [layer.name for layer in mixed] == ["minus", "none", "one"]


def test_image_batch_sets_the_frames_and_frame_k_takes_mask_k(caplog: pytest.LogCaptureFixture) -> None:
    # As core pairs them: the image batch is the number of frames; mask[k] for frame k, a mask batch of 1 for all.
    mask = torch.ones(3, 4, 4)
    for i in range(3):
        mask[i, i, i] = 0
    with caplog.at_level(logging.WARNING):
        one = stack_from_document(
            {"canvas": (4, 4), "layers": [{"image": torch.rand(1, 4, 4, 3), "mask": mask, "name": "m"}]}
        )
    assert [(layer.name, layer.bbox()) for layer in one] == [("m", (0, 0, 1, 1))]
    assert "image batch 1 with mask batch 3" in caplog.text
    two = stack_from_document({"canvas": (4, 4), "layers": [{"image": torch.rand(2, 4, 4, 3), "mask": mask}]})
    assert [layer.bbox() for layer in two] == [(0, 0, 1, 1), (1, 1, 2, 2)]
    four = stack_from_document({"canvas": (4, 4), "layers": [{"image": torch.rand(4, 4, 4, 3), "mask": mask}]})
    assert [layer.bbox() for layer in four] == [(0, 0, 1, 1), (1, 1, 2, 2), (2, 2, 3, 3), (0, 0, 4, 4)]
    assert (four[3].alpha == 1).all()  # past the masks: unmasked
    shared = stack_from_document({"canvas": (4, 4), "layers": [{"image": torch.rand(3, 4, 4, 3), "mask": mask[1:2]}]})
    assert [layer.bbox() for layer in shared] == [(1, 1, 2, 2)] * 3


def test_rgba_image_and_mask_multiply() -> None:
    image = torch.ones(1, 2, 2, 4)
    image[..., 3] = 0.5
    mask = torch.full((2, 2), 0.5)  # [H, W] is accepted too
    stack = stack_from_document({"canvas": (2, 2), "layers": [{"image": image, "mask": mask}]})
    np.testing.assert_allclose(stack[0].alpha, 0.25)


def test_mask_of_another_size_is_resized() -> None:
    # LoadImage gives a 64x64 all-zero MASK for an image without alpha: that means fully opaque.
    stack = stack_from_document(
        {"canvas": (10, 6), "layers": [{"image": torch.rand(1, 6, 10, 3), "mask": torch.zeros(1, 64, 64)}]}
    )
    assert stack[0].bbox() == (0, 0, 10, 6) and (stack[0].alpha == 1).all()


def test_display_size_rotation_and_flips() -> None:
    img = torch.zeros(1, 2, 4, 4)
    img[..., 3] = 1
    img[0, 0, 3, :3] = 1  # white marker top right
    base = {"image": img, "x": 10, "y": 10}
    big = stack_from_document({"canvas": (40, 40), "layers": [{**base, "w": 8, "h": 4}]})[0]
    assert big.bbox() == (10, 10, 18, 14)
    rot = stack_from_document({"canvas": (40, 40), "layers": [{**base, "rotation": math.pi / 2}]})[0]
    assert rot.pixels.shape == (4, 2, 4) and np.array_equal(rot.pixels, np.rot90(img[0].numpy(), k=-1))
    flip = stack_from_document({"canvas": (40, 40), "layers": [{**base, "flip_h": True}]})[0]
    assert np.array_equal(flip.pixels, img[0].numpy()[:, ::-1]) and flip.bbox() == (10, 10, 14, 12)


def test_empty_document_and_inferred_canvas() -> None:
    empty = stack_from_document({"version": 1, "canvas": (640, 480), "layers": []})
    assert empty.size == (640, 480) and len(empty) == 0
    inferred = stack_from_document({"layers": [{"image": torch.rand(1, 5, 7, 3), "x": 3, "y": 1}]})
    assert inferred.size == (10, 6)


@pytest.mark.parametrize(
    "doc,msg",
    [
        ({"canvas": (4, 4), "layers": [{"image": torch.rand(4, 4)}]}, r"layers\[0\]\.image must be an IMAGE"),
        ({"canvas": (4, 4), "layers": [{"image": torch.rand(1, 4, 4, 2)}]}, r"C = 1, 3 or 4, got shape \(1, 4, 4, 2\)"),
        (
            {"canvas": (4, 4), "layers": [{"image": torch.full((1, 4, 4, 3), float("nan"))}]},
            r"layers\[0\]\.image contains NaN",
        ),
        (
            {"canvas": (4, 4), "layers": [{"image": torch.rand(1, 4, 4, 3), "mask": torch.full((4, 4), float("inf"))}]},
            r"layers\[0\]\.mask contains NaN or infinite",
        ),
        ({"canvas": (MAX_CANVAS_SIDE + 1, 4), "layers": []}, "outside 1..30000"),
        ({"canvas": (0, 4), "layers": []}, "outside 1..30000"),
        ({"layers": []}, "no 'canvas' and no layers"),
        ({"version": 2, "canvas": (4, 4), "layers": []}, "version 2 is not supported"),
        ({"canvas": (4, 4), "layers": [{"type": "text", "image": torch.rand(1, 4, 4, 3)}]}, "type 'text'"),
        ({"canvas": (4, 4), "layers": [{"name": "x"}]}, r"layers\[0\] has no 'image'"),
        (
            {"canvas": (4, 4), "layers": [{"image": torch.rand(1, 4, 4, 3), "opacity": float("nan")}]},
            r"layers\[0\]\.opacity must be a finite number",
        ),
        ({"canvas": (4, 4), "layers": [{"image": torch.rand(1, 4, 4, 3), "opacity": "half"}]}, r"\.opacity must be"),
        (
            {"canvas": (4, 4), "layers": [{"image": torch.rand(1, 4, 4, 3), "w": MAX_CANVAS_SIDE + 1}]},
            r"layers\[0\]\.w = 30001 is outside",
        ),
        ({"canvas": (4, 4), "layers": [{"image": torch.rand(1, 4, 4, 3), "z_index": "top"}]}, r"\.z_index must be a"),
        ({"canvas": (4, 4), "layers": [{"image": torch.rand(1, 4, 4, 3), "x": float("nan")}]}, r"\.x must be a finite"),
        ({"canvas": (4, 4), "layers": [{"image": torch.rand(1, 4, 4, 3), "rotation": float("nan")}]}, "rotation"),
        ({"canvas": (4, 4), "layers": "nope"}, "must be a list of dicts"),
    ],
)
def test_document_validation(doc: dict, msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        stack_from_document(doc)


def test_document_must_be_a_dict() -> None:
    with pytest.raises(InputError, match="LAYERS must be a dict"):
        stack_from_document([])  # type: ignore[arg-type]


def test_document_accepts_numpy_bf16_uint8_and_loose_mode_names(caplog: pytest.LogCaptureFixture) -> None:
    np_img = np.random.default_rng(0).random((1, 3, 3, 3), dtype=np.float32)
    bf16 = torch.rand(1, 3, 3, 4).to(torch.bfloat16)
    u8 = np.full((3, 3, 3), 255, np.uint8)
    over = np.full((1, 3, 3, 3), 1.5, np.float32)
    with caplog.at_level(logging.WARNING):
        stack = stack_from_document(
            {
                "canvas": (3, 3),
                "layers": [
                    {"image": np_img, "blend_mode": "Linear_Dodge"},
                    {"image": bf16, "opacity": torch.tensor(0.5)},
                    {"image": u8},
                    {"image": over},
                ],
            }
        )
    assert stack[0].blend_mode == "linear-dodge" and stack[1].opacity == 0.5
    assert (stack[2].pixels == 1).all() and (stack[3].pixels == 1).all()
    assert "outside 0..1" in caplog.text


def test_alpha_mask_inversion_helpers() -> None:
    a = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(alpha_to_mask(a), torch.tensor([1.0, 0.75, 0.0]))
    assert torch.equal(mask_to_alpha(alpha_to_mask(a)), a)
    assert np.array_equal(mask_to_alpha(np.float32([1, 0])), np.float32([0, 1]))


def test_images_round_trip() -> None:
    stack = random_stack(1)
    inside = [
        layer
        for layer in stack
        if layer.pixels.size
        and layer.x >= 0
        and layer.y >= 0
        and layer.x + layer.width <= 12
        and layer.y + layer.height <= 10
    ]
    stack = LayerStack(12, 10, [layer.replace(opacity=1.0, blend_mode="normal", visible=True) for layer in inside])
    assert len(stack) >= 1
    rgba, mask = stack_to_images(stack)
    assert rgba.shape == (len(stack), 10, 12, 4) and rgba.dtype == torch.float32
    assert mask.shape == (len(stack), 10, 12) and torch.equal(mask, 1 - rgba[..., 3])
    back = stack_from_images(rgba[..., :3], mask, names=[layer.name for layer in stack])
    for a, b in zip(stack, back):
        assert a.bbox() == b.bbox() and a.name == b.name
        np.testing.assert_array_equal(a.pixels, b.pixels)
    assert torch.equal(stack_to_images(stack_from_images(rgba))[0], rgba)


def test_images_zero_rgb_under_transparency_and_clip_or_union() -> None:
    px = np.float32([[[0.3, 0.6, 0.9, 0.0], [1, 0, 0, 1]]])
    stack = LayerStack(4, 2, [Layer(px, x=-1, y=0)])
    rgba, mask = stack_to_images(stack)
    assert rgba.shape == (1, 2, 4, 4) and torch.equal(rgba[0, 0, 0], torch.tensor([1.0, 0, 0, 1]))
    assert not rgba[0, :, 1:].any() and mask[0, 1, 0] == 1
    union, _ = stack_to_images(stack, full_canvas=False)
    assert union.shape == (1, 1, 2, 4)  # the layer's own box, its off-canvas pixel kept
    assert torch.equal(union[0, 0], torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 1]]))
    none, none_mask = stack_to_images(LayerStack(5, 3))
    assert none.shape == (1, 3, 5, 4) and not none.any() and (none_mask == 1).all()


def test_images_channels_batch_and_offsets() -> None:
    grey = torch.full((2, 3, 4, 1), 0.5)
    stack = stack_from_images(grey, x=2, y=1)
    assert [layer.name for layer in stack] == ["Layer 1", "Layer 2"] and stack.size == (4, 3)
    assert stack[0].bbox() == (2, 1, 6, 4) and (stack[0].pixels == [0.5, 0.5, 0.5, 1]).all()
    rgba = torch.zeros(3, 4, 4)  # [H, W, C] without batch
    rgba[1:, 1:, 3] = 1
    one = stack_from_images(rgba, canvas=(8, 8))
    assert len(one) == 1 and one[0].bbox() == (1, 1, 4, 3) and one.size == (8, 8)
    masked = stack_from_images(torch.rand(1, 4, 4, 3), torch.ones(2, 4, 4))
    assert len(masked) == 2 and all(layer.pixels.size == 0 for layer in masked)
    with pytest.raises(InputError, match="image batch 2 and mask batch 3"):
        stack_from_images(torch.rand(2, 4, 4, 3), torch.ones(3, 4, 4))
    with pytest.raises(InputError, match="2 names given for 1 layers"):
        stack_from_images(torch.rand(1, 4, 4, 3), names=["a", "b"])
    with pytest.raises(InputError, match=r"image must be an IMAGE \[B, H, W, C\]"):
        stack_from_images(torch.rand(1, 1, 4, 4, 3))
    with pytest.raises(InputError, match="mask must be a MASK"):
        stack_from_images(torch.rand(1, 4, 4, 3), torch.ones(1, 1, 4, 4, 2))
    with pytest.raises(InputError, match="x must be an int"):
        stack_from_images(torch.rand(1, 4, 4, 3), x=1.5)  # type: ignore[arg-type]
