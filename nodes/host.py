"""The one module that touches ComfyUI: folders, safe save paths, progress, interrupt, devices and memory.

Every hook uses the running host when it is there and a standalone fallback otherwise (environment variables,
the working directory, logging progress, plain torch), so nodes, the CLI and CI run without ComfyUI.

We never *import* ComfyUI modules: importing `folder_paths` or `comfy.*` outside a started server parses
`sys.argv` (comfy.cli_args) and creates folders. ComfyUI imports all of them before it loads custom nodes, so
`sys.modules` holds them exactly when we run inside the host (tests put fakes there the same way).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..qil_core.errors import ModelFileNotFoundError, OutputPathError, WeightsError
from ..qil_core.fsutil import ensure_inside, name_problem, next_counter, publish_group

log = logging.getLogger(__name__)

MODEL_KINDS: tuple[str, ...] = ("diffusion_models", "vae", "text_encoders", "diffusers", "loras")
# Legacy folder names ComfyUI still searches for the same kinds.
_LEGACY_FOLDERS = {"diffusion_models": ("unet",), "text_encoders": ("clip",)}
WEIGHT_SUFFIXES = (".safetensors", ".sft")


def _host(name: str) -> ModuleType | None:
    """The already-loaded ComfyUI module `name`, or None when we are not running inside ComfyUI."""
    return sys.modules.get(name)


def _folder_paths() -> ModuleType | None:
    fp = _host("folder_paths")
    return fp if fp is not None and hasattr(fp, "get_output_directory") else None


# ---------------------------------------------------------------- folders
def _directory(kind: str, env: str, default: str) -> Path:
    fp = _folder_paths()
    if fp is not None:
        return Path(getattr(fp, f"get_{kind}_directory")())
    return Path(os.environ.get(env) or Path.cwd() / default).absolute()


def get_output_directory() -> Path:
    """ComfyUI's output folder, else $QIL_OUTPUT_DIR, else ./output."""
    return _directory("output", "QIL_OUTPUT_DIR", "output")


def get_input_directory() -> Path:
    """ComfyUI's input folder, else $QIL_INPUT_DIR, else ./input."""
    return _directory("input", "QIL_INPUT_DIR", "input")


def get_temp_directory() -> Path:
    """ComfyUI's temp folder (emptied at start-up), else $QIL_TEMP_DIR, else ./temp."""
    return _directory("temp", "QIL_TEMP_DIR", "temp")


