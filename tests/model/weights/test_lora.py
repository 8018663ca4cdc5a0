"""LoRA files on the tiny random transformer: naming, refusals, full deltas, fp8, stacking, removal, memory modes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qil_core.errors import InputError, ModelMismatchError, WeightsError
from qil_core.model.runtime.offload import BlockSwapPlacement, OffloadPlacement
from qil_core.model.weights.lora import read_lora
from qil_core.model.weights.lora_apply import apply_lora, load_lora, lora_stack, loras_applied, remove_loras
from qil_core.model.weights.quant import TRANSFORMER_FP8_SKIP, Fp8Linear, quantize_module_fp8
from qil_core.model.weights.tiny import build_tiny_modules

D = 64  # the tiny transformer's width (2 heads x 32)


@pytest.fixture
def dit() -> torch.nn.Module:
    return build_tiny_modules(seed=3)[0].eval()


def _inputs() -> tuple:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3 * 4, 64, generator=gen)
    txt = torch.randn(1, 5, 128, generator=gen)
    return x, txt, None, torch.tensor([0.5]), [(1, 2, 2)] * 3


def _run(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(*_inputs())


def _save(tmp_path: Path, tensors: dict[str, torch.Tensor], name: str = "l.safetensors") -> Path:
    path = tmp_path / name
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
    return path


def _pair(out: int, inp: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=gen) * 0.2, torch.randn(out, rank, generator=gen) * 0.2


def test_bare_kohya_style_pairs_diffs_and_norms_equal_editing_the_weights(dit, tmp_path) -> None:
    """lightx2v's layout (bare names, lora_down/lora_up/alpha), full deltas on a Linear and on a norm."""
    down, up = _pair(6 * D, D, 4, 1)
    gen = torch.Generator().manual_seed(2)
    norm_diff = torch.randn(32, generator=gen) * 0.3
    w_diff, b_diff = torch.randn(D, 64, generator=gen) * 0.05, torch.randn(D, generator=gen) * 0.05
    path = _save(
        tmp_path,
        {
            "transformer_blocks.1.img_mod.1.lora_down.weight": down,
            "transformer_blocks.1.img_mod.1.lora_up.weight": up,
            "transformer_blocks.1.img_mod.1.alpha": torch.tensor(2.0),
            "transformer_blocks.0.attn.norm_q.diff": norm_diff,
            "img_in.diff": w_diff,
            "img_in.diff_b": b_diff,
        },
    )
    edited = copy.deepcopy(dit)
    with torch.no_grad():
        edited.transformer_blocks[1].img_mod[1].weight += 0.8 * (2.0 / 4) * (up @ down)
        edited.transformer_blocks[0].attn.norm_q.weight += 0.8 * norm_diff
        edited.img_in.weight += 0.8 * w_diff
        edited.img_in.bias += 0.8 * b_diff
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    for mode in ("fly", "merge"):
        handle = load_lora(dit, path, 0.8, mode=mode)
        torch.testing.assert_close(_run(dit), _run(edited), rtol=1e-5, atol=1e-5)
        assert list(dit.state_dict()) == list(before)
        handle.remove()
        assert all(torch.equal(dit.state_dict()[k], v) for k, v in before.items())


def test_strength_zero_and_changes_and_stack_order(dit, tmp_path) -> None:
    base = _run(dit)
    a = _save(
        tmp_path,
        dict(
            zip(
                ("transformer.img_in.lora_A.weight", "transformer.img_in.lora_B.weight"),
                _pair(D, 64, 2, 5),
                strict=True,
            )
        ),
        "a.safetensors",
    )
    b = _save(
        tmp_path,
        dict(
            zip(
                ("diffusion_model.proj_out.lora_down.weight", "diffusion_model.proj_out.lora_up.weight"),
                _pair(64, D, 3, 6),
                strict=True,
            )
        ),
        "b.safetensors",
    )
    ha = load_lora(dit, a, 0.0)
    assert torch.equal(_run(dit), base)  # strength 0 applies nothing at all
    ha.set_strength(1.0)
    hb = load_lora(dit, b, -0.5)
    both = _run(dit)
    ha.remove()
    only_b = _run(dit)
    ha2 = load_lora(dit, a, 1.0)  # re-added after b: the result does not depend on the order
    torch.testing.assert_close(_run(dit), both, rtol=0, atol=1e-6)
    assert not torch.allclose(only_b, both)
    assert hb.active and ha2.active and not ha.active
    remove_loras(dit)
    assert torch.equal(_run(dit), base) and lora_stack(dit).entries == []
    with pytest.raises(InputError, match="strength"):
        load_lora(dit, a, float("nan"))


