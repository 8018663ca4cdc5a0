"""Pixels are never silently wrong: every command reads 16-bit grey and float images as decompose does, a huge hue
shift keeps its precision, and no NaN reaches a file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qil_core.cli import main
from qil_core.errors import InputError
from qil_core.layers.export import read_layer_pngs, write_png
from qil_core.layers.image_file import open_image, read_rgba
from qil_core.layers.psd import read_psd
from qil_core.layers.recolor import recolor_layer
from qil_core.layers.stack import Layer
from qil_core.model.pipeline.imaging import prepare_images


@pytest.fixture()
def grey16(tmp_path: Path) -> Path:
    """A 16-bit grey PNG: a ramp from 0 to 65535 (Pillow's convert("RGBA") clips most of it to white)."""
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


@pytest.fixture()
def float_tiff(tmp_path: Path) -> Path:
    """A float32 TIFF holding 0.25 .. 0.75 (Pillow's convert("RGBA") makes it black)."""
    data = np.linspace(0.25, 0.75, 48 * 64, dtype=np.float32).reshape(48, 64)
    path = tmp_path / "float.tif"
    Image.fromarray(data, mode="F").save(path)
    return path


def _expected(path: Path) -> np.ndarray:
    """The grey values in 0..1 the file holds."""
    with Image.open(path) as im:
        arr = np.asarray(im, np.float64)
    return arr / 65535.0 if arr.max() > 1 else arr


@pytest.mark.parametrize("name", ["grey16", "float_tiff"])
def test_layer_reader_scales_16_bit_and_float_images(name: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(name)
    stack = read_layer_pngs([path])
    px = stack.layers[0].pixels
    want = _expected(path)
    assert stack.size == (64, 48)
    np.testing.assert_allclose(px[..., 0], want, atol=1e-4)
    np.testing.assert_allclose(px[..., 2], want, atol=1e-4)
    assert (px[..., 3] == 1).all()


@pytest.mark.parametrize("name", ["grey16", "float_tiff"])
def test_decompose_and_the_layer_commands_read_the_same_pixels(name: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(name)
    model_side = prepare_images(open_image(path, "image"))[0]  # what decompose feeds the model (8-bit RGBA)
    layer_side, _ = read_rgba(path, "image")
    np.testing.assert_array_equal(model_side, np.rint(layer_side * 255).astype(np.uint8))


@pytest.mark.parametrize("name", ["grey16", "float_tiff"])
def test_compose_info_and_layers_to_psd_keep_16_bit_and_float_tones(
    name: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = request.getfixturevalue(name)
    want = _expected(path)
    assert main(["compose", str(path), "--out", str(tmp_path / "flat.png")]) == 0
    flat = np.asarray(Image.open(tmp_path / "flat.png").convert("RGB"), np.float64)[..., 0] / 255
    np.testing.assert_allclose(flat, want, atol=1 / 255 + 1e-6)
    assert main(["layers-to-psd", str(path), "--out", str(tmp_path / "doc.psd")]) == 0
    layer = read_psd(tmp_path / "doc.psd").layers[0]
    np.testing.assert_allclose(
        layer.pixels[..., 1], want[layer.y :, layer.x :][: layer.height, : layer.width], atol=1 / 255 + 1e-6
    )
    assert main(["edit", str(path), "--out", str(tmp_path / "e.psd"), "--layer", "0", "--opacity", "0.5"]) == 0
    edited = read_psd(tmp_path / "e.psd").layers[0]
    np.testing.assert_allclose(edited.pixels[..., 0], layer.pixels[..., 0], atol=1e-6)


def test_float_image_with_nan_is_repaired_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = np.full((8, 8), 0.5, np.float32)
    data[2, 3] = np.nan
    path = tmp_path / "nan.tif"
    Image.fromarray(data, mode="F").save(path)
    with caplog.at_level("WARNING"):
        px, _ = read_rgba(path, "image")
    assert np.isfinite(px).all() and px[2, 3, 0] == 0 and px[0, 0, 0] == 0.5
    assert "NaN" in caplog.text


def test_huge_hue_shift_is_reduced_modulo_360_first() -> None:
    rng = np.random.default_rng(3)
    px = rng.random((16, 16, 4), dtype=np.float32)
    px[..., 3] = 1
    layer = Layer(px)
    a = recolor_layer(layer, hue_shift=1e9).pixels
    b = recolor_layer(layer, hue_shift=1e9 % 360).pixels  # 280 degrees
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(a - layer.pixels).max() > 0.1  # it did shift


def test_nan_never_reaches_a_png(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = np.full((4, 4, 4), 0.5, np.float32)
    bad[1, 1, 0] = np.nan
    with pytest.raises(InputError, match="1 NaN or infinite values"):
        write_png(bad, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()

    from qil_core.cli import layers as cli_layers

    src = tmp_path / "in.png"
    Image.new("RGBA", (4, 4), (10, 20, 30, 255)).save(src)
    monkeypatch.setattr(cli_layers, "composite", lambda *a, **k: bad)  # e.g. a 32-bit PSD with NaN floats
    assert main(["compose", str(src), "--out", str(tmp_path / "flat.png")]) == 2
    assert "NaN" in capsys.readouterr().err
    assert not (tmp_path / "flat.png").exists()
