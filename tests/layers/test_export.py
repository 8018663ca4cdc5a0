"""PNG-per-layer and ZIP export: names, zeroed transparent RGB, metadata round trip, atomic and complete sets."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from qil_core.errors import InputError, OutputPathError
from qil_core.layers import Layer, LayerStack
from qil_core.layers import export as export_mod
from qil_core.layers.export import export_pngs, export_zip, read_layer_pngs


def _stack() -> LayerStack:
    rng = np.random.default_rng(2)
    px = rng.random((6, 8, 4), dtype=np.float32)
    px[..., 3] = np.where(px[..., 3] < 0.3, 0, px[..., 3])
    px[0, 0, 3] = px[-1, -1, 3] = 1  # keep the bounding box
    layers = [
        Layer(px, x=2, y=3, name="base", opacity=0.75, blend_mode="multiply"),
        Layer(px[:3, :3], x=-1, y=-1, name="a/b: レイヤー 😀", visible=False),
        Layer(np.zeros((0, 0, 4), np.float32), name=""),
    ]
    layers += [Layer(px[:2, :2], x=i, y=i, name=f"n{i}") for i in range(9)]
    return LayerStack(16, 12, layers)


def test_names_are_bottom_first_zero_padded_and_safe(tmp_path) -> None:
    paths = export_pngs(_stack(), tmp_path / "out")
    names = [p.name for p in paths]
    assert names[:3] == ["layer_00_base.png", "layer_01_a_b_ レイヤー 😀.png", "layer_02_layer.png"]
    assert names[-1] == "layer_11_n8.png" and len(names) == 12
    assert sorted(os.listdir(tmp_path / "out")) == sorted(names)


def test_full_canvas_pngs_and_transparent_rgb_zeroed(tmp_path) -> None:
    stack = _stack()
    paths = export_pngs(stack, tmp_path)
    img = np.asarray(Image.open(paths[0]))
    assert img.shape == (12, 16, 4)
    assert (img[img[..., 3] == 0][:, :3] == 0).all()
    want = np.floor(np.clip(stack[0].pixels, 0, 1) * 255 + 0.5).astype(np.uint8)
    want[..., :3] *= want[..., 3:4] != 0
    np.testing.assert_array_equal(img[3:9, 2:10], want)
    assert (img[:3] == 0).all() and (img[:, :2] == 0).all()


@pytest.mark.parametrize("full_canvas", [True, False])
def test_round_trip_through_pngs(tmp_path, full_canvas) -> None:
    stack = _stack()
    back = read_layer_pngs(export_pngs(stack, tmp_path, full_canvas=full_canvas))
    assert back.size == stack.size and len(back) == len(stack)
    for got, want in zip(back, stack):
        assert (got.name, got.opacity, got.blend_mode, got.visible) == (
            want.name,
            want.opacity,
            want.blend_mode,
            want.visible,
        )
    assert (back[0].x, back[0].y, back[0].pixels.shape) == (2, 3, (6, 8, 4))
    assert back[2].pixels.shape == (0, 0, 4)
    if full_canvas:  # clipped to the canvas
        assert (back[1].x, back[1].y) == (0, 0) and back[1].pixels.shape[:2] == (2, 2)
    else:
        assert (back[1].x, back[1].y) == (-1, -1) and back[1].pixels.shape[:2] == (3, 3)


def test_zip_with_manifest(tmp_path) -> None:
    stack = _stack()
    path = export_zip(stack, tmp_path / "layers.zip")
    with zipfile.ZipFile(path) as z:
        manifest = json.loads(z.read("manifest.json"))
        assert sorted(z.namelist()) == sorted([r["file"] for r in manifest["layers"]] + ["manifest.json"])
    assert manifest["canvas"] == [16, 12] and manifest["layers"][0]["blend_mode"] == "multiply"
    assert manifest["layers"][1]["name"] == "a/b: レイヤー 😀" and manifest["layers"][1]["x"] == -1
    back = read_layer_pngs(path)
    assert [layer.name for layer in back] == [layer.name for layer in stack]
    with pytest.raises(OutputPathError, match="already exists"):
        export_zip(stack, path)


def test_never_overwrites_and_writes_nothing_on_conflict(tmp_path) -> None:
    stack = _stack()
    (tmp_path / "layer_05_n2.png").write_bytes(b"mine")
    with pytest.raises(OutputPathError, match="nothing was written"):
        export_pngs(stack, tmp_path)
    assert os.listdir(tmp_path) == ["layer_05_n2.png"]
    assert (tmp_path / "layer_05_n2.png").read_bytes() == b"mine"
    export_pngs(stack, tmp_path, overwrite=True)
    assert len(os.listdir(tmp_path)) == 12


def test_failure_midway_removes_the_partial_set(tmp_path, monkeypatch) -> None:
    real = export_mod._png_bytes
    count = []

    def flaky(*args):
        count.append(1)
        if len(count) == 4:
            raise KeyboardInterrupt("injected")
        return real(*args)

    monkeypatch.setattr(export_mod, "_png_bytes", flaky)
    with pytest.raises(KeyboardInterrupt):
        export_pngs(_stack(), tmp_path)
    assert os.listdir(tmp_path) == []


def test_plain_pngs_and_bad_inputs(tmp_path) -> None:
    a = np.zeros((10, 12, 4), np.uint8)
    a[2:5, 3:7] = (255, 0, 0, 255)
    Image.fromarray(a, "RGBA").save(tmp_path / "red.png")
    Image.fromarray(a[..., :3], "RGB").save(tmp_path / "rgb.png")
    stack = read_layer_pngs([tmp_path / "red.png", tmp_path / "rgb.png"])
    assert stack.size == (12, 10) and [layer.name for layer in stack] == ["red", "rgb"]
    assert (stack[0].x, stack[0].y, stack[0].pixels.shape) == (3, 2, (3, 4, 4))
    assert stack[1].pixels.shape == (10, 12, 4)
    with pytest.raises(InputError, match="not found"):
        read_layer_pngs([tmp_path / "missing.png"])
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable PNG"):
        read_layer_pngs([tmp_path / "junk.png"])
    nan = np.full((2, 2, 4), np.nan, np.float32)
    with pytest.raises(InputError, match="NaN"):
        export_pngs(LayerStack(4, 4, [Layer(nan, name="bad")]), tmp_path / "nan")
    with pytest.raises(InputError, match="no layers"):
        export_pngs(LayerStack(4, 4, []), tmp_path / "none")
