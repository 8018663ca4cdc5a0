"""Files in and out: Save PSD, Load PSD, Save Layer PNGs, Preview Layers."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..qil_core.errors import InputError
from ..qil_core.layers import alpha_to_mask, composite, stack_to_images
from ..qil_core.layers.export import export_pngs, export_zip, layer_file_names, quantize_rgba8
from ..qil_core.layers.psd import load_psd, write_psd
from . import host
from .common import CATEGORY_IO, checkerboard, layers_input, to_document, to_output, to_stack

PSD_SUFFIXES = (".psd", ".psb")
DEPTHS = {"8-bit": 8, "16-bit": 16}
PREVIEW_SIDE = 1024  # temp previews are shrunk to this; saved files keep full size
GROUP_CHOICES = {"keep children": "keep", "flatten": "flatten"}  # Load PSD's 'groups' -> the reader's option


def _png_writer(
    rgba: np.ndarray, info: PngInfo | None = None, level: int = 4, max_side: int | None = None
) -> Callable[[Path], None]:
    """A writer for host.save_files: (H, W, 3|4) float 0..1 -> 8-bit PNG (RGB under alpha 0 zeroed)."""

    def write(path: Path) -> None:
        px = quantize_rgba8(np.asarray(rgba, np.float32))
        img = Image.fromarray(px, "RGBA" if px.shape[-1] == 4 else "RGB")
        if max_side is not None and max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        img.save(path, pnginfo=info, compress_level=level)

    return write


def _metadata(prompt: Any, extra_pnginfo: Any) -> PngInfo | None:
    """The prompt and workflow as PNG text chunks, as SaveImage stores them (so the PNG reloads the graph)."""
    if not host.png_metadata_enabled() or (prompt is None and not extra_pnginfo):
        return None
    info = PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        info.add_text(key, json.dumps(value))
    return info


def _prefix_input(tip: str) -> tuple[str, dict[str, Any]]:
    """The saving nodes' 'filename_prefix' widget."""
    return ("STRING", {"default": "QwenLayered/layers", "tooltip": tip})


def _preview_prefix() -> str:
    # A random part, as PreviewImage uses: the temp folder is emptied at start-up and counters restart at 1,
    # so a fixed name could show a stale browser-cached image.
    return f"QILPreview_{secrets.token_hex(3)}"


class QILSavePSD:
    """Save a layer document as a layered PSD (and a flattened PNG) in the output folder."""

    DESCRIPTION = (
        "Saves the layers as a PSD that Photoshop, GIMP, Krita and Photopea open with every layer cropped to "
        "its content at its place, with names in any language, opacity, visibility, blend modes and a correct "
        "flattened image. Files go to ComfyUI's output folder as <prefix>_00001_.psd; an existing file is never "
        "overwritten and the prefix cannot leave the output folder. Optionally writes the flattened picture as "
        "a PNG with the same number (it carries the workflow, like Save Image)."
    )
    CATEGORY = CATEGORY_IO
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("psd_path",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "layers": layers_input(),
                "filename_prefix": _prefix_input(
                    "File name start, relative to the output folder; may contain "
                    "subfolders and %width% %height% %year% %month% %day%."
                ),
            },
            "optional": {
                "also_composite_png": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Also save the flattened picture as <prefix>_00001_.png."},
                ),
                "depth": (
                    list(DEPTHS),
                    {
                        "default": "8-bit",
                        "tooltip": "Bits per channel. 8-bit opens everywhere; 16-bit embeds an sRGB profile.",
                    },
                ),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(
        self,
        layers: Any,
        filename_prefix: str,
        also_composite_png: bool = True,
        depth: str = "8-bit",
        prompt: Any = None,
        extra_pnginfo: Any = None,
    ) -> dict[str, Any]:
        if depth not in DEPTHS:
            raise InputError(f"input 'depth' must be one of {', '.join(DEPTHS)}, got {depth!r}")
        stack = to_stack(layers)
        merged = composite(stack)  # (H, W, 4), shared by the PSD's merged image and the PNG

        def psd_writer(path: Path) -> None:
            write_psd(stack, path, depth=DEPTHS[depth], merged=merged)

        writers: list[tuple[str, Callable[[Path], None]]] = [(".psd", psd_writer)]
        if also_composite_png:
            writers.append((".png", _png_writer(merged, _metadata(prompt, extra_pnginfo))))
        files = host.save_files(str(filename_prefix), writers, stack.width, stack.height)
        if also_composite_png:
            shown = files[1]
        else:
            shown = host.save_files(
                _preview_prefix(), [(".png", _png_writer(merged, level=1, max_side=PREVIEW_SIDE))], temp=True
            )[0]
        # "images" must list image files (the frontend loads each one); the PSD goes under its own key, which
        # the frontend keeps in the history without trying to display it (like core's SaveLatent "latents").
        return {"ui": {"images": [shown.ui()], "psd": [files[0].ui()]}, "result": (str(files[0].path),)}


