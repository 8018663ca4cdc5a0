"""The README's Python API example runs as written (with a tiny random model and a few steps)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import qil_core
from qil_core.model.weights.tiny import write_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _python_api_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds one python example"
    return blocks[0]


@pytest.mark.slow
def test_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiny_model(tmp_path / "Qwen-Image-Layered", layout="diffusers")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    # The example's settings, only faster: 2 steps at a 64 px working size on the tiny model.
    fast = functools.partial(qil_core.decompose, steps=2, resolution="custom", max_side=64)
    monkeypatch.setattr(qil_core, "decompose", fast)
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_api_example(), "README.md (Python API)", "exec"), {"__name__": "readme_example"})
    psd = qil_core.read_psd(tmp_path / "photo.psd")
    assert len(psd.layers) == 4 and psd.size == (64, 64)
    flat = np.asarray(Image.open(tmp_path / "photo_flat.png"))
    assert flat.shape == (64, 64, 4)


def test_one_version_everywhere() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    found = re.search(r'^\[project\][^\[]*?^version = "([^"]+)"', pyproject, flags=re.M | re.S)
    assert found is not None, "pyproject.toml has no [project] version"
    assert qil_core.__version__ == found.group(1)
    assert f"## {found.group(1)} (" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
