"""A small stand-in for ComfyUI's executor: runs API-format graphs (the POST /prompt JSON) in CI.

It follows ComfyUI 0.3.64's `execution.py` where that matters for a node pack, and is stricter where strictness
finds bugs in our graphs:
- validation: known class_type; required inputs present; unknown input names rejected (ComfyUI ignores them);
  links are [node_id, slot] to an existing node and slot; the linked RETURN_TYPE must match the input type
  (comma-separated type sets overlap, `*` matches anything); widget constants are converted like ComfyUI does
  (INT/FLOAT/STRING/BOOLEAN), checked against min/max and combo lists unless VALIDATE_INPUTS takes them, and a
  constant for a non-widget type (IMAGE, LAYERS...) is rejected; VALIDATE_INPUTS is called with constants only
  (linked inputs arrive as None, as in ComfyUI);
- execution: only output nodes and what they depend on, in topological order; one node instance per id; the
  FUNCTION gets constants, linked outputs and declared hidden inputs as keyword arguments; `{"ui", "result"}`
  dicts are split; result tuples must have len(RETURN_TYPES) and values of the declared types;
- caching: IS_CHANGED is computed from constants before running; a node whose class, constants, IS_CHANGED and
  upstream signatures equal the previous run's is served from the cache (NaN never equals, so it always runs).

Core nodes used by our workflows (LoadImage, SaveImage, PreviewImage) are small faithful stand-ins written here.
The host modules our pack looks for are installed into `sys.modules` only while a graph runs: `folder_paths`
(the real one from $COMFYUI_DIR when set, else a stand-in), `comfy.utils` (a ProgressBar that records updates),
`comfy.model_management` (interrupt flag, devices, memory calls recorded) and `comfy.model_patcher`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import random
import sys
import time
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from string_nodes import STRING_NODES

ROOT = Path(__file__).resolve().parents[2]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
HIDDEN_VALUES = {"PROMPT", "EXTRA_PNGINFO", "UNIQUE_ID", "DYNPROMPT"}


class GraphError(ValueError):
    """The graph would be refused by ComfyUI's validation (or by the harness's stricter checks)."""


class InterruptProcessingException(Exception):
    """Stand-in of comfy.model_management.InterruptProcessingException (what Cancel raises)."""


def load_pack(path: Path = ROOT, name: str | None = None) -> types.ModuleType:
    """Import the pack by path as ComfyUI's loader does (module name = folder path with '.' -> '_x_')."""
    name = name or str(path).replace(".", "_x_")
    if name in sys.modules:
        return sys.modules[name]
    parts = name.split(".")
    for i in range(1, len(parts)):  # a dotted name such as custom_nodes.<pack> needs its parent packages
        parent = ".".join(parts[:i])
        if parent not in sys.modules:
            sys.modules[parent] = types.ModuleType(parent)
            sys.modules[parent].__path__ = []
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def pack_module(dotted: str) -> types.ModuleType:
    """A submodule of the path-imported pack, e.g. "nodes.host" or "qil_core.errors".

    Tests that check node behaviour must use these (not a top-level `import qil_core`): the pack's copy of
    qil_core is a different module, so its classes (errors, LayerStack) are different objects."""
    return importlib.import_module(f"{load_pack().__name__}.{dotted}")


