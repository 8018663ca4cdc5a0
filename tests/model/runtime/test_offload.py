"""Offload and block-swap placements: bit-identical outputs to the resident model, bounded residency, clean exits."""

from __future__ import annotations

import pytest
import torch
from perf_models import TINY, random_transformer, transformer_inputs

from qil_core.errors import InputError
from qil_core.model.runtime.offload import BlockSwapPlacement, ModuleStore, OffloadPlacement
from qil_core.model.runtime.placement import Placement, ResidentPlacement
from qil_core.model.weights.quant import quantize_module_fp8


def _run(placement: Placement, model: torch.nn.Module, inputs: dict, forwards: int = 1) -> list[torch.Tensor]:
    outs = []
    with torch.inference_mode(), placement.use("transformer", model) as dit:
        for _ in range(forwards):
            outs.append(dit(**inputs))
    placement.release("transformer", model)
    return outs


def _host_ptrs(model: torch.nn.Module) -> dict[str, int]:
    return {k: v.data_ptr() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_transformer()


@pytest.fixture(scope="module")
def inputs() -> dict:
    return transformer_inputs()


@pytest.fixture(scope="module")
def reference(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return _run(ResidentPlacement("cpu"), model, inputs)[0]


PLACEMENTS = {
    "offload": lambda: OffloadPlacement("cpu"),
    "offload-keep": lambda: OffloadPlacement("cpu", keep=("transformer",)),
    **{
        f"swap-k{k}-prefetch{int(p)}": (lambda k=k, p=p: BlockSwapPlacement("cpu", k, prefetch=p))
        for k in (0, 1, 3, 7)
        for p in (False, True)
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_outputs_bit_identical_to_resident(name: str, model, inputs, reference) -> None:
    placement = PLACEMENTS[name]()
    assert isinstance(placement, Placement)
    before = _host_ptrs(model)
    outs = _run(placement, model, inputs, forwards=3)
    for out in outs:  # repeated forwards reuse the wrap-around prefetch: still exact
        assert torch.equal(out, reference)
    if name == "offload":
        assert _host_ptrs(model) == before and placement.device_bytes() == 0
    placement.unload()
    assert _host_ptrs(model) == before and placement.device_bytes() == 0


def test_block_swap_residency_and_hooks(model, inputs) -> None:
    blocks = model.transformer_blocks
    host = [_host_ptrs(b) for b in blocks]
    seen: list[tuple[int, bool, int]] = []
    placement = BlockSwapPlacement("cpu", resident_blocks=1, prefetch=True)
    with torch.inference_mode(), placement.use("transformer", model) as dit:
        hooks = [b.register_forward_pre_hook(
            lambda m, a, i=i: seen.append((i, _host_ptrs(m) != host[i], placement.device_bytes())))
            for i, b in enumerate(blocks)]  # fmt: skip
        dit(**inputs)
        for h in hooks:
            h.remove()
    # every block runs on copies, never on the host tensors
    assert [i for i, on_copy, _ in seen] == [0, 1, 2] and all(on_copy for _, on_copy, _ in seen)
    block = sum(t.numel() * t.element_size() for t in blocks[0].state_dict().values())
    rest = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if "transformer_blocks" not in k)
    # while block 1 runs: rest + resident block 0 + block 1 + prefetched block 2
    assert seen[1][2] == rest + 3 * block
    assert placement.stats.peak_streamed_blocks == 2
    # after the use: hooks gone, streamed blocks back on their host tensors, resident part still on the device
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in blocks)
    assert [_host_ptrs(b) for b in blocks[1:]] == host[1:]
    assert _host_ptrs(blocks[0]) != host[0]
    assert placement.device_bytes() == rest + block
    placement.unload()
    assert placement.device_bytes() == 0 and [_host_ptrs(b) for b in blocks] == host


def test_block_swap_without_prefetch_holds_one_block(model, inputs, reference) -> None:
    placement = BlockSwapPlacement("cpu", resident_blocks=0, prefetch=False, keep_resident=False)
    assert torch.equal(_run(placement, model, inputs, forwards=2)[1], reference)
    assert placement.stats.peak_streamed_blocks == 1
    assert placement.stats.uploads == 2 * TINY.num_layers
    assert placement.device_bytes() == 0  # keep_resident=False: release dropped the rest too


def test_block_swap_counts_uploads_with_prefetch(model, inputs) -> None:
    placement = BlockSwapPlacement("cpu", resident_blocks=1, prefetch=True)
    _run(placement, model, inputs, forwards=2)
    # 2 streamed blocks per forward, plus the wrap-around prefetch issued by the last block of the last forward
    assert placement.stats.uploads == 2 * 2 + 1
    block = sum(t.numel() * t.element_size() for t in model.transformer_blocks[1].state_dict().values())
    assert placement.stats.bytes_uploaded == 5 * block
    placement.unload()


def test_fp8_blocks_stream_as_fp8() -> None:
    model = random_transformer(seed=3)
    quantize_module_fp8(model, skip=("img_in", "txt_in", "proj_out", "norm_out.*", "time_text_embed.*"))
    inputs = transformer_inputs()
    reference = _run(ResidentPlacement("cpu"), model, inputs)[0]
    dtypes = []
    placement = BlockSwapPlacement("cpu", resident_blocks=0, prefetch=True)
    with torch.inference_mode(), placement.use("transformer", model) as dit:
        h = model.transformer_blocks[1].register_forward_pre_hook(
            lambda m, a: dtypes.append((m.attn.to_q.weight.dtype, m.attn.to_q.weight_scale.dtype))
        )
        out = dit(**inputs)
        h.remove()
    assert dtypes == [(torch.float8_e4m3fn, torch.float32)]
    assert torch.equal(out, reference)
    block = model.transformer_blocks[0]
    fp8_bytes = sum(t.numel() * t.element_size() for t in block.state_dict().values())
    assert placement.stats.bytes_uploaded == 4 * fp8_bytes  # 3 blocks + 1 wrap-around, at fp8 size
    assert block.attn.to_q.weight.dtype == torch.float8_e4m3fn


def test_exception_inside_use_restores_everything(model, inputs) -> None:
    host = _host_ptrs(model)
    placement = BlockSwapPlacement("cpu", resident_blocks=0, prefetch=True, keep_resident=False)

    def boom(m, a):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), torch.inference_mode(), placement.use("transformer", model) as dit:
        model.transformer_blocks[1].register_forward_pre_hook(boom)
        try:
            dit(**inputs)
        finally:
            model.transformer_blocks[1]._forward_pre_hooks.clear()
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.transformer_blocks)
    placement.release("transformer", model)
    assert _host_ptrs(model) == host and placement.device_bytes() == 0