def test_unknown_keys_are_refused_with_the_list_and_the_naming(dit, tmp_path) -> None:
    down, up = _pair(D, D, 2, 1)
    path = _save(
        tmp_path,
        {
            "transformer_blocks.0.attn.to_q.lora_A.weight": down,
            "transformer_blocks.0.attn.to_q.lora_B.weight": up,
            "transformer_blocks.0.attn.to_qq.lora_A.weight": down,
            "transformer_blocks.7.attn.to_q.lora_B.weight": up,
        },
    )
    with pytest.raises(ModelMismatchError) as e:
        read_lora(path, dit)
    text = str(e.value)
    assert "2 of 4 keys" in text and "to_qq.lora_A.weight" in text and "transformer_blocks.7.attn.to_q" in text
    assert "lora_unet_transformer_blocks_0_attn_to_q" in text  # the expected naming is spelled out
    assert not any("qil_lora" in n for n, _ in dit.named_modules())


def test_a_flux_lora_is_refused_as_flux(dit, tmp_path) -> None:
    down, up = _pair(D, D, 2, 1)
    tensors = {}
    for i in range(2):
        for name in (f"double_blocks.{i}.img_attn.qkv", f"single_blocks.{i}.linear1", f"double_blocks.{i}.txt_mlp.0"):
            tensors[f"diffusion_model.{name}.lora_down.weight"] = down
            tensors[f"diffusion_model.{name}.lora_up.weight"] = up
    with pytest.raises(ModelMismatchError, match="this LoRA is for Flux"):
        read_lora(_save(tmp_path, tensors), dit)


def test_shapes_dora_pickles_and_missing_halves_are_refused(dit, tmp_path) -> None:
    down, up = _pair(D + 1, D, 2, 1)
    with pytest.raises(ModelMismatchError, match="to_q"):
        read_lora(
            _save(
                tmp_path,
                {
                    "transformer_blocks.0.attn.to_q.lora_A.weight": down,
                    "transformer_blocks.0.attn.to_q.lora_B.weight": up,
                },
            ),
            dit,
        )
    with pytest.raises(ModelMismatchError, match="only one half"):
        read_lora(_save(tmp_path, {"transformer_blocks.0.attn.to_q.lora_A.weight": down}), dit)
    with pytest.raises(WeightsError, match="DoRA"):
        read_lora(_save(tmp_path, {"transformer_blocks.0.attn.to_q.dora_scale": torch.ones(1, D)}), dit)
    pickle = tmp_path / "lora.pt"
    torch.save({"a": torch.ones(1)}, pickle)
    with pytest.raises(WeightsError, match="only .safetensors"):
        read_lora(pickle, dit)


def test_fp8_base_on_the_fly_keeps_the_lora_exact_and_removal_restores_fp8(dit, tmp_path) -> None:
    quantize_module_fp8(dit, skip=TRANSFORMER_FP8_SKIP)
    layer = dit.transformer_blocks[0].attn.to_v
    assert isinstance(layer, Fp8Linear)
    down, up = _pair(D, D, 4, 9)
    path = _save(
        tmp_path,
        {"transformer_blocks.0.attn.to_v.lora_A.weight": down, "transformer_blocks.0.attn.to_v.lora_B.weight": up},
    )
    x = torch.randn(3, D)
    base_w = layer.dequantized_weight(torch.float32)
    want = x @ (base_w + up @ down).T + layer.bias
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    with torch.no_grad():
        fly = load_lora(dit, path, 1.0, mode="fly")
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)  # the branch is exact
        fly.remove()
        merged = load_lora(dit, path, 1.0, mode="merge")
        err_merge = (layer(x) - want).abs().max()
        assert layer.weight.dtype == torch.float8_e4m3fn and 0 < err_merge  # requantised: fp8 rounding error
        merged.remove()
    after = dit.state_dict()
    assert all(torch.equal(after[k].float(), v.float()) and after[k].dtype == v.dtype for k, v in before.items())


