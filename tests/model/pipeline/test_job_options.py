"""The job options: one frozen dataclass per job, validated on construction, each default/range/help written once."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from qil_core.errors import InputError
from qil_core.model.pipeline.decompose import JobInputs, split_options
from qil_core.model.pipeline.options import (
    MAX_LAYERS,
    DecomposeLayerOptions,
    DecomposeOptions,
    SamplingOptions,
    TextToLayersOptions,
)
from qil_core.model.policy import LoadPolicy
from qil_core.options import specs

ROOT = Path(__file__).resolve().parents[3]
CLASSES = (DecomposeOptions, TextToLayersOptions, DecomposeLayerOptions, LoadPolicy)


def test_defaults_are_the_reference_settings_and_the_objects_are_frozen() -> None:
    d = DecomposeOptions()
    assert (d.layers, d.steps, d.cfg, d.cfg_normalize, d.seed) == (4, 50, 4.0, True, 0)
    assert (d.resolution, d.max_side, d.output_size, d.negative_prompt) == (640, None, "processing", " ")
    assert d.prompt is None
    assert DecomposeLayerOptions().layers == 2 and TextToLayersOptions().width == 640
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.layers = 5  # type: ignore[misc]
    assert d.changed(layers=6).layers == 6 and d.layers == 4


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"layers": 0}, "layers must be in 1..20"),
        ({"steps": 1001}, "steps must be in 1..1000"),
        ({"cfg": math.nan}, "cfg must be a finite number in 1..100"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"output_size": "full"}, "output_size must be 'processing' or 'original'"),
        ({"resolution": 512}, "resolution must be 640, 1024 or 'custom'"),
        ({"resolution": "custom"}, "resolution 'custom' needs max_side"),
        ({"cfg_normalize": "yes"}, "cfg_normalize must be true or false"),
        ({"vae_tile": 30}, "vae_tile must be None"),
        ({"prompt": b"bytes"}, "prompt must be a str"),
    ],
)
def test_every_value_is_checked_when_the_object_is_made(values: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        DecomposeOptions(**values)


def test_values_are_normalised_once() -> None:
    d = DecomposeOptions(resolution="1024", seed=-1, layers=True + 2)
    assert d.resolution == 1024 and d.seed == 2**64 - 1 and d.layers == 3
    assert DecomposeOptions(resolution="Custom", max_side=256).resolution == "custom"
    assert DecomposeOptions(**DecomposeOptions().values()) == DecomposeOptions()


def test_build_names_the_inputs_as_the_front_end_shows_them() -> None:
    with pytest.raises(InputError, match=r"^--layers must be in 1\.\.20, got 0"):
        DecomposeOptions.build({"layers": 0}, lambda n: "--" + n.replace("_", "-"))
    with pytest.raises(InputError, match=r"--resolution 'custom' needs max_side \(--max-side\)"):
        DecomposeOptions.build({"resolution": "custom"}, lambda n: "--" + n.replace("_", "-"))
    with pytest.raises(InputError, match="unknown option"):
        DecomposeOptions.build({"layer": 3})


def test_keyword_wrappers_split_options_from_job_inputs() -> None:
    opts, given = split_options(DecomposeOptions, None, {"layers": 3, "callback": print})
    assert opts.layers == 3 and given == JobInputs(callback=print)
    base = DecomposeOptions(steps=7)
    opts, _ = split_options(DecomposeOptions, base, {"layers": 5})
    assert (opts.layers, opts.steps) == (5, 7)
    with pytest.raises(TypeError):
        split_options(DecomposeOptions, None, {"no_such_option": 1})
    with pytest.raises(InputError, match="options must be a DecomposeOptions"):
        split_options(DecomposeOptions, TextToLayersOptions(), {})


def test_shared_options_have_one_definition_in_every_job() -> None:
    shared = {f.name: spec for f, spec in specs(SamplingOptions)}
    for cls in CLASSES[:3]:
        for f, spec in specs(cls):
            if f.name in shared and f.name not in {"prompt", "layers"}:  # each job words these two itself
                assert spec is shared[f.name], (cls.__name__, f.name)
    layers = [dict((f.name, s) for f, s in specs(cls))["layers"] for cls in CLASSES[:3]]
    assert {(s.lo, s.hi) for s in layers} == {(1, MAX_LAYERS)}


def _sources() -> str:
    files = [*sorted((ROOT / "qil_core").rglob("*.py")), *sorted((ROOT / "nodes").glob("*.py"))]
    return "\n".join(p.read_text(encoding="utf-8") for p in files)


def test_each_help_text_is_written_once_in_the_source() -> None:
    source = _sources()
    seen: set[str] = set()
    for cls in CLASSES:
        for _, spec in specs(cls):
            start = re.split(r"[\"']", spec.help)[0][:40]  # the first source line holds at least this much
            if start in seen:
                continue
            seen.add(start)
            assert source.count(start) == 1, (cls.__name__, start)


def test_front_ends_restate_no_limit_or_default() -> None:
    for rel in ("nodes/sample_nodes.py", "nodes/sample_inputs.py", "nodes/model_nodes.py", "qil_core/cli/model.py"):
        text = (ROOT / rel).read_text(encoding="utf-8")
        for word in ('"min":', '"max":', '"1024"', "4096", '("processing"', "bfloat16", '"640"'):
            assert word not in text, (rel, word)
        assert text.count('"block swap"') == (rel == "nodes/model_nodes.py")  # only in the table of old spellings
