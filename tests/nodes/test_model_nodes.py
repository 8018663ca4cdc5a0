"""Load Qwen-Layered, Decompose Image, Text to Layers and Decompose Layer as ComfyUI runs them: Cancel, progress,
caching, loading once, memory modes, and the bad inputs of robustness.md (L1, L2, L5, D2, D3, D10, D14)."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from comfy_harness import GraphError, InterruptProcessingException, pack_module
from PIL import Image
from psd_tools import PSDImage
from qil_graphs import (
    MODEL_FILES,
    MODEL_NAMES,
    ListHarness,
    fast,
    harness,
    items,
    load_workflow,
    sample_picture,
    write_inputs,
)
from tiny_runs import fast_node_settings, one_thread

FILES = MODEL_NAMES
SETTINGS = fast_node_settings(prompt="a sunny sky with a red box")
errors = pack_module("qil_core.errors")
model_nodes = pack_module("nodes.model_nodes")
sample_nodes = pack_module("nodes.sample_nodes")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ListHarness, Any]]:
    """One harness with the tiny model and a loaded handle, shared by the direct node calls below."""
    h = harness(tmp_path_factory.mktemp("model_nodes"))
    with h.host():
        (handle,) = model_nodes.QILLoadModel().load(*FILES)
        yield h, handle


def _picture() -> torch.Tensor:
    return torch.from_numpy(sample_picture()).float()[None] / 255.0  # [1, 72, 96, 3]


def _decompose(env: tuple, image: Any, **changes: Any) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    return sample_nodes.QILDecompose().decompose(env[1], image, **{**SETTINGS, **changes})["result"][:3]


class Forwards:
    """Counts the transformer's forward calls (one per denoising step with batched CFG)."""

    def __init__(self, handle: Any) -> None:
        self.calls = 0
        self._hook = handle.model.transformer.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._hook.remove()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.name.startswith("."))


# ------------------------------------------------------------------ Cancel, progress, cache
def test_cancel_during_sampling_stops_within_one_step_and_leaves_nothing(tmp_path: Path) -> None:
    h = harness(tmp_path)
    graph = fast(load_workflow("decompose_to_psd"), steps=4)
    with h.host():
        (handle,) = model_nodes.QILLoadModel().load(*FILES)  # the graph's loader gets this same model
    calls: list[int] = []
    pressed: list[bool] = []

    def press_cancel_during_step_two(*_: Any) -> None:
        calls.append(1)
        if len(calls) == 2 and not pressed:  # the user presses Cancel while the second forward runs
            pressed.append(True)
            h.record.interrupt_after = h.record.interrupt_checks + 1

    hook = handle.model.transformer.register_forward_hook(press_cancel_during_step_two)
    with pytest.raises(InterruptProcessingException):
        h.run(graph)
    cancelled = len(calls)
    # the empty prompt was captioned first (its own bar, one tick per token of 512), then step 2 ran out and it stopped
    assert [p for p in h.record.progress if p[0] == "3" and p[2] != 512] == [("3", 1, 4)]
    assert [p[1] for p in h.record.progress if p[0] == "3" and p[2] == 512][:3] == [1, 2, 3]
    assert _files(h.output_dir) == []  # no PSD, no PNG, no staging folder
    assert _files(h.temp_dir) == []

    h.record.interrupt_after = None
    calls.clear()
    result = h.run(graph)
    hook.remove()
    per_step = len(calls) // 4
    assert per_step in (1, 2) and len(calls) == 4 * per_step  # 1 with batched CFG, 2 with sequential CFG
    assert cancelled <= 2 + per_step - 1  # at most the rest of the step that was running when Cancel came
    assert "3" in result.executed and "4" in result.executed  # nothing of the cancelled run was cached
    assert "2" not in result.executed  # the model load had finished and stays cached
    assert _files(h.output_dir / "QwenLayered") == ["decomposed_00001_.png", "decomposed_00001_.psd"]


def test_progress_bar_counts_steps(env: tuple) -> None:
    h = env[0]
    h.record.progress.clear()
    with h.host():
        sample_nodes.QILDecompose().decompose(env[1], _picture(), **{**SETTINGS, "steps": 3}, unique_id="9")
        assert h.record.progress == [("9", 1, 3), ("9", 2, 3), ("9", 3, 3)]
        h.record.progress.clear()
        batch = torch.cat([_picture(), _picture().flip(2)])  # two images: one bar over both
        sample_nodes.QILDecompose().decompose(env[1], batch, **SETTINGS, unique_id="9")
        assert [p[1:] for p in h.record.progress] == [(i, 4) for i in range(1, 5)]
        h.record.progress.clear()
        sample_nodes.QILTextToLayers().generate(env[1], "a poster", " ", 64, 64, 2, 3, 4.0, True, 1, unique_id="5")
        assert h.record.progress == [("5", 1, 3), ("5", 2, 3), ("5", 3, 3)]


