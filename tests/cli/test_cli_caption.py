"""The `caption` command and decompose's auto-caption flags, on tiny random weights."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qil_core.cli.entry import main
from qil_core.model.pipeline.caption_job import caption_from_files
from qil_core.model.weights.tiny import write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("capcli")
    return {
        "comfyui": write_tiny_model(root / "c", layout="comfyui", seed=4),
        "diffusers": write_tiny_model(root / "d", layout="diffusers", seed=4),
    }


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    rgba = np.random.default_rng(2).integers(0, 256, (70, 100, 4), dtype=np.uint8)
    path = tmp_path / "in.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def test_caption_prints_only_the_caption(capsys, tiny, image: Path) -> None:
    code = main(
        [
            "caption",
            str(image),
            "--model-dir",
            str(tiny["diffusers"]["model_dir"]),
            "--dtype",
            "fp32",
            "--device",
            "cpu",
            "--language",
            "zh",
            "--max-new-tokens",
            "12",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    expect = caption_from_files(
        Image.open(image),
        model_dir=tiny["diffusers"]["model_dir"],
        language="zh",
        max_new_tokens=12,
        dtype=torch.float32,
    )
    assert out == expect + "\n" and expect
    assert "caption (zh" in err  # logs go to stderr
    assert "caption: token 1/12 (" in err and "s/token)" in err  # progress while it writes (every token of 12)


def test_caption_from_a_single_file(capsys, tiny, image: Path) -> None:
    paths = tiny["comfyui"]
    code = main(
        [
            "caption",
            str(image),
            "--text-encoder",
            str(paths["text_encoder"]),
            "--tokenizer",
            str(paths["tokenizer"]),
            "--dtype",
            "fp32",
            "--device",
            "cpu",
            "--max-new-tokens",
            "5",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("\n") >= 1 and out.strip()


def test_caption_errors(capsys, tiny, image: Path, tmp_path: Path) -> None:
    assert main(["caption", str(image), "--device", "cpu"]) == 2
    assert "needs the Qwen2.5-VL text encoder" in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "nope.png"), "--model-dir", str(tiny["diffusers"]["model_dir"])]) == 2
    assert main(["caption", str(image), "--language", "fr"]) == 2


def test_decompose_flags(capsys, tiny, image: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = [
        "decompose",
        str(image),
        "--model-dir",
        str(tiny["diffusers"]["model_dir"]),
        "--layers",
        "2",
        "--steps",
        "1",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--resolution",
        "custom",
        "--max-side",
        "64",
    ]
    with caplog.at_level(logging.INFO):
        assert main([*base, "--out", str(tmp_path / "a.psd"), "--caption-language", "zh"]) == 0
    assert "auto-caption: " in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main([*base, "--out", str(tmp_path / "b.psd"), "--no-auto-caption"]) == 0
    assert "auto-caption" not in caplog.text and "no prompt given" in caplog.text
