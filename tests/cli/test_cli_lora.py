"""`--lora FILE[:STRENGTH]` (repeatable), `--lora-mode` and the schedule flags on decompose and text-to-layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lora_support import write_tiny_lora
from PIL import Image
from tiny_runs import fast_cli_args

from qil_core.cli import main
from qil_core.layers.psd import read_psd
from qil_core.model.weights.tiny import build_tiny_modules, write_tiny_model

pytestmark = pytest.mark.slow  # each test decomposes or loads models: seconds on a CPU

FAST = fast_cli_args("a test scene")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_lora")
    paths = write_tiny_model(root, layout="comfyui", seed=1)
    dit = build_tiny_modules(1)[0]
    paths["a"] = write_tiny_lora(root / "a.safetensors", dit, seed=1)
    paths["b"] = write_tiny_lora(root / "b.safetensors", dit, seed=2, rank=2)
    img = np.zeros((48, 64, 3), np.uint8)
    img[..., 0], img[10:30, 20:40] = 200, (30, 200, 90)
    Image.fromarray(img).save(root / "in.png")
    paths["image"] = root / "in.png"
    return paths


def _decompose(capsys, files: dict[str, Path], out: Path, *extra: object) -> tuple[int, str]:
    args = [
        "decompose",
        files["image"],
        "--out",
        out,
        "--transformer",
        files["transformer"],
        "--vae",
        files["vae"],
        "--text-encoder",
        files["text_encoder"],
        *FAST,
        *extra,
    ]
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _pixels(path: Path) -> list[np.ndarray]:
    return [layer.pixels for layer in read_psd(path)]


def test_loras_stack_from_the_command_line(capsys, files, tmp_path: Path) -> None:
    code, err = _decompose(capsys, files, tmp_path / "base.psd")
    assert code == 0, err
    code, err = _decompose(capsys, files, tmp_path / "one.psd", "--lora", files["a"])
    assert code == 0, err
    assert "applied LoRA a.safetensors at strength 1 (fly)" in err
    code, err = _decompose(
        capsys,
        files,
        tmp_path / "two.psd",
        "--lora",
        f"{files['a']}:1",
        "--lora",
        f"{files['b']}:0.5",
        "--lora-mode",
        "merge",
    )
    assert code == 0, err
    assert "b.safetensors at strength 0.5 (merge)" in err
    code, err = _decompose(capsys, files, tmp_path / "zero.psd", "--lora", f"{files['a']}:0")
    assert code == 0, err
    base, one, two = (_pixels(tmp_path / f"{n}.psd") for n in ("base", "one", "two"))
    assert any(not np.array_equal(a, b) for a, b in zip(base, one, strict=True))
    assert any(not np.array_equal(a, b) for a, b in zip(one, two, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(base, _pixels(tmp_path / "zero.psd"), strict=True))


def test_schedule_flags_and_errors(capsys, files, tmp_path: Path) -> None:
    code, err = _decompose(capsys, files, tmp_path / "s.psd", "--sigmas", "1,0.7,0.4", "--cfg", "1")
    assert code == 0, err
    assert "step 3/3" in err  # the sigmas set the step count
    code, err = _decompose(capsys, files, tmp_path / "e.psd", "--time-shift", "exponential", "--shift", "1.0986")
    assert code == 0, err
    code, err = _decompose(capsys, files, tmp_path / "x.psd", "--lora", tmp_path / "missing.safetensors")
    assert code != 0 and "missing.safetensors" in err and not (tmp_path / "x.psd").exists()
    code, err = _decompose(capsys, files, tmp_path / "y.psd", "--sigmas", "0.5,0.9")
    assert code != 0 and "decreasing" in err
