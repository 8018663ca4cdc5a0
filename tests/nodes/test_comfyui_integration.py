"""The pack inside a real ComfyUI: server on loopback, POST /prompt, poll /history, check the files written.

Runs when $COMFYUI_DIR points at a ComfyUI checkout (tested with 0.3.64 and 0.25.0); the server runs under
$COMFYUI_PYTHON (default: this interpreter), which needs ComfyUI's requirements and ours. Skipped with a reason
otherwise.
The pack is copied into a temporary base directory (custom_nodes/, input/, output/, temp/, models/), so neither
the checkout nor this repository is written to. Other tests can reuse the `comfy_server` fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from comfy_harness import ROOT, Harness, load_pack, pack_module
from PIL import Image
from psd_tools import PSDImage
from qil_graphs import fast as fast_graph
from qil_graphs import install_models, load_workflow, sample_picture, workflow_names, write_inputs
from test_io_nodes import EDIT_GRAPH, write_sample_inputs
from test_pack_import import EXPECTED_NODES

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
START_TIMEOUT = float(os.environ.get("QIL_COMFYUI_START_TIMEOUT", "240"))
RUN_TIMEOUT = 180.0

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(
        not COMFYUI_DIR,
        reason="COMFYUI_DIR is not set: no ComfyUI checkout to run the real "
        "server against (set it, and COMFYUI_PYTHON to its Python)",
    ),
]
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


def _copy_pack(dest: Path) -> None:
    """The files ComfyUI needs from the pack (no tests, benches or caches)."""
    dest.mkdir(parents=True)
    for name in ("__init__.py", "pyproject.toml", "requirements.txt"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("nodes", "qil_core"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server process on 127.0.0.1 with its own base directory, and a tiny HTTP client for it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Launch main.py and wait (bounded) until our nodes are listed in /object_info."""
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [
            COMFYUI_PYTHON,
            str(Path(COMFYUI_DIR) / "main.py"),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-auto-launch",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.base, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if "QILSavePSD" in self.get("/object_info/QILSavePSD"):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        pytest.fail(f"ComfyUI did not list our nodes within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; the server runs in its own process group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_tail(self, chars: int = 6000) -> str:
        """The end of the server's log, for failure messages."""
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else "(no log)"

    def get(self, path: str) -> Any:
        """GET a JSON endpoint."""
        with _NO_PROXY.open(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        """GET raw bytes (e.g. /view?filename=...)."""
        with _NO_PROXY.open(self.url + path, timeout=10) as r:
            return r.read()

    def queue(self, graph: dict) -> tuple[int, dict]:
        """POST /prompt; returns (HTTP status, JSON body), a 400 included."""
        body = json.dumps({"prompt": graph, "client_id": "qil-tests"}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with _NO_PROXY.open(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def post(self, path: str, data: dict) -> int:
        """POST a JSON body (e.g. /interrupt, /free); returns the HTTP status."""
        req = urllib.request.Request(
            self.url + path, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"}
        )
        with _NO_PROXY.open(req, timeout=10) as r:
            return r.status

    def run(self, graph: dict, timeout: float = RUN_TIMEOUT) -> dict:
        """Queue `graph` and poll /history until it finished; returns its history entry."""
        status, body = self.queue(graph)
        assert status == 200, f"prompt refused: {json.dumps(body)[:2000]}"
        return self.wait(body["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT) -> dict:
        """Poll /history until the queued prompt `prompt_id` finished; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if (
                entry
                and entry.get("status", {}).get("completed") is not None
                and entry["status"].get("status_str") in ("success", "error")
            ):
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"ComfyUI died while running the prompt:\n{self.log_tail()}")
            time.sleep(0.5)
        pytest.fail(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    base = tmp_path_factory.mktemp("comfy_base")
    for sub in (
        "input",
        "output",
        "temp",
        "models/diffusion_models",
        "models/vae",
        "models/text_encoders",
        "models/diffusers",
    ):
        (base / sub).mkdir(parents=True)
    _copy_pack(base / "custom_nodes" / "qwen_layered")
    server = ComfyServer(base)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _messages(entry: dict, kind: str) -> list[dict]:
    return [data for name, data in entry["status"].get("messages", []) if name == kind]


def test_nodes_register_in_the_real_host(comfy_server: ComfyServer) -> None:
    info = comfy_server.get("/object_info")
    assert {k for k in info if k.startswith("QIL")} == set(EXPECTED_NODES)
    for node_id, display in EXPECTED_NODES.items():
        assert info[node_id]["display_name"] == display
        assert info[node_id]["category"].startswith("Qwen-Image-Layered")
        assert info[node_id]["description"]
    assert info["QILSavePSD"]["output_node"] is True
    # Only this pack's import counts: core's optional nodes fail on hosts without OpenGL or torchaudio.
    pack_dir = str(comfy_server.base / "custom_nodes" / "qwen_layered")
    lines = comfy_server.log_tail(200_000).splitlines()
    timing = [line for line in lines if line.rstrip().endswith(": " + pack_dir)]  # "  0.1 seconds: <pack>"
    assert timing and all("IMPORT FAILED" not in line for line in timing), timing
    assert not [line for line in lines if pack_dir in line and ("IMPORT FAILED" in line or "Cannot import" in line)]


def test_core_node_declarations_match_the_real_server(comfy_server: ComfyServer) -> None:
    """The workflows lay out core nodes from tests/support (Qwen-Image-Edit in qwen_edit_nodes.py, the text nodes
    in string_nodes.py): same input names, order, kinds and widget choices as the real ComfyUI (0.3.64 or later)."""
    from qwen_edit_nodes import QWEN_EDIT_NODES
    from string_nodes import STRING_NODES

    info = comfy_server.get("/object_info")
    for name, cls in {**QWEN_EDIT_NODES, **STRING_NODES}.items():
        assert name in info, f"{name} is missing from this ComfyUI (the workflow needs 0.3.64 or later)"
        real = info[name]
        ours = cls.INPUT_TYPES()
        assert list(real["output"]) == list(cls.RETURN_TYPES), name
        for group in ("required", "optional"):
            got = list(real["input"].get(group, {}))
            want = list(ours.get(group, {}))
            assert got[: len(want)] == want, (name, group, got, want)  # later versions may append inputs
            for key, decl in ours.get(group, {}).items():
                kind = real["input"][group][key][0]
                if isinstance(decl[0], list):  # a combo: our choices are values the real one accepts
                    choices = kind if isinstance(kind, list) else real["input"][group][key][1].get("options", [])
                    if not key.endswith("_name"):  # model file lists depend on the install
                        assert set(decl[0]) <= set(choices), (name, key)
                else:
                    assert kind == decl[0], (name, key, kind)


def test_edit_graph_on_the_real_server_matches_the_harness(comfy_server: ComfyServer, tmp_path: Path) -> None:
    write_sample_inputs(comfy_server.base / "input")
    entry = comfy_server.run(EDIT_GRAPH)
    assert entry["status"]["status_str"] == "success", comfy_server.log_tail()
    outputs = entry["outputs"]
    assert outputs["10"]["psd"] == [{"filename": "edit_00001_.psd", "subfolder": "QwenLayered", "type": "output"}]
    assert outputs["10"]["images"] == [{"filename": "edit_00001_.png", "subfolder": "QwenLayered", "type": "output"}]
    assert len(outputs["14"]["images"]) == 2 and all(i["type"] == "temp" for i in outputs["14"]["images"])
    out = comfy_server.base / "output" / "QwenLayered"
    assert sorted(p.name for p in out.iterdir()) == [
        "composite_00001_.png",
        "edit_00001_.png",
        "edit_00001_.psd",
        "reloaded_00001_.png",
        "reloaded_00002_.png",
    ]
    psd = PSDImage.open(out / "edit_00001_.psd")
    assert [(layer.name, layer.left, layer.top) for layer in psd] == [("sky", 0, 0), ("ロゴ", 18, 12)]
    png = comfy_server.get_bytes("/view?filename=edit_00001_.png&subfolder=QwenLayered&type=output")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "workflow" not in Image.open(out / "edit_00001_.png").info  # API prompts carry no workflow
    assert "prompt" in Image.open(out / "edit_00001_.png").info

    # The same graph through the CI harness (stand-ins for LoadImage/SaveImage) gives identical pixels.
    harness = Harness(load_pack().NODE_CLASS_MAPPINGS, tmp_path / "harness")
    write_sample_inputs(harness.input_dir)
    harness.run(EDIT_GRAPH)
    for name in ("composite_00001_.png", "reloaded_00001_.png", "reloaded_00002_.png", "edit_00001_.png"):
        ours = np.asarray(Image.open(harness.output_dir / "QwenLayered" / name))
        theirs = np.asarray(Image.open(out / name))
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), name

    cached = comfy_server.run(EDIT_GRAPH)  # unchanged inputs: served from ComfyUI's cache
    assert cached["status"]["status_str"] == "success"
    assert {"10", "11", "14"} <= set(_messages(cached, "execution_cached")[0]["nodes"])
    assert len(list(out.iterdir())) == 5


def test_load_psd_reads_masked_and_flat_psds_on_the_real_server(comfy_server: ComfyServer) -> None:
    from psd_craft import mask_block, psd_bytes, raw_channel, rgba_layer

    red = np.zeros((8, 12, 4), np.uint8)
    red[..., 0], red[..., 3] = 255, 255
    masked = rgba_layer("masked", 2, 4, red, mask=mask_block(2, 4, 10, 10, 0), blocks=[(b"knko", b"\x01\0\0\0")])
    masked.channels.append((-2, raw_channel(np.full((8, 6), 255, np.uint8))))
    under = rgba_layer("under", 0, 0, np.full((16, 24, 4), (0, 0, 255, 255), np.uint8))
    (comfy_server.base / "input" / "masked.psd").write_bytes(psd_bytes(24, 16, [under, masked]))
    (comfy_server.base / "input" / "flat.psd").write_bytes(
        psd_bytes(24, 16, [], merged=np.full((16, 24, 3), 90, np.uint8))
    )
    graph = {
        "1": {
            "class_type": "QILLoadPSD",
            "inputs": {"psd": "masked.psd", "path": "", "groups": "keep children", "use_merged": False},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 1], "filename_prefix": "psd/masked"}},
        "3": {
            "class_type": "QILLoadPSD",
            "inputs": {"psd": "flat.psd", "path": "", "groups": "flatten", "use_merged": False},
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 1], "filename_prefix": "psd/flat"}},
        "5": {
            "class_type": "QILSaveLayerPNGs",
            "inputs": {"layers": ["1", 0], "filename_prefix": "psd/layers", "full_canvas": True, "zip": False},
        },
    }
    entry = comfy_server.run(graph)
    assert entry["status"]["status_str"] == "success", comfy_server.log_tail()
    assert any("'masked'" in t and "knockout" in t for t in entry["outputs"]["1"]["text"])  # the node's warnings
    out = comfy_server.base / "output" / "psd"
    masked_png = np.asarray(Image.open(out / "masked_00001_.png").convert("RGBA"))
    assert tuple(masked_png[5, 6]) == (255, 0, 0, 255)  # inside the mask: the red layer
    assert tuple(masked_png[5, 12]) == (0, 0, 255, 255)  # the layer's right half is masked: blue shows
    flat_png = np.asarray(Image.open(out / "flat_00001_.png").convert("RGBA"))
    assert np.all(flat_png == (90, 90, 90, 255))
    layer_files = sorted(p.name for p in (out / "layers_00001_").iterdir())
    assert len(layer_files) == 2 and "masked" in layer_files[1]


def test_errors_are_reported_and_the_server_keeps_going(comfy_server: ComfyServer) -> None:
    write_sample_inputs(comfy_server.base / "input")
    bad_value = json.loads(json.dumps(EDIT_GRAPH))
    bad_value["6"]["inputs"]["dx"] = 1e9
    status, body = comfy_server.queue(bad_value)
    assert status == 400 and "6" in body["node_errors"]

    escape = json.loads(json.dumps(EDIT_GRAPH))
    escape["10"]["inputs"]["filename_prefix"] = "../escape"
    entry = comfy_server.run(escape)
    assert entry["status"]["status_str"] == "error"
    (error,) = _messages(entry, "execution_error")
    assert error["node_id"] == "10" and error["exception_type"].endswith("OutputPathError")
    assert "filename_prefix '../escape' rejected" in error["exception_message"]
    assert not (comfy_server.base / "escape_00001_.psd").exists()

    ok = json.loads(json.dumps(EDIT_GRAPH))
    ok["10"]["inputs"]["filename_prefix"] = "after_error/layers"
    assert comfy_server.run(ok)["status"]["status_str"] == "success"
    assert (comfy_server.base / "output" / "after_error" / "layers_00001_.psd").is_file()


# Runs inside ComfyUI's Python with the real comfy modules loaded, the way they are when nodes execute.
_HOST_PROBE = r"""
import importlib.util, json, os, sys
comfy_dir, pack, base = sys.argv[1:4]
sys.path.insert(0, comfy_dir)
from comfy.cli_args import args
args.cpu, args.base_directory = True, base
import torch
import comfy.model_management as mm, comfy.model_patcher, comfy.utils, folder_paths
name = pack.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, os.path.join(pack, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
host = sys.modules[name + ".nodes.host"]
net = torch.nn.Sequential(torch.nn.Linear(8, 8))
patcher = host.wrap_model_patcher(net, host.get_torch_device(), mm.unet_offload_device())
host.load_models_gpu([patcher])
loaded = any(m.model is patcher for m in mm.current_loaded_models)
seen = []
comfy.utils.set_progress_bar_global_hook(lambda v, t, preview, node_id=None: seen.append([v, t]))
callback = host.make_callback(3)
for step in (1, 2, 3):
    callback(step, 3)
mm.interrupt_current_processing(True)
try:
    host.make_callback(3)(1, 3)
    interrupted = False
except mm.InterruptProcessingException:
    interrupted = True
print(json.dumps({"patcher": type(patcher).__module__ + "." + type(patcher).__name__, "loaded": loaded,
                  "progress": seen, "interrupted": interrupted, "output": str(host.get_output_directory()),
                  "vae": [str(p) for p in host.model_folders("vae")]}))
"""


def test_host_adapter_with_the_real_comfy_modules(tmp_path: Path) -> None:
    pack = tmp_path / "custom_nodes" / "qwen_layered"
    _copy_pack(pack)
    proc = subprocess.run(
        [COMFYUI_PYTHON, "-c", _HOST_PROBE, COMFYUI_DIR, str(pack), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["patcher"] == "comfy.model_patcher.ModelPatcher" and report["loaded"] is True
    # What users see: a bar that only moves forward and reaches the end. How many updates get through is the
    # host's business (0.3.64 sends each one; 0.25 coalesces the ones in between).
    progress = report["progress"]
    assert progress and all(total == 3 for _, total in progress), progress
    steps = [value for value, _ in progress]
    assert steps == sorted(set(steps)) and set(steps) <= {1, 2, 3} and steps[-1] == 3, progress
    assert report["interrupted"] is True
    assert report["output"] == str(tmp_path / "output")
    assert str(tmp_path / "models" / "vae") in report["vae"]


# ------------------------------------------------------------------ the example workflows on the real server
def _server_graph(name: str) -> dict:
    """A workflow's API graph with CPU-test settings, saving under its own subfolder of output/."""
    graph = fast_graph(load_workflow(name))
    for node in graph.values():
        prefix = node["inputs"].get("filename_prefix")
        if isinstance(prefix, str):
            node["inputs"]["filename_prefix"] = prefix.replace("QwenLayered/", f"workflows/{name}/", 1)
    return graph


@pytest.fixture(scope="module")
def models_installed(comfy_server: ComfyServer) -> ComfyServer:
    """Tiny random weights under the users' file names in the server's models/ folders, and the sample inputs."""
    install_models(comfy_server.base)
    write_inputs(comfy_server.base / "input")
    return comfy_server


@pytest.mark.parametrize("name", workflow_names())
def test_every_workflow_runs_on_the_real_server(models_installed: ComfyServer, name: str) -> None:
    server = models_installed
    entry = server.run(_server_graph(name))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000] + server.log_tail()
    out = server.base / "output" / "workflows" / name
    psds = sorted(out.glob("*.psd"))
    assert len(psds) == 1
    assert pack_module("qil_core.layers.psd").lint_psd(psds[0]) == []
    names = [layer.name for layer in PSDImage.open(psds[0])]
    expected = {
        "psd_edit": ["Background", "box", "title"],
        "recursive_decomposition": ["Background", "Layer 1", "Layer 2", "Layer 3 / 1", "Layer 3 / 2", "Layer 3 / 3"],
    }.get(name, ["Background", "Layer 1", "Layer 2", "Layer 3"])
    assert names == expected
    saved = [i for ui in entry["outputs"].values() for key in ("psd", "images") for i in ui.get(key, [])]
    assert {"filename": psds[0].name, "subfolder": f"workflows/{name}", "type": "output"} in saved
    for item in saved:  # every file the UI lists can be fetched back
        data = server.get_bytes(f"/view?filename={item['filename']}&subfolder={item['subfolder']}&type={item['type']}")
        assert data[:4] in (b"8BPS", b"\x89PNG")

    again = server.run(_server_graph(name))  # unchanged inputs: every node served from ComfyUI's cache
    assert again["status"]["status_str"] == "success"
    assert set(_messages(again, "execution_cached")[0]["nodes"]) == set(_server_graph(name))
    assert sorted(out.glob("*.psd")) == psds


def test_caption_edits_through_the_real_core_text_nodes(models_installed: ComfyServer) -> None:
    """caption_edit_decompose on the real Replace and Concatenate nodes: left empty they pass the caption through;
    filled in, Decompose Image uses the edited caption, and the caption itself comes from the cache."""
    name = "caption_edit_decompose"
    graph = _server_graph(name)
    graph["5"]["inputs"]["filename_prefix"] = "caption_edits/captioned"  # the workflow test counts its own PSDs
    first = models_installed.run(graph)
    assert first["status"]["status_str"] == "success", json.dumps(first["status"])[:3000]
    (caption,) = first["outputs"]["3"]["text"]
    assert caption and first["outputs"]["4"]["text"] == [caption]
    word = caption.split()[0]
    graph["6"]["inputs"].update(find=word, replace="a fox")
    graph["7"]["inputs"].update(string_b="on white.", delimiter=" ")
    edited = models_installed.run(graph)
    assert edited["status"]["status_str"] == "success", json.dumps(edited["status"])[:3000]
    assert edited["outputs"]["4"]["text"] == [caption.replace(word, "a fox") + " on white."]
    assert {"1", "2", "3"} <= set(_messages(edited, "execution_cached")[0]["nodes"])


def test_a_saved_loader_with_the_old_block_swap_spelling_runs_on_the_real_server(models_installed: ComfyServer) -> None:
    # Before the memory modes were spelled once, the loader offered "block swap"; saved workflows keep that value.
    graph = _server_graph("text_to_layers")
    for node in graph.values():
        if node["class_type"] == "QILLoadModel":
            node["inputs"]["memory_mode"] = "block swap"
        if isinstance(node["inputs"].get("filename_prefix"), str):
            node["inputs"]["filename_prefix"] = "legacy/old_spelling"
    entry = models_installed.run(graph)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000] + models_installed.log_tail()
    assert len(list((models_installed.base / "output" / "legacy").glob("*.psd"))) == 1


def test_cancel_on_the_real_server_leaves_nothing(models_installed: ComfyServer) -> None:
    server = models_installed
    graph = _server_graph("decompose_to_psd")
    graph["3"]["inputs"].update(steps=1000, seed=12345, max_side=128)  # long enough to press Cancel mid-sampling
    before = sorted((server.base / "output").rglob("*"))
    status, body = server.queue(graph)
    assert status == 200, body
    prompt_id = body["prompt_id"]
    deadline = time.monotonic() + 60
    while not server.get("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(3.0)  # let it load the (cached) model and start sampling
    req = urllib.request.Request(server.url + "/interrupt", data=b"{}", headers={"Content-Type": "application/json"})
    with _NO_PROXY.open(req, timeout=10) as r:
        assert r.status == 200
    deadline = time.monotonic() + RUN_TIMEOUT
    entry = None
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.5)
    assert entry is not None and entry["status"]["status_str"] == "error"
    assert _messages(entry, "execution_interrupted"), json.dumps(entry["status"])[:2000]
    assert sorted((server.base / "output").rglob("*")) == before  # no PSD, no PNG, no staging folder


def test_unload_models_really_frees_the_model(models_installed: ComfyServer) -> None:
    server = models_installed
    graph = _server_graph("text_to_layers")
    assert server.run(graph)["status"]["status_str"] == "success"
    loads = server.log_tail(10**7).count("Qwen-Image-Layered: transformer ")
    req = urllib.request.Request(
        server.url + "/free",
        data=json.dumps({"unload_models": True, "free_memory": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with _NO_PROXY.open(req, timeout=10) as r:  # the "Unload models" / "Free model and node cache" buttons
        assert r.status == 200
    time.sleep(2.0)  # the worker applies the flags when it wakes up
    graph["2"]["inputs"]["seed"] = 99
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success"
    assert "1" not in _messages(entry, "execution_cached")[0]["nodes"]
    # Loaded from disk again: no cache of ours kept the model alive once ComfyUI let go of it.
    assert server.log_tail(10**7).count("Qwen-Image-Layered: transformer ") == loads + 1


# ------------------------------------------------------------------ under load: the queue
SOAK_PROMPTS = 30
SOAK_SIZES = {"soak_a.png": (96, 72), "soak_b.png": (64, 64), "soak_c.png": (120, 48)}
SOAK_LONG = 12  # this one samples long enough to be interrupted; /free follows it


def _soak_graph(k: int) -> dict:
    """Decomposition k of the soak: its own seed, input size, processing size and layer count; every Save PSD
    writes under the same prefix, and every fifth prompt has a second Save PSD (16-bit) with that prefix too."""
    graph = _server_graph("decompose_to_psd")
    graph["1"]["inputs"]["image"] = list(SOAK_SIZES)[k % 3]
    graph["3"]["inputs"].update(seed=7000 + k, layers=2 + k % 3, max_side=(64, 96)[k % 2], steps=2)
    graph["4"]["inputs"]["filename_prefix"] = "soak/same"
    if k % 5 == 4:
        graph["6"] = {
            "class_type": "QILSavePSD",
            "inputs": {**graph["4"]["inputs"], "depth": "16-bit", "also_composite_png": False},
        }
    if k == SOAK_LONG:
        graph["3"]["inputs"].update(steps=1000, max_side=128)
    return graph


def _rss(pid: int) -> int:
    psutil = pytest.importorskip("psutil")
    return int(psutil.Process(pid).memory_info().rss)


def test_soak_the_queue(models_installed: ComfyServer) -> None:
    server = models_installed
    assert server.proc is not None
    for name, (w, h) in SOAK_SIZES.items():
        Image.fromarray(sample_picture(w, h)).save(server.base / "input" / name)
    out = server.base / "output" / "soak"
    started = time.monotonic()
    ids = []
    for k in range(SOAK_PROMPTS):  # all queued up front, as a user queueing a batch
        status, body = server.queue(_soak_graph(k))
        assert status == 200, body
        ids.append(body["prompt_id"])

    entries: dict[int, dict] = {}
    for k in range(5):
        entries[k] = server.wait(ids[k])
    rss_early = _rss(server.proc.pid)

    # Cancel the long one while it samples, then "Free model and node cache" while the queue goes on.
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline and ids[SOAK_LONG] not in [q[1] for q in server.get("/queue")["queue_running"]]:
        time.sleep(0.1)
    time.sleep(1.5)
    loads = server.log_tail(10**7).count("Qwen-Image-Layered: transformer ")
    assert server.post("/interrupt", {}) == 200
    assert server.post("/free", {"unload_models": True, "free_memory": True}) == 200
    for k in range(5, SOAK_PROMPTS):
        entries[k] = server.wait(ids[k])
    elapsed = time.monotonic() - started
    rss_end = _rss(server.proc.pid)
    assert server.log_tail(10**7).count("Qwen-Image-Layered: transformer ") > loads  # /free made it load again

    interrupted = [k for k, e in entries.items() if e["status"]["status_str"] != "success"]
    assert interrupted == [SOAK_LONG], {k: entries[k]["status"] for k in interrupted}
    assert _messages(entries[SOAK_LONG], "execution_interrupted")
    expected: dict[str, tuple[int, int, int]] = {}  # file name -> (width, height, layers)
    eight_bit: list[str] = []  # the PSDs of node "4": one per finished prompt
    for k, entry in entries.items():
        if k == SOAK_LONG:
            assert entry["outputs"].get("4") is None
            continue
        graph = _soak_graph(k)
        size = SOAK_SIZES[graph["1"]["inputs"]["image"]]
        for node in ("4", "6"):
            if node in graph:
                saved = entry["outputs"][node]["psd"] + entry["outputs"][node].get("images", [])
                for item in (i for i in saved if i["type"] == "output"):  # not the UI's temp previews
                    assert item["subfolder"] == "soak" and item["filename"] not in expected, item  # no collision
                    expected[item["filename"]] = (*size, graph["3"]["inputs"]["layers"])
        eight_bit += [item["filename"] for item in entry["outputs"]["4"]["psd"]]
    saves = sum(1 + (k % 5 == 4) for k in range(SOAK_PROMPTS) if k != SOAK_LONG)
    assert len([n for n in expected if n.endswith(".psd")]) == saves

    # On disk: exactly the files the UI lists (no leftovers, no staging or temp files anywhere), each complete.
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    stray = [
        p
        for sub in ("output", "temp", "input")
        for p in (server.base / sub).rglob("*")
        if p.name.startswith(".") or p.name.endswith(".tmp")
    ]
    assert stray == []
    counters = sorted(int(n.split("_")[1]) for n in expected if n.endswith(".psd"))
    assert counters == list(range(1, saves + 1))  # one counter per save, none reused or skipped
    lint = pack_module("qil_core.layers.psd").lint_psd
    digests = set()
    for name, (w, h, n_layers) in expected.items():
        if name.endswith(".png"):
            with Image.open(out / name) as png:
                png.load()
                assert png.size == (w, h)
            continue
        psd = PSDImage.open(out / name)
        assert (psd.width, psd.height) == (w, h) and len(psd) == n_layers, name
        assert lint(out / name) == [], name
        if name in eight_bit:
            digests.add(np.asarray(psd.composite()).tobytes())
    assert len(eight_bit) == len(digests) == SOAK_PROMPTS - 1  # a distinct picture from every finished prompt

    growth = rss_end / rss_early - 1
    print(
        f"\nsoak: {SOAK_PROMPTS} prompts in {elapsed:.1f} s, {len(expected)} files; server RSS after 5 prompts "
        f"{rss_early / 2**20:.0f} MiB, after the run {rss_end / 2**20:.0f} MiB ({growth:+.1%})"
    )
    assert abs(growth) <= 0.10


def test_int8_convrot_file_on_the_real_server(models_installed: ComfyServer) -> None:
    """The file users have, made by comfy-kitchen (ComfyUI's quantiser), decomposed by the real server."""
    import torch
    from comfy_kitchen.tensor import QuantizedTensor
    from safetensors.torch import load_file, save_file

    server = models_installed
    diffusion = server.base / "models" / "diffusion_models"
    sd = load_file(str(diffusion / "qwen_image_layered_fp8mixed.safetensors"))
    marker = json.dumps({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 64}).encode("utf-8")
    quantised = 0
    for key in [k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2 and ".attn." in k]:
        qt = QuantizedTensor.from_float(sd[key].to(torch.bfloat16), "TensorWiseINT8Layout", per_channel=True,
                                        convrot=True, convrot_groupsize=64)  # fmt: skip
        sd.update({k: v.contiguous() for k, v in qt.state_dict(key).items()})
        sd[key[: -len(".weight")] + ".comfy_quant"] = torch.tensor(list(marker), dtype=torch.uint8)
        quantised += 1
    assert quantised >= 16
    save_file(sd, str(diffusion / "qwen_image_layered_int8_convrot.safetensors"))
    graph = _server_graph("decompose_to_psd")
    for node in graph.values():
        if node["class_type"] == "QILLoadModel":
            node["inputs"]["transformer"] = "qwen_image_layered_int8_convrot.safetensors"
        if isinstance(node["inputs"].get("filename_prefix"), str):
            node["inputs"]["filename_prefix"] = "workflows/int8_convrot/out"
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000] + server.log_tail()
    psds = sorted((server.base / "output" / "workflows" / "int8_convrot").glob("*.psd"))
    assert len(psds) == 1 and len(list(PSDImage.open(psds[0]))) == 4