# ------------------------------------------------------------------ host stand-ins
def _standin_folder_paths(base: Path) -> types.ModuleType:
    """A `folder_paths` with the functions packs call, behaving like ComfyUI 0.3.64's (written here)."""
    fp = types.ModuleType("folder_paths")
    dirs = {"output": base / "output", "input": base / "input", "temp": base / "temp"}
    models = base / "models"
    folders = {
        "diffusion_models": [models / "unet", models / "diffusion_models"],
        "vae": [models / "vae"],
        "text_encoders": [models / "text_encoders", models / "clip"],
        "diffusers": [models / "diffusers"],
        "loras": [models / "loras"],
    }
    fp.get_output_directory = lambda: str(dirs["output"])
    fp.get_input_directory = lambda: str(dirs["input"])
    fp.get_temp_directory = lambda: str(dirs["temp"])
    fp.get_folder_paths = lambda kind: [
        str(p) for p in folders[{"unet": "diffusion_models", "clip": "text_encoders"}.get(kind, kind)]
    ]

    def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
        for tag, key in ((" [output]", "output"), (" [input]", "input"), (" [temp]", "temp")):
            if name.endswith(tag):
                return os.path.join(dirs[key], name[: -len(tag)])
        return os.path.join(default_dir or dirs["input"], name)

    def get_save_image_path(prefix: str, output_dir: str, image_width: int = 0, image_height: int = 0):
        now = time.localtime()
        for key, value in (
            ("width", image_width),
            ("height", image_height),
            ("year", now.tm_year),
            ("month", f"{now.tm_mon:02}"),
            ("day", f"{now.tm_mday:02}"),
            ("hour", f"{now.tm_hour:02}"),
            ("minute", f"{now.tm_min:02}"),
            ("second", f"{now.tm_sec:02}"),
        ):
            prefix = prefix.replace(f"%{key}%", str(value))
        subfolder = os.path.dirname(os.path.normpath(prefix))
        filename = os.path.basename(os.path.normpath(prefix))
        full = os.path.join(output_dir, subfolder)
        # ComfyUI compares abspath (not realpath): a symlink inside output/ passes this check.
        if os.path.commonpath((output_dir, os.path.abspath(full))) != output_dir:
            raise Exception("**** ERROR: Saving image outside the output folder is not allowed.")  # noqa: TRY002
        counter = 1
        if os.path.isdir(full):
            for entry in os.listdir(full):
                head, sep, rest = entry.partition(filename + "_")
                digits = rest.split("_")[0]
                if sep and not head and digits.isdigit():
                    counter = max(counter, int(digits) + 1)
        else:
            os.makedirs(full, exist_ok=True)
        return full, filename, counter, subfolder, prefix

    fp.get_annotated_filepath = get_annotated_filepath
    fp.exists_annotated_filepath = lambda name: os.path.exists(get_annotated_filepath(name))
    fp.get_save_image_path = get_save_image_path
    return fp


def _real_folder_paths(comfy_dir: Path, base: Path) -> tuple[types.ModuleType, dict[str, types.ModuleType]]:
    """ComfyUI's own folder_paths.py (and the comfy.options / comfy.cli_args it needs), pointed at `base`."""
    comfy_pkg = types.ModuleType("comfy")
    comfy_pkg.__path__ = [str(comfy_dir / "comfy")]
    extra = {"comfy": comfy_pkg}
    saved = {k: sys.modules.get(k) for k in ("comfy", "comfy.options", "comfy.cli_args")}
    sys.modules["comfy"] = comfy_pkg
    write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # leave the checkout as it is
    try:
        extra["comfy.options"] = importlib.import_module("comfy.options")  # args_parsing stays False: no argv
        extra["comfy.cli_args"] = importlib.import_module("comfy.cli_args")
        spec = importlib.util.spec_from_file_location("folder_paths", comfy_dir / "folder_paths.py")
        assert spec is not None and spec.loader is not None
        fp = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fp)
    finally:
        sys.dont_write_bytecode = write_bytecode
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    fp.set_output_directory(str(base / "output"))
    fp.set_input_directory(str(base / "input"))
    fp.set_temp_directory(str(base / "temp"))
    for kind, sub in (
        ("diffusion_models", "diffusion_models"),
        ("vae", "vae"),
        ("text_encoders", "text_encoders"),
        ("diffusers", "diffusers"),
    ):
        fp.folder_names_and_paths[kind] = ([str(base / "models" / sub)], fp.folder_names_and_paths[kind][1])
    return fp, extra


@dataclass
class HostRecord:
    """What the fake comfy.* modules saw during a run."""

    progress: list[tuple[str | None, int, int]] = field(default_factory=list)
    free_memory: list[tuple[int, Any]] = field(default_factory=list)
    loaded: list[Any] = field(default_factory=list)
    interrupt_checks: int = 0
    interrupt_after: int | None = None  # raise on the n-th interrupt check (Cancel pressed)


