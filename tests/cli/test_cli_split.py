"""`decompose-layer`: one layer of a PSD split into sub-layers in place, with tiny random weights."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from qil_core.cli import split as cli_split
from qil_core.cli.entry import main
from qil_core.layers.composite import paste_layer
from qil_core.layers.psd import lint_psd, read_psd, write_psd
from qil_core.layers.stack import Layer, LayerStack
from qil_core.model.weights.tiny import write_tiny_model

FAST = ["--layers", "2", "--steps", "2", "--dtype", "fp32", "--device", "cpu", "--resolution", "custom"]
FAST += ["--max-side", "64"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    paths = write_tiny_model(tmp_path_factory.mktemp("comfy"), layout="comfyui", seed=1)
    return [f"--{k.replace('_', '-')}={paths[k]}" for k in ("transformer", "vae", "text_encoder")]


@pytest.fixture()
def psd(tmp_path: Path) -> Path:
    """Background, a half-transparent offset "Badge" at 80 % opacity in multiply mode, and a "Title" on top."""
    bg = np.ones((72, 96, 4), np.float32) * (0.9, 0.85, 0.7, 1.0)
    badge = np.zeros((40, 48, 4), np.float32)
    yy, xx = np.mgrid[0:40, 0:48]
    badge[..., 0], badge[..., 1], badge[..., 2] = xx / 48, yy / 40, 0.3
    badge[..., 3] = np.where((xx - 24) ** 2 + (yy - 20) ** 2 < 18**2, 1.0, 0.0)
    badge[15:25, 10:38, :3] = (0.1, 0.2, 0.8)
    title = np.zeros((10, 60, 4), np.float32)
    title[2:8, 4:56] = (0.2, 0.2, 0.2, 1.0)
    stack = LayerStack(
        96,
        72,
        [
            Layer(bg, name="Background"),
            Layer(badge, name="Badge", x=30, y=20, opacity=0.8, blend_mode="multiply"),
            Layer(title, name="Title", x=18, y=4),
        ],
    )
    path = tmp_path / "in.psd"
    write_psd(stack, path)
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_splits_the_named_layer_in_place(capsys, files, psd: Path, tmp_path: Path) -> None:
    out, pngs = tmp_path / "out.psd", tmp_path / "pngs"
    code, err = _run(
        capsys,
        "decompose-layer",
        psd,
        "--layer",
        "Badge",
        "--out",
        out,
        "--png-dir",
        pngs,
        *files,
        *FAST,
        "--prompt",
        "a round badge",
    )
    assert code == 0, err
    assert "'Badge' split into 2 sub-layers (3 -> 4 layers)" in err and "wrote" in err
    assert lint_psd(out) == []
    before, after = read_psd(psd), read_psd(out)
    assert [layer.name for layer in after] == ["Background", "Badge / 1", "Badge / 2", "Title"]
    for k in (0, 3):  # the other layers are untouched
        src = before.layers[0 if k == 0 else 2]
        assert np.array_equal(after.layers[k].pixels, src.pixels) and after.layers[k].name == src.name
    parent = paste_layer(np.zeros((72, 96, 4), np.float32), before.layers[1])[..., 3]
    for sub in after.layers[1:3]:  # the parent's properties, and never outside its alpha
        assert sub.opacity == pytest.approx(before.layers[1].opacity) and sub.blend_mode == "multiply"
        assert (paste_layer(np.zeros((72, 96, 4), np.float32), sub)[..., 3] <= parent + 1 / 255).all()
    assert sorted(p.name for p in pngs.iterdir()) == [
        "out_00_Background.png",
        "out_01_Badge _ 1.png",
        "out_02_Badge _ 2.png",
        "out_03_Title.png",
    ]


def test_no_prompt_captions_the_layer_first(capsys, caplog, files, psd: Path, tmp_path: Path) -> None:
    out = tmp_path / "auto.psd"
    with caplog.at_level(logging.INFO):
        code, err = _run(capsys, "decompose-layer", psd, "--layer", "-1", "--out", out, *files, *FAST)
    assert code == 0, err
    assert any(r.getMessage().startswith("caption (en,") for r in caplog.records)
    assert [layer.name for layer in read_psd(out)][-2:] == ["Title / 1", "Title / 2"]


def test_everything_is_checked_before_loading(
    capsys, files, psd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_split, "load_from_args", lambda args: pytest.fail("the model must not be loaded"))
    taken = tmp_path / "taken.psd"
    taken.write_bytes(b"keep me")
    empty = LayerStack(96, 72, [Layer(np.zeros((72, 96, 4), np.float32), name="Ghost")])
    write_psd(empty, tmp_path / "ghost.psd")
    out = tmp_path / "o.psd"
    cases = [
        ([psd, "--layer", "Nope", "--out", out], "layer named 'Nope' not found; layers are: 'Background'"),
        ([psd, "--layer", "7", "--out", out], "layer 7 requested, 3 available"),
        ([tmp_path / "ghost.psd", "--layer", "0", "--out", out], "is fully transparent; there is nothing"),
        ([psd, "--layer", "0", "--out", taken], "--overwrite"),
        ([psd, "--layer", "0", "--out", tmp_path / "o.png"], "must end with .psd"),
        ([psd, "--layer", "0", "--out", out, "--layers", "0"], "layers must be in 1..20"),
        ([psd, "--layer", "0", "--out", out, "--resolution", "640", "--max-side", "96"], "--max-side applies only"),
        ([psd, "--layer", "0", "--out", out, "--caption-language", "fr"], "invalid choice: 'fr'"),
        ([tmp_path / "none.psd", "--layer", "0", "--out", out], "none.psd"),
        ([psd, "--layer", "0", "--out", out, "--sigmas", "0.5,0.9"], "decreasing"),
        ([psd, "--layer", "0", "--out", out, "--lora", tmp_path / "gone.safetensors"], "file not found"),
    ]
    for argv, message in cases:
        code, err = _run(capsys, "decompose-layer", *files, *FAST, *argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    assert taken.read_bytes() == b"keep me" and not out.exists()
