"""Memory planning: the cost-model estimates, mode choice from free memory, fallbacks, and identical decompositions."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from perf_models import random_transformer, tiny_vae

from qil_core.errors import InputError, ResourceError
from qil_core.model.runtime import memory_plan as mp
from qil_core.model.runtime.offload import BlockSwapPlacement, OffloadPlacement
from qil_core.model.runtime.placement import ResidentPlacement

GB = 10**9
# Weight sizes of the real model (performance.md): transformer, text encoder, VAE.
BF16 = {"transformer": int(40.86 * GB), "text_encoder": int(16.6 * GB), "vae": int(0.25 * GB)}
FP8 = {"transformer": int(20.43 * GB), "text_encoder": 9 * GB, "vae": int(0.25 * GB)}
REST_BF16 = 40_529_472 * 2  # parameters outside the 60 blocks (model_spec §4.5), kept in bf16
BLOCK_BF16 = 339_831_296 * 2
BLOCK_FP8 = 339_831_296  # every block Linear in fp8 (norm weights and biases are a rounding error here)


def _real(components: dict[str, int], block: int, width: int, height: int, layers: int, **kw) -> mp.MemoryPlan:
    tokens = mp.image_tokens(width, height, layers) + 200
    fp8 = block == BLOCK_FP8
    return mp.plan_memory(
        component_bytes=components, block_bytes=[block] * 60,
        activation_bytes=mp.estimate_activation_bytes(tokens, fp8=fp8),
        vae_work_bytes=mp.estimate_vae_decode_bytes(width, height), free_ram_bytes=128 * GB, **kw,
    )  # fmt: skip


def test_estimates_follow_the_cost_model() -> None:
    assert mp.image_tokens(640, 640, 4) == 6 * 1600
    assert mp.image_tokens(1024, 1024, 8) == 10 * 4096
    assert mp.estimate_activation_bytes(1) == 86_016  # 86 KB per token in bf16
    big = mp.estimate_activation_bytes(mp.image_tokens(1024, 1024, 8))
    assert 3.4 * GB < big < 3.6 * GB  # "3.5 GB at 1024²/N=8"
    assert mp.estimate_activation_bytes(100, batch=2) == 2 * mp.estimate_activation_bytes(100)
    assert mp.estimate_activation_bytes(100, dtype=torch.float32) == 2 * mp.estimate_activation_bytes(100)
    assert mp.estimate_activation_bytes(0, fp8=True) == 2 * 4 * 3072 * 3072 * 2  # two bf16 copies of the MLP weight
    assert mp.estimate_vae_decode_bytes(1000, 1000) == 4.2 * GB
    assert mp.estimate_vae_decode_bytes(1000, 1000, frames=8) == 8 * 4.2 * GB
    with pytest.raises(InputError):
        mp.estimate_activation_bytes(-1)


def test_h200_keeps_everything_resident() -> None:
    plan = _real(BF16, BLOCK_BF16, 1024, 1024, 8, free_device_bytes=139 * GB)
    assert plan.mode == "resident" and set(plan.keep) == set(BF16)
    assert isinstance(plan.placement(), ResidentPlacement)
    assert plan.peak_bytes < 46 * GB + BF16["text_encoder"]  # "under 46 GB with bf16 weights" + the encoder


def test_bf16_on_48gb_offloads_with_eviction() -> None:
    plan = _real(BF16, BLOCK_BF16, 640, 640, 4, free_device_bytes=48 * GB)
    assert plan.mode == "offload" and set(plan.keep) == set(BF16)
    placement = plan.placement()
    assert isinstance(placement, OffloadPlacement) and placement.budget_bytes == plan.budget_bytes
    assert plan.phase_bytes["transformer"] == BF16["transformer"] + plan.work_bytes["transformer"]
    assert plan.peak_bytes <= plan.budget_bytes


def test_offload_eviction_makes_room_in_lru_order() -> None:
    te, dit, vae = (torch.nn.Linear(n, 100, bias=False) for n in (300, 500, 10))  # 120, 200, 4 KB of fp32
    placement = OffloadPlacement(
        "cpu", keep=("text_encoder", "transformer", "vae"), budget_bytes=320_000, work_bytes={"transformer": 5_000}
    )
    for name, module in (("text_encoder", te), ("vae", vae)):
        with placement.use(name, module):
            pass
    assert placement.device_bytes() == 124_000 and placement.evictions == 0
    with placement.use("transformer", dit):  # 200 KB + 5 KB work: the text encoder must go, the VAE may stay
        assert placement.device_bytes() == 204_000
    assert placement.evictions == 1
    placement.release("transformer", dit)  # released: first to go when the text encoder returns
    with placement.use("text_encoder", te):
        assert placement.device_bytes() == 124_000
    assert placement.evictions == 2


def test_fp8_on_24gb_card_uses_block_swap_under_23gb() -> None:
    fp8 = dict(FP8, transformer=REST_BF16 + 60 * BLOCK_FP8)
    free = int(23.5 * GB)
    plan = _real(fp8, BLOCK_FP8, 1024, 1024, 8, free_device_bytes=free)
    assert plan.mode == "block_swap" and 0 < plan.resident_blocks < 60
    assert plan.peak_bytes <= 23 * GB  # the performance target for 1024²/N=8 with block swap
    placement = plan.placement()
    assert isinstance(placement, BlockSwapPlacement) and placement.resident_blocks == plan.resident_blocks
    # the text encoder (9 GB) cannot share the card with 40+ resident blocks: they are re-sent each run instead
    assert not plan.keep_resident
    act = plan.work_bytes["transformer"]
    k = (plan.budget_bytes - REST_BF16 - act - fp8["vae"]) // BLOCK_FP8 - 2  # running + prefetched block
    assert plan.resident_blocks == k
    assert plan.phase_bytes["transformer"] == REST_BF16 + (k + 2) * BLOCK_FP8 + act + fp8["vae"]


def test_forced_mode_is_honoured_or_falls_back() -> None:
    plan = _real(FP8, BLOCK_FP8, 640, 640, 4, free_device_bytes=80 * GB, mode="offload")
    assert plan.mode == "offload" and set(plan.keep) == set(FP8)
    plan = _real(FP8, BLOCK_FP8, 640, 640, 4, free_device_bytes=80 * GB, mode="block_swap")
    assert plan.mode == "block_swap" and plan.resident_blocks == 60
    plan = _real(BF16, BLOCK_BF16, 640, 640, 4, free_device_bytes=24 * GB, mode="resident")
    assert plan.mode == "block_swap" and any("fell back" in n for n in plan.notes)
    with pytest.raises(InputError, match="memory mode"):
        _real(BF16, BLOCK_BF16, 640, 640, 4, free_device_bytes=24 * GB, mode="fast")


def test_never_oversubscribes() -> None:
    rng = random.Random(0)
    for _ in range(300):
        comp = {"transformer": rng.randint(1, 50) * GB, "vae": rng.randint(1, 500) * 10**6}
        if rng.random() < 0.5:
            comp["text_encoder"] = rng.randint(1, 20) * GB
        n = rng.choice([1, 4, 60])
        free = rng.randint(1, 100) * GB
        mode = rng.choice(mp.MODES)
        try:
            plan = mp.plan_memory(
                free_device_bytes=free,
                free_ram_bytes=None,
                component_bytes=comp,
                mode=mode,
                activation_bytes=rng.randint(0, 5) * GB,
                block_bytes=[comp["transformer"] // n] * n,
            )
        except ResourceError as e:
            assert "not enough device memory" in str(e)
            continue
        assert plan.peak_bytes <= plan.budget_bytes < free
        assert set(plan.phase_bytes) == {k for k in mp.PHASES if k in comp}


def test_too_little_memory_raises() -> None:
    with pytest.raises(ResourceError, match="fewer layers"):
        _real(BF16, BLOCK_BF16, 1024, 1024, 8, free_device_bytes=4 * GB)


def test_cpu_and_unknown_memory_stay_resident() -> None:
    plan = _real(BF16, BLOCK_BF16, 640, 640, 4, free_device_bytes=8 * GB, device="cpu")
    assert plan.mode == "resident" and isinstance(plan.placement(), ResidentPlacement)
    plan = _real(BF16, BLOCK_BF16, 640, 640, 4, free_device_bytes=None)
    assert plan.mode == "resident" and "unknown" in plan.notes[0]
    plan = _real(
        BF16, BLOCK_BF16, 640, 640, 4, free_device_bytes=None, device="cpu", mode="block_swap", resident_blocks=3
    )
    assert plan.mode == "block_swap" and plan.placement().resident_blocks == 3


def test_cfg_batch_fits() -> None:
    tokens = mp.image_tokens(640, 640, 4) + 150
    assert mp.cfg_batch_fits(tokens, free_device_bytes=20 * GB)
    assert not mp.cfg_batch_fits(tokens, free_device_bytes=2 * GB)
    assert not mp.cfg_batch_fits(tokens, free_device_bytes=None)
    one = mp.estimate_activation_bytes(tokens)
    # just enough for one sample but not two: sequential CFG
    assert not mp.cfg_batch_fits(tokens, free_device_bytes=int(1.5 * one) + mp.RESERVE_BYTES)
    free = 10 * GB
    assert mp.cfg_batch_fits(tokens, free_device_bytes=free)
    assert not mp.cfg_batch_fits(tokens, free_device_bytes=free, transient_bytes=8 * GB)


def _model() -> SimpleNamespace:
    return SimpleNamespace(
        transformer=random_transformer(),
        vae=tiny_vae(),
        text_encoder=None,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


def test_plan_for_model_measures_the_modules() -> None:
    model = _model()
    dit, vae = model.transformer, model.vae
    blocks = mp.transformer_block_bytes(dit)
    assert len(blocks) == 3 and 0 < sum(blocks) < mp.module_bytes(dit)
    act = mp.estimate_activation_bytes(
        mp.image_tokens(64, 64, 2) + 200, width=dit.config.inner_dim, dtype=torch.float32
    )
    plan = mp.plan_for_model(
        model, width=64, height=64, layers=2, device="cuda", free_device_bytes=10 * GB, free_ram_bytes=10 * GB
    )
    weights = mp.module_bytes(dit) + mp.module_bytes(vae)
    assert plan.mode == "resident" and plan.phase_bytes == {
        "transformer": weights + act,
        "vae": weights + mp.estimate_vae_decode_bytes(64, 64, dtype=torch.float32),
    }
    batched = mp.plan_for_model(
        model, width=64, height=64, layers=2, device="cuda", free_device_bytes=10 * GB, cfg_batch=True
    )
    assert batched.work_bytes["transformer"] == 2 * act
    # a device a little short of holding everything at once: components take turns
    tight = mp.plan_for_model(
        model,
        width=64,
        height=64,
        layers=2,
        device="cuda",
        free_ram_bytes=10 * GB,
        free_device_bytes=int((plan.phase_bytes["vae"] - 1 + mp.RESERVE_BYTES) / 0.95),
    )
    assert tight.mode == "offload" and tight.peak_bytes <= tight.budget_bytes < plan.peak_bytes


@pytest.fixture(scope="module")
def bundle():
    from qil_core.model.loader import QwenLayeredModel

    return QwenLayeredModel(
        random_transformer(seed=5), tiny_vae(seed=6), dtype=torch.float32, device=torch.device("cpu")
    )


def _decompose(bundle, placement, cfg_batch: bool) -> list[tuple[int, int, np.ndarray]]:
    from qil_core.model.pipeline.decompose import decompose

    gen = torch.Generator().manual_seed(2)
    img = (np.random.default_rng(0).random((64, 64, 4)) * 255).astype(np.uint8)
    pos, neg = torch.randn(1, 5, 48, generator=gen), torch.randn(1, 3, 48, generator=gen)
    stack = decompose(
        bundle,
        img,
        prompt_embeds=pos,
        negative_embeds=neg,
        layers=2,
        steps=2,
        resolution="custom",
        max_side=64,
        placement=placement,
        cfg_batch=cfg_batch,
        seed=7,
    )[0]
    return [(layer.x, layer.y, layer.pixels) for layer in stack.layers]


@pytest.mark.slow
@pytest.mark.parametrize("cfg_batch", [False, True], ids=["sequential-cfg", "batched-cfg"])
def test_decompositions_identical_across_modes(bundle, cfg_batch: bool) -> None:
    plans = {
        mode: mp.plan_memory(free_device_bytes=None, free_ram_bytes=None, device="cpu", mode=mode,
                             component_bytes={"transformer": 1, "vae": 1}, activation_bytes=0, block_bytes=[0] * 3,
                             resident_blocks=1)
        for mode in ("resident", "offload", "block_swap")
    }  # fmt: skip
    outs = {mode: _decompose(bundle, plan.placement(torch.float32), cfg_batch) for mode, plan in plans.items()}
    outs["swap-prefetch"] = _decompose(bundle, BlockSwapPlacement("cpu", 0, prefetch=True), cfg_batch)
    base = outs.pop("resident")
    assert len(base) == 2 and all(np.ptp(px) > 0 for _, _, px in base)
    for mode, out in outs.items():
        assert [(x, y) for x, y, _ in out] == [(x, y) for x, y, _ in base], mode
        assert all(np.array_equal(a, b) for (_, _, a), (_, _, b) in zip(out, base, strict=True)), mode


def test_pipeline_auto_cfg_batch_uses_cfg_batch_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    from qil_core.model.pipeline.denoise import choose_cfg_batch

    dit = random_transformer()
    tokens = 5000
    need = mp.estimate_activation_bytes(tokens, width=dit.config.inner_dim, dtype=torch.float32, batch=2)
    for free, expected in ((need // 2, False), (10 * need + 2 * mp.RESERVE_BYTES, True)):
        monkeypatch.setenv("QIL_ASSUME_FREE_RAM", str(free))
        assert choose_cfg_batch("auto", dit, tokens, torch.float32, torch.device("cpu")) is expected
        assert (
            mp.cfg_batch_fits(tokens, free_device_bytes=free, width=dit.config.inner_dim, dtype=torch.float32)
            is expected
        )
    assert choose_cfg_batch(True, dit, tokens, torch.float32, torch.device("cpu")) is True