def _standin_comfy(record: HostRecord) -> dict[str, types.ModuleType]:
    utils = types.ModuleType("comfy.utils")
    mm = types.ModuleType("comfy.model_management")
    mp = types.ModuleType("comfy.model_patcher")

    class ProgressBar:
        def __init__(self, total: int, node_id: str | None = None) -> None:
            self.total, self.current, self.node_id = total, 0, node_id

        def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
            if total is not None:
                self.total = total
            self.current = min(value, self.total)
            record.progress.append((self.node_id, self.current, self.total))

        def update(self, value: int) -> None:
            self.update_absolute(self.current + value)

    def throw_exception_if_processing_interrupted() -> None:
        record.interrupt_checks += 1
        if record.interrupt_after is not None and record.interrupt_checks >= record.interrupt_after:
            raise InterruptProcessingException()

    class ModelPatcher:
        def __init__(self, model: Any, load_device: Any, offload_device: Any, size: int = 0, **_: Any) -> None:
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            self.size = size or sum(p.numel() * p.element_size() for p in model.parameters())

        def model_size(self) -> int:
            return self.size

    def load_models_gpu(models: list[Any], *args: Any, **kwargs: Any) -> None:
        for m in models:
            m.model.to(m.load_device)
            record.loaded.append(m)

    utils.ProgressBar = ProgressBar
    mm.InterruptProcessingException = InterruptProcessingException
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    mm.free_memory = lambda memory_required, device, keep_loaded=(): record.free_memory.append(
        (memory_required, device)
    )
    mm.load_models_gpu = load_models_gpu
    mp.ModelPatcher = ModelPatcher
    return {"comfy.utils": utils, "comfy.model_management": mm, "comfy.model_patcher": mp}


