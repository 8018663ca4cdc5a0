"""Save PSD, Load PSD, Save Layer PNGs and Preview Layers inside a (stand-in or real) ComfyUI host, and
API-format graphs run end to end through the harness, including its validation and caching."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_harness import GraphError, Harness, load_pack, pack_module
from PIL import Image
from psd_tools import PSDImage

core = pack_module("qil_core.layers")
lint_psd = pack_module("qil_core.layers.psd").lint_psd
errors = pack_module("qil_core.errors")
common = pack_module("nodes.common")
io_nodes = pack_module("nodes.io_nodes")


def _doc() -> dict:
    """A 24x16 canvas with a grey background, a red block named in Japanese and a half-transparent green one."""
    bg = np.full((16, 24, 4), 0.5, np.float32)
    bg[..., 3] = 1
    red = np.zeros((3, 5, 4), np.float32)
    red[:] = (1, 0, 0, 1)
    green = np.zeros((4, 4, 4), np.float32)
    green[:] = (0, 1, 0, 0.5)
    return common.to_document(
        core.LayerStack(
            24,
            16,
            [
                core.Layer(bg, name="background"),
                core.Layer(red, x=3, y=2, name="赤いブロック 😀"),
                core.Layer(green, x=15, y=9, name="green", opacity=0.8),
            ],
        )
    )


@pytest.fixture()
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    monkeypatch.delenv("QIL_OUTPUT_DIR", raising=False)
    return Harness(load_pack().NODE_CLASS_MAPPINGS, tmp_path / "comfy")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_save_psd_ui_dict_files_and_independent_reader(harness: Harness) -> None:
    prompt, extra = {"1": {"class_type": "QILSavePSD"}}, {"workflow": {"nodes": []}}
    with harness.host():
        result = io_nodes.QILSavePSD().save(_doc(), "QwenLayered/layers", prompt=prompt, extra_pnginfo=extra)
    ui = result["ui"]
    assert set(ui) == {"images", "psd"}  # S15: every value a list of {filename, subfolder, type}
    assert ui["images"] == [{"filename": "layers_00001_.png", "subfolder": "QwenLayered", "type": "output"}]
    assert ui["psd"] == [{"filename": "layers_00001_.psd", "subfolder": "QwenLayered", "type": "output"}]
    psd_path = harness.output_dir / "QwenLayered" / "layers_00001_.psd"
    assert result["result"] == (str(psd_path),)
    assert _files(harness.output_dir) == ["QwenLayered/layers_00001_.png", "QwenLayered/layers_00001_.psd"]
    assert lint_psd(psd_path) == []
    psd = PSDImage.open(psd_path)  # a reader nobody on the team wrote
    assert (psd.width, psd.height) == (24, 16)
    assert [(layer.name, layer.left, layer.top, layer.width, layer.height) for layer in psd] == [
        ("background", 0, 0, 24, 16),
        ("赤いブロック 😀", 3, 2, 5, 3),
        ("green", 15, 9, 4, 4),
    ]
    assert round(psd[2].opacity / 255, 2) == 0.8
    png = Image.open(harness.output_dir / "QwenLayered" / "layers_00001_.png")
    assert png.mode == "RGBA" and png.size == (24, 16)
    assert json.loads(png.info["prompt"]) == prompt and json.loads(png.info["workflow"]) == extra["workflow"]
    assert png.getpixel((4, 3)) == (255, 0, 0, 255)


def test_save_psd_never_overwrites_and_previews_in_temp(harness: Harness) -> None:
    folder = harness.output_dir / "QwenLayered"
    folder.mkdir()
    (folder / "layers_00001_.psd").write_bytes(b"someone else's file")
    with harness.host():
        result = io_nodes.QILSavePSD().save(_doc(), "QwenLayered/layers", also_composite_png=False, depth="16-bit")
    assert (folder / "layers_00001_.psd").read_bytes() == b"someone else's file"
    assert result["ui"]["psd"][0]["filename"] == "layers_00002_.psd"
    (preview,) = result["ui"]["images"]
    assert preview["type"] == "temp" and (harness.temp_dir / preview["subfolder"] / preview["filename"]).is_file()
    assert _files(folder) == ["layers_00001_.psd", "layers_00002_.psd"]
    assert PSDImage.open(folder / "layers_00002_.psd").depth == 16
    assert lint_psd(folder / "layers_00002_.psd") == []


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/abs", "a/../../x", "link_out/pwned", "", "CON", "x" * 300])
def test_save_psd_rejects_unsafe_prefixes(harness: Harness, tmp_path: Path, prefix: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (harness.output_dir / "link_out").symlink_to(outside, target_is_directory=True)
    with harness.host(), pytest.raises(errors.OutputPathError, match="filename_prefix"):
        io_nodes.QILSavePSD().save(_doc(), prefix)
    assert _files(harness.output_dir) == [] and list(outside.iterdir()) == []
    assert not (tmp_path / "comfy" / "escape_00001_.psd").exists()


def test_load_psd_lists_validates_hashes_and_loads(harness: Harness) -> None:
    with harness.host():
        saved = io_nodes.QILSavePSD().save(_doc(), "pair/doc")["result"][0]
    (harness.input_dir / "sub").mkdir()
    (harness.input_dir / "sub" / "copy.psd").write_bytes(Path(saved).read_bytes())
    (harness.input_dir / ".hidden.psd").write_bytes(b"x")
    (harness.input_dir / "notes.txt").write_text("x")
    node = io_nodes.QILLoadPSD
    with harness.host():
        assert node.INPUT_TYPES()["required"]["psd"][0] == ["sub/copy.psd"]
        assert node.VALIDATE_INPUTS("sub/copy.psd") is True
        assert "not found" in node.VALIDATE_INPUTS("gone.psd")
        assert "must be a file name" in node.VALIDATE_INPUTS("../../etc/x.psd")
        assert "outside ComfyUI's input" in node.VALIDATE_INPUTS("", path="/etc/passwd.psd")
        assert node.VALIDATE_INPUTS("", path=None) is True  # a linked path is checked when the node runs
        first = node.IS_CHANGED("sub/copy.psd")
        assert node.IS_CHANGED("sub/copy.psd") == first
        loaded = node().load("sub/copy.psd")
        layers, image, mask = loaded["result"]
        assert loaded["ui"]["text"] == []  # our own PSD: nothing the reader cannot represent
        from_output, _, _ = node().load("ignored.psd", path=saved)["result"]  # Save PSD's path output, in output/
        with open(harness.input_dir / "sub" / "copy.psd", "ab") as f:
            f.write(b"\0")
        assert node.IS_CHANGED("sub/copy.psd") != first
        with pytest.raises(errors.InputError, match="not a .psd"):
            node().load("notes.txt")
    assert [(it["name"], it["x"], it["y"], it["w"], it["h"]) for it in layers["layers"]] == [
        ("background", 0, 0, 24, 16),
        ("赤いブロック 😀", 3, 2, 5, 3),
        ("green", 15, 9, 4, 4),
    ]
    assert layers["layers"][2]["opacity"] == pytest.approx(0.8, abs=1 / 255)
    assert [it["name"] for it in from_output["layers"]] == [it["name"] for it in layers["layers"]]
    assert image.shape == (1, 16, 24, 4) and mask.shape == (1, 16, 24)
    assert torch.allclose(image[0, 3, 4], torch.tensor([1.0, 0.0, 0.0, 1.0]))


def test_load_psd_masks_flat_files_warnings_and_switches(harness: Harness) -> None:
    from psd_craft import mask_block, psd_bytes, raw_channel, rgba_layer

    px = np.full((4, 6, 4), 255, np.uint8)
    masked = rgba_layer("masked", 0, 0, px, mask=mask_block(0, 0, 4, 3, 0), blocks=[(b"knko", b"\x01\0\0\0")])
    masked.channels.append((-2, raw_channel(np.full((4, 3), 255, np.uint8))))
    stored = np.zeros((4, 6, 4), np.uint8)
    stored[..., 2], stored[..., 3] = 255, 255
    (harness.input_dir / "masked.psd").write_bytes(psd_bytes(6, 4, [masked], merged=stored))
    (harness.input_dir / "flat.psd").write_bytes(psd_bytes(6, 4, [], merged=np.full((4, 6, 3), 90, np.uint8)))
    node = io_nodes.QILLoadPSD
    assert node.INPUT_TYPES()["optional"]["groups"][0] == ["keep children", "flatten"]
    with harness.host():
        out = node().load("masked.psd")
        merged = node().load("masked.psd", use_merged=True)["result"][1]
        flat = node().load("flat.psd", groups="flatten")
        with pytest.raises(errors.InputError, match="groups"):
            node().load("flat.psd", groups="sideways")
    doc, image, mask = out["result"]
    alpha = doc["layers"][0]["image"][0, ..., 3]
    assert torch.equal(alpha[:, :3], torch.ones(4, 3)) and torch.equal(alpha[:, 3:], torch.zeros(4, 3))
    assert torch.equal(mask[0, :, 3:], torch.ones(4, 3))
    assert any("'masked'" in t and "knockout" in t for t in out["ui"]["text"])
    assert torch.allclose(merged[0, 0, 5], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert [it["name"] for it in flat["result"][0]["layers"]] == ["Background"]
    assert torch.allclose(flat["result"][1][0, 2, 2], torch.tensor([90 / 255, 90 / 255, 90 / 255, 1.0]))


def test_save_layer_pngs_folder_zip_and_ui(harness: Harness) -> None:
    (harness.output_dir / "pngs" / "set_00001_").mkdir(parents=True)  # taken: must not be reused
    with harness.host():
        result = io_nodes.QILSaveLayerPNGs().save(_doc(), "pngs/set", full_canvas=False, zip=True)
    folder = harness.output_dir / "pngs" / "set_00002_"
    assert result["result"] == (str(folder),)
    assert [i["filename"] for i in result["ui"]["images"]] == sorted(p.name for p in folder.iterdir())
    assert all(i["subfolder"] == "pngs/set_00002_" and i["type"] == "output" for i in result["ui"]["images"])
    assert result["ui"]["zip"] == [{"filename": "set_00002_.zip", "subfolder": "pngs", "type": "output"}]
    assert Image.open(folder / result["ui"]["images"][1]["filename"]).size == (5, 3)  # cropped to the layer
    with zipfile.ZipFile(harness.output_dir / "pngs" / "set_00002_.zip") as z:
        assert "manifest.json" in z.namelist() and len(z.namelist()) == 4
    assert list((harness.output_dir / "pngs" / "set_00001_").iterdir()) == []


def test_preview_layers_over_checkerboard(harness: Harness) -> None:
    with harness.host():
        result = io_nodes.QILPreviewLayers().preview(_doc(), include_composite=True)
    (frames,) = result["result"]
    assert frames.shape == (4, 16, 24, 3)  # three layers + the composite
    assert [i["type"] for i in result["ui"]["images"]] == ["temp"] * 4
    for item in result["ui"]["images"]:
        assert (harness.temp_dir / item["subfolder"] / item["filename"]).is_file()
    assert torch.allclose(frames[1, 3, 4], torch.tensor([1.0, 0.0, 0.0]))
    assert float(frames[1, 0, 0, 0]) in (1.0, pytest.approx(0.8))  # transparent: the checkerboard shows
    assert float(frames[1, 0, 0, 0]) != float(frames[1, 0, 16, 0])  # two different checker cells
    green = frames[2, 10, 16]  # alpha 0.5 x opacity 0.8 = 0.4 of green over the board
    board = float(frames[2, 0, 16, 0])
    assert torch.allclose(green, torch.tensor([0.6 * board, 0.4 + 0.6 * board, 0.6 * board]), atol=1e-5)


# ------------------------------------------------------------------ graphs through the harness
def write_sample_inputs(folder: Path) -> None:
    """The two input images EDIT_GRAPH loads: an opaque sky and a red logo block on transparency."""
    sky = np.zeros((32, 48, 3), np.uint8)
    sky[:] = (40, 90, 200)
    Image.fromarray(sky).save(folder / "sky.png")
    logo = np.zeros((32, 48, 4), np.uint8)
    logo[8:20, 10:30] = (230, 30, 30, 255)
    Image.fromarray(logo, "RGBA").save(folder / "logo.png")


def _inputs(harness: Harness) -> None:
    write_sample_inputs(harness.input_dir)


EDIT_GRAPH = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "sky.png"}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "logo.png"}},
    "3": {"class_type": "QILImagesToLayers", "inputs": {"image": ["1", 0], "mask": ["1", 1], "names": "sky"}},
    "4": {"class_type": "QILImagesToLayers", "inputs": {"image": ["2", 0], "mask": ["2", 1], "names": "ロゴ"}},
    "5": {"class_type": "QILCombineLayers", "inputs": {"bottom": ["3", 0], "top": ["4", 0], "canvas": "bottom"}},
    "6": {
        "class_type": "QILLayerTransform",
        "inputs": {
            "layers": ["5", 0],
            "layer": "ロゴ",
            "dx": 8.0,
            "dy": 4.0,
            "scale_x": 1.0,
            "scale_y": 1.0,
            "rotation": 0.0,
            "flip_h": False,
            "flip_v": False,
            "opacity": 1.0,
            "pivot": "selection center",
            "interpolation": "lanczos",
        },
    },
    "7": {
        "class_type": "QILLayerRecolor",
        "inputs": {
            "layers": ["6", 0],
            "layer": "-1",
            "hue_shift": 120.0,
            "saturation": 0.0,
            "lightness": 0.0,
            "brightness": 0.0,
            "contrast": 0.0,
            "tint": "",
            "tint_strength": 0.5,
            "replace_color": "",
            "replace_with": "",
            "tolerance": 0.1,
            "invert": False,
        },
    },
    "8": {"class_type": "QILCompositeLayers", "inputs": {"layers": ["7", 0]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "QwenLayered/composite"}},
    "10": {
        "class_type": "QILSavePSD",
        "inputs": {
            "layers": ["7", 0],
            "filename_prefix": "QwenLayered/edit",
            "also_composite_png": True,
            "depth": "8-bit",
        },
    },
    "11": {"class_type": "QILLoadPSD", "inputs": {"psd": "", "path": ["10", 0]}},
    "12": {"class_type": "QILLayersToImages", "inputs": {"layers": ["11", 0], "full_canvas": True}},
    "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "QwenLayered/reloaded"}},
    "14": {"class_type": "QILPreviewLayers", "inputs": {"layers": ["11", 0]}},
}


def test_edit_graph_runs_end_to_end_and_is_cached(harness: Harness) -> None:
    _inputs(harness)
    result = harness.run(EDIT_GRAPH, extra_pnginfo={"workflow": {"nodes": [], "links": []}})
    assert sorted(result.executed, key=int) == [str(i) for i in range(1, 15)]
    png = Image.open(harness.output_dir / "QwenLayered" / "edit_00001_.png")
    assert json.loads(png.info["workflow"]) == {"nodes": [], "links": []}  # drag the PNG back into ComfyUI
    assert json.loads(png.info["prompt"])["10"]["class_type"] == "QILSavePSD"
    out = harness.output_dir / "QwenLayered"
    assert _files(out) == [
        "composite_00001_.png",
        "edit_00001_.png",
        "edit_00001_.psd",
        "reloaded_00001_.png",
        "reloaded_00002_.png",
    ]
    composite = np.asarray(Image.open(out / "composite_00001_.png"))
    assert composite.shape == (32, 48, 4)
    assert tuple(composite[0, 0]) == (40, 90, 200, 255)
    # The logo (x 10..30, y 8..20) moved by (8, 4) and turned from (230, 30, 30) by 120 degrees to green.
    assert np.abs(composite[16, 25].astype(int) - (30, 230, 30, 255)).max() <= 1
    assert np.abs(composite[23, 37].astype(int) - (30, 230, 30, 255)).max() <= 1
    assert tuple(composite[9, 11]) == (40, 90, 200, 255)  # the logo's old place shows the sky again
    psd = PSDImage.open(out / "edit_00001_.psd")
    assert [(layer.name, layer.left, layer.top) for layer in psd] == [("sky", 0, 0), ("ロゴ", 18, 12)]
    assert result.ui["10"]["psd"] == [{"filename": "edit_00001_.psd", "subfolder": "QwenLayered", "type": "output"}]
    assert len(result.ui["14"]["images"]) == 2
    assert result.is_changed["11"] == "linked path" and len(result.is_changed["1"]) == 64

    again = harness.run(EDIT_GRAPH)
    assert again.executed == [] and again.ui == result.ui  # served from the cache, like ComfyUI
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(harness.input_dir / "sky.png")
    changed = harness.run(EDIT_GRAPH)
    assert "1" in changed.executed and "2" not in changed.executed and "10" in changed.executed


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"6": {"bogus": 1}}, "unknown input 'bogus'"),
        ({"6": {"dx": 1e9}}, "bigger than max"),
        ({"6": {"interpolation": "cubic"}}, "not in"),
        ({"8": {"layers": ["1", 0]}}, "received type IMAGE from node 1, expected LAYERS"),
        ({"10": {"layers": _doc()}}, "must be linked"),
        ({"11": {"path": "/etc/x.psd"}}, "VALIDATE_INPUTS failed"),
        ({"7": {"layers": ["6", 3]}}, "output 3 of node 6 does not exist"),
    ],
)
def test_graph_validation_refuses_bad_graphs(harness: Harness, patch: dict, message: str) -> None:
    _inputs(harness)
    graph = json.loads(json.dumps({k: v for k, v in EDIT_GRAPH.items()}))
    for node_id, inputs in patch.items():
        graph[node_id]["inputs"].update(inputs)
    with pytest.raises(GraphError, match=message):
        harness.run(graph)
    assert _files(harness.output_dir) == []


def test_graph_without_an_output_or_with_a_missing_input_is_refused(harness: Harness) -> None:
    _inputs(harness)
    with pytest.raises(GraphError, match="no outputs"):
        harness.run({k: EDIT_GRAPH[k] for k in ("1", "3")})
    graph = json.loads(json.dumps(EDIT_GRAPH))
    del graph["6"]["inputs"]["layer"]
    with pytest.raises(GraphError, match="required input 'layer' is missing"):
        harness.run(graph)


def test_preview_files_are_capped_and_bad_options_refused(harness: Harness) -> None:
    wide = common.to_document(core.LayerStack(1500, 40, [core.Layer(np.ones((40, 1500, 4), np.float32), name="w")]))
    with harness.host():
        result = io_nodes.QILPreviewLayers().preview(wide)
        with pytest.raises(errors.InputError, match="'depth' must be one of 8-bit, 16-bit"):
            io_nodes.QILSavePSD().save(wide, "x", depth="32-bit")
        with pytest.raises(errors.InputError, match="no layers"):
            io_nodes.QILSaveLayerPNGs().save({"version": 1, "canvas": (4, 4), "layers": []}, "x")
    assert result["result"][0].shape == (1, 40, 1500, 3)  # the IMAGE output keeps the full size
    (item,) = result["ui"]["images"]
    assert Image.open(harness.temp_dir / item["subfolder"] / item["filename"]).size == (1024, 27)
    assert _files(harness.output_dir) == []


# A file-size limit makes every write past 64 KiB fail with EFBIG, like a full disk (robustness.md S6: as root,
# chmod does not block writes). Runs in a child process so the limit cannot leak into the test session.
_DISK_FULL_PROBE = r"""
import json, resource, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import numpy as np
from comfy_harness import Harness, load_pack, pack_module
harness = Harness(load_pack().NODE_CLASS_MAPPINGS, Path(sys.argv[2]))
(harness.output_dir / "full").mkdir()
(harness.output_dir / "full" / "doc_00001_.psd").write_bytes(b"keep me")
core, common = pack_module("qil_core.layers"), pack_module("nodes.common")
noise = np.random.default_rng(0).random((256, 256, 4), dtype=np.float32)
doc = common.to_document(core.LayerStack(256, 256, [core.Layer(noise, name="noise")]))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
try:
    with harness.host():
        pack_module("nodes.io_nodes").QILSavePSD().save(doc, "full/doc")
    outcome = "saved"
except ValueError as e:
    outcome = type(e).__name__ + ": " + str(e)
files = sorted(str(p.relative_to(harness.output_dir)) for p in harness.output_dir.rglob("*"))
print(json.dumps({"outcome": outcome, "files": files,
                  "kept": (harness.output_dir / "full" / "doc_00001_.psd").read_bytes().decode()}))
"""


@pytest.mark.slow
def test_disk_full_leaves_nothing_behind_and_keeps_existing_files(tmp_path: Path) -> None:
    support = Path(__file__).parents[1] / "support"  # comfy_harness
    proc = subprocess.run(
        [sys.executable, "-c", _DISK_FULL_PROBE, str(support), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["outcome"].startswith("OutputPathError") and "doc" in report["outcome"], report["outcome"]
    assert report["files"] == ["full", "full/doc_00001_.psd"]
    assert report["kept"] == "keep me"