def test_second_run_with_unchanged_inputs_is_served_from_the_cache(tmp_path: Path) -> None:
    h = harness(tmp_path)
    graph = fast(load_workflow("recursive_decomposition"))
    first = h.run(graph)
    files = _files(h.output_dir)
    assert sorted(first.executed, key=int) == ["1", "2", "3", "4", "5", "6"]
    again = h.run(graph)
    assert again.executed == [] and _files(h.output_dir) == files
    graph["4"]["inputs"]["seed"] = 1  # only Decompose Layer and what follows it run again
    assert sorted(h.run(graph).executed, key=int) == ["4", "5", "6"]


# ------------------------------------------------------------------ loading
def test_same_files_load_once_and_a_changed_file_loads_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = pack_module("qil_core.model.loader")
    loads: list[dict] = []
    real = bundle.load_model
    monkeypatch.setattr(bundle, "load_model", lambda **kw: loads.append(kw) or real(**kw))
    h = harness(tmp_path)
    graph = fast(load_workflow("decompose_to_psd"))
    graph["12"] = {"class_type": "QILLoadModel", "inputs": dict(graph["2"]["inputs"])}  # a second loader
    graph["13"] = {"class_type": "QILDecompose", "inputs": {**graph["3"]["inputs"], "model": ["12", 0]}}
    graph["14"] = {"class_type": "QILSavePSD", "inputs": {**graph["4"]["inputs"], "layers": ["13", 0]}}
    result = h.run(graph)
    assert len(loads) == 1 and result.outputs["2"][0] is result.outputs["12"][0]
    assert loads[0]["device"] == "cpu"  # loaded to the offload device; ComfyUI moves it when it runs

    path = h.base / MODEL_FILES["vae"]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed on disk
    changed = h.run(graph)
    assert len(loads) == 2 and {"2", "12"} <= set(changed.executed)
    assert changed.is_changed["2"] != result.is_changed["2"]
    assert changed.outputs["2"][0] is not result.outputs["2"][0]

    # The weak cache holds no model on its own: when ComfyUI drops the outputs, the model is freed.
    gone = weakref.ref(result.outputs["2"][0])
    del result
    gc.collect()
    assert gone() is None


def test_components_are_handed_to_comfy_model_management(env: tuple) -> None:
    h, handle = env
    h.record.loaded.clear()
    with h.host():
        _decompose(env, _picture())
    patchers = {id(p) for p in h.record.loaded}
    assert patchers == {id(p) for p in handle.patchers.values()}  # transformer, VAE and text encoder
    for name, patcher in handle.patchers.items():
        assert patcher.model.inner is getattr(handle.model, name)
        assert patcher.offload_device == torch.device("cpu") and patcher.size > 0


def test_pack_without_model_files_lists_nothing_and_says_where_to_put_them(tmp_path: Path) -> None:
    h = ListHarness(pack_module("nodes").NODE_CLASS_MAPPINGS, tmp_path)  # empty models folders
    before = _files(tmp_path)
    with h.host():
        spec = model_nodes.QILLoadModel.INPUT_TYPES()
        assert spec["required"]["transformer"][0] == [] and spec["optional"]["diffusers_folder"][0] == ["none"]
        msg = model_nodes.QILLoadModel.VALIDATE_INPUTS(*FILES)
    assert f"model {FILES[0]!r} not found in models/diffusion_models (looked in: " in msg
    assert str(tmp_path / "models" / "diffusion_models") in msg
    assert _files(tmp_path) == before
    write_inputs(h.input_dir)
    with pytest.raises(GraphError, match="not found in models/diffusion_models"):
        h.run(fast(load_workflow("decompose_to_psd")))


def test_wrong_or_unsafe_model_files_are_named(env: tuple) -> None:
    h = env[0]
    loader = model_nodes.QILLoadModel()
    with h.host():
        assert "only .safetensors" in loader.VALIDATE_INPUTS("model.ckpt", FILES[1], FILES[2])
        assert "must be a name from the" in loader.VALIDATE_INPUTS("../../etc/passwd.safetensors", *FILES[1:])
        wrong = h.base / "models" / "diffusion_models" / "vae_in_the_wrong_folder.safetensors"
        shutil.copy2(h.base / MODEL_FILES["vae"], wrong)
        assert loader.VALIDATE_INPUTS(wrong.name, *FILES[1:]) is True
        with pytest.raises(errors.ModelMismatchError, match="vae_in_the_wrong_folder"):
            loader.load(wrong.name, *FILES[1:])
        with pytest.raises(errors.InputError, match="memory_mode"):
            loader.load(*FILES, memory_mode="everything")