def test_block_swap_and_offload_stream_the_patched_model(tmp_path) -> None:
    """The same LoRA gives the same output resident, offloaded and block-swapped (the branch streams with its block)."""
    dit = build_tiny_modules(seed=4)[0].eval()
    tensors = {}
    for i in range(2):
        for name in ("attn.to_q", "img_mlp.net.2"):
            out, inp = (D, D) if name == "attn.to_q" else (D, 4 * D)
            down, up = _pair(out, inp, 2, 10 + i)
            tensors[f"transformer_blocks.{i}.{name}.lora_A.weight"] = down
            tensors[f"transformer_blocks.{i}.{name}.lora_B.weight"] = up
    lora = read_lora(_save(tmp_path, tensors), dit)
    base = _run(dit)
    for mode in ("fly", "merge"):
        with loras_applied(dit, [(lora, 1.0)], mode=mode):
            resident = _run(dit)
            for placement in (BlockSwapPlacement("cpu", resident_blocks=0, prefetch=False), OffloadPlacement("cpu")):
                with torch.no_grad(), placement.use("transformer", dit) as m:
                    got = m(*_inputs())
                placement.unload()
                assert torch.equal(got, resident), (mode, placement)
        assert not torch.allclose(resident, base)
        assert torch.equal(_run(dit), base)  # the context took the LoRA off again


def test_apply_checks_the_model(dit, tmp_path) -> None:
    down, up = _pair(D, D, 2, 1)
    lora = read_lora(
        _save(
            tmp_path,
            {"transformer_blocks.1.attn.to_k.lora_A.weight": down, "transformer_blocks.1.attn.to_k.lora_B.weight": up},
        ),
        dit,
    )
    with pytest.raises(InputError, match="QwenLayeredModel"):
        apply_lora(torch.nn.Linear(2, 2), lora)
    with pytest.raises(InputError, match="mode"):
        apply_lora(dit, lora, mode="fuse")
    small = copy.deepcopy(dit)
    del small.transformer_blocks[1]
    with pytest.raises(InputError, match="not in this transformer"):
        apply_lora(small, lora)
    assert lora_stack(small).entries == []
    assert np.isclose(lora.patches["transformer_blocks.1.attn.to_k"].scale, 1.0)  # no alpha anywhere: scale 1


@pytest.mark.parametrize("fmt", ["int8", "int8-convrot", "mxfp8"])
def test_other_quantised_formats_get_the_lora_on_the_fly_even_when_merge_is_asked(fmt: str, tmp_path) -> None:
    from qil_core.model.weights.quant import QUANT_CHOICES, fits_format

    dit = build_tiny_modules(seed=3)[0].eval()
    quantize_module_fp8(dit, skip=TRANSFORMER_FP8_SKIP, fmt=fmt)
    name, layer = next((n, m) for n, m in dit.named_modules() if isinstance(m, Fp8Linear))
    assert layer.fmt.name != "float8_e4m3fn" and fits_format(QUANT_CHOICES[fmt], layer.in_features)
    down, up = _pair(layer.out_features, layer.in_features, 4, 9)
    path = _save(tmp_path, {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
    x = torch.randn(3, layer.in_features)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    with torch.no_grad():
        base = layer(x)
        for mode in ("fly", "merge"):
            handle = load_lora(dit, path, 0.5, mode=mode)
            torch.testing.assert_close(layer(x), base + 0.5 * x @ (up @ down).T, rtol=1e-5, atol=1e-5)
            assert hasattr(layer, "qil_lora")  # the branch, never a requantised weight
            handle.remove()
    after = dit.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_full_delta_in_a_quantised_layers_packed_shape_is_refused(tmp_path) -> None:
    """nvfp4 stores (out, in / 2) bytes; a diff of that shape is not a weight delta and is refused by name."""
    dit = build_tiny_modules(seed=3)[0].eval()
    quantize_module_fp8(dit, skip=TRANSFORMER_FP8_SKIP, fmt="nvfp4")
    name, layer = next((n, m) for n, m in dit.named_modules() if isinstance(m, Fp8Linear))
    packed = tuple(layer.weight.shape)
    assert packed != (layer.out_features, layer.in_features)
    path = _save(tmp_path, {f"{name}.diff": torch.zeros(packed)})
    with pytest.raises(ModelMismatchError, match=rf"{name}.*has a diff of shape"):
        read_lora(path, dit)
