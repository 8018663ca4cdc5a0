"""Replace Layer Pixels: the library op (qil_core.layers.replace), the node, and the CLI `edit --replace-pixels`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_harness import pack_module
from PIL import Image

core = pack_module("qil_core.layers")
replace_mod = pack_module("qil_core.layers.replace")
errors = pack_module("qil_core.errors")
common = pack_module("nodes.common")
nodes = pack_module("nodes")


def _stack():
    """An opaque background, a soft disc (offset, with properties) and a small top block."""
    yy, xx = np.mgrid[0:30, 0:40].astype(np.float32)
    disc = np.zeros((30, 40, 4), np.float32)
    disc[..., 0], disc[..., 1], disc[..., 2] = 0.9, xx / 40, yy / 30
    disc[..., 3] = np.clip(1.3 - np.hypot(xx - 20, yy - 15) / 12, 0, 1)
    return core.LayerStack(
        64,
        48,
        [
            core.Layer(np.full((48, 64, 4), [0.2, 0.3, 0.5, 1.0], np.float32), name="Bg"),
            core.Layer(disc, x=10, y=8, name="Disc", opacity=0.9, blend_mode="multiply").cropped(),
            core.Layer(np.full((6, 8, 4), [1, 1, 0, 1], np.float32), x=50, y=2, name="Tag"),
        ],
    )


def _alpha_on_canvas(stack, i: int) -> np.ndarray:
    layer = stack.layers[i]
    return pack_module("qil_core.layers.composite").paste_layer(np.zeros((48, 64, 4), np.float32), layer)[..., 3]


def _frame(stack, i: int) -> np.ndarray:
    """What Select Layers outputs for layer i: the layer on the full canvas, RGBA, RGB 0 under alpha 0."""
    rgba, _ = core.stack_to_images(core.select_layers(stack, [i]))
    return rgba[0].numpy()


@pytest.mark.parametrize("policy", ["keep", "image", "difference"])
def test_replacing_a_layer_with_its_own_pixels_changes_nothing(policy: str) -> None:
    stack = _stack()
    out = replace_mod.replace_layer_pixels(stack, "Disc", _frame(stack, 1), alpha=policy)
    a, b = stack.layers[1], out.layers[1]
    assert (b.x, b.y, b.name, b.opacity, b.blend_mode) == (a.x, a.y, a.name, a.opacity, a.blend_mode)
    np.testing.assert_array_equal(a.alpha, b.alpha)
    np.testing.assert_array_equal(a.pixels[a.alpha > 0], b.pixels[b.alpha > 0])
    np.testing.assert_array_equal(core.composite(out), core.composite(stack))
    assert out.layers[0] is stack.layers[0] and out.layers[2] is stack.layers[2]


def test_keep_alpha_with_an_edit_at_another_size() -> None:
    stack = _stack()
    edited = _frame(stack, 1)[..., :3].copy()
    edited[..., 1] = 1 - edited[..., 1]  # the "edit"
    big = np.asarray(Image.fromarray(np.round(edited * 255).astype(np.uint8)).resize((96, 72)))  # RGB, 1.5x
    out = replace_mod.replace_layer_pixels(stack, 1, big)
    a, b = stack.layers[1], out.layers[1]
    np.testing.assert_array_equal(a.alpha, b.alpha)  # the shape is the layer's, to the bit
    inner = a.alpha > 0.5
    assert np.abs(b.pixels[..., 1][inner] - (1 - a.pixels[..., 1][inner])).mean() < 0.03
    # the picture of the layer's own box (a different aspect) is recognised as such
    box = np.ascontiguousarray(edited[a.y : a.y + a.height, a.x : a.x + a.width])
    out2 = replace_mod.replace_layer_pixels(stack, 1, box)
    np.testing.assert_array_equal(out2.layers[1].alpha, a.alpha)
    np.testing.assert_allclose(out2.layers[1].pixels[inner], out.layers[1].pixels[inner], atol=0.05)


def test_image_and_difference_alpha() -> None:
    stack = _stack()
    frame = _frame(stack, 1)
    frame[30:40, 50:60] = [0, 1, 0, 1]  # the edit painted a new green patch outside the disc
    out = replace_mod.replace_layer_pixels(stack, 1, frame, alpha="image")
    assert np.all(_alpha_on_canvas(out, 1)[30:40, 50:60] == 1)
    rgb = frame[..., :3].copy()
    out = replace_mod.replace_layer_pixels(stack, 1, rgb, alpha="difference")
    alpha = _alpha_on_canvas(out, 1)
    assert np.all(alpha[30:40, 50:60] == 1)  # new content joins the layer
    np.testing.assert_array_equal(alpha[:25], _alpha_on_canvas(stack, 1)[:25])  # unchanged elsewhere
    with pytest.raises(errors.InputError, match="needs an RGBA picture"):
        replace_mod.replace_layer_pixels(stack, 1, rgb, alpha="image")
    with pytest.raises(errors.InputError, match="alpha policy must be one of keep, image, difference"):
        replace_mod.replace_layer_pixels(stack, 1, rgb, alpha="mine")
    with pytest.raises(errors.InputError, match="RGB or RGBA picture"):
        replace_mod.replace_layer_pixels(stack, 1, rgb[..., 0])
    with pytest.raises(errors.LayerIndexError):
        replace_mod.replace_layer_pixels(stack, 7, rgb)


def test_the_node() -> None:
    node = nodes.NODE_CLASS_MAPPINGS["QILReplaceLayerImage"]()
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["QILReplaceLayerImage"] == "Replace Layer Pixels"
    stack = _stack()
    doc = common.to_document(stack)
    image = torch.from_numpy(_frame(stack, 1))[None]
    (out,) = node.replace(doc, "Disc", image, "keep layer alpha")
    back = common.to_stack(out)
    np.testing.assert_array_equal(core.composite(back), core.composite(stack))
    (out,) = node.replace(doc, "1", image[..., :3], "re-matte by difference", "canvas", 0.2)
    np.testing.assert_array_equal(common.to_stack(out).layers[1].alpha, stack.layers[1].alpha)
    with pytest.raises(errors.InputError, match="selects 3 layers"):
        node.replace(doc, "all", image, "keep layer alpha")
    with pytest.raises(errors.InputError, match="input 'alpha'"):
        node.replace(doc, "1", image, "keep")


def test_cli_edit_replace_pixels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = pack_module("qil_core.cli")
    psd = pack_module("qil_core.layers.psd")
    stack = _stack()
    src = tmp_path / "in.psd"
    psd.write_psd(stack, src)
    edited = np.round(_frame(stack, 2) * 255).astype(np.uint8)
    edited[..., :3] = [255, 0, 255]
    Image.fromarray(edited).save(tmp_path / "tag.png")
    out = tmp_path / "out.psd"
    assert cli.main(["edit", str(src), "--out", str(out), "--replace-pixels", f"Tag={tmp_path / 'tag.png'}"]) == 0
    back = psd.read_psd(out)
    tag = back.layers[2]
    np.testing.assert_array_equal(tag.alpha, stack.layers[2].alpha)
    assert np.all(np.round(tag.pixels[..., :3] * 255) == [255, 0, 255])
    assert cli.main(["edit", str(src), "--out", str(tmp_path / "o2.psd"), "--replace-pixels", "Tag"]) == 2
    missing = ["edit", str(src), "--out", str(tmp_path / "o3.psd"), "--replace-pixels", f"Tag={tmp_path / 'no.png'}"]
    assert cli.main(missing) == 2
    assert "replacement picture" in capsys.readouterr().err and not (tmp_path / "o3.psd").exists()
