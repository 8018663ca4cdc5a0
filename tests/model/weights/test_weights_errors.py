"""Bad model files, rows L1-L12 of robustness.md §4.1: each gives a typed error naming the file and the fix.

Nothing half-loaded may stay behind: after every failed load no module holding real tensors is alive.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
import weakref
import zipfile
from pathlib import Path

import pytest
import torch
from reference_models import tiny_transformer_config
from safetensors.torch import save_file

from qil_core.errors import (
    CorruptFileError,
    InputError,
    ModelFileNotFoundError,
    ModelMismatchError,
    ResourceError,
    WeightsError,
)
from qil_core.model.arch.transformer import QwenImageLayeredTransformer, build_transformer
from qil_core.model.arch.vae import RGBAVAE, VAEConfig
from qil_core.model.runtime import memory
from qil_core.model.weights.checkpoint import Checkpoint, checkpoint_fingerprint
from qil_core.model.weights.loading import load_transformer, load_vae
from qil_core.model.weights.quant import quantize_tensor_fp8
from qil_core.model.weights.vae_keys import diffusers_to_wan_key

CFG = tiny_transformer_config(axes_dims_rope=(4, 14, 14))  # inferable from shapes, like the real model


@pytest.fixture(scope="module")
def transformer_sd() -> dict[str, torch.Tensor]:
    """A valid tiny Layered transformer state dict (our module, default init)."""
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in build_transformer(CFG, "cpu").state_dict().items()}


@pytest.fixture(scope="module")
def vae_sd() -> dict[str, torch.Tensor]:
    """A valid tiny RGBA-VAE state dict (base_dim 4), diffusers names."""
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in RGBAVAE(VAEConfig(base_dim=4)).state_dict().items()}


def save(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def write_sharded(sd: dict[str, torch.Tensor], folder: Path, shards: int = 3) -> Path:
    """A diffusers-style transformer folder with `shards` files, the index and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save({k: sd[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    config = {"_class_name": "QwenImageTransformer2DModel", **dataclasses.asdict(CFG)}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def no_live_loaded_models() -> bool:
    """True when every live transformer or VAE module holds only meta tensors (a failed load left nothing).

    Call it while the caught exception is still referenced: its traceback keeps the loader's frames alive, as a
    host that shows the error does.
    """
    gc.collect()
    for obj in gc.get_objects():
        if type(obj) in (QwenImageLayeredTransformer, RGBAVAE):
            if any(not t.is_meta for t in obj.state_dict().values()):
                return False
    return True


# L1 -------------------------------------------------------------------------------------------------------------
def test_l1_missing_file_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ModelFileNotFoundError, match="looked in") as e:
        load_transformer(tmp_path / "qwen_image_layered_bf16.safetensors")
    assert "qwen_image_layered_bf16.safetensors" in str(e.value) and isinstance(e.value, FileNotFoundError)
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(ModelFileNotFoundError, match=str(tmp_path / "pipe" / "vae")):
        load_vae(tmp_path / "pipe")  # a pipeline folder without its vae/ subfolder
    (tmp_path / "pipe" / "vae").mkdir()
    (tmp_path / "pipe" / "model_index.json").unlink()  # a bare folder of component subfolders also works
    with pytest.raises(ModelFileNotFoundError, match=r"no \.safetensors weights in .*pipe/vae"):
        load_vae(tmp_path / "pipe")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileNotFoundError, match="no .safetensors weights"):
        load_vae(tmp_path / "empty")


def test_l1_file_deleted_after_listing(tmp_path: Path, vae_sd) -> None:
    path = save(vae_sd, tmp_path / "vae.safetensors")
    assert checkpoint_fingerprint(path)  # listed
    path.unlink()
    with pytest.raises(ModelFileNotFoundError, match="vae.safetensors"):
        load_vae(path)


# L2 -------------------------------------------------------------------------------------------------------------
def test_l2_vae_given_as_transformer_and_back(tmp_path: Path, vae_sd, transformer_sd) -> None:
    vae = save(vae_sd, tmp_path / "qwen_image_layered_vae.safetensors")
    with pytest.raises(ModelMismatchError, match="not a Qwen-Image-Layered transformer.*VAE") as e:
        load_transformer(vae)
    assert "qwen_image_layered_vae.safetensors" in str(e.value)
    transformer = save(transformer_sd, tmp_path / "dit.safetensors")
    with pytest.raises(ModelMismatchError, match="diffusion transformer, not a VAE"):
        load_vae(transformer)
    assert no_live_loaded_models()


def test_l2_other_architectures(tmp_path: Path, transformer_sd) -> None:
    unet = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3),
    }
    with pytest.raises(ModelMismatchError, match="UNet"):
        load_transformer(save(unet, tmp_path / "sd15.safetensors"))
    te = {"model.embed_tokens.weight": torch.zeros(10, 8), "model.layers.0.mlp.gate_proj.weight": torch.zeros(4, 8)}
    with pytest.raises(ModelMismatchError, match="text encoder"):
        load_transformer(save(te, tmp_path / "te.safetensors"))
    plain = {k: v for k, v in transformer_sd.items() if "addition_t_embedding" not in k}
    with pytest.raises(ModelMismatchError, match="not Qwen-Image-Layered"):
        load_transformer(save(plain, tmp_path / "qwen_image_bf16.safetensors"))


