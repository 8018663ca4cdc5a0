"""The example workflows: both formats describe the same graph, every input matches INPUT_TYPES, and every
workflow runs end to end through the CI harness with tiny random weights under the users' file names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from comfy_harness import CORE_NODES, Harness, pack_module
from PIL import Image
from psd_tools import PSDImage
from qil_graphs import API_DIR, MODEL_FILES, WORKFLOWS, harness, items, load_workflow, workflow_names
from qil_graphs import fast as fast_graph
from qwen_edit_nodes import QWEN_EDIT_NODES
from string_nodes import STRING_NODES
from tiny_runs import one_thread

REQUIRED = {
    "decompose_to_psd",
    "decompose_edit_composite",
    "recursive_decomposition",
    "text_to_layers",
    "psd_edit",
    "caption_edit_decompose",
}
VIRTUAL = {"Note", "MarkdownNote"}  # frontend-only nodes, never part of the API graph
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Stock core nodes a workflow may use: present in every ComfyUI since 0.3.
CORE_SINCE_03 = {"LoadImage", "SaveImage", "PreviewImage"}
NAMES = workflow_names()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def _mappings() -> dict[str, type]:
    return {**CORE_NODES, **QWEN_EDIT_NODES, **pack_module("nodes").NODE_CLASS_MAPPINGS}


def _through_bypassed(ui: dict[str, Any], src: int, slot: int) -> tuple[int, int] | None:
    """The frontend's bypass rule: a bypassed node (mode 4) hands each output over from its first input of the
    same type (the same slot first); None when it has none."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {ln[0]: ln for ln in ui["links"]}
    while nodes[src]["mode"] == 4:
        node = nodes[src]
        want = node["outputs"][slot]["type"]
        candidates = ([slot] if slot < len(node["inputs"]) else []) + list(range(len(node["inputs"])))
        hit = next((k for k in candidates if node["inputs"][k]["type"] == want and node["inputs"][k]["link"]), None)
        if hit is None:
            return None
        src, slot = links[node["inputs"][hit]["link"]][1:3]
    return src, slot