# ------------------------------------------------------------------ core node stand-ins
class LoadImage:
    """Stand-in of core LoadImage: RGB IMAGE plus MASK = 1 - alpha (64x64 zeros without alpha), frames stacked."""

    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        folder = sys.modules["folder_paths"].get_input_directory()
        files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
        return {"required": {"image": (files, {"image_upload": True})}}

    def load_image(self, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        img = Image.open(sys.modules["folder_paths"].get_annotated_filepath(image))
        images, masks = [], []
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            rgb = frame.convert("RGB")
            if images and rgb.size != (images[0].shape[2], images[0].shape[1]):
                continue
            images.append(torch.from_numpy(np.asarray(rgb, np.float32) / 255.0)[None])
            if "A" in frame.getbands() or (frame.mode == "P" and "transparency" in frame.info):
                alpha = np.asarray(frame.convert("RGBA").getchannel("A"), np.float32) / 255.0
                masks.append(1.0 - torch.from_numpy(alpha)[None])
            else:
                masks.append(torch.zeros((1, 64, 64), dtype=torch.float32))
        return torch.cat(images), torch.cat(masks)

    @classmethod
    def IS_CHANGED(cls, image: str) -> str:
        with open(sys.modules["folder_paths"].get_annotated_filepath(image), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, image: str) -> bool | str:
        if not sys.modules["folder_paths"].exists_annotated_filepath(image):
            return f"Invalid image file: {image}"
        return True


class SaveImage:
    """Stand-in of core SaveImage: `{prefix}_{counter:05}_.png` per batch item in the output folder."""

    CATEGORY = "image"
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    folder_type = "output"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def _folder(self) -> str:
        return sys.modules["folder_paths"].get_output_directory()

    def save_images(
        self, images: torch.Tensor, filename_prefix: str = "ComfyUI", prompt: Any = None, extra_pnginfo: Any = None
    ) -> dict:
        fp = sys.modules["folder_paths"]
        folder, name, counter, subfolder, _ = fp.get_save_image_path(
            filename_prefix, self._folder(), images[0].shape[1], images[0].shape[0]
        )
        results = []
        for image in images:
            arr = np.clip(image.cpu().numpy() * 255.0, 0, 255).astype(np.uint8)
            file = f"{name}_{counter:05}_.png"
            Image.fromarray(arr).save(os.path.join(folder, file), compress_level=4)
            results.append({"filename": file, "subfolder": subfolder, "type": self.folder_type})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    """Stand-in of core PreviewImage: like SaveImage, into the temp folder with a random name part."""

    folder_type = "temp"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def _folder(self) -> str:
        return sys.modules["folder_paths"].get_temp_directory()

    def save_images(
        self, images: torch.Tensor, filename_prefix: str = "ComfyUI", prompt: Any = None, extra_pnginfo: Any = None
    ) -> dict:
        tag = "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
        return super().save_images(images, f"ComfyUI_temp_{tag}", prompt, extra_pnginfo)


CORE_NODES: dict[str, type] = {
    "LoadImage": LoadImage,
    "SaveImage": SaveImage,
    "PreviewImage": PreviewImage,
    **STRING_NODES,
}


# ------------------------------------------------------------------ the executor
def _types_match(received: str, expected: Any) -> bool:
    if isinstance(expected, list):  # combo input: only a combo output (a list) could match; ours never link
        return False
    if received == "*" or expected == "*" or received == expected:
        return True
    return bool({t.strip() for t in str(received).split(",")} & {t.strip() for t in str(expected).split(",")})


def check_value(type_name: str, value: Any, where: str) -> None:
    """Check a value passed between nodes against its declared ComfyUI type (IMAGE, MASK, LAYERS, ...)."""
    if type_name == "IMAGE":
        ok = (
            isinstance(value, torch.Tensor)
            and value.ndim == 4
            and value.dtype == torch.float32
            and value.shape[-1] in (1, 3, 4)
        )
    elif type_name == "MASK":
        ok = isinstance(value, torch.Tensor) and value.ndim in (2, 3) and value.dtype == torch.float32
    elif type_name == "LAYERS":
        ok = isinstance(value, dict) and value.get("version") == 1 and isinstance(value.get("layers"), list)
    elif type_name == "STRING":
        ok = isinstance(value, str)
    elif type_name == "INT":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif type_name == "FLOAT":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif type_name == "BOOLEAN":
        ok = isinstance(value, bool)
    else:
        ok = True
    if not ok:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        dtype = getattr(value, "dtype", "")
        raise GraphError(f"{where}: value {shape} {dtype} is not a valid {type_name}")


@dataclass
class RunResult:
    """Outputs per node id, UI dicts of the nodes that returned one, the IS_CHANGED values, and which nodes ran."""

    outputs: dict[str, tuple]
    ui: dict[str, dict]
    is_changed: dict[str, Any]
    executed: list[str]
    host: HostRecord


class Harness:
    """Executes API-format graphs against NODE_CLASS_MAPPINGS (plus core stand-ins) with folders under `base`."""

    def __init__(
        self,
        mappings: Mapping[str, type],
        base: Path,
        *,
        comfyui_dir: str | os.PathLike | None = None,
        core_nodes: bool = True,
    ) -> None:
        self.mappings = {**(CORE_NODES if core_nodes else {}), **mappings}
        self.base = Path(base)
        for sub in (
            "output",
            "input",
            "temp",
            "models/diffusion_models",
            "models/vae",
            "models/text_encoders",
            "models/diffusers",
        ):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        comfy_dir = comfyui_dir if comfyui_dir is not None else os.environ.get("COMFYUI_DIR")
        self.comfyui_dir = Path(comfy_dir) if comfy_dir else None
        self.record = HostRecord()
        self._instances: dict[str, Any] = {}
        self._cache: dict[str, tuple[Any, tuple, dict | None]] = {}

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def temp_dir(self) -> Path:
        return self.base / "temp"

    @contextlib.contextmanager
    def host(self) -> Iterator[HostRecord]:
        """Install folder_paths and the comfy.* stand-ins into sys.modules while the block runs."""
        if self.comfyui_dir is not None:
            fp, extra = _real_folder_paths(self.comfyui_dir, self.base)
        else:
            fp, extra = _standin_folder_paths(self.base), {}
        modules = {**extra, **_standin_comfy(self.record), "folder_paths": fp}
        saved = {k: sys.modules.get(k) for k in modules}
        sys.modules.update(modules)
        try:
            yield self.record
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v

    # -------------------------------------------------------------- validation
    def _class(self, graph: Mapping[str, Any], node_id: str) -> type:
        node = graph[node_id]
        if not isinstance(node, Mapping) or "class_type" not in node:
            raise GraphError(f"node {node_id}: missing class_type")
        cls = self.mappings.get(node["class_type"])
        if cls is None:
            raise GraphError(f"node {node_id}: node type {node['class_type']!r} does not exist")
        for flag in ("INPUT_IS_LIST", "OUTPUT_IS_LIST"):
            if getattr(cls, flag, False):
                raise GraphError(f"node {node_id}: {flag} nodes are not supported by this harness")
        return cls

    def validate(self, graph: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Check the whole graph; returns each node's converted constant inputs. Raises GraphError listing all."""
        with self.host():  # INPUT_TYPES of loaders list the input folder
            return self._validate(graph)

    def _validate(self, graph: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        errors: list[str] = []
        constants: dict[str, dict[str, Any]] = {}
        for node_id, node in graph.items():
            try:
                cls = self._class(graph, node_id)
            except GraphError as e:
                errors.append(str(e))
                continue
            spec = cls.INPUT_TYPES()
            declared = {**spec.get("required", {}), **spec.get("optional", {})}
            inputs = node.get("inputs", {})
            where = f"node {node_id} ({node['class_type']})"
            validator = getattr(cls, "VALIDATE_INPUTS", None)
            v_args = inspect.getfullargspec(validator).args if validator else []
            v_kwargs = bool(validator and inspect.getfullargspec(validator).varkw)
            consts: dict[str, Any] = {}
            for name in spec.get("required", {}):
                if name not in inputs:
                    errors.append(f"{where}: required input {name!r} is missing")
            for name, value in inputs.items():
                if name not in declared:
                    errors.append(f"{where}: unknown input {name!r} (declared: {', '.join(declared)})")
                    continue
                in_type = declared[name][0]
                opts = declared[name][1] if len(declared[name]) > 1 else {}
                if isinstance(value, list):
                    err = self._check_link(graph, value, in_type, f"{where} input {name!r}")
                    if err:
                        errors.append(err)
                    continue
                if isinstance(value, dict) and "__value__" in value:
                    value = value["__value__"]
                if not isinstance(in_type, list) and in_type not in WIDGET_TYPES:
                    errors.append(f"{where}: input {name!r} of type {in_type} must be linked, got a constant")
                    continue
                try:
                    value = (
                        {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(in_type, lambda v: v)(value)
                        if not isinstance(in_type, list)
                        else value
                    )
                except (TypeError, ValueError) as e:
                    errors.append(f"{where}: input {name!r}: cannot convert {value!r} to {in_type} ({e})")
                    continue
                consts[name] = value
                if name in v_args or v_kwargs:
                    continue  # ComfyUI skips its own checks for inputs VALIDATE_INPUTS takes
                if "min" in opts and value < opts["min"]:
                    errors.append(f"{where}: input {name!r}: value {value} smaller than min of {opts['min']}")
                elif "max" in opts and value > opts["max"]:
                    errors.append(f"{where}: input {name!r}: value {value} bigger than max of {opts['max']}")
                elif isinstance(in_type, list) and value not in in_type:
                    errors.append(f"{where}: input {name!r}: value {value!r} not in {in_type[:20]}")
            constants[node_id] = consts
            if validator and not errors:
                verdict = validator(**{k: consts.get(k) for k in inputs if k in v_args or v_kwargs})
                if verdict is not True:
                    errors.append(f"{where}: VALIDATE_INPUTS failed: {verdict}")
        if not any(
            getattr(self.mappings.get(n.get("class_type")), "OUTPUT_NODE", False)
            for n in graph.values()
            if isinstance(n, Mapping)
        ):
            errors.append("prompt has no outputs (no OUTPUT_NODE in the graph)")
        if errors:
            raise GraphError("graph refused:\n  " + "\n  ".join(errors))
        return constants

    def _check_link(self, graph: Mapping[str, Any], link: list, in_type: Any, where: str) -> str | None:
        if len(link) != 2:
            return f"{where}: a link must be [node_id, output_index], got {link!r}"
        src, slot = str(link[0]), link[1]
        if src not in graph:
            return f"{where}: linked node {src} does not exist"
        src_cls = self.mappings.get(graph[src].get("class_type"))
        if src_cls is None:
            return None  # reported on the source node itself
        outs = src_cls.RETURN_TYPES
        if not isinstance(slot, int) or not 0 <= slot < len(outs):
            return f"{where}: output {slot!r} of node {src} does not exist ({len(outs)} outputs)"
        if not _types_match(outs[slot], in_type):
            return f"{where}: received type {outs[slot]} from node {src}, expected {in_type}"
        return None

    # -------------------------------------------------------------- execution
    def _order(self, graph: Mapping[str, Any]) -> list[str]:
        wanted = [n for n, node in graph.items() if getattr(self.mappings[node["class_type"]], "OUTPUT_NODE", False)]
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(n: str) -> None:
            if state.get(n) == 2:
                return
            if state.get(n) == 1:
                raise GraphError(f"the graph has a cycle through node {n}")
            state[n] = 1
            for value in graph[n].get("inputs", {}).values():
                if isinstance(value, list):
                    visit(str(value[0]))
            state[n] = 2
            order.append(n)

        for n in sorted(wanted, key=str):
            visit(n)
        return order

    def run(self, graph: Mapping[str, Any], *, extra_pnginfo: dict | None = None) -> RunResult:
        """Validate and execute `graph`; raises GraphError for refused graphs, or whatever a node raised.

        `extra_pnginfo` is what the frontend sends beside the prompt (e.g. {"workflow": ui_graph})."""
        graph = {str(k): v for k, v in graph.items()}
        constants = self.validate(graph)
        order = self._order(graph)
        outputs: dict[str, tuple] = {}
        ui: dict[str, dict] = {}
        is_changed: dict[str, Any] = {}
        executed: list[str] = []
        signatures: dict[str, Any] = {}
        with self.host():
            for n in order:
                node, cls = graph[n], self.mappings[graph[n]["class_type"]]
                if hasattr(cls, "IS_CHANGED"):
                    # ComfyUI passes every input (linked ones as None); a signature that cannot take them
                    # fails there with only a logged warning and disables caching, so the harness refuses it.
                    wanted = inspect.getfullargspec(cls.IS_CHANGED)
                    extra = [k for k in node.get("inputs", {}) if k not in wanted.args and not wanted.varkw]
                    if extra:
                        raise GraphError(f"node {n}: IS_CHANGED does not accept inputs {extra}")
                    is_changed[n] = cls.IS_CHANGED(**{k: constants[n].get(k) for k in node.get("inputs", {})})
                ups = {
                    k: signatures[str(v[0])] + (v[1],) for k, v in node.get("inputs", {}).items() if isinstance(v, list)
                }
                signatures[n] = (
                    node["class_type"],
                    repr(sorted(constants[n].items())),
                    repr(sorted(ups.items())),
                    repr(is_changed.get(n)),
                )
                cached = self._cache.get(n)
                if cached is not None and cached[0] == signatures[n] and not _is_nan(is_changed.get(n)):
                    outputs[n] = cached[1]
                    if cached[2] is not None:
                        ui[n] = cached[2]
                    continue
                outputs[n], node_ui = self._execute(graph, n, cls, constants[n], outputs, extra_pnginfo)
                executed.append(n)
                if node_ui is not None:
                    ui[n] = node_ui
                self._cache[n] = (signatures[n], outputs[n], node_ui)
        return RunResult(outputs, ui, is_changed, executed, self.record)

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
        kwargs = dict(consts)
        for name, value in node.get("inputs", {}).items():
            if isinstance(value, list):
                kwargs[name] = outputs[str(value[0])][value[1]]
        hidden = cls.INPUT_TYPES().get("hidden", {})
        for name, kind in hidden.items():
            kwargs[name] = {"PROMPT": graph, "UNIQUE_ID": n, "EXTRA_PNGINFO": extra_pnginfo}.get(kind)
        if n not in self._instances or type(self._instances[n]) is not cls:
            self._instances[n] = cls()
        result = getattr(self._instances[n], cls.FUNCTION)(**kwargs)
        node_ui = None
        if isinstance(result, dict):
            node_ui = result.get("ui")  # ComfyUI caches and sends any node's ui (execution.py), output node or not
            if node_ui is not None and not isinstance(node_ui, dict):
                raise GraphError(f"{where}: 'ui' must be a dict, got {type(node_ui).__name__}")
            result = result.get("result", ())
        if not isinstance(result, tuple):
            raise GraphError(f"{where}: FUNCTION must return a tuple or a dict, got {type(result).__name__}")
        if len(result) != len(cls.RETURN_TYPES) and not (result == () and getattr(cls, "OUTPUT_NODE", False)):
            raise GraphError(f"{where}: returned {len(result)} values for RETURN_TYPES {cls.RETURN_TYPES}")
        for i, (value, type_name) in enumerate(zip(result, cls.RETURN_TYPES)):
            check_value(type_name, value, f"{where} output {i}")
        return result, node_ui


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
