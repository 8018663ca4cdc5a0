"""Writes the example workflows: workflows/<name>.json (the frontend's UI format, drag into ComfyUI) and
workflows/api/<name>.json (API format, for POST /prompt), both from one spec per workflow below.

Run `python tests/support/workflow_build.py` after changing a node's inputs. Widget values follow the frontend's rules:
every widget input (required, then optional, in INPUT_TYPES order) gets a value; an INT with
`control_after_generate` is followed by its control value ("fixed"), and Load Image's picker by its "upload"
button value ("image"). tests/nodes/test_workflows.py converts each UI file back to API format on its own and checks
that both files describe the same graph.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_harness import CORE_NODES, ROOT, pack_module  # noqa: E402
from qwen_edit_nodes import EDIT_MODEL, QWEN_EDIT_NODES, bypass_source  # noqa: E402

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CORE_TITLES = {"LoadImage": "Load Image", "SaveImage": "Save Image", "PreviewImage": "Preview Image"}
MODEL = {
    "transformer": "qwen_image_layered_fp8mixed.safetensors",
    "vae": "qwen_image_layered_vae.safetensors",
    "text_encoder": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
    "diffusers_folder": "none",
}
_LAYERED = "https://huggingface.co/Comfy-Org/Qwen-Image-Layered_ComfyUI/resolve/main/split_files"
_QWEN = "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files"
# The frontend offers these downloads when a file is missing (properties.models, as core templates do).
MODEL_LINKS = [
    {
        "name": MODEL["transformer"],
        "url": f"{_LAYERED}/diffusion_models/{MODEL['transformer']}",
        "directory": "diffusion_models",
    },
    {"name": MODEL["vae"], "url": f"{_LAYERED}/vae/{MODEL['vae']}", "directory": "vae"},
    {
        "name": MODEL["text_encoder"],
        "url": f"{_QWEN}/text_encoders/{MODEL['text_encoder']}",
        "directory": "text_encoders",
    },
]
MODEL_NOTE = (
    "MODEL FILES (put them here, then press R in ComfyUI to refresh the lists):\n"
    "- ComfyUI/models/diffusion_models/qwen_image_layered_fp8mixed.safetensors (20.5 GB)\n"
    "  or qwen_image_layered_bf16.safetensors (40.9 GB)\n"
    "- ComfyUI/models/vae/qwen_image_layered_vae.safetensors (254 MB)\n"
    "- ComfyUI/models/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors (9.4 GB)\n"
    "Downloads: huggingface.co/Comfy-Org/Qwen-Image-Layered_ComfyUI (split_files/diffusion_models, split_files/vae) "
    "and huggingface.co/Comfy-Org/Qwen-Image_ComfyUI (split_files/text_encoders).\n"
    "Or a diffusers Qwen-Image-Layered folder in ComfyUI/models/diffusers (pick it in diffusers_folder).\n\n"
    "Layers are bottom first. The prompt describes the WHOLE picture (optional). 50 steps / cfg 4 is the "
    "reference setting; 20-30 steps are faster. memory_mode auto streams what does not fit in VRAM.\n"
)

LIGHTNING = "Qwen-Image-Lightning-8steps-V1.1.safetensors"
LIGHTNING_URL = "huggingface.co/lightx2v/Qwen-Image-Lightning"
LORA_LINKS = [{"name": LIGHTNING, "url": f"https://{LIGHTNING_URL}/resolve/main/{LIGHTNING}", "directory": "loras"}]

# Each node: (id, class_type, inputs that differ from the defaults (links as [node, slot]), (x, y)).
SPECS: dict[str, dict[str, Any]] = {
    "decompose_to_psd": {
        "note": "DECOMPOSE AN IMAGE INTO LAYERS AND SAVE A PSD\nPick your picture in Load Image and press Queue. "
        "The PSD (and a flattened PNG) land in ComfyUI/output/QwenLayered/.\n\n" + MODEL_NOTE,
        "nodes": [
            (1, "LoadImage", {"image": "example.png"}, (40, 420)),
            (2, "QILLoadModel", dict(MODEL), (40, 120)),
            (
                3,
                "QILDecompose",
                {"model": [2, 0], "image": [1, 0], "mask": [1, 1], "output_size": "original"},
                (440, 120),
            ),
            (4, "QILSavePSD", {"layers": [3, 0], "filename_prefix": "QwenLayered/decomposed"}, (860, 120)),
            (5, "QILPreviewLayers", {"layers": [3, 0]}, (860, 360)),
        ],
    },
    "decompose_edit_composite": {
        "note": "DECOMPOSE, EDIT, RECOMPOSE\nDecompose the picture, recolor layer 1, move the top layer 40 px to the "
        "right, then save the flattened result as a PNG and the edited layers as a PSD.\n\n" + MODEL_NOTE,
        "nodes": [
            (1, "LoadImage", {"image": "example.png"}, (40, 420)),
            (2, "QILLoadModel", dict(MODEL), (40, 120)),
            (3, "QILDecompose", {"model": [2, 0], "image": [1, 0], "mask": [1, 1]}, (440, 120)),
            (4, "QILLayerRecolor", {"layers": [3, 0], "layer": "1", "hue_shift": 120.0}, (860, 120)),
            (5, "QILLayerTransform", {"layers": [4, 0], "layer": "-1", "dx": 40.0}, (1240, 120)),
            (6, "QILCompositeLayers", {"layers": [5, 0]}, (1620, 120)),
            (7, "SaveImage", {"images": [6, 0], "filename_prefix": "QwenLayered/edited"}, (1960, 120)),
            (
                8,
                "QILSavePSD",
                {"layers": [5, 0], "filename_prefix": "QwenLayered/edited_layers", "also_composite_png": False},
                (1620, 420),
            ),
        ],
    },
    "caption_edit_decompose": {
        "note": "CAPTION, EDIT, DECOMPOSE\nCaption Image writes the caption the reference would use for an empty "
        "prompt (shown on the node). Two core text nodes edit it on its way to Decompose Image's prompt_text:"
        " Replace changes words (find -> replace; every occurrence) and Concatenate adds your own text "
        "(string_b; start it with a space, or set the delimiter). Left empty, both pass the caption through "
        "unchanged, which gives the reference's result. Run once to read the caption, type the edits, run "
        "again: the caption is cached, so only the decomposition runs. To rewrite it entirely, paste your "
        "text into Decompose Image's prompt and remove the prompt_text link (a connected prompt_text wins "
        "over the prompt widget). Decompose Image's caption output is the prompt it used. Needs the text "
        "encoder's vision tower and lm_head (the diffusers text_encoder/ folder has both).\n\n" + MODEL_NOTE,
        "nodes": [
            (1, "LoadImage", {"image": "example.png"}, (40, 420)),
            (2, "QILLoadModel", dict(MODEL), (40, 120)),
            (3, "QILCaptionImage", {"model": [2, 0], "image": [1, 0]}, (440, 420)),
            (6, "StringReplace", {"string": [3, 0]}, (440, 700)),
            (7, "StringConcatenate", {"string_a": [6, 0]}, (440, 980)),
            (4, "QILDecompose", {"model": [2, 0], "image": [1, 0], "mask": [1, 1], "prompt_text": [7, 0]}, (860, 120)),
            (5, "QILSavePSD", {"layers": [4, 0], "filename_prefix": "QwenLayered/captioned"}, (1280, 120)),
        ],
    },
    "recursive_decomposition": {
        "note": "RECURSIVE DECOMPOSITION\nDecompose the picture, then split its top layer again into 3 sub-layers, "
        "in place. Change 'layer' to split another one (0 = bottom, -1 = top, or a layer name).\n\n" + MODEL_NOTE,
        "nodes": [
            (1, "LoadImage", {"image": "example.png"}, (40, 420)),
            (2, "QILLoadModel", dict(MODEL), (40, 120)),
            (3, "QILDecompose", {"model": [2, 0], "image": [1, 0], "mask": [1, 1]}, (440, 120)),
            (4, "QILDecomposeLayer", {"model": [2, 0], "layers": [3, 0], "layer": "-1"}, (860, 120)),
            (5, "QILSavePSD", {"layers": [4, 0], "filename_prefix": "QwenLayered/recursive"}, (1280, 120)),
            (6, "PreviewImage", {"images": [4, 1]}, (1280, 380)),
        ],
    },
    "text_to_layers": {
        "note": "TEXT TO LAYERS\nGenerate a layered picture from a prompt and save it as a PSD. The released "
        "weights are tuned for decomposing images, so quality is limited; generating a picture with an "
        "image model and decomposing it works better.\n\n" + MODEL_NOTE,
        "nodes": [
            (1, "QILLoadModel", dict(MODEL), (40, 120)),
            (
                2,
                "QILTextToLayers",
                {
                    "model": [1, 0],
                    "prompt": "A summer sale poster: a red bicycle on a sunny "
                    "street, palm trees, and the title SUMMER RIDE in big white letters.",
                },
                (440, 120),
            ),
            (3, "QILSavePSD", {"layers": [2, 0], "filename_prefix": "QwenLayered/text_to_layers"}, (860, 120)),
            (4, "PreviewImage", {"images": [2, 1]}, (860, 380)),
        ],
    },
    "edit_layer_with_qwen_image_edit": {
        "note": "EDIT ONE LAYER WITH ANY IMAGE MODEL, KEEP ITS SHAPE\nDecompose the picture (layers give back the "
        "original exactly: recompose 'auto' is exact at output_size 'original'), pick the top layer, edit "
        "it with ComfyUI's own Qwen-Image-Edit nodes (the purple group), and put the result back with "
        "Replace Layer Pixels: the layer keeps its alpha, so nothing outside it changes. Then the "
        "flattened PNG and the PSD are saved in ComfyUI/output/QwenLayered/.\n\n"
        "THE EDIT GROUP IS BYPASSED so the workflow runs without the edit model (the layer then goes back "
        "unchanged). To enable it: put "
        + EDIT_MODEL["unet"]
        + " in models/diffusion_models and "
        + EDIT_MODEL["vae"]
        + " in models/vae (huggingface.co/Comfy-Org/Qwen-Image-Edit_ComfyUI and "
        "Comfy-Org/Qwen-Image_ComfyUI; the text encoder is the one below), write your instruction in the "
        "first TextEncodeQwenImageEdit, then right-click the group > 'Set Group Nodes to Always' (or select "
        "its nodes and press Ctrl+B). Needs ComfyUI 0.3.64 or later.\n\n" + MODEL_NOTE,
        "nodes": [
            (1, "LoadImage", {"image": "example.png"}, (40, 420)),
            (2, "QILLoadModel", dict(MODEL), (40, 120)),
            (
                3,
                "QILDecompose",
                {"model": [2, 0], "image": [1, 0], "mask": [1, 1], "output_size": "original"},
                (440, 120),
            ),
            (4, "QILSelectLayer", {"layers": [3, 0], "layer": "-1"}, (860, 120)),
            (10, "UNETLoader", {"unet_name": EDIT_MODEL["unet"]}, (860, 520), 4),
            (11, "CLIPLoader", {"clip_name": EDIT_MODEL["clip"], "type": "qwen_image"}, (860, 680), 4),
            (12, "VAELoader", {"vae_name": EDIT_MODEL["vae"]}, (860, 860), 4),
            (
                13,
                "TextEncodeQwenImageEdit",
                {"clip": [11, 0], "prompt": "Make it shiny gold, keep the shape.", "vae": [12, 0], "image": [4, 1]},
                (1240, 520),
                4,
            ),
            (
                14,
                "TextEncodeQwenImageEdit",
                {"clip": [11, 0], "prompt": "", "vae": [12, 0], "image": [4, 1]},
                (1240, 780),
                4,
            ),
            (15, "ImageScaleToTotalPixels", {"image": [4, 1], "upscale_method": "lanczos"}, (1240, 1040), 4),
            (16, "VAEEncode", {"pixels": [15, 0], "vae": [12, 0]}, (1620, 1040), 4),
            (
                17,
                "KSampler",
                {
                    "model": [10, 0],
                    "positive": [13, 0],
                    "negative": [14, 0],
                    "latent_image": [16, 0],
                    "steps": 20,
                    "cfg": 2.5,
                    "sampler_name": "euler",
                    "scheduler": "simple",
                },
                (1620, 520),
                4,
            ),
            (18, "VAEDecode", {"samples": [17, 0], "vae": [12, 0]}, (2000, 520), 4),
            (
                19,
                "ImageCompositeMasked",
                {"destination": [4, 1], "source": [18, 0], "resize_source": True},
                (2000, 680),
                4,
            ),
            (5, "QILReplaceLayerImage", {"layers": [3, 0], "layer": "-1", "image": [19, 0]}, (2400, 120)),
            (6, "QILCompositeLayers", {"layers": [5, 0]}, (2780, 120)),
            (7, "SaveImage", {"images": [6, 0], "filename_prefix": "QwenLayered/edited_layer"}, (3120, 120)),
            (
                8,
                "QILSavePSD",
                {"layers": [5, 0], "filename_prefix": "QwenLayered/edited_layer_layers", "also_composite_png": False},
                (2780, 420),
            ),
        ],
        "groups": [
            {
                "title": "Qwen-Image-Edit (bypassed: right-click > Set Group Nodes to Always to enable)",
                "bounding": [840, 440, 1540, 760],
                "color": "#a1309b",
                "font_size": 24,
            }
        ],
    },
    "lora_lightning": {
        "note": "LORA: FEW-STEP DECOMPOSITION WITH QWEN-IMAGE-LIGHTNING\nLoad LoRA adds a LoRA from "
        "ComfyUI/models/loras (chain more Load LoRA nodes to stack several). This one is lightx2v's 8-step "
        "Lightning LoRA for Qwen-Image (" + LIGHTNING_URL + "): Sampler Settings switches to its schedule "
        "(exponential, shift 1.0986 = ln 3) and Decompose runs 8 steps at cfg 1 (no negative pass), about "
        "12x fewer transformer passes than 50 steps with CFG. It was distilled on Qwen-Image, not on "
        "Layered: compare with a 50-step run and lower the strength if the layers degrade.\n\n" + MODEL_NOTE,
        "nodes": [
            (1, "LoadImage", {"image": "example.png"}, (40, 520)),
            (2, "QILLoadModel", dict(MODEL), (40, 120)),
            (3, "QILLoadLoRA", {"model": [2, 0], "lora_name": LIGHTNING, "strength": 1.0}, (440, 120)),
            (4, "QILSamplerSettings", {"model": [3, 0], "time_shift": "exponential", "shift": 1.0986}, (440, 340)),
            (5, "QILDecompose", {"model": [4, 0], "image": [1, 0], "mask": [1, 1], "steps": 8, "cfg": 1.0}, (840, 120)),
            (6, "QILSavePSD", {"layers": [5, 0], "filename_prefix": "QwenLayered/lightning"}, (1260, 120)),
            (7, "QILPreviewLayers", {"layers": [5, 0]}, (1260, 360)),
        ],
    },
    "psd_edit": {
        "note": "LOAD A PSD, EDIT, SAVE\nNo model needed. Put a .psd into ComfyUI/input and pick it in Load PSD. "
        "Layer 1 is recolored and the top layer moved and scaled; the result is saved as a new PSD (the "
        "original is never overwritten) plus a flattened PNG in ComfyUI/output/QwenLayered/.",
        "nodes": [
            (1, "QILLoadPSD", {"psd": "example.psd"}, (40, 120)),
            (2, "QILLayerRecolor", {"layers": [1, 0], "layer": "1", "hue_shift": 180.0, "saturation": 0.2}, (420, 120)),
            (
                3,
                "QILLayerTransform",
                {"layers": [2, 0], "layer": "-1", "dx": 12.0, "dy": 8.0, "scale_x": 1.2, "scale_y": 1.2},
                (800, 120),
            ),
            (4, "QILSavePSD", {"layers": [3, 0], "filename_prefix": "QwenLayered/psd_edit"}, (1180, 120)),
            (5, "QILPreviewLayers", {"layers": [3, 0]}, (1180, 360)),
        ],
    },
}


def mappings() -> dict[str, type]:
    """Our nodes, the harness's stand-ins of the core nodes the workflows run, and the Qwen-Image-Edit declarations."""
    return {**CORE_NODES, **QWEN_EDIT_NODES, **pack_module("nodes").NODE_CLASS_MAPPINGS}


