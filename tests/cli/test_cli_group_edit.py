"""`edit` with several layers in one --layer group: they turn, scale and flip as one about a shared --pivot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qil_core.cli.entry import main
from qil_core.layers import Layer, LayerStack, transform_layers
from qil_core.layers.psd import read_psd, write_psd


@pytest.fixture(scope="module")
def psd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40x20 canvas: background, a 6x4 block at (4, 6) and a 4x4 block at (24, 10), both with a horizontal ramp."""
    ramp = np.ones((4, 6, 4), np.float32)
    ramp[..., 0] = np.linspace(0.1, 0.9, 6, dtype=np.float32)
    stack = LayerStack(
        40,
        20,
        [
            Layer(np.ones((20, 40, 4), np.float32), name="Back"),
            Layer(ramp, x=4, y=6, name="A"),
            Layer(ramp[:, :4].copy(), x=24, y=10, name="B"),
        ],
    )
    path = tmp_path_factory.mktemp("group") / "group.psd"
    write_psd(stack, path)
    return path


def _edit(capsys: pytest.CaptureFixture[str], psd: Path, out: Path, *argv: str) -> tuple[int, str]:
    code = main(["edit", str(psd), "--out", str(out), *argv])
    return code, capsys.readouterr().err


def _boxes(path: Path) -> dict[str, tuple[int, int, int, int]]:
    return {layer.name: layer.bbox() for layer in read_psd(path).layers}


def test_a_group_flips_about_its_common_box(capsys: pytest.CaptureFixture[str], tmp_path: Path, psd: Path) -> None:
    out = tmp_path / "flip.psd"
    code, err = _edit(capsys, psd, out, "--layer", "A,B", "--flip-h")
    assert code == 0, err
    # A spans x 4..10, B x 24..28: the pair's box is x 4..28, centre 16, so A lands at 22..28 and B at 4..8
    boxes = _boxes(out)
    assert boxes["A"] == (22, 6, 28, 10) and boxes["B"] == (4, 10, 8, 14) and boxes["Back"] == (0, 0, 40, 20)
    src = read_psd(psd)
    assert np.abs(read_psd(out)[1].pixels - src[1].pixels[:, ::-1]).max() <= 1 / 255  # pixels mirrored


@pytest.mark.parametrize(
    ("pivot", "library"),
    [
        ([], "group"),
        (["--pivot", "layer"], "layer"),
        (["--pivot", "canvas"], "canvas"),
        (["--pivot", "-5,2.5"], (-5.0, 2.5)),
    ],
)
def test_pivot_choices_match_the_library(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, psd: Path, pivot: list[str], library: object
) -> None:
    out = tmp_path / "turn.psd"
    code, err = _edit(capsys, psd, out, "--layer", "1-2", "--rotate", "90", "--flip-v", "--move", "1,-1", *pivot)
    assert code == 0, err
    expected = transform_layers(read_psd(psd), [1, 2], rotation=90.0, flip_v=True, dx=1, dy=-1, pivot=library)  # type: ignore[arg-type]
    assert _boxes(out) == {layer.name: layer.bbox() for layer in expected.layers}


def test_pivot_needs_a_transform_and_a_valid_value(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, psd: Path
) -> None:
    out = tmp_path / "x.psd"
    code, err = _edit(capsys, psd, out, "--layer", "A", "--pivot", "middle", "--rotate", "10")
    assert code == 2 and "argument --pivot" in err and "X,Y" in err
    code, err = _edit(capsys, psd, out, "--layer", "A", "--pivot", "canvas", "--hue", "10")
    assert code != 0 and "--pivot sets the centre" in err
    assert not out.exists()
