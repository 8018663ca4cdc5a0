"""The pack as ComfyUI sees it: import by path (fast, no files, no network), registrations, node metadata,
and static checks that qil_core never imports ComfyUI and that nothing risky is called (robustness.md 4.6)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from comfy_harness import ROOT, load_pack

EXPECTED_NODES = {
    "QILLoadModel": "Load Qwen-Layered",
    "QILLoadLoRA": "Load LoRA (Qwen-Layered)",
    "QILSamplerSettings": "Sampler Settings (Qwen-Layered)",
    "QILDecompose": "Decompose Image",
    "QILCaptionImage": "Caption Image (Qwen2.5-VL)",
    "QILTextToLayers": "Text to Layers",
    "QILDecomposeLayer": "Decompose Layer",
    "QILImagesToLayers": "Images to Layers",
    "QILLayersToImages": "Layers to Images",
    "QILLayerTransform": "Layer Transform",
    "QILLayerRecolor": "Layer Recolor",
    "QILCompositeLayers": "Composite Layers",
    "QILSelectLayer": "Select Layers",
    "QILLayerStackEdit": "Edit Layer Stack",
    "QILSetLayerProperties": "Set Layer Properties",
    "QILCombineLayers": "Combine Layers",
    "QILSavePSD": "Save PSD",
    "QILLoadPSD": "Load PSD",
    "QILSaveLayerPNGs": "Save Layer PNGs",
    "QILPreviewLayers": "Preview Layers",
    "QILReplaceLayerImage": "Replace Layer Pixels",
}
OUTPUT_NODES = {"QILSavePSD", "QILSaveLayerPNGs", "QILPreviewLayers"}
HOST_MODULES = {
    "comfy",
    "comfy_api",
    "comfy_extras",
    "comfy_execution",
    "folder_paths",
    "nodes",
    "server",
    "execution",
    "node_helpers",
    "latent_preview",
}

# Imports the pack in a fresh interpreter the way ComfyUI does (torch is already loaded there), with every
# socket connection refused, and reports the import time, new files and what was registered.
# What importing the pack may load beyond the standard library (torch is loaded by the probe, like ComfyUI does).
LIGHT_IMPORTS = {"numpy", "PIL", "safetensors"}
_IMPORT_PROBE = r"""
import importlib.util, json, os, socket, sys
import torch  # ComfyUI has torch loaded long before it imports custom nodes
attempts = []
def refuse(self, *args, **kwargs):
    attempts.append(repr(args))
    raise OSError("network disabled in this test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
pack = sys.argv[1]
before = {os.path.join(d, f) for d, _, fs in os.walk(pack) for f in fs}
loaded = {m.split(".")[0] for m in sys.modules}
name = pack.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, os.path.join(pack, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
after = {os.path.join(d, f) for d, _, fs in os.walk(pack) for f in fs}
print(json.dumps({
    "new_packages": sorted({m.split(".")[0] for m in sys.modules} - loaded - {name} - set(sys.stdlib_module_names)),
    "new_files": sorted(after - before), "cwd_files": sorted(os.listdir(".")),
    "network": attempts, "nodes": sorted(module.NODE_CLASS_MAPPINGS),
    "exports": sorted(k for k in vars(module) if k.isupper()),
    "entrypoint": hasattr(module, "comfy_entrypoint"),
    "host_loaded": sorted(m for m in sys.modules if m.split(".")[0] in %r),
}))
"""


@pytest.mark.slow
def test_import_by_path_is_fast_quiet_and_registers_everything(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(tmp_path)}
    env.pop("COMFYUI_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE % (sorted(HOST_MODULES),), str(ROOT)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # Fast without a timer: importing the pack loads only these packages (ComfyUI has torch loaded already);
    # no diffusers, transformers, psd-tools or tokenizers until a node runs. Import time is measured in bench/.
    assert set(report["new_packages"]) <= LIGHT_IMPORTS, report["new_packages"]
    assert report["new_files"] == [] and report["cwd_files"] == []
    assert report["network"] == []
    assert report["nodes"] == sorted(EXPECTED_NODES)
    assert report["exports"] == ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]  # no WEB_DIRECTORY: no web files
    assert report["entrypoint"] is False  # V1 only: a comfy_entrypoint would be silently ignored anyway
    assert report["host_loaded"] == []


def test_registrations_and_node_metadata() -> None:
    pack = load_pack()
    assert pack.NODE_CLASS_MAPPINGS.keys() == EXPECTED_NODES.keys()
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == EXPECTED_NODES
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("QIL")
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 80, node_id
        assert cls.CATEGORY.startswith("Qwen-Image-Layered"), node_id
        assert isinstance(cls.RETURN_TYPES, tuple) and len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert bool(getattr(cls, "OUTPUT_NODE", False)) == (node_id in OUTPUT_NODES), node_id
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}, node_id
        for section in ("required", "optional"):
            for name, decl in spec.get(section, {}).items():
                assert len(decl) == 2 and decl[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
                kind, opts = decl
                if isinstance(kind, list):
                    assert opts.get("default", kind[0] if kind else None) in kind or not kind, f"{node_id}.{name}"
                elif kind in ("INT", "FLOAT"):
                    assert opts["min"] <= opts["default"] <= opts["max"], f"{node_id}.{name}"


def _python_files(*parts: str) -> list[Path]:
    files: list[Path] = []
    for part in parts:
        p = ROOT / part
        files += [p] if p.is_file() else sorted(p.rglob("*.py"))
    return files


def _absolute_imports(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_qil_core_and_nodes_never_import_comfyui() -> None:
    for path in _python_files("qil_core", "nodes", "__init__.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        bad = _absolute_imports(tree) & HOST_MODULES
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    # Inside the pack only relative imports of our own code: ComfyUI loads the pack under a path-derived
    # module name, so `import qil_core` (or `nodes`) would fail or pick up ComfyUI's own `nodes` module.
    for path in _python_files("qil_core", "nodes", "__init__.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        assert not _absolute_imports(tree) & {"qil_core", "nodes"}, path.relative_to(ROOT)


_BANNED_CALLS = {"print", "eval", "exec", "compile", "__import__", "breakpoint"}
_BANNED_ATTR_CALLS = {
    ("torch", "load"),
    ("os", "system"),
    ("os", "popen"),
    ("os", "spawnl"),
    ("os", "execv"),
    ("base64", "b64decode"),
    ("pickle", "load"),
    ("pickle", "loads"),
}
_BANNED_MODULES = {
    "pickle",
    "dill",
    "marshal",
    "subprocess",
    "requests",
    "urllib",
    "http",
    "socket",
    "ftplib",
    "huggingface_hub",
    "shelve",
    "ctypes",
}


def test_no_risky_calls_in_shipped_code() -> None:
    problems = []
    for path in _python_files("qil_core", "nodes", "__init__.py"):
        rel = path.relative_to(ROOT)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in _BANNED_CALLS:
                    problems.append(f"{rel}:{node.lineno} calls {f.id}()")
                if (
                    isinstance(f, ast.Attribute)
                    and isinstance(f.value, ast.Name)
                    and (f.value.id, f.attr) in _BANNED_ATTR_CALLS
                ):
                    problems.append(f"{rel}:{node.lineno} calls {f.value.id}.{f.attr}()")
                if isinstance(f, ast.Attribute) and f.attr in ("hf_hub_download", "snapshot_download"):
                    problems.append(f"{rel}:{node.lineno} downloads with {f.attr}()")
                for kw in node.keywords:
                    if kw.arg == "trust_remote_code" and getattr(kw.value, "value", False) is True:
                        problems.append(f"{rel}:{node.lineno} passes trust_remote_code=True")
        bad = _absolute_imports(tree) & _BANNED_MODULES
        if bad:
            problems.append(f"{rel} imports {sorted(bad)}")
    assert problems == []


@pytest.mark.parametrize("name", ["custom_nodes.qwen_layered_probe", "ComfyUI-Qwen-Layered"])
def test_pack_imports_under_other_module_names(name: str) -> None:
    # ComfyUI derives the module name from the folder; a name with dashes or dots must work as well.
    pack = load_pack(ROOT, name)
    assert pack.__name__ == name and set(pack.NODE_CLASS_MAPPINGS) == set(EXPECTED_NODES)
    assert sys.modules[f"{name}.nodes.host"].__file__ == str(ROOT / "nodes" / "host.py")