def test_a_diffusers_folder_can_be_chosen_instead(env: tuple) -> None:
    h = env[0]
    tiny = pack_module("qil_core.model.weights.tiny")
    tiny.write_tiny_model(h.base / "models" / "diffusers" / "qwen_layered_tiny", layout="diffusers")
    with h.host():
        assert "qwen_layered_tiny" in model_nodes.QILLoadModel.INPUT_TYPES()["optional"]["diffusers_folder"][0]
        assert model_nodes.QILLoadModel.VALIDATE_INPUTS("gone.safetensors", "", "", "qwen_layered_tiny") is True
        (handle,) = model_nodes.QILLoadModel().load("gone.safetensors", "", "", diffusers_folder="qwen_layered_tiny")
        assert handle.files == {"model_dir": str(h.base / "models" / "diffusers" / "qwen_layered_tiny")}
        docs, images, _ = sample_nodes.QILDecompose().decompose(handle, _picture(), **SETTINGS)["result"][:3]
    assert len(docs) == 1 and images.shape == (2, 64, 64, 4)


@contextlib.contextmanager
def _weights_in_allocated_memory(model: Any, copy: bool = True) -> Iterator[None]:
    """The model runs on copies of its weights in memory torch allocates; its own tensors are put back afterwards.

    On a CPU the loader leaves the weights as memory-mapped views of the safetensors files, at file offsets that
    safetensors aligns to 8 bytes only, while offload and block swap compute on bit-identical copies in memory
    torch allocates (64-byte aligned). MKL's matrix-vector kernel (a Linear on one row, e.g. the timestep embedding when
    CFG runs sequentially) sums in another order when a weight is not 16-byte aligned, so the same weights give
    results ~1e-6 apart. Comparing a streaming mode with resident weights laid out like its copies keeps the
    assertion exact about what the memory mode changes. (On a GPU every mode computes on allocated copies.)
    """
    saved: list[tuple[Any, str, bool, torch.Tensor]] = []
    for component in (model.transformer, model.vae, model.text_encoder) if copy else ():
        for module in component.modules():
            saved += [(module, k, True, p.data) for k, p in module._parameters.items() if p is not None]
            saved += [(module, k, False, b) for k, b in module._buffers.items() if b is not None]
    try:
        for module, k, is_param, t in saved:
            if is_param:
                module._parameters[k].data = t.clone()
            else:
                module._buffers[k] = t.clone()
        yield
    finally:
        for module, k, is_param, t in saved:
            if is_param:
                module._parameters[k].data = t
            else:
                module._buffers[k] = t


