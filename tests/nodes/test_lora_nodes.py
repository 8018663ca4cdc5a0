"""Load LoRA (Qwen-Layered) and Sampler Settings (Qwen-Layered) as ComfyUI runs them (tiny model, CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from comfy_harness import pack_module
from lora_support import LIGHTNING_NAME, write_tiny_lora
from qil_graphs import MODEL_NAMES, ListHarness, harness, sample_picture
from safetensors.torch import save_file
from tiny_runs import fast_node_settings, one_thread

errors = pack_module("qil_core.errors")
model_nodes = pack_module("nodes.model_nodes")
sample_nodes = pack_module("nodes.sample_nodes")
lora_nodes = pack_module("nodes.lora_nodes")

pytestmark = pytest.mark.slow  # each test decomposes or loads models: seconds on a CPU


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ListHarness, Any]]:
    h = harness(tmp_path_factory.mktemp("lora_nodes"))
    with one_thread(), h.host():
        (handle,) = model_nodes.QILLoadModel().load(*MODEL_NAMES)
        write_tiny_lora(h.base / "models" / "loras" / "sub" / "second.safetensors", handle.model.transformer, seed=9)
        yield h, handle


def _images(handle: Any, **changes: Any) -> torch.Tensor:
    picture = torch.from_numpy(sample_picture()).float()[None] / 255.0
    return sample_nodes.QILDecompose().decompose(handle, picture, **fast_node_settings(**changes))["result"][1]


def test_chained_loras_change_the_result_and_never_the_base(env) -> None:
    h, base = env
    with h.host():
        assert lora_nodes.QILLoadLoRA.INPUT_TYPES()["required"]["lora_name"][0] == [
            LIGHTNING_NAME,
            "sub/second.safetensors",
        ]
        before = {k: v.clone() for k, v in base.model.transformer.state_dict().items()}
        plain = _images(base)
        (one,) = lora_nodes.QILLoadLoRA().load(base, LIGHTNING_NAME, 1.0)
        (two,) = lora_nodes.QILLoadLoRA().load(one, "sub/second.safetensors", 0.5)
        (again,) = lora_nodes.QILLoadLoRA().load(base, LIGHTNING_NAME, 0.3)
        assert again.loras[0][0] is one.loras[0][0]  # read once, cached on the file's fingerprint
        assert base.loras == () and [s for _, s in two.loras] == [1.0, 0.5]
        with_one, with_two = _images(one), _images(two)
        assert not torch.equal(with_one, plain) and not torch.equal(with_two, with_one)
        assert torch.equal(_images(base), plain)  # the loader's own output still gives the base model
        zero = lora_nodes.QILLoadLoRA().load(base, LIGHTNING_NAME, 0.0)[0]
        assert torch.equal(_images(zero), plain)
    after = base.model.transformer.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    key = lora_nodes.QILLoadLoRA.IS_CHANGED(lora_name=LIGHTNING_NAME, strength=1.0)
    assert key == lora_nodes.QILLoadLoRA.IS_CHANGED(lora_name=LIGHTNING_NAME, strength=1.0) and "missing" not in key


def test_bad_loras_are_refused_with_a_reason(env) -> None:
    h, base = env
    folder = h.base / "models" / "loras"
    save_file(
        {
            "double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 64),
            "double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(64, 2),
        },
        str(folder / "flux.safetensors"),
    )
    Path(folder / "old.ckpt").write_bytes(b"not a safetensors file")
    with h.host():
        with pytest.raises(errors.ModelMismatchError, match="Flux"):
            lora_nodes.QILLoadLoRA().load(base, "flux.safetensors", 1.0)
        with pytest.raises(errors.WeightsError, match="only .safetensors"):
            lora_nodes.QILLoadLoRA().load(base, "old.ckpt", 1.0)
        with pytest.raises(errors.ModelFileNotFoundError):
            lora_nodes.QILLoadLoRA().load(base, "missing.safetensors", 1.0)
        with pytest.raises(errors.InputError, match="model"):
            lora_nodes.QILLoadLoRA().load(None, LIGHTNING_NAME, 1.0)


def test_sampler_settings_set_the_schedule(env) -> None:
    h, base = env
    settings = lora_nodes.QILSamplerSettings()
    (ref,) = settings.apply(base, "linear", 0.0, "")
    assert ref.sampler is None  # the defaults are the reference schedule
    (light,) = settings.apply(base, "exponential", 1.0986, "")
    assert light.sampler.shift == 1.0986 and light.sampler.time_shift == "exponential" and base.sampler is None
    steps: list[int] = []
    hook = base.model.transformer.register_forward_hook(lambda *_: steps.append(1))
    try:
        with h.host():
            (custom,) = settings.apply(base, "linear", 0.0, "1, 0.6, 0.3", custom_sigmas=None)
            _images(custom, cfg=1.0)
            (sig,) = settings.apply(base, "linear", 0.0, "", custom_sigmas=torch.tensor([1.0, 0.5, 0.0]))
            _images(sig, cfg=1.0)
    finally:
        hook.remove()
    assert len(steps) == 3 + 2  # the sigmas set the steps, cfg 1 runs no negative pass
    with pytest.raises(errors.InputError, match="sigmas"):
        settings.apply(base, "linear", 0.0, "0.5, 0.9")
    with pytest.raises(errors.InputError, match="shift"):
        settings.apply(base, "linear", -1.0, "")
    with pytest.raises(errors.InputError, match="shift"):  # NaN is an error, not "automatic"
        settings.apply(base, "exponential", float("nan"), "")