def is_widget(decl: tuple) -> bool:
    """True for inputs the frontend shows as a widget: combos and INT/FLOAT/STRING/BOOLEAN (not forceInput ones)."""
    if len(decl) > 1 and decl[1].get("forceInput"):
        return False
    return isinstance(decl[0], list) or decl[0] in WIDGET_TYPES


def declared(cls: type) -> dict[str, tuple]:
    """Required then optional inputs, in INPUT_TYPES order."""
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def widget_default(decl: tuple) -> Any:
    opts = decl[1] if len(decl) > 1 else {}
    if "default" in opts:
        return opts["default"]
    if isinstance(decl[0], list):
        return decl[0][0] if decl[0] else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(decl[0])


def build(name: str, spec: dict[str, Any], nodes_map: dict[str, type]) -> tuple[dict, dict]:
    """(UI graph, API graph) of one spec. A spec node may carry a 5th item, its mode (4 = bypassed): bypassed
    nodes stay out of the API graph, and links through them follow the frontend's pass-through rule."""
    spec = {**spec, "nodes": [n if len(n) == 5 else (*n, 0) for n in spec["nodes"]]}
    api: dict[str, Any] = {}
    for node_id, class_type, given, _, _ in spec["nodes"]:
        cls = nodes_map[class_type]
        decl = declared(cls)
        unknown = set(given) - set(decl)
        if unknown:
            raise ValueError(f"{name}: node {node_id} ({class_type}) has no inputs {sorted(unknown)}")
        inputs = {k: widget_default(d) for k, d in decl.items() if is_widget(d)}
        inputs.update({k: ([str(v[0]), v[1]] if isinstance(v, list) else v) for k, v in given.items()})
        title = {**CORE_TITLES, **pack_module("nodes").NODE_DISPLAY_NAME_MAPPINGS}.get(class_type, class_type)
        api[str(node_id)] = {"inputs": inputs, "class_type": class_type, "_meta": {"title": title}}

    links: list[list] = []
    for node_id, _, given, _, _ in spec["nodes"]:
        for input_name, value in given.items():
            if isinstance(value, list):
                src, slot = value
                src_type = nodes_map[next(n[1] for n in spec["nodes"] if n[0] == src)].RETURN_TYPES[slot]
                links.append([len(links) + 1, src, slot, node_id, input_name, src_type])
    order = {nid: i for i, nid in enumerate(_topological(spec))}
    ui_nodes = []
    for node_id, class_type, _, pos, mode in spec["nodes"]:
        cls = nodes_map[class_type]
        decl = declared(cls)
        sockets = [k for k, d in decl.items() if not is_widget(d)]
        inputs = []
        for k in sockets:
            link = next((ln[0] for ln in links if ln[3] == node_id and ln[4] == k), None)
            inputs.append({"name": k, "type": decl[k][0], "link": link})
        # A widget fed by a link is an input after the sockets that names its widget (it keeps a widget value).
        for k, d in decl.items():
            link = next((ln[0] for ln in links if ln[3] == node_id and ln[4] == k), None)
            if is_widget(d) and link is not None:
                inputs.append({"name": k, "type": d[0], "widget": {"name": k}, "link": link})
                sockets.append(k)
        for ln in links:
            if ln[3] == node_id:
                ln[4] = sockets.index(ln[4])  # the UI format links to the target's socket index
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        is_list = getattr(cls, "OUTPUT_IS_LIST", (False,) * len(cls.RETURN_TYPES))
        outputs = []
        for slot, (out_name, out_type) in enumerate(zip(names, cls.RETURN_TYPES)):
            out = {
                "name": out_name,
                "type": out_type,
                "links": [ln[0] for ln in links if ln[1] == node_id and ln[2] == slot],
                "slot_index": slot,
            }
            if is_list[slot]:
                out["shape"] = 6  # the frontend's grid marker for list outputs
            outputs.append(out)
        values = []
        for k, d in decl.items():
            if not is_widget(d):
                continue
            value = api[str(node_id)]["inputs"][k]
            values.append(widget_default(d) if isinstance(value, list) else value)  # a linked widget: its default
            opts = d[1] if len(d) > 1 else {}
            if opts.get("control_after_generate"):
                values.append("fixed")
            if opts.get("image_upload"):
                values.append("image")
        widgets = len(values) + sum(3 for k, d in decl.items() if is_widget(d) and d[1].get("multiline"))
        height = 46 + 22 * max(len(inputs), len(outputs)) + 26 * widgets
        properties: dict[str, Any] = {"Node name for S&R": class_type}
        if class_type == "QILLoadModel":
            properties["models"] = MODEL_LINKS
        if class_type == "QILLoadLoRA":
            properties["models"] = LORA_LINKS
        ui_nodes.append(
            {
                "id": node_id,
                "type": class_type,
                "pos": list(pos),
                "size": [340, height],
                "flags": {},
                "order": order[node_id],
                "mode": mode,
                "inputs": inputs,
                "outputs": outputs,
                "properties": properties,
                "widgets_values": values,
            }
        )
    _bypass(api, ui_nodes, links)
    note_id = max(n[0] for n in spec["nodes"]) + 1
    ui_nodes.append(
        {
            "id": note_id,
            "type": "Note",
            "title": "Read me",
            "pos": [40, -300],
            "size": [760, 370],
            "flags": {},
            "order": len(spec["nodes"]),
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {},
            "widgets_values": [spec["note"]],
            "color": "#432",
            "bgcolor": "#653",
        }
    )
    ui = {
        "last_node_id": note_id,
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": spec.get("groups", []),
        "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [60, 320]}},
        "version": 0.4,
    }
    return ui, api