@pytest.mark.parametrize("mode", ["offload", "block swap", "resident"])
def test_memory_modes_give_the_resident_layers(
    env: tuple, mode: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    h = env[0]
    # CFG runs sequentially in both runs whatever memory is free (the node's default, cfg_batch "auto", reads it).
    monkeypatch.setattr(pack_module("qil_core.model.pipeline.decompose"), "choose_cfg_batch", lambda *a, **k: False)
    with h.host():
        (handle,) = model_nodes.QILLoadModel().load(*FILES, memory_mode=mode)
        assert handle is not env[1]
        monkeypatch.setenv("QIL_ASSUME_FREE_RAM", "1M")  # almost no room on the device: every block streams
        with _weights_in_allocated_memory(env[1].model, copy=mode != "resident"):  # see there: same layout
            _, expected, _ = _decompose(env, _picture())  # memory mode auto, which is resident on a CPU
        with caplog.at_level(logging.INFO):
            _, got, _ = sample_nodes.QILDecompose().decompose(handle, _picture(), **SETTINGS)["result"][:3]
    assert torch.equal(got, expected)
    assert env[1].memory_mode == "auto" and env[1].resolved_mode == "resident"
    shown = {
        "offload": "; OffloadPlacement(device=cpu",
        "resident": "memory mode",
        "block swap": "; BlockSwapPlacement(device=cpu, resident_blocks=0",
    }[mode]
    assert (shown in caplog.text) == (mode != "resident")  # resident: ComfyUI's memory management, no streaming


@pytest.mark.parametrize(
    ("planned", "resolved"), [("block_swap", "block_swap"), ("offload", "resident"), ("resident", "resident")]
)
def test_auto_memory_mode_makes_room_then_follows_the_plan(
    env: tuple, monkeypatch: pytest.MonkeyPatch, planned: str, resolved: str
) -> None:
    h, handle = env
    plan_module = pack_module("qil_core.model.runtime.memory_plan")
    runtime = pack_module("nodes.model_runtime")
    asked: list[dict] = []

    def plan(model: Any, **kw: Any) -> Any:  # what memory_plan would say for a small GPU
        asked.append(kw)
        mode = planned if kw["mode"] == "auto" else kw["mode"]
        return plan_module.MemoryPlan(mode, torch.device("cuda"), ("vae",), resident_blocks=3)

    monkeypatch.setattr(plan_module, "plan_for_model", plan)
    gpu = runtime.QILModel(handle.model, handle.patchers, "auto", torch.device("cuda"))  # no CUDA is touched
    h.record.free_memory.clear()
    with h.host():
        with runtime.run_placement(gpu, 640, 480, 4) as placement:
            kind = type(placement).__name__
        with runtime.run_placement(gpu, 640, 480, 4):
            pass
    assert gpu.resolved_mode == resolved  # decided on the first run only
    assert asked[0] == {"width": 640, "height": 480, "layers": 4, "mode": "auto", "device": torch.device("cuda")}
    assert h.record.free_memory[0][1] == torch.device("cuda")  # ComfyUI was asked to unload other models first
    assert h.record.free_memory[0][0] >= sum(p.size for p in handle.patchers.values())
    if resolved == "block_swap":
        assert kind == "BlockSwapPlacement" and placement.resident_blocks == 3
        assert [a["mode"] for a in asked] == ["auto", "block_swap", "block_swap"]
    else:
        assert kind == "HostPlacement" and len(asked) == 1  # ComfyUI's own memory management from then on


def test_fp8_on_the_fly_quantises_the_transformer_blocks(env: tuple) -> None:
    quant = pack_module("qil_core.model.weights.quant")
    with env[0].host():
        (handle,) = model_nodes.QILLoadModel().load(*FILES, weight_dtype="fp8_e4m3fn")
        dit = handle.model.transformer
        assert isinstance(dit.transformer_blocks[0].attn.to_q, quant.Fp8Linear)
        assert not isinstance(dit.proj_out, quant.Fp8Linear) and not isinstance(dit.img_in, quant.Fp8Linear)
        _, images, _ = sample_nodes.QILDecompose().decompose(handle, _picture(), **SETTINGS)["result"][:3]
    assert torch.isfinite(images).all() and images.shape == (2, 64, 64, 4)


# ------------------------------------------------------------------ bad inputs (robustness.md 4.2)
@pytest.mark.parametrize("node", ["decompose", "text", "layer"])
def test_no_model_says_to_connect_the_loader(env: tuple, node: str) -> None:
    doc = sample_nodes.QILDecompose  # a LAYERS document for Decompose Layer
    with pytest.raises(errors.InputError, match="connect a Load Qwen-Layered node"):
        if node == "decompose":
            doc().decompose(None, _picture(), **SETTINGS)
        elif node == "text":
            sample_nodes.QILTextToLayers().generate(None, "x", " ", 64, 64, 2, 2, 4.0, True, 0)
        else:
            sample_nodes.QILDecomposeLayer().decompose_layer(
                {"not": "a model"}, {"version": 1, "layers": []}, "0", "x", " ", 2, 2, 4.0, True, 0, "640", 1024
            )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"layers": float("nan")}, "layers must be an integer in 1..20, got nan"),
        ({"layers": 0}, "layers must be in 1..20, got 0"),
        ({"layers": 21}, "layers must be in 1..20"),
        ({"steps": 0}, "steps must be in 1..1000"),
        ({"cfg": float("nan")}, "cfg must be a finite number"),
        ({"resolution": "777"}, "input 'resolution' must be one of 640, 1024, custom"),
        ({"max_side": 10}, "max_side"),
        ({"output_size": "huge"}, "output_size must be 'processing' or 'original'"),
        ({"seed": "abc"}, "seed must be an integer"),
    ],
)
def test_linked_bad_values_are_refused_before_any_work(env: tuple, change: dict, match: str) -> None:
    forwards = Forwards(env[1])
    try:
        with env[0].host(), pytest.raises(errors.InputError, match=match):
            _decompose(env, _picture(), **change)
    finally:
        forwards.remove()
    assert forwards.calls == 0