def test_offload_keep_and_unload(model, inputs, reference) -> None:
    vae_like = torch.nn.Linear(4, 4)
    placement = OffloadPlacement("cpu", keep=("transformer",))
    host = _host_ptrs(model)
    _run(placement, model, inputs)
    with placement.use("vae", vae_like):
        assert placement.device_bytes() > 0
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert placement.device_bytes() == size  # the VAE-like module left, the kept transformer stayed
    assert _host_ptrs(model) != host
    placement.unload()
    assert placement.device_bytes() == 0 and _host_ptrs(model) == host
    assert torch.equal(_run(placement, model, inputs)[0], reference)


def test_block_swap_forwards_other_components(model) -> None:
    inner = OffloadPlacement("cpu")
    placement = BlockSwapPlacement("cpu", 1, others=inner)
    lin = torch.nn.Linear(3, 3)
    with placement.use("text_encoder", lin) as te:
        assert te is lin and inner.device_bytes() == sum(t.numel() * 4 for t in lin.state_dict().values())
    placement.release("text_encoder", lin)
    assert inner.device_bytes() == 0


def test_errors() -> None:
    with pytest.raises(InputError, match="resident_blocks"):
        BlockSwapPlacement("cpu", -1)
    with (
        pytest.raises(InputError, match="transformer_blocks"),
        BlockSwapPlacement("cpu", 1).use("transformer", torch.nn.Linear(2, 2)),
    ):
        pass
    with torch.device("meta"):
        meta = torch.nn.Linear(2, 2)
    with pytest.raises(InputError, match="meta"):
        ModuleStore(meta, "vae")


def test_tied_weights_stored_once() -> None:
    a = torch.nn.Linear(3, 3, bias=False)
    m = torch.nn.Sequential(a, torch.nn.Linear(3, 3, bias=False))
    m[1].weight = a.weight
    store = ModuleStore(m, "tied")
    assert len(store.host) == 1
    store.attach(store.copies(torch.device("cpu")))
    assert m[0].weight.data_ptr() == m[1].weight.data_ptr()
