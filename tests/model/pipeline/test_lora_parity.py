"""LoRAs and sampler options against diffusers' QwenImageLayeredPipeline (tiny random weights, CPU, fp32).

A random PEFT LoRA saved by diffusers (`save_lora_weights`) on every kind of Linear (attention, MLP, modulation,
embeddings, output) is applied by diffusers (`load_lora_weights` + `set_adapters`) and by us; the decomposed
layers must agree within 1/255, for strengths 0.5 and 1.0, in the kohya and ComfyUI layouts, merged or on the
fly, and with two LoRAs stacked. Prompt embeddings are given, so no text encoder is needed.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_support import make_peft_lora, to_layout
from PIL import Image
from reference_models import LAYERED_SCHEDULER, tiny_diffusers_transformer, tiny_diffusers_vae

from qil_core.layers.composite import paste_layer
from qil_core.layers.stack import LayerStack
from qil_core.model.loader import load_model
from qil_core.model.pipeline.decompose import decompose
from qil_core.model.pipeline.sampler_options import SamplerOptions
from qil_core.model.weights.lora_apply import load_lora, lora_stack, remove_loras

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

pytestmark = pytest.mark.slow  # each test decomposes or loads models: seconds on a CPU

STEPS = 2
TXT_DIM = 48


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    dit = tiny_diffusers_transformer(seed=0)
    dit.save_pretrained(root / "transformer")
    tiny_diffusers_vae(seed=1).save_pretrained(root / "vae")
    lora_a = make_peft_lora(dit, root / "a", seed=11, rank=4, alpha=8.0)
    lora_b = make_peft_lora(dit, root / "b", seed=12, rank=2, alpha=2.0, targets=["to_q", "to_v", "img_mlp.net.2"])
    return {"root": root, "a": lora_a, "b": lora_b}


class _NoTextEncoder(torch.nn.Module):
    """Stands in for the text encoder (embeddings are given); the pipeline only reads its dtype."""

    dtype = torch.float32
    device = torch.device("cpu")


def _pipe(saved: dict[str, Path], **scheduler):
    p = diffusers.QwenImageLayeredPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**{**LAYERED_SCHEDULER, **scheduler}),
        vae=diffusers.AutoencoderKLQwenImage.from_pretrained(saved["root"] / "vae").eval(),
        text_encoder=_NoTextEncoder(),
        tokenizer=None,
        processor=None,
        transformer=diffusers.QwenImageTransformer2DModel.from_pretrained(saved["root"] / "transformer").eval(),
    )
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def model(saved: dict[str, Path]):
    root = saved["root"]
    return load_model(
        transformer=root / "transformer", vae=root / "vae", dtype=torch.float32, device="cpu", load_text=False
    )


def _image() -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:80].astype(np.float32)
    img = np.empty((64, 80, 4), np.float32)
    for c in range(3):
        img[..., c] = 0.5 + 0.4 * np.sin(xx / (6 + 3 * c)) * np.cos(yy / 9)
    img[20:44, 25:55, :3] = (0.9, 0.2, 0.4)
    img[..., 3] = np.clip(1.3 - ((xx - 40) ** 2 + (yy - 32) ** 2) / 2500, 0, 1)
    return np.rint(img * 255).astype(np.uint8)


EMBEDS = torch.randn(1, 9, TXT_DIM, generator=torch.Generator().manual_seed(3))
NEG = torch.randn(1, 5, TXT_DIM, generator=torch.Generator().manual_seed(4))
MASK = torch.ones(1, 9, dtype=torch.long)
NEG_MASK = torch.ones(1, 5, dtype=torch.long)


def _reference(pipe, cfg: float = 3.0, steps: int = STEPS) -> list:
    kwargs = dict(negative_prompt_embeds=NEG, negative_prompt_embeds_mask=NEG_MASK) if cfg > 1 else {}
    return pipe(
        image=Image.fromarray(_image(), "RGBA"),
        prompt="(given)",
        prompt_embeds=EMBEDS,
        prompt_embeds_mask=MASK,
        true_cfg_scale=cfg,
        layers=2,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(7),
        resolution=640,
        cfg_normalize=True,
        **kwargs,
    ).images[0]


def _ours(model, cfg: float = 3.0, steps: int = STEPS, sampler: SamplerOptions | None = None) -> LayerStack:
    neg = dict(negative_prompt=None, negative_embeds=NEG, negative_mask=NEG_MASK) if cfg > 1 else {}
    return decompose(
        model,
        _image(),
        prompt_embeds=EMBEDS,
        prompt_mask=MASK,
        layers=2,
        steps=steps,
        cfg=cfg,
        seed=7,
        resolution=640,
        cfg_batch=False,
        sampler=sampler,
        **neg,
    )[0]


def _max_diff(ref_images: list, stack: LayerStack) -> int:
    """Largest uint8 difference over alpha everywhere and RGB where our alpha > 0."""
    worst = 0
    for ref, layer in zip(ref_images, stack.layers, strict=True):
        want = np.asarray(ref).astype(np.int16)
        full = paste_layer(np.zeros((stack.height, stack.width, 4), np.float32), layer)
        got = np.rint(full * 255).astype(np.int16)
        seen = full[..., 3] > 0
        worst = max(
            worst,
            int(np.abs(want[..., 3] - got[..., 3]).max()),
            int(np.abs(want[..., :3] - got[..., :3])[seen].max()) if seen.any() else 0,
        )
    return worst


@pytest.fixture(scope="module")
def base_ours(saved, model):
    """Our decomposition without LoRA, checked once against diffusers'."""
    ours = _ours(model)
    assert _max_diff(_reference(_pipe(saved)), ours) <= 1
    return ours