def test_image_shapes_and_the_mask(env: tuple) -> None:
    rgb = _picture()  # [1, 72, 96, 3]
    alpha = torch.zeros(72, 96)
    alpha[10:60, 20:80] = 1.0
    with env[0].host():
        base = _decompose(env, rgb)[1]
        assert torch.equal(_decompose(env, rgb[0])[1], base)  # [H, W, C]: the batch dimension is added
        gray = _decompose(env, rgb[..., :1])[1]  # [1, H, W, 1] is expanded to RGB
        assert gray.shape == base.shape
        rgba = _decompose(env, torch.cat([rgb, alpha[None, ..., None]], dim=-1))[1]
        assert not torch.equal(rgba, base)  # an RGBA image's alpha is used
        masked = _decompose(env, rgb, mask=1.0 - alpha)[1]  # MASK = 1 - alpha, [H, W] without batch
        assert torch.equal(masked, rgba)
        placeholder = _decompose(env, rgb, mask=torch.zeros(1, 64, 64))[1]  # Load Image without alpha
        assert torch.equal(placeholder, base)
        with pytest.raises(errors.InputError, match=r"expected IMAGE \[B, H, W, C\]"):
            _decompose(env, torch.rand(72, 96))
        with pytest.raises(errors.InputError, match="mask"):
            _decompose(env, rgb, mask=torch.ones(1, 64, 64))


def test_a_batch_gives_one_document_per_image_in_order(env: tuple, tmp_path: Path) -> None:
    a, b = _picture(), _picture().flip(2)
    with env[0].host():
        docs, images, masks = _decompose(env, torch.cat([a, b]))
        single, first, _ = _decompose(env, a)
    assert isinstance(docs, list) and len(docs) == 2 and len(docs[0]["layers"]) == 2
    assert images.shape == (4, 64, 64, 4) and masks.shape == (4, 64, 64)
    assert torch.equal(images[:2], first)  # image 0's layers first, bottom first
    assert torch.allclose(masks, 1.0 - images[..., 3])

    # In a graph every node after Decompose runs once per image: a two-frame file gives two PSDs.
    h = harness(tmp_path)
    frames = [Image.fromarray(sample_picture()), Image.fromarray(sample_picture()[:, ::-1].copy())]
    frames[0].save(h.input_dir / "two.tiff", save_all=True, append_images=frames[1:])
    graph = fast(load_workflow("decompose_to_psd"))
    graph["1"]["inputs"]["image"] = "two.tiff"
    result = h.run(graph)
    assert len(items(result.outputs["3"][0])) == 2 and result.outputs["3"][1].shape[0] == 8
    psds = sorted((h.output_dir / "QwenLayered").glob("*.psd"))
    assert [p.name for p in psds] == ["decomposed_00001_.psd", "decomposed_00002_.psd"]
    assert [[layer.name for layer in PSDImage.open(p)] for p in psds] == [
        ["Background", "Layer 1", "Layer 2", "Layer 3"]
    ] * 2
    assert len(result.ui["4"]["psd"]) == 2 and len(result.ui["5"]["images"]) == 8


def test_decompose_layer_splits_one_layer_in_place(env: tuple) -> None:
    with env[0].host():
        docs, _, _ = _decompose(env, _picture(), layers=3)
        node = sample_nodes.QILDecomposeLayer()
        args = ("a red box", " ", 2, 2, 4.0, True, 3, "custom", 64)
        ran = node.decompose_layer(env[1], docs[0], "Layer 1", *args)
        doc, subs, sub_masks, used = ran["result"]
        with pytest.raises(errors.InputError, match="selects 3 layers; choose exactly one"):
            node.decompose_layer(env[1], docs[0], "all", *args)
        with pytest.raises(errors.InputError, match="sub_layers must be in 1..20"):
            node.decompose_layer(env[1], docs[0], "0", "x", " ", 0, 2, 4.0, True, 3, "custom", 64)
    assert [item["name"] for item in doc["layers"]] == ["Background", "Layer 1 / 1", "Layer 1 / 2", "Layer 2"]
    assert subs.shape == (2, 64, 64, 4) and sub_masks.shape == (2, 64, 64)
    assert used == "a red box" and ran["ui"]["text"] == [used]  # a typed prompt is not captioned
    assert torch.equal(doc["layers"][3]["image"], docs[0]["layers"][2]["image"])  # the others are untouched
    parent_alpha = docs[0]["layers"][1]["image"][0, ..., 3].numpy()
    parent = np.zeros((64, 64), np.float32)
    item = docs[0]["layers"][1]
    parent[item["y"] : item["y"] + parent_alpha.shape[0], item["x"] : item["x"] + parent_alpha.shape[1]] = parent_alpha
    assert (subs[..., 3].numpy() <= parent[None] + 1e-6).all()  # sub-layers never paint outside their parent
