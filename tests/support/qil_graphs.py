"""Test support for graphs with the model nodes: a list-aware harness, tiny model files, sample inputs, workflows.

- `ListHarness`: the CI harness plus ComfyUI's list semantics (execution.py `_map_node_over_list` and
  `merge_result_data` in 0.3.64): an output declared in OUTPUT_IS_LIST carries a list, a node fed a list runs
  once per item (shorter lists repeat their last item), its outputs become lists and its UI dicts are merged.
  Decompose Image needs it: its LAYERS output is one document per input image.
- `install_models(base)`: tiny RANDOM weights in ComfyUI's layout under the file names users have, so the
  workflows run unchanged; written once per session and copied.
- `write_inputs(folder)`: example.png (what the workflows load) and example.psd.
- `load_workflow(name)` / `fast(graph)`: the API graphs, with steps and sizes shrunk for CPU tests.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from comfy_harness import ROOT, GraphError, Harness, check_value, pack_module
from lora_support import LIGHTNING_NAME, write_tiny_lora
from PIL import Image

WORKFLOWS = ROOT / "workflows"
API_DIR = WORKFLOWS / "api"
# The files users have (ComfyUI's repackaged release); tests write tiny random weights under these names.
MODEL_FILES = {
    "transformer": Path("models/diffusion_models/qwen_image_layered_fp8mixed.safetensors"),
    "vae": Path("models/vae/qwen_image_layered_vae.safetensors"),
    "text_encoder": Path("models/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"),
}
# Load Qwen-Layered's three file inputs, as the node lists them.
MODEL_NAMES = tuple(MODEL_FILES[k].name for k in ("transformer", "vae", "text_encoder"))
TOKENIZER = Path("comfy/text_encoders/qwen25_tokenizer")  # where a ComfyUI root keeps it, next to models/
_CACHE: dict[str, Path] = {}


class NodeList(list):
    """An output slot holding a list of values (OUTPUT_IS_LIST, or a node that ran once per list item)."""


class ListHarness(Harness):
    """The CI harness with ComfyUI's OUTPUT_IS_LIST / map-over-list semantics (INPUT_IS_LIST stays refused)."""

    def _class(self, graph: Mapping[str, Any], node_id: str) -> type:
        node = graph[node_id]
        cls = self.mappings.get(node.get("class_type")) if isinstance(node, Mapping) else None
        if cls is not None and getattr(cls, "OUTPUT_IS_LIST", None) and not getattr(cls, "INPUT_IS_LIST", False):
            return cls
        return super()._class(graph, node_id)

    def _execute(
        self,
        graph: Mapping[str, Any],
        n: str,
        cls: type,
        consts: dict[str, Any],
        outputs: dict[str, tuple],
        extra_pnginfo: dict | None,
    ) -> tuple[tuple, dict | None]:
        node = graph[n]
        where = f"node {n} ({node['class_type']})"
        linked = {k: outputs[str(v[0])][v[1]] for k, v in node.get("inputs", {}).items() if isinstance(v, list)}
        count = max([len(v) for v in linked.values() if isinstance(v, NodeList)], default=1)
        hidden = {
            name: {"PROMPT": graph, "UNIQUE_ID": n, "EXTRA_PNGINFO": extra_pnginfo}.get(kind)
            for name, kind in cls.INPUT_TYPES().get("hidden", {}).items()
        }
        if n not in self._instances or type(self._instances[n]) is not cls:
            self._instances[n] = cls()
        results, uis = [], []
        for i in range(count):
            args = {k: (v[min(i, len(v) - 1)] if isinstance(v, NodeList) else v) for k, v in linked.items()}
            result = getattr(self._instances[n], cls.FUNCTION)(**consts, **args, **hidden)
            if isinstance(result, dict):
                if result.get("ui") is not None:  # ComfyUI sends any node's ui (execution.py), output node or not
                    if not isinstance(result["ui"], dict):
                        raise GraphError(f"{where}: 'ui' must be a dict, got {type(result['ui']).__name__}")
                    uis.append(result["ui"])
                result = result.get("result", ())
            if not isinstance(result, tuple):
                raise GraphError(f"{where}: FUNCTION must return a tuple or a dict, got {type(result).__name__}")
            if len(result) != len(cls.RETURN_TYPES) and not (result == () and getattr(cls, "OUTPUT_NODE", False)):
                raise GraphError(f"{where}: returned {len(result)} values for RETURN_TYPES {cls.RETURN_TYPES}")
            results.append(result)
        is_list = getattr(cls, "OUTPUT_IS_LIST", (False,) * len(cls.RETURN_TYPES))
        merged: list[Any] = []
        for slot, type_name in enumerate(cls.RETURN_TYPES if results and results[0] else ()):
            if is_list[slot]:
                values = NodeList(x for r in results for x in _as_list(r[slot], f"{where} output {slot}"))
            else:
                values = NodeList(r[slot] for r in results)
            for v in values:
                check_value(type_name, v, f"{where} output {slot}")
            merged.append(values if is_list[slot] or count > 1 else values[0])
        ui = {k: [y for u in uis for y in u[k]] for k in uis[0]} if uis else None
        return tuple(merged), ui


