"""PSD reader: files from psd-tools (a writer we did not write), groups, 16-bit, damaged and foreign files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage
from psd_tools.api.layers import PixelLayer
from psd_tools.constants import BlendMode

from qil_core.errors import PSDError
from qil_core.layers import Layer, LayerStack
from qil_core.layers.psd import lint_psd, read_psd, write_psd


def _img(w: int, h: int, rgba: tuple[int, int, int, int]) -> Image.Image:
    return Image.new("RGBA", (w, h), rgba)


def _psd_tools_file(tmp_path, with_group: bool = False):
    """A PSD written by psd-tools itself: three pixel layers (one hidden, one at 50 %), optionally in a group."""
    psd = PSDImage.new("RGBA", (40, 30))
    a = PixelLayer.frompil(_img(10, 8, (255, 0, 0, 255)), psd, "rouge", top=4, left=3)
    b = PixelLayer.frompil(_img(6, 5, (0, 255, 0, 128)), psd, "green", top=20, left=-2)
    b.name = "緑 😀"  # the setter writes luni (and '?' as the legacy name)
    b.opacity = 128
    b.blend_mode = BlendMode.MULTIPLY
    c = PixelLayer.frompil(_img(4, 4, (0, 0, 255, 255)), psd, "hidden", top=1, left=30)
    c.visible = False
    psd.extend([a, b, c])
    if with_group:
        group = psd.create_group([b, c], name="grp")
        group.opacity = 51
    path = tmp_path / "foreign.psd"
    psd.save(path)
    return path


def test_reads_a_psd_tools_file(tmp_path) -> None:
    stack = read_psd(_psd_tools_file(tmp_path))
    assert stack.size == (40, 30)
    assert [layer.name for layer in stack] == ["rouge", "緑 😀", "hidden"]
    assert [(layer.x, layer.y, layer.width, layer.height) for layer in stack] == [
        (3, 4, 10, 8),
        (-2, 20, 6, 5),
        (30, 1, 4, 4),
    ]
    np.testing.assert_allclose(stack[0].pixels[0, 0], [1, 0, 0, 1])
    np.testing.assert_allclose(stack[1].pixels[0, 0], [0, 1, 0, 128 / 255], atol=1e-6)
    assert stack[1].opacity == pytest.approx(128 / 255) and stack[1].blend_mode == "multiply"
    assert [layer.visible for layer in stack] == [True, True, False]


def test_group_with_opacity_is_read_with_a_warning(tmp_path, caplog) -> None:
    # A pass-through group at 20 % with a multiply child: its children stay layers with the group's opacity
    # folded in (isolating it would change how the multiply layer blends); 'flatten' makes it one layer.
    with caplog.at_level(logging.WARNING):
        stack = read_psd(_psd_tools_file(tmp_path, with_group=True))
    assert "group 'grp' is pass-through" in caplog.text
    assert [layer.name for layer in stack] == ["rouge", "緑 😀", "hidden"]
    assert stack[1].opacity == pytest.approx(51 / 255 * 128 / 255)
    assert stack[2].visible is False
    flat = read_psd(_psd_tools_file(tmp_path, with_group=True), groups="flatten")
    assert [layer.name for layer in flat] == ["rouge", "grp"]
    assert flat[1].opacity == pytest.approx(51 / 255) and flat[1].bbox() == (-2, 20, 4, 25)


def test_round_trip_keeps_everything(tmp_path) -> None:
    rng = np.random.default_rng(3)
    px = rng.random((7, 9, 4), dtype=np.float32)
    px[..., 3] = np.where(px[..., 3] < 0.2, 0, px[..., 3])
    px[0, :, 3] = 1  # keep the bounding box
    px[:, 0, 3] = 1
    px[-1, :, 3] = 1
    px[:, -1, 3] = 1
    stack = LayerStack(
        20,
        12,
        [
            Layer(px, x=-3, y=6, name="a 😀", opacity=0.4, blend_mode="screen", visible=False),
            Layer(np.zeros((0, 0, 4), np.float32), name="empty"),
        ],
    )
    for depth, tol in ((8, 0.5 / 255), (16, 0.5 / 65535)):
        path = write_psd(stack, tmp_path / f"rt{depth}.psd", depth=depth)
        assert lint_psd(path) == []
        back = read_psd(path)
        assert len(back) == 2
        got = back[0]
        assert (got.name, got.x, got.y, got.blend_mode, got.visible) == ("a 😀", -3, 6, "screen", False)
        assert got.opacity == pytest.approx(0.4, abs=0.5 / 255)
        want = px.copy()
        want[..., :3] *= want[..., 3:4] > 0.5 / (255 if depth == 8 else 65535)
        np.testing.assert_allclose(got.pixels, np.clip(want, 0, 1), atol=tol + 1e-7)
        assert back[1].pixels.shape == (0, 0, 4) and back[1].name == "empty"


def test_not_a_psd_names_the_file(tmp_path) -> None:
    png = tmp_path / "picture.psd"
    _img(4, 4, (1, 2, 3, 4)).save(png, "PNG")
    with pytest.raises(PSDError, match=r"picture\.psd.*not a PSD"):
        read_psd(png)
    with pytest.raises(PSDError, match="not found"):
        read_psd(tmp_path / "missing.psd")
    with pytest.raises(PSDError, match="folder"):
        read_psd(tmp_path)


@pytest.mark.parametrize("keep", [10, 200, 0.6])
def test_truncated_file_gives_psd_error(tmp_path, keep, caplog) -> None:
    stack = LayerStack(30, 20, [Layer(np.ones((10, 10, 4), np.float32), name="a")])
    full_path = write_psd(stack, tmp_path / "full.psd")
    assert lint_psd(full_path) == []
    full = full_path.read_bytes()
    n = int(len(full) * keep) if isinstance(keep, float) else keep
    cut = tmp_path / "cut.psd"
    cut.write_bytes(full[:n])
    if keep == 0.6:  # cut inside the merged image: the layers are intact, so they are read with a warning
        with caplog.at_level(logging.WARNING):
            back = read_psd(cut)
        assert "merged image ends early" in caplog.text
        np.testing.assert_allclose(back[0].pixels, 1.0)
        return
    with pytest.raises(PSDError, match=r"cut\.psd"):
        read_psd(cut)


def test_grayscale_document_is_converted(tmp_path, caplog) -> None:
    psd = PSDImage.new("L", (12, 10))
    psd.append(PixelLayer.frompil(Image.new("L", (5, 4), 200), psd, "grey", top=2, left=3))
    path = tmp_path / "grey.psd"
    psd.save(path)
    with caplog.at_level(logging.WARNING):
        stack = read_psd(path)
    assert "not RGB" in caplog.text
    assert (stack[0].x, stack[0].y, stack[0].pixels.shape) == (3, 2, (4, 5, 4))
    np.testing.assert_allclose(stack[0].pixels[0, 0], [200 / 255, 200 / 255, 200 / 255, 1], atol=1e-6)