def test_l2_missing_unexpected_and_misshaped_keys_are_all_listed(tmp_path: Path, transformer_sd) -> None:
    bad = dict(transformer_sd)
    del bad["transformer_blocks.1.attn.to_k.bias"]
    bad["transformer_blocks.0.attn.extra_proj.weight"] = torch.zeros(2, 2)
    bad["proj_out.bias"] = torch.zeros(65)
    path = save(bad, tmp_path / "broken.safetensors")
    with pytest.raises(ModelMismatchError) as e:
        load_transformer(path)
    msg = str(e.value)
    assert "missing keys: transformer_blocks.1.attn.to_k.bias" in msg
    assert "unexpected keys: transformer_blocks.0.attn.extra_proj.weight" in msg
    assert "proj_out.bias in broken.safetensors has shape [65], expected [64]" in msg
    assert str(path) in msg and "re-download" in msg
    assert no_live_loaded_models()


def test_l2_three_channel_qwen_image_vae_is_refused(tmp_path: Path) -> None:
    rgb = RGBAVAE(VAEConfig(base_dim=4, input_channels=3)).state_dict()
    wan = {diffusers_to_wan_key(k, 2): v for k, v in rgb.items()}
    with pytest.raises(ModelMismatchError, match="3 image channels.*qwen_image_vae.safetensors.*layered_vae"):
        load_vae(save(wan, tmp_path / "qwen_image_vae.safetensors"))


# L3, L4, L6 -----------------------------------------------------------------------------------------------------
def _bytes_of(sd: dict[str, torch.Tensor], tmp_path: Path) -> bytes:
    return save(sd, tmp_path / "valid.safetensors").read_bytes()