def _declared(cls: type) -> dict[str, tuple]:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def _is_widget(decl: tuple) -> bool:
    if len(decl) > 1 and decl[1].get("forceInput"):
        return False  # a socket, not a widget
    return isinstance(decl[0], list) or decl[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")


def ui_to_api(ui: dict[str, Any], mappings: dict[str, type]) -> dict[str, dict]:
    """The API graph the frontend would send for a UI-format workflow (widgets mapped in INPUT_TYPES order)."""
    links = {ln[0]: ln for ln in ui["links"]}
    api: dict[str, dict] = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL or node["mode"] == 4:  # bypassed nodes never reach the API graph
            continue
        cls = mappings[node["type"]]
        decl = _declared(cls)
        inputs: dict[str, Any] = {}
        sockets = [name for name, d in decl.items() if not _is_widget(d)]
        fed = [i["name"] for i in node["inputs"][len(sockets) :]]  # widgets fed by a link, after the sockets
        assert [i["name"] for i in node["inputs"]] == sockets + fed, (
            f"node {node['id']}: sockets differ from INPUT_TYPES"
        )
        for socket in node["inputs"][len(sockets) :]:
            assert socket["widget"] == {"name": socket["name"]} and _is_widget(decl[socket["name"]]), socket
            assert socket["link"] is not None, f"node {node['id']}: an unlinked widget input {socket['name']!r}"
        for slot, socket in enumerate(node["inputs"]):
            if socket["link"] is None:
                continue
            _, src, src_slot, dst, dst_slot, type_name = links[socket["link"]]
            assert (dst, dst_slot) == (node["id"], slot), f"link {socket['link']} does not end at this socket"
            src_node = next(n for n in ui["nodes"] if n["id"] == src)
            assert socket["link"] in src_node["outputs"][src_slot]["links"]
            assert type_name == mappings[src_node["type"]].RETURN_TYPES[src_slot] == socket["type"]
            through = _through_bypassed(ui, src, src_slot)
            if through is not None:
                inputs[socket["name"]] = [str(through[0]), through[1]]
        values = list(node["widgets_values"])
        for name, d in decl.items():
            if not _is_widget(d):
                continue
            assert values, f"node {node['id']} ({node['type']}): no widget value left for {name!r}"
            value = values.pop(0)
            inputs.setdefault(name, value)  # a widget fed by a link keeps a value, and the link wins
            opts = d[1] if len(d) > 1 else {}
            if opts.get("control_after_generate"):
                assert values.pop(0) in CONTROL_VALUES
            if opts.get("image_upload"):
                assert values.pop(0) == "image"
        assert values == [], f"node {node['id']} ({node['type']}): extra widget values {values}"
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def test_the_required_workflows_exist_in_both_formats() -> None:
    assert REQUIRED <= set(NAMES)
    assert sorted(p.stem for p in API_DIR.glob("*.json")) == NAMES
    # ComfyUI lists custom_nodes/<pack>/workflows/*.json as templates: only UI files may be there.
    for name in NAMES:
        assert "nodes" in json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_files_describe_the_same_graph(name: str, tmp_path: Path) -> None:
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    api = load_workflow(name)
    mappings = _mappings()
    host = Harness(mappings, tmp_path).host()  # Load Image's INPUT_TYPES lists the input folder
    host.__enter__()
    assert ui["version"] == 0.4 and isinstance(ui["groups"], list)
    assert ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    assert ui["last_link_id"] == max((ln[0] for ln in ui["links"]), default=0)
    for node in ui["nodes"]:
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
        # only the Qwen-Image-Edit nodes may be bypassed (mode 4), and they must be: they need weights we lack
        assert node["mode"] == (4 if node["type"] in QWEN_EDIT_NODES else 0), (node["id"], node["type"])
        if node["mode"] == 4:
            (group,) = ui["groups"]
            x, y, w, h = group["bounding"]
            assert x <= node["pos"][0] < x + w and y <= node["pos"][1] < y + h, node["id"]
    try:
        converted = ui_to_api(ui, mappings)
    finally:
        host.__exit__(None, None, None)
    assert converted == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    types = {n["type"] for n in ui["nodes"]}
    allowed = CORE_SINCE_03 | {"Note"} | set(QWEN_EDIT_NODES) | set(STRING_NODES)
    assert all(t.startswith("QIL") or t in allowed for t in types), types
    (note,) = [n for n in ui["nodes"] if n["type"] == "Note"]
    if "QILLoadModel" in types:  # the note says which files go where, with their sizes
        for rel in MODEL_FILES.values():
            assert rel.name in note["widgets_values"][0] and rel.parent.name in note["widgets_values"][0]
        assert "GB" in note["widgets_values"][0] and "MB" in note["widgets_values"][0]
        (loader,) = [n for n in api.values() if n["class_type"] == "QILLoadModel"]
        assert {loader["inputs"][k] for k in ("transformer", "vae", "text_encoder")} == {
            p.name for p in MODEL_FILES.values()
        }
        # properties.models lets the frontend offer the downloads when a file is missing
        (ui_loader,) = [n for n in ui["nodes"] if n["type"] == "QILLoadModel"]
        links = {(m["name"], m["directory"]) for m in ui_loader["properties"]["models"]}
        assert links == {(p.name, p.parent.name) for p in MODEL_FILES.values()}
        for m in ui_loader["properties"]["models"]:
            assert m["url"].startswith("https://huggingface.co/Comfy-Org/") and m["url"].endswith("/" + m["name"])


@pytest.mark.parametrize("name", NAMES)
def test_every_input_name_and_type_matches_input_types(name: str, tmp_path: Path) -> None:
    h = harness(tmp_path)
    constants = h.validate(load_workflow(name))  # unknown names, missing inputs, link types, ranges, combos
    assert set(constants) == set(load_workflow(name))


def _psds(out: Path) -> list[Path]:
    return sorted(out.rglob("*.psd"))


def _check_psd(path: Path) -> PSDImage:
    lint = pack_module("qil_core.layers.psd").lint_psd
    assert lint(path) == [], path
    return PSDImage.open(path)  # psd-tools: a reader we did not write


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_end_to_end(name: str, tmp_path: Path) -> None:
    h = harness(tmp_path)
    graph = fast_graph(load_workflow(name))
    result = h.run(graph)
    assert sorted(result.executed, key=int) == sorted(graph, key=int)
    out = h.output_dir / "QwenLayered"
    psds = _psds(out)
    assert len(psds) == 1
    psd = _check_psd(psds[0])
    assert not list(h.output_dir.rglob(".qil-staging-*"))
    names = [layer.name for layer in psd]
    decomposed = ["Background", "Layer 1", "Layer 2", "Layer 3"]
    if name == "decompose_to_psd":
        assert names == decomposed and psd.size == (96, 72)  # output_size "original": the input's size
        assert (out / psds[0].name.replace(".psd", ".png")).is_file()
        assert len(result.ui["5"]["images"]) == 4  # Preview Layers: one frame per layer
    elif name == "decompose_edit_composite":
        assert names == decomposed and psd.size == (64, 64)  # processing size of 96x72 at max_side 64 (x32)
        before, after = (pack_module("nodes.common").to_stack(items(result.outputs[n][0])[0]) for n in ("3", "5"))
        assert after.layers[3].x == before.layers[3].x + 40 and after.layers[3].y == before.layers[3].y
        assert np.array_equal(after.layers[1].alpha, before.layers[1].alpha)  # recolor keeps alpha
        assert not np.array_equal(after.layers[1].pixels[..., :3], before.layers[1].pixels[..., :3])
        png = np.asarray(Image.open(out / "edited_00001_.png"))
        assert png.shape == (64, 64, 4)
    elif name == "recursive_decomposition":
        assert names == ["Background", "Layer 1", "Layer 2", "Layer 3 / 1", "Layer 3 / 2", "Layer 3 / 3"]
        assert len(result.ui["6"]["images"]) == 3  # the sub-layers
    elif name == "text_to_layers":
        assert names == decomposed and psd.size == (64, 64)
        assert result.outputs["2"][1].shape == (4, 64, 64, 4)
    elif name == "edit_layer_with_qwen_image_edit":
        # the edit group is bypassed: Replace Layer Pixels gets the layer's own pixels back, and changes nothing
        assert names == decomposed and psd.size == (96, 72)
        to_stack = pack_module("nodes.common").to_stack
        before, after = (to_stack(items(result.outputs[n][0])[0]) for n in ("3", "5"))
        composite = pack_module("qil_core.layers").composite
        np.testing.assert_array_equal(composite(after), composite(before))
        assert "recompose" in before.metadata  # exact recomposition is on at output_size "original"
        png = np.asarray(Image.open(out / "edited_layer_00001_.png"))
        assert png.shape == (72, 96, 4)
    elif name == "psd_edit":
        assert names == ["Background", "box", "title"] and psd.size == (96, 72)
        assert (psd[2].left, psd[2].top) != (50, 6)  # the title moved
    elif name == "lora_lightning":
        assert names == decomposed and psd.size == (64, 64)
        handle = result.outputs["4"][0]  # Load LoRA then Sampler Settings: the LoRA and the schedule ride along
        assert [s for _, s in handle.loras] == [1.0] and handle.sampler.time_shift == "exponential"
        assert not any("qil_lora" in n for n, _ in handle.model.transformer.named_modules())  # taken off again
    elif name == "caption_edit_decompose":
        assert names == decomposed and psd.size == (64, 64)
        caption = result.outputs["3"][0]
        assert isinstance(caption, str) and caption and result.ui["3"]["text"] == [caption]
        # the edit nodes left empty pass the caption through: the prompt used is the caption itself
        assert result.outputs["4"][3] == caption and result.ui["4"]["text"] == [caption]
        word = caption.split()[0]
        graph["6"]["inputs"].update(find=word, replace="a fox")
        graph["7"]["inputs"].update(string_b="on a plain white background.", delimiter=" ")
        edited = h.run(graph)
        assert edited.executed == ["6", "7", "4", "5"]  # the cached caption is not written again
        want = caption.replace(word, "a fox") + " on a plain white background."
        assert edited.outputs["4"][3] == want and edited.ui["4"]["text"] == [want]
        assert len(_psds(out)) == 2
    else:
        pytest.fail(f"no checks written for workflow {name!r}")