class QILSaveLayerPNGs:
    """Save every layer as its own RGBA PNG in a new folder (and optionally a ZIP of them)."""

    DESCRIPTION = (
        "Saves one transparent PNG per layer into a new folder <prefix>_00001_ in the output folder, named "
        "bottom first: layer_00_<name>.png, layer_01_<name>.png, ... Each PNG stores the layer's name, offset, "
        "opacity and blend mode. Optionally also writes <prefix>_00001_.zip holding the same PNGs and a "
        "manifest.json. Nothing is ever overwritten."
    )
    CATEGORY = CATEGORY_IO
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("folder",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "layers": layers_input(),
                "filename_prefix": _prefix_input(
                    "Folder name start, relative to the output folder (subfolders allowed)."
                ),
            },
            "optional": {
                "full_canvas": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "On: every PNG is the canvas size with "
                        "the layer at its place. Off: each PNG is cropped to its layer.",
                    },
                ),
                "zip": ("BOOLEAN", {"default": False, "tooltip": "Also write a ZIP of the PNGs."}),
            },
        }

    def save(self, layers: Any, filename_prefix: str, full_canvas: bool = True, zip: bool = False) -> dict[str, Any]:
        stack = to_stack(layers)
        if not stack.layers:
            raise InputError("input 'layers' has no layers; nothing to save")
        writers: list[tuple[str, Callable[[Path], Any]]] = [
            ("", lambda p: export_pngs(stack, p, full_canvas=bool(full_canvas)))
        ]
        if zip:
            writers.append((".zip", lambda p: export_zip(stack, p, full_canvas=bool(full_canvas))))
        files = host.save_files(str(filename_prefix), writers, stack.width, stack.height)
        folder = files[0]
        sub = f"{folder.subfolder}/{folder.filename}" if folder.subfolder else folder.filename
        images = [{"filename": name, "subfolder": sub, "type": folder.type} for name in layer_file_names(stack)]
        ui: dict[str, Any] = {"images": images}
        if zip:
            ui["zip"] = [files[1].ui()]
        return {"ui": ui, "result": (str(folder.path),)}


def _input_psds() -> list[str]:
    root = host.get_input_directory()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        found += [
            (rel / f).as_posix().removeprefix("./")
            for f in filenames
            if f.lower().endswith(PSD_SUFFIXES) and not f.startswith(".")
        ]
    return sorted(found, key=str.lower)


def resolve_psd(psd: str, path: str = "") -> Path:
    """The PSD to load: `path` (inside the input, output or temp folder) when given, else `psd` in input/."""
    text = str(path or "").strip()
    for label, value in (("path", text), ("psd", str(psd or ""))):
        if "\x00" in value:
            raise InputError(
                f"input {label!r} {value!r} contains a NUL character, which no file name can hold; retype the path"
            )
    if text:
        roots = [host.get_input_directory(), host.get_output_directory(), host.get_temp_directory()]
        candidate = Path(text) if Path(text).is_absolute() else roots[0] / text
        real = os.path.realpath(candidate)
        if not any(os.path.commonpath([real, os.path.realpath(r)]) == os.path.realpath(r) for r in roots):
            raise InputError(
                f"input 'path' {text!r} is outside ComfyUI's input, output and temp folders; copy "
                "the file into the input folder"
            )
        file = Path(real)
    else:
        name = str(psd or "")
        if not name or Path(name).is_absolute() or ".." in Path(name.replace("\\", "/")).parts:
            raise InputError(f"input 'psd' {name!r} must be a file name from the input folder's list")
        file = host.get_input_directory() / name
    if not file.name.lower().endswith(PSD_SUFFIXES):
        raise InputError(f"{file.name!r} is not a .psd or .psb file")
    if file.is_dir():
        raise InputError(f"{file} is a folder, not a PSD file; choose the .psd file inside it")
    if not file.is_file():
        raise InputError(f"PSD file {file} not found; put it into ComfyUI's input folder and refresh")
    return file