def _with_header(raw: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    text = edit(header)
    text = text if isinstance(text, str) else json.dumps(text)
    blob = text.encode() + b" " * (-len(text) % 8)
    return struct.pack("<Q", len(blob)) + blob + raw[8 + n :]


@pytest.fixture
def never_unpickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries torch.load or pickle on a user file."""

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("a model file was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize(
    "case",
    ["truncated", "empty", "stub20", "png", "pickle", "zip", "offsets_past_eof", "duplicate_keys", "dtype_mismatch"],
)
def test_l3_l4_l6_corrupt_files(tmp_path: Path, vae_sd, case: str, never_unpickle: None) -> None:
    raw = _bytes_of(vae_sd, tmp_path)
    first = next(iter(json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])))
    payloads = {
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
        "stub20": b"\x00" * 20,
        "png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "pickle": pickle.dumps({"state_dict": {"w": [0.0] * 64}}, protocol=4),  # written here, never read
        "offsets_past_eof": _with_header(
            raw,
            lambda h: {
                **h,
                first: {**h[first], "data_offsets": [h[first]["data_offsets"][0], h[first]["data_offsets"][1] + 4096]},
            },
        ),
        "duplicate_keys": _with_header(raw, lambda h: f'{json.dumps(h)[:-1]}, "{first}": {json.dumps(h[first])}}}'),
        "dtype_mismatch": _with_header(raw, lambda h: {**h, first: {**h[first], "dtype": "F16"}}),
    }
    path = tmp_path / "qwen_image_layered_vae.safetensors"
    if case == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    else:
        path.write_bytes(payloads[case])
    with pytest.raises(CorruptFileError) as e:
        load_vae(path)
    msg = str(e.value)
    assert "corrupt or incomplete file, re-download" in msg and str(path) in msg
    assert f"size {path.stat().st_size:,} bytes" in msg
    expected_words = {
        "png": "PNG image",
        "pickle": "pickle",
        "zip": "zip archive",
        "truncated": "expected",
        "duplicate_keys": "duplicate",
    }
    if case in expected_words:
        assert expected_words[case] in msg


# L5 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_l5_pickle_formats_are_refused(tmp_path: Path, suffix: str, never_unpickle: None) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(WeightsError, match=r"only \.safetensors is supported"):
        load_transformer(path)
    folder = tmp_path / "hf"
    folder.mkdir(exist_ok=True)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(WeightsError, match=r"only \.safetensors is supported.*pytorch_model.bin"):
        load_vae(folder)


# L7 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key",
    [
        "proj_out.weight",
        "norm_out.linear.bias",
        "transformer_blocks.1.img_mlp.net.2.weight",
        "transformer_blocks.0.attn.norm_q.weight",
    ],
)
def test_l7_nan_weights_are_detected_and_nothing_stays_loaded(tmp_path: Path, transformer_sd, key: str) -> None:
    bad = dict(transformer_sd)
    bad[key] = bad[key].clone()
    bad[key].view(-1)[3] = float("nan") if "bias" not in key else float("inf")
    path = save(bad, tmp_path / "nan.safetensors")
    with pytest.raises(WeightsError, match=f"NaN/inf in {key} of nan.safetensors") as e:
        load_transformer(path, dtype=torch.float32)
    assert e.value.__traceback__ is not None and no_live_loaded_models()


def test_l7_nan_in_vae_and_in_fp8_scale(tmp_path: Path, vae_sd, transformer_sd) -> None:
    bad = dict(vae_sd)
    bad["decoder.conv_out.bias"] = torch.full_like(bad["decoder.conv_out.bias"], float("nan"))
    with pytest.raises(WeightsError, match="NaN/inf in decoder.conv_out.bias") as e1:
        load_vae(save(bad, tmp_path / "vae.safetensors"))
    sd = dict(transformer_sd)
    w8, _ = quantize_tensor_fp8(sd["transformer_blocks.0.attn.to_q.weight"])
    sd["transformer_blocks.0.attn.to_q.weight"] = w8
    sd["transformer_blocks.0.attn.to_q.weight_scale"] = torch.tensor(float("inf"))
    with pytest.raises(WeightsError, match="NaN/inf in transformer_blocks.0.attn.to_q.weight_scale") as e2:
        load_transformer(save(sd, tmp_path / "fp8.safetensors"))
    assert e1.value.__traceback__ is not None and e2.value.__traceback__ is not None and no_live_loaded_models()


# L8 -------------------------------------------------------------------------------------------------------------
def test_l8_fp8_file_runs_on_cpu_and_logs_its_memory(tmp_path: Path, transformer_sd, caplog) -> None:
    sd = dict(transformer_sd)
    layers = [
        k[:-7] for k, v in sd.items() if k.startswith("transformer_blocks.") and k.endswith(".weight") and v.ndim == 2
    ]
    for layer in layers:
        sd[layer + ".weight"], sd[layer + ".weight_scale"] = quantize_tensor_fp8(sd[layer + ".weight"])
    meta = {
        "_quantization_metadata": json.dumps(
            {"format_version": "1.0", "layers": {n: {"format": "float8_e4m3fn"} for n in layers}}
        )
    }
    with caplog.at_level(logging.INFO, logger="qil_core.model.weights.loading"):
        model = load_transformer(save(sd, tmp_path / "fp8.safetensors", meta), device="cpu")
    assert "stay fp8 in memory" in caplog.text and "dequantised to torch.bfloat16" in caplog.text
    x = torch.randn(1, 4 * 4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(
            x,
            torch.randn(1, 3, 48, dtype=torch.bfloat16),
            None,
            torch.tensor([0.5]),
            [(1, 2, 2)] * 3 + [(1, 2, 2)],
            torch.zeros(1, dtype=torch.long),
        )
    assert out.shape == (1, 16, 64) and bool(torch.isfinite(out).all())


def test_dtype_policy(tmp_path: Path, vae_sd) -> None:
    path = save(vae_sd, tmp_path / "vae.safetensors")
    with pytest.raises(InputError, match="quantize_module_fp8"):
        load_vae(path, dtype=torch.float8_e4m3fn)
    with pytest.raises(InputError, match="float32, torch.bfloat16 or torch.float16"):
        load_vae(path, dtype=torch.int8)
    assert load_vae(path, dtype=torch.float16).dtype == torch.float16


# L9 -------------------------------------------------------------------------------------------------------------
def test_l9_low_ram_is_refused_before_allocating(tmp_path: Path, transformer_sd, monkeypatch) -> None:
    path = save(transformer_sd, tmp_path / "dit.safetensors")

    def no_read(*a: object, **k: object) -> None:
        raise AssertionError("tensors were read before the memory check")

    monkeypatch.setattr(Checkpoint, "read", no_read)
    monkeypatch.setenv(memory.ENV_FREE_RAM, "100M")
    with pytest.raises(ResourceError, match="not enough RAM for the Qwen-Image-Layered transformer") as e:
        load_transformer(path)
    assert isinstance(e.value, MemoryError) and "fp8" in str(e.value)


def test_l9_memory_mapped_weights_do_not_count_as_allocated_ram(
    tmp_path: Path, transformer_sd, monkeypatch, caplog
) -> None:
    # Same dtype as the file: the tensors stay views of the file (page cache), so little free RAM is no reason
    # to refuse (a block-swap user streams them to the GPU), but running on the CPU is warned about.
    path = save(transformer_sd, tmp_path / "dit.safetensors")
    stored = next(iter(transformer_sd.values())).dtype
    monkeypatch.setenv(memory.ENV_FREE_RAM, "1K")
    with caplog.at_level("WARNING"):
        model = load_transformer(path, dtype=stored)
    assert next(model.parameters()).dtype == stored
    assert "memory-mapped" in caplog.text and "slow" in caplog.text
    converted = torch.float16 if stored != torch.float16 else torch.bfloat16
    with pytest.raises(ResourceError, match="not enough RAM"):
        load_transformer(path, dtype=converted)


def test_l9_memory_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert memory.parse_bytes("512M") == 512 * 2**20 and memory.parse_bytes("1.5G") == int(1.5 * 2**30)
    assert memory.parse_bytes("2GiB") == 2 * 2**30 and memory.parse_bytes("4096") == 4096
    with pytest.raises(InputError):
        memory.parse_bytes("lots")
    memory.check_ram(10, "a tiny thing", available=2**31)
    with pytest.raises(ResourceError, match="needs 40.00 GB"):
        memory.check_ram(40 * 10**9, "the bf16 transformer", available=24 * 2**30)
    with pytest.raises(ResourceError, match="cuda:0"):
        memory.check_device_memory(10**10, "cuda:0", "the transformer", available=10**9)
    monkeypatch.setenv(memory.ENV_FREE_VRAM, "1G")
    assert memory.available_device_memory("cuda") == 2**30
    monkeypatch.delenv(memory.ENV_FREE_RAM, raising=False)
    monkeypatch.setitem(sys.modules, "psutil", None)  # psutil absent: /proc/meminfo is read instead
    free = memory.available_ram()
    assert free is not None and free > 0


# L10 ------------------------------------------------------------------------------------------------------------
def test_l10_fingerprint_tracks_path_mtime_and_size(tmp_path: Path, vae_sd, transformer_sd) -> None:
    path = save(vae_sd, tmp_path / "vae.safetensors")
    first = checkpoint_fingerprint(path)
    assert first == checkpoint_fingerprint(path) and first[0][0] == str(path.resolve())
    os.utime(path, ns=(first[0][1] + 10**9, first[0][1] + 10**9))
    assert checkpoint_fingerprint(path) != first
    folder = write_sharded(transformer_sd, tmp_path / "transformer")
    names = {Path(p).name for p, _, _ in checkpoint_fingerprint(folder)}
    assert {"config.json", "diffusion_pytorch_model.safetensors.index.json"} <= names and len(names) == 5


def test_l10_repeated_loads_do_not_leak(tmp_path: Path, vae_sd) -> None:
    path = save(vae_sd, tmp_path / "vae.safetensors")
    refs = []
    for _ in range(5):
        vae = load_vae(path)
        refs.append(weakref.ref(vae))
        del vae
    gc.collect()
    assert all(r() is None for r in refs)


# L11 ------------------------------------------------------------------------------------------------------------
def test_l11_import_needs_no_files_and_no_network(tmp_path: Path, repo_root: Path) -> None:
    code = (
        "import socket\n"
        "def _no_net(*a, **k):\n    raise RuntimeError('network used at import')\n"
        "socket.socket.connect = socket.socket.connect_ex = _no_net\n"
        "socket.getaddrinfo = socket.create_connection = _no_net\n"
        "import qil_core.model.weights.loading, qil_core.model.weights.checkpoint, qil_core.model.weights.quant, "
        "qil_core.model.runtime.memory\n"
        "print('imported')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(repo_root), "HOME": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "imported" in done.stdout and list(tmp_path.iterdir()) == []


# L12 ------------------------------------------------------------------------------------------------------------
def test_l12_sharded_folder_errors(tmp_path: Path, transformer_sd) -> None:
    folder = write_sharded(transformer_sd, tmp_path / "transformer")
    assert load_transformer(folder, dtype=torch.float32).config == CFG
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    good_index = index.read_text()
    # an index entry pointing at the wrong shard
    moved = json.loads(good_index)
    key = next(iter(moved["weight_map"]))
    shard_names = sorted(set(moved["weight_map"].values()))
    moved["weight_map"][key] = next(n for n in shard_names if n != moved["weight_map"][key])
    index.write_text(json.dumps(moved))
    with pytest.raises(CorruptFileError, match="index and the shards do not match"):
        load_transformer(folder)
    index.write_text("{not json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        load_transformer(folder)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CorruptFileError, match="weight_map"):
        load_transformer(folder)
    index.write_text(good_index)
    (folder / "diffusion_pytorch_model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelFileNotFoundError, match="shard 2 of 3 missing"):
        load_transformer(folder)
    assert no_live_loaded_models()


def test_l12_duplicate_tensor_across_shards(tmp_path: Path, transformer_sd) -> None:
    a = save({"img_in.weight": transformer_sd["img_in.weight"]}, tmp_path / "a.safetensors")
    b = save(transformer_sd, tmp_path / "b.safetensors")
    with pytest.raises(CorruptFileError, match="'img_in.weight' is in both a.safetensors and b.safetensors"):
        load_transformer([a, b])