def model_folders(kind: str, models_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders searched for `kind` models: the `models_dir` argument, ComfyUI's folders, then $QIL_MODELS_DIR."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; use one of {', '.join(MODEL_KINDS)}")
    roots = [Path(models_dir)] if models_dir else []
    folders = [root / sub for root in roots for sub in (kind, *_LEGACY_FOLDERS.get(kind, ()))]
    fp = _folder_paths()
    if fp is not None:
        folders += [Path(p) for p in fp.get_folder_paths(kind)]
    env = os.environ.get("QIL_MODELS_DIR")
    if env:
        folders += [Path(env) / sub for sub in (kind, *_LEGACY_FOLDERS.get(kind, ()))]
    unique: list[Path] = []
    for f in folders:
        if f not in unique:
            unique.append(f)
    return unique


def list_models(kind: str, models_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Model names of `kind` as the loaders show them: relative paths with '/' (diffusers: folder names)."""
    names: set[str] = set()
    for folder in model_folders(kind, models_dir):
        if not folder.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(folder)
            if kind == "diffusers":
                if rel != Path(".") and ("model_index.json" in filenames or "config.json" in filenames):
                    names.add(rel.as_posix())
                    dirnames[:] = []  # a model folder's subfolders are its components, not more models
                continue
            names.update((rel / f).as_posix().removeprefix("./") for f in filenames if f.endswith(WEIGHT_SUFFIXES))
    return sorted(names, key=str.lower)


def find_model(kind: str, name: str, models_dir: str | os.PathLike[str] | None = None) -> Path:
    """Resolve a model name from `list_models` to its path; typed errors for unsafe, unsupported or missing names."""
    parts = Path(name.replace("\\", "/")).parts
    if not name or Path(name).is_absolute() or ".." in parts:
        raise ModelFileNotFoundError(f"model name {name!r} must be a name from the {kind} list, not a path")
    if kind != "diffusers" and not name.lower().endswith(WEIGHT_SUFFIXES):
        raise WeightsError(
            f"model {name!r}: only .safetensors files are supported (pickle-based .ckpt/.pt/.bin files can run "
            "code when loaded); download the .safetensors version"
        )
    folders = model_folders(kind, models_dir)
    for folder in folders:
        path = folder / name
        if path.is_dir() if kind == "diffusers" else path.is_file():
            return path
    looked = ", ".join(str(f) for f in folders) or "no folder (set QIL_MODELS_DIR or pass a models folder)"
    raise ModelFileNotFoundError(
        f"model {name!r} not found in models/{kind} (looked in: {looked}); put the file there and refresh, "
        "or pick one from the list"
    )


# ---------------------------------------------------------------- save paths
@dataclass(frozen=True)
class SavedFile:
    """A file written into the output (or temp) folder, in the form ComfyUI's UI lists it."""

    path: Path
    filename: str
    subfolder: str
    type: str = "output"

    def ui(self) -> dict[str, str]:
        """The {"filename", "subfolder", "type"} entry of an output node's UI dict."""
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


def expand_prefix(prefix: str, width: int = 0, height: int = 0) -> str:
    """Expand ComfyUI's %width% %height% %year% %month% %day% %hour% %minute% %second% variables."""
    now = time.localtime()
    values = {
        "width": width,
        "height": height,
        "year": now.tm_year,
        "month": f"{now.tm_mon:02}",
        "day": f"{now.tm_mday:02}",
        "hour": f"{now.tm_hour:02}",
        "minute": f"{now.tm_min:02}",
        "second": f"{now.tm_sec:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", str(value))
    return prefix


def check_prefix(prefix: str) -> tuple[str, str]:
    """Validate a filename prefix relative to the output folder; returns (subfolder, base name) with '/'."""
    shown = repr(prefix) if len(prefix) <= 80 else repr(prefix[:77]) + "..."
    hint = "use a relative prefix such as 'QwenLayered/layers'"
    if not prefix.strip():
        raise OutputPathError(f"filename_prefix is empty; {hint}")
    if any(ord(c) < 32 or ord(c) == 127 for c in prefix):
        raise OutputPathError(f"filename_prefix {shown} contains a control character (NUL, newline...); {hint}")
    norm = prefix.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or norm.startswith("~"):
        raise OutputPathError(f"filename_prefix {shown} is an absolute path; files stay in the output folder, {hint}")
    parts = [p for p in norm.split("/") if p]
    for part in parts:
        why = (
            "'.' and '..' are not allowed (files must stay inside the output folder)"
            if part in (".", "..")
            else name_problem(part)
        )  # the same rules as every file the library writes
        if why:
            raise OutputPathError(f"filename_prefix {shown} rejected: {part[:40]!r}: {why}; {hint}")
    return "/".join(parts[:-1]), parts[-1]


def _inside(path: Path, root: Path) -> bool:
    try:
        ensure_inside(path, root)
    except OutputPathError:
        return False
    return True


def _plan(prefix: str, width: int, height: int, temp: bool) -> tuple[Path, str, int, str, str]:
    """(folder, base name, first free counter, subfolder, "output"|"temp") for `prefix`; creates the folder."""
    root = get_temp_directory() if temp else get_output_directory()
    subfolder, base = check_prefix(expand_prefix(prefix, width, height))
    folder = root / subfolder
    # Check before anything is created: ComfyUI's own check uses abspath, which a symlink inside output/ escapes.
    if not _inside(folder, root):
        raise OutputPathError(
            f"filename_prefix {prefix!r} leads outside the {'temp' if temp else 'output'} folder through a link "
            f"({folder} -> {os.path.realpath(folder)}); choose another subfolder"
        )
    fp = _folder_paths()
    try:
        if fp is not None and hasattr(fp, "get_save_image_path"):
            out_folder, base, counter, subfolder, _ = fp.get_save_image_path(
                f"{subfolder}/{base}" if subfolder else base, str(root), width, height
            )
            folder = Path(out_folder)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            counter = next_counter(folder, base)
    except OSError as e:  # a path part is a file, read-only or full disk, no permission
        raise OutputPathError(
            f"cannot create or list the folder {folder} for {prefix!r}: {e.strerror or e}; check the output folder"
        ) from e
    if not folder.is_dir() or not _inside(folder, root):
        raise OutputPathError(f"cannot save into {folder}: not a folder inside {root}")
    return folder, base, int(counter), subfolder.replace("\\", "/"), "temp" if temp else "output"


def save_files(
    prefix: str,
    writers: Sequence[tuple[str, Callable[[Path], Any]]],
    width: int = 0,
    height: int = 0,
    *,
    temp: bool = False,
    max_tries: int = 1000,
) -> list[SavedFile]:
    """Write files (or folders) sharing one counter, e.g. `.psd` + `.png`, named `{base}_{counter:05}_{suffix}`.

    The folder and the first counter come from ComfyUI (`folder_paths.get_save_image_path`) or the standalone
    fallback; writing and the exclusive, all-or-nothing claim are `fsutil.publish_group`'s. Returns `writers` order.
    """
    folder, base, counter, subfolder, kind = _plan(prefix, width, height, temp)
    paths = publish_group(folder, base, writers, counter=counter, max_tries=max_tries, label=prefix)
    return [SavedFile(p, p.name, subfolder, kind) for p in paths]


def png_metadata_enabled() -> bool:
    """False when ComfyUI runs with --disable-metadata (then PNGs carry no prompt/workflow); True otherwise."""
    cli = _host("comfy.cli_args")
    args = getattr(cli, "args", None)
    return not bool(getattr(args, "disable_metadata", False))


# ---------------------------------------------------------------- progress and interrupt
class ProgressReporter:
    """Step progress: ComfyUI's progress bar inside the host, else a logging line every 10 % with rate and ETA."""

    def __init__(self, total: int, *, node_id: str | None = None, label: str = "progress") -> None:
        self.total = max(int(total), 1)
        self.label = label
        self._start = time.monotonic()
        self._logged = -1
        utils = _host("comfy.utils")
        self._bar = None
        if utils is not None:  # node_id is only known to newer ComfyUI releases
            kw = {"node_id": node_id} if node_id is not None else {}
            self._bar = utils.ProgressBar(self.total, **kw)

    def update(self, step: int, preview: Any = None, total: int | None = None) -> None:
        """Report that `step` of `total` steps are done (absolute); `preview` is a PIL image or ("JPEG", img, px)."""
        if total is not None:
            self.total = max(int(total), 1)
        step = min(int(step), self.total)
        if self._bar is not None:
            if preview is not None and not isinstance(preview, tuple):
                preview = ("JPEG", preview.convert("RGB"), 512)
            self._bar.update_absolute(step, self.total, preview)
            return
        tenth = step * 10 // self.total
        if tenth > self._logged:
            self._logged = tenth
            spent = time.monotonic() - self._start
            eta = spent / step * (self.total - step) if step else float("nan")
            log.info(
                "%s: %d/%d (%.0f%%) %.1fs elapsed, ETA %.1fs",
                self.label,
                step,
                self.total,
                100 * step / self.total,
                spent,
                eta,
            )


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel; a no-op outside the host."""
    mm = _host("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def make_callback(total: int, *, node_id: str | None = None, label: str = "sampling") -> Callable[[int, int], None]:
    """The pipeline's `callback(step, total)`: checks Cancel (raises to stop), then advances the progress bar."""
    bar = ProgressReporter(total, node_id=node_id, label=label)

    def callback(step: int, total: int) -> None:
        check_interrupt()
        bar.update(step, total=total)

    return callback


# ---------------------------------------------------------------- devices and memory
def get_torch_device() -> Any:
    """The device models run on: ComfyUI's choice, else CUDA, else MPS, else CPU."""
    mm = _host("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    from ..qil_core.model.policy import best_device  # the CLI's choice too

    return best_device()


def intermediate_device() -> Any:
    """Where node outputs (IMAGE, MASK) live between nodes: ComfyUI's choice, else the CPU."""
    mm = _host("comfy.model_management")
    if mm is not None:
        return mm.intermediate_device()
    import torch

    return torch.device("cpu")


def free_memory(memory_required: int, device: Any) -> None:
    """Ask ComfyUI to unload models until `memory_required` bytes are free on `device`; else empty the CUDA cache."""
    mm = _host("comfy.model_management")
    if mm is not None:
        mm.free_memory(memory_required, device)
        return
    import gc

    import torch

    gc.collect()
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


class StandalonePatcher:
    """Fallback for ComfyUI's ModelPatcher: holds `.model` and moves it between the load and offload devices."""

    def __init__(self, model: Any, load_device: Any, offload_device: Any, size: int = 0) -> None:
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size or sum(p.numel() * p.element_size() for p in model.parameters())

    def model_size(self) -> int:
        """Bytes of the wrapped module's parameters."""
        return self.size

    def load(self, device_to: Any = None) -> None:
        """Move the module to `device_to` (default: the load device)."""
        self.model.to(device_to if device_to is not None else self.load_device)

    def offload(self) -> None:
        """Move the module back to the offload device."""
        self.model.to(self.offload_device)


def wrap_model_patcher(module: Any, load_device: Any, offload_device: Any, size: int | None = None) -> Any:
    """Wrap a torch module so ComfyUI loads, offloads and unloads it like its own models (ModelPatcher)."""
    mp = _host("comfy.model_patcher")
    if mp is not None:
        return mp.ModelPatcher(module, load_device=load_device, offload_device=offload_device, size=size or 0)
    return StandalonePatcher(module, load_device, offload_device, size or 0)


def load_models_gpu(patchers: Sequence[Any], *, memory_required: int = 0, force_full_load: bool = False) -> None:
    """Make sure the wrapped modules are on their load device (ComfyUI frees room for them first).

    `memory_required`: extra bytes to keep free for the work that follows; `force_full_load`: never load
    partially (plain torch modules cannot run with some weights left on the offload device)."""
    mm = _host("comfy.model_management")
    if mm is not None and not all(isinstance(p, StandalonePatcher) for p in patchers):
        mm.load_models_gpu(list(patchers), memory_required=memory_required, force_full_load=force_full_load)
        return
    for p in patchers:
        p.load()
