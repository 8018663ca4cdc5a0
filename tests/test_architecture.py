"""The import rules that keep the layout honest, checked on the source (ast) of every module in qil_core.

- `qil_core.layers` never imports `qil_core.model` (the layer engine runs without torch or weights).
- The library (`qil_core` minus `qil_core.cli`) never imports the CLI or the ComfyUI adapters (`nodes`).
- `qil_core` never imports ComfyUI.
- Inside `qil_core.model` the rooms import each other only along the arrows in MODEL_ARROWS: `arch` (the networks)
  imports no other room, `pipeline` (the jobs) may import them all.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qil_core"
COMFY_MODULES = {
    "comfy",
    "comfy_api",
    "comfy_extras",
    "comfy_execution",
    "folder_paths",
    "server",
    "nodes",
    "execution",
    "latent_preview",
    "node_helpers",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (function bodies too), as absolute dotted names.

    A relative import that climbs above `qil_core` (the ComfyUI pack's `..nodes`) is reported under its top-level
    name; `from X import y` reports X and X.y (y may be a submodule).
    """
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                keep = len(package) - (node.level - 1)
                base = package[:keep] if keep >= 0 else []
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module:
                found.add(module)
            found.update(f"{module}.{alias.name}" if module else alias.name for alias in node.names)
    return found


def _library_files() -> list[Path]:
    """qil_core without its command line (cli/ and `python -m qil_core`'s __main__.py)."""
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in ("cli", "__main__.py"))


def _hits(files: list[Path], banned: set[str]) -> list[str]:
    bad = []
    for path in files:
        for module in sorted(_imports(path)):
            if any(module == b or module.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    return bad


def test_the_checker_sees_relative_nested_and_absolute_imports(tmp_path: Path) -> None:
    # The rules below are only as good as the import finder: prove it on this repository's own files.
    assert "qil_core.errors" in _imports(PACKAGE / "layers" / "stack.py")  # from ..errors import ...
    assert "qil_core.model.loader" in _imports(PACKAGE / "cli" / "model.py")  # inside a function
    assert "qil_core.cli.entry" in _imports(PACKAGE / "__main__.py")
    assert any(m.startswith("qil_core.model.runtime") for m in _imports(PACKAGE / "model" / "pipeline" / "denoise.py"))


def test_layers_never_import_the_model() -> None:
    files = sorted((PACKAGE / "layers").rglob("*.py"))
    assert len(files) > 10
    assert _hits(files, {"qil_core.model"}) == []


def test_library_never_imports_the_cli_or_the_nodes() -> None:
    files = _library_files()
    assert PACKAGE / "demo" / "job.py" in files and PACKAGE / "cli" / "entry.py" not in files
    assert PACKAGE / "__main__.py" not in files
    assert _hits(files, {"qil_core.cli", "nodes", "qil_core.nodes"}) == []


@pytest.mark.parametrize("top", sorted(COMFY_MODULES))
def test_qil_core_never_imports_comfyui(top: str) -> None:
    assert _hits(sorted(PACKAGE.rglob("*.py")), {top}) == []


# Which rooms of qil_core.model each room may import (the arrows of docs/architecture.md).
MODEL_ARROWS = {
    "arch": set(),
    "runtime": {"arch"},
    "weights": {"arch", "runtime"},
    "loader": {"arch", "weights"},
    "pipeline": {"arch", "weights", "runtime", "loader"},
}


@pytest.mark.parametrize("room", sorted(MODEL_ARROWS))
def test_model_rooms_import_only_along_the_arrows(room: str) -> None:
    model = PACKAGE / "model"
    files = [model / "loader.py"] if room == "loader" else sorted((model / room).rglob("*.py"))
    banned = {f"qil_core.model.{other}" for other in MODEL_ARROWS if other != room and other not in MODEL_ARROWS[room]}
    assert files and _hits(files, banned | {"qil_core.demo"}) == []


def test_arch_reads_no_files() -> None:
    assert _hits(sorted((PACKAGE / "model" / "arch").rglob("*.py")), {"safetensors", "qil_core.layers"}) == []


def test_import_qil_core_stays_light() -> None:
    # The public API re-exports the layer engine eagerly and the model names lazily: no torch until they are used.
    code = (
        "import sys, qil_core\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert not [m for m in sys.modules if m.startswith(('qil_core.model', 'qil_core.cli'))]\n"
        "missing = [n for n in qil_core.__all__ if n not in qil_core._LAZY and not hasattr(qil_core, n)]\n"
        "assert not missing, missing\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_lazy_model_names_are_the_library_functions() -> None:
    import qil_core
    from qil_core.model.loader import QwenLayeredModel, load_model
    from qil_core.model.pipeline.decompose import decompose, text_to_layers
    from qil_core.model.pipeline.layer_split import decompose_layer

    assert qil_core.load_model is load_model and qil_core.QwenLayeredModel is QwenLayeredModel
    assert (qil_core.decompose, qil_core.text_to_layers, qil_core.decompose_layer) == (
        decompose,
        text_to_layers,
        decompose_layer,
    )
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = qil_core.nope  # type: ignore[attr-defined]