def _forward(dit, peft: bool):
    """One transformer forward on fixed random inputs (diffusers' or ours)."""
    gen = torch.Generator().manual_seed(1)
    x, txt = torch.randn(1, 4 * 16, 64, generator=gen), torch.randn(1, 7, TXT_DIM, generator=gen)
    shapes = [(1, 4, 4)] * 4
    t = torch.tensor([0.6])
    with torch.no_grad():
        if peft:
            return dit(
                hidden_states=x,
                encoder_hidden_states=txt,
                encoder_hidden_states_mask=None,
                timestep=t,
                img_shapes=[shapes],
                additional_t_cond=torch.zeros(1, dtype=torch.long),
                return_dict=False,
            )[0]
        return dit(x, txt, None, t, shapes)


def test_every_layout_and_mode_matches_diffusers_on_the_transformer(saved, model, tmp_path) -> None:
    layouts = {
        "peft": saved["a"],
        "kohya": to_layout(saved["a"], tmp_path / "k.safetensors", "kohya"),
        "comfyui": to_layout(saved["a"], tmp_path / "c.safetensors", "comfyui"),
    }
    pipe = _pipe(saved)
    base = _forward(pipe.transformer, True)
    pipe.load_lora_weights(str(saved["a"]), adapter_name="a")
    for strength in (0.5, 1.0):
        pipe.set_adapters(["a"], adapter_weights=[strength])
        ref = _forward(pipe.transformer, True)
        assert (ref - base).abs().max() > 0.5, "the LoRA must change the output clearly"
        for layout, path in layouts.items():
            for mode in ("fly", "merge"):
                with _applied(model, path, strength, mode):
                    got = _forward(model.transformer, False)
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=f"{layout} {mode} {strength}")


class _applied:
    def __init__(self, model, path, strength, mode) -> None:
        self.args = (model, path, strength, mode)

    def __enter__(self) -> None:
        model, path, strength, mode = self.args
        self.handle = load_lora(model, path, strength, mode=mode)

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize(("strength", "layout", "mode"), [(0.5, "peft", "fly"), (1.0, "kohya", "merge")])
def test_peft_lora_decomposition_matches_diffusers(saved, model, base_ours, strength, layout, mode, tmp_path) -> None:
    pipe = _pipe(saved)
    pipe.load_lora_weights(str(saved["a"]), adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[strength])
    ref = _reference(pipe)
    assert _max_diff(ref, base_ours) > 8, "the LoRA must change the result clearly, or the test proves nothing"
    path = saved["a"] if layout == "peft" else to_layout(saved["a"], tmp_path / "l.safetensors", layout)
    with _applied(model, path, strength, mode):
        assert _max_diff(ref, _ours(model)) <= 1


# The reference side loads a second adapter on purpose; peft warns about that.
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")
def test_two_stacked_loras_match_diffusers_with_two_adapters(saved, model) -> None:
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    pipe = _pipe(saved)
    pipe.load_lora_weights(str(saved["a"]), adapter_name="a")
    pipe.load_lora_weights(str(saved["b"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 1.5])
    ref = _reference(pipe)
    load_lora(model, saved["a"], 0.7)
    hb = load_lora(model, saved["b"], 1.5, mode="merge")  # one merged, one on the fly: still the same sum
    assert len(lora_stack(model).entries) == 2
    assert _max_diff(ref, _ours(model)) <= 1
    hb.remove()
    remove_loras(model)
    after = model.transformer.state_dict()
    assert list(after) == list(before)  # the state dict keys never change
    assert all(torch.equal(after[k], before[k]) for k in before), "removing every LoRA must restore the base exactly"
    assert not any("qil_lora" in n for n, _ in model.transformer.named_modules())


def test_exponential_time_shift_matches_diffusers_scheduler(saved, model) -> None:
    """diffusers' exponential time shift with the pipeline's own mu, and cfg 1 (no negative pass) with a fixed mu."""
    ref = _reference(_pipe(saved, time_shift_type="exponential"))
    assert _max_diff(ref, _ours(model, sampler=SamplerOptions(time_shift="exponential"))) <= 1
    # lightx2v's Lightning schedule: exponential, mu = ln 3 for every size, 4 steps, cfg 1
    light = _pipe(saved, time_shift_type="exponential", base_shift=math.log(3), max_shift=math.log(3))
    light.scheduler.set_timesteps = _fixed_mu(light.scheduler.set_timesteps, math.log(3))
    ref = _reference(light, cfg=1.0, steps=4)
    ours = _ours(model, cfg=1.0, steps=4, sampler=SamplerOptions(shift=math.log(3), time_shift="exponential"))
    assert _max_diff(ref, ours) <= 1


def _fixed_mu(set_timesteps, mu: float):
    """The Layered pipeline passes mu = sqrt(L/256); Lightning's config means a fixed mu: override it."""

    @functools.wraps(set_timesteps)
    def wrapped(*args, **kwargs):
        kwargs["mu"] = mu
        return set_timesteps(*args, **kwargs)

    return wrapped