class QILLoadPSD:
    """Load a PSD's layers (names, offsets, opacity, blend modes, visibility) as LAYERS, plus its composite."""

    DESCRIPTION = (
        "Loads a PSD from ComfyUI's input folder (or any PSD in the input, output or temp folder given by "
        "'path', e.g. the path output of Save PSD) as a layer document, bottom layer first, keeping names, "
        "positions, opacity, blend modes and visibility, with layer and vector masks applied to each layer's "
        "alpha, clipping masks and fill opacity. A flat PSD gives one 'Background' layer. Also outputs the "
        "layers flattened by our compositor as an RGBA IMAGE and its MASK (1 = transparent). Anything in the "
        "file that changes the picture but cannot be represented (layer effects, adjustment layers, knockout...) "
        "is listed as a warning on the node. Re-runs when the file changes."
    )
    CATEGORY = CATEGORY_IO
    RETURN_TYPES = ("LAYERS", "IMAGE", "MASK")
    RETURN_NAMES = ("layers", "composite", "mask")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "psd": (_input_psds(), {"tooltip": "A .psd or .psb file in ComfyUI's input folder."}),
            },
            "optional": {
                "path": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Optional: a PSD path inside the input, output or "
                        "temp folder (absolute, or relative to input); overrides 'psd'.",
                    },
                ),
                "groups": (
                    list(GROUP_CHOICES),
                    {
                        "default": "keep children",
                        "tooltip": "keep children: the "
                        "layers of pass-through groups stay layers; a group with its own blend mode, opacity "
                        "or mask becomes one layer (that is how it looks). flatten: every group is one layer.",
                    },
                ),
                "use_merged": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Output Photoshop's stored merged image "
                        "as 'composite' instead of compositing the layers: use it when the node warns about "
                        "effects or adjustments it cannot draw.",
                    },
                ),
            },
        }

    def load(self, psd: str, path: str = "", groups: str = "keep children", use_merged: bool = False) -> dict[str, Any]:
        if groups not in GROUP_CHOICES:
            raise InputError(f"input 'groups' must be one of {', '.join(GROUP_CHOICES)}, got {groups!r}")
        read = load_psd(resolve_psd(psd, path), groups=GROUP_CHOICES[groups], merged=bool(use_merged))
        rgba = read.merged if read.merged is not None else composite(read.stack)  # (H, W, 4)
        outputs = (to_document(read.stack), to_output(rgba[None]), to_output(alpha_to_mask(rgba[..., 3])[None]))
        return {"ui": {"text": read.warnings}, "result": outputs}

    @classmethod
    def IS_CHANGED(cls, psd: str, path: str | None = "", groups: str = "", use_merged: bool = False) -> str:
        if path is None:  # linked: the upstream node's own change already re-runs this one
            return "linked path"
        digest = hashlib.sha256()
        with open(resolve_psd(psd, path), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, psd: str, path: str | None = "", **_options: Any) -> bool | str:
        if path is None:  # linked: checked when the node runs
            return True
        try:
            resolve_psd(psd, path)
        except InputError as e:
            return str(e)
        return True


class QILPreviewLayers:
    """Show every layer on its own over a checkerboard, as a preview batch and an IMAGE output."""

    DESCRIPTION = (
        "Shows each layer alone, at its place on the canvas, over a grey checkerboard that makes transparency "
        "visible (opacity applied, blend mode not), bottom layer first. The frames are also an RGB IMAGE batch "
        "at full size for other nodes; the preview files in the temp folder are at most 1024 px."
    )
    CATEGORY = CATEGORY_IO
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("previews",)
    FUNCTION = "preview"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"layers": layers_input()},
            "optional": {
                "include_composite": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Add the flattened picture as a last frame."},
                ),
            },
        }

    def preview(self, layers: Any, include_composite: bool = False) -> dict[str, Any]:
        stack = to_stack(layers)
        frames, _ = stack_to_images(stack, full_canvas=True)  # (N, H, W, 4) straight RGBA
        rgba = frames.numpy()
        if stack.layers:
            rgba[..., 3] *= np.asarray([layer.opacity for layer in stack.layers], np.float32)[:, None, None]
        if include_composite:
            rgba = np.concatenate([rgba, composite(stack)[None]])
        board = checkerboard(stack.height, stack.width)
        shown = rgba[..., :3] * rgba[..., 3:] + board * (1 - rgba[..., 3:])  # (N, H, W, 3)
        files = host.save_files(
            _preview_prefix(),
            [(f"{i:02}.png", _png_writer(f, level=1, max_side=PREVIEW_SIDE)) for i, f in enumerate(shown)],
            temp=True,
        )
        return {"ui": {"images": [f.ui() for f in files]}, "result": (to_output(shown),)}


NODE_CLASS_MAPPINGS = {
    "QILSavePSD": QILSavePSD,
    "QILLoadPSD": QILLoadPSD,
    "QILSaveLayerPNGs": QILSaveLayerPNGs,
    "QILPreviewLayers": QILPreviewLayers,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QILSavePSD": "Save PSD",
    "QILLoadPSD": "Load PSD",
    "QILSaveLayerPNGs": "Save Layer PNGs",
    "QILPreviewLayers": "Preview Layers",
}