def _bypass(api: dict[str, Any], ui_nodes: list[dict], links: list[list]) -> None:
    """Drop bypassed nodes from the API graph and re-point links that ran through them (frontend rule)."""
    by_id = {n["id"]: n for n in ui_nodes}
    by_link = {ln[0]: ln for ln in links}
    for node in ui_nodes:
        if node["mode"] == 4:
            api.pop(str(node["id"]), None)
    for node in api.values():
        for name, value in list(node["inputs"].items()):
            if isinstance(value, list):
                src = bypass_source(by_id, by_link, int(value[0]), value[1])
                if src is None:
                    del node["inputs"][name]
                else:
                    node["inputs"][name] = [str(src[0]), src[1]]


def _topological(spec: dict[str, Any]) -> list[int]:
    deps = {n[0]: {v[0] for v in n[2].values() if isinstance(v, list)} for n in spec["nodes"]}
    order: list[int] = []
    while len(order) < len(deps):
        order += sorted(n for n, d in deps.items() if n not in order and d <= set(order))
    return order


def write_all(folder: Path = ROOT / "workflows") -> list[Path]:
    """Write every workflow (UI and API format); returns the files written."""
    import tempfile

    from comfy_harness import Harness

    written = []
    with tempfile.TemporaryDirectory() as tmp:
        h = Harness(pack_module("nodes").NODE_CLASS_MAPPINGS, Path(tmp))
        with h.host():  # INPUT_TYPES of Load Image lists the input folder
            nodes_map = mappings()
            for name, spec in SPECS.items():
                ui, api = build(name, spec, nodes_map)
                (folder / "api").mkdir(parents=True, exist_ok=True)
                for path, data in ((folder / f"{name}.json", ui), (folder / "api" / f"{name}.json", api)):
                    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                    written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all():
        sys.stdout.write(f"wrote {p.relative_to(ROOT)}\n")
