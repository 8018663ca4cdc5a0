"""The node widgets are generated from the library's options: same defaults, limits, choices and help; saved
workflows with old spellings (memory_mode 'block swap') still validate and run."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from comfy_harness import pack_module
from qil_graphs import fast, harness, load_workflow

options = pack_module("qil_core.model.pipeline.options")
policy = pack_module("qil_core.model.policy")
spec_of = pack_module("qil_core.options").spec_of
sample_nodes = pack_module("nodes.sample_nodes")
sample_inputs = pack_module("nodes.sample_inputs")
model_nodes = pack_module("nodes.model_nodes")
errors = pack_module("qil_core.errors")

NODES = [
    (sample_nodes.QILDecompose, options.DecomposeOptions, sample_inputs.DECOMPOSE_WIDGETS, {}),
    (sample_nodes.QILTextToLayers, options.TextToLayersOptions, sample_inputs.TEXT_TO_LAYERS_WIDGETS, {}),
    (
        sample_nodes.QILDecomposeLayer,
        options.DecomposeLayerOptions,
        sample_inputs.DECOMPOSE_LAYER_WIDGETS,
        sample_inputs.DECOMPOSE_LAYER_RENAME,
    ),
]


@pytest.mark.parametrize(("node", "cls", "names", "rename"), NODES)
def test_sampling_widgets_agree_with_the_option_fields(node: type, cls: type, names: list, rename: dict) -> None:
    required = node.INPUT_TYPES()["required"]
    for name in names:
        f, spec = spec_of(cls, name)
        kind, settings = required[rename.get(name, name)]
        assert settings["tooltip"] == spec.help
        if spec.choices:
            assert kind == list(spec.choices) and settings["default"] == str(f.default)
            continue
        assert kind == {int: "INT", float: "FLOAT", bool: "BOOLEAN", str: "STRING"}[spec.kind]
        for key, limit in (("min", spec.lo), ("max", spec.hi)):
            assert settings.get(key) == spec.widget.get(key, limit), (name, key)
        assert settings["default"] == spec.widget.get("default", f.default)


@pytest.mark.parametrize(("node", "cls", "names", "rename"), NODES)
def test_widget_defaults_are_valid_options(node: type, cls: type, names: list, rename: dict) -> None:
    required = node.INPUT_TYPES()["required"]
    values = {rename.get(n, n): required[rename.get(n, n)][1]["default"] for n in names}
    opts = pack_module("nodes.widgets").options_from_widgets(cls, values, rename)
    for name in names:  # equal to the library's defaults except where the node shows its own (spec.widget)
        f, spec = spec_of(cls, name)
        if "default" not in spec.widget:
            assert getattr(opts, name) == f.default, name


def test_loader_widgets_come_from_the_load_policy() -> None:
    required = model_nodes.QILLoadModel.INPUT_TYPES()["required"]
    memory, dtype = required["memory_mode"], required["weight_dtype"]
    assert memory[0] == list(policy.MEMORY_MODES) == ["auto", "resident", "offload", "block_swap"]
    assert memory[1]["default"] == "auto" and memory[1]["tooltip"] == spec_of(policy.LoadPolicy, "memory")[1].help
    assert dtype[0] == ["default", *policy.DTYPES, "fp8_e4m3fn", "int8_convrot"] and dtype[1]["default"] == "default"
    p = model_nodes.load_policy("fp8_e4m3fn", "block swap")  # an old spelling, read through the LEGACY table
    assert (p.dtype, p.quant_format(), p.memory) == ("default", "fp8", "block_swap")
    assert model_nodes.load_policy("int8_convrot", "auto").quant_format() == "int8-convrot"
    assert model_nodes.load_policy("fp16", "block_swap") == policy.LoadPolicy(dtype="fp16", memory="block_swap")
    with pytest.raises(errors.InputError, match="input 'memory_mode' must be one of auto, resident, offload"):
        model_nodes.load_policy("default", "everything")
    with pytest.raises(errors.InputError, match="input 'weight_dtype' must be one of default, bf16"):
        model_nodes.load_policy("fp64", "auto")


def _with_memory_mode(name: str, mode: str) -> dict[str, Any]:
    graph = copy.deepcopy(load_workflow(name))
    (loader,) = [n for n in graph.values() if n["class_type"] == "QILLoadModel"]
    loader["inputs"]["memory_mode"] = mode
    return graph


def test_a_saved_workflow_with_the_old_block_swap_spelling_validates_and_runs(tmp_path: Path) -> None:
    h = harness(tmp_path)
    graph = fast(_with_memory_mode("text_to_layers", "block swap"))
    h.validate(graph)  # ComfyUI leaves memory_mode to VALIDATE_INPUTS, which reads the old spelling
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = h.run(graph)
    finally:
        torch.set_num_threads(threads)
    assert sorted(result.executed, key=int) == sorted(graph, key=int)
    (loader_id,) = [k for k, n in graph.items() if n["class_type"] == "QILLoadModel"]
    assert result.outputs[loader_id][0].memory_mode == "block_swap"
    assert len(list((h.output_dir / "QwenLayered").rglob("*.psd"))) == 1
    bad = fast(_with_memory_mode("text_to_layers", "everything"))
    with pytest.raises(Exception, match="memory_mode"):
        h.validate(bad)