def _as_list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise GraphError(f"{where}: declared in OUTPUT_IS_LIST but returned {type(value).__name__}, not a list")
    return value


def items(value: Any) -> list:
    """The values of an output slot as a list (one item unless it is a NodeList)."""
    return list(value) if isinstance(value, NodeList) else [value]


# ------------------------------------------------------------------ files
def _tiny_model() -> Path:
    """A session-wide folder with tiny random weights under the user file names, and the tiny tokenizer."""
    if "root" not in _CACHE or not _CACHE["root"].is_dir():
        tiny = pack_module("qil_core.model.weights.tiny")
        root = Path(tempfile.mkdtemp(prefix="qil-tiny-model-"))
        paths = tiny.write_tiny_model(root / "build", layout="comfyui")
        for name, rel in MODEL_FILES.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(paths[name], root / rel)
        shutil.move(paths["tokenizer"], root / "tokenizer")
        shutil.rmtree(root / "build")
        dit = tiny.build_tiny_modules(0)[0]
        write_tiny_lora(root / "loras" / LIGHTNING_NAME, dit)
        _CACHE["root"] = root
    return _CACHE["root"]


def install_models(base: Path) -> dict[str, Path]:
    """Copy the tiny model into `base` (a ComfyUI base dir): models/... files and comfy/.../qwen25_tokenizer."""
    src = _tiny_model()
    out = {}
    for name, rel in MODEL_FILES.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        out[name] = Path(shutil.copy2(src / rel, base / rel))
    if not (base / TOKENIZER).is_dir():
        shutil.copytree(src / "tokenizer", base / TOKENIZER)
    out["tokenizer"] = base / TOKENIZER
    out["lora"] = Path(shutil.copy2(src / "loras" / LIGHTNING_NAME, _lora_dir(base)))  # the LoRA workflow's file
    return out


def _lora_dir(base: Path) -> Path:
    (base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    return base / "models" / "loras" / LIGHTNING_NAME


def sample_picture(width: int = 96, height: int = 72) -> np.ndarray:
    """A small RGB picture (H, W, 3) uint8: sky gradient, a sun disc and a red box (not flat, so no warning)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    img[..., 0], img[..., 1], img[..., 2] = 60 + 80 * yy / height, 120 + 60 * xx / width, 220 - 40 * yy / height
    img[((xx - width * 0.7) ** 2 + (yy - height * 0.3) ** 2) < (height * 0.15) ** 2] = (250, 220, 60)
    img[int(height * 0.55) : int(height * 0.9), int(width * 0.15) : int(width * 0.45)] = (200, 30, 40)
    return img.astype(np.uint8)


def write_inputs(folder: Path) -> None:
    """example.png (the workflows' Load Image) and example.psd (the PSD workflow's Load PSD) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample_picture()).save(folder / "example.png")
    layers = pack_module("qil_core.layers")
    psd = pack_module("qil_core.layers.psd")
    sky = np.zeros((72, 96, 4), np.float32)
    sky[...] = (0.25, 0.5, 0.9, 1.0)
    box = np.zeros((20, 30, 4), np.float32)
    box[...] = (0.9, 0.1, 0.1, 1.0)
    logo = np.zeros((12, 40, 4), np.float32)
    logo[2:10, 2:38] = (1.0, 1.0, 1.0, 1.0)
    stack = layers.LayerStack(
        96,
        72,
        [
            layers.Layer(sky, name="Background"),
            layers.Layer(box, x=10, y=40, name="box"),
            layers.Layer(logo, x=50, y=6, name="title"),
        ],
    )
    if not (folder / "example.psd").exists():
        psd.write_psd(stack, folder / "example.psd")


# ------------------------------------------------------------------ workflows
def workflow_names() -> list[str]:
    """Names of the example workflows (UI files in workflows/, each with an API twin in workflows/api/)."""
    return sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def load_workflow(name: str) -> dict[str, Any]:
    """The API-format graph of a workflow."""
    return json.loads((API_DIR / f"{name}.json").read_text(encoding="utf-8"))


def fast(graph: Mapping[str, Any], steps: int = 2, side: int = 64) -> dict[str, Any]:
    """A copy of an API graph with CPU-test settings: few steps, custom resolution and small canvases."""
    out = copy.deepcopy(dict(graph))
    for node in out.values():
        inputs = node["inputs"]
        if node["class_type"] in ("QILDecompose", "QILTextToLayers", "QILDecomposeLayer"):
            inputs["steps"] = steps
        if "resolution" in inputs:
            inputs["resolution"], inputs["max_side"] = "custom", side
        if node["class_type"] == "QILTextToLayers":
            inputs["width"], inputs["height"] = side, side
    return out


def harness(base: Path) -> ListHarness:
    """A ListHarness over the whole pack with the tiny model and the sample inputs under `base`."""
    h = ListHarness(pack_module("nodes").NODE_CLASS_MAPPINGS, base)
    install_models(base)
    write_inputs(h.input_dir)
    return h
