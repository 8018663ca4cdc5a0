"""nodes/host.py: standalone fallbacks and the ComfyUI branch (stand-ins, or the real folder_paths from
$COMFYUI_DIR), save-path rules S3-S7 of robustness.md, progress, interrupt, devices and ModelPatcher wrapping."""

from __future__ import annotations

import errno
import logging
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from comfy_harness import Harness, InterruptProcessingException, pack_module

_errors = pack_module("qil_core.errors")  # the pack's own classes, as the nodes raise them
ModelFileNotFoundError, OutputPathError, WeightsError = (
    _errors.ModelFileNotFoundError,
    _errors.OutputPathError,
    _errors.WeightsError,
)


@pytest.fixture(scope="module")
def host() -> types.ModuleType:
    return pack_module("nodes.host")


@pytest.fixture()
def standalone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No ComfyUI modules loaded; output/input/temp folders come from the QIL_* variables."""
    for name in ("folder_paths", "comfy.utils", "comfy.model_management", "comfy.model_patcher"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for sub in ("output", "input", "temp"):
        monkeypatch.setenv(f"QIL_{sub.upper()}_DIR", str(tmp_path / sub))
    monkeypatch.delenv("QIL_MODELS_DIR", raising=False)
    return tmp_path


@pytest.fixture(params=["standalone", "comfyui"])
def out_root(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The output folder, with the host adapter either standalone or inside (stand-in or real) folder_paths."""
    request.getfixturevalue("standalone")
    if request.param == "standalone":
        (tmp_path / "output").mkdir()
        yield tmp_path / "output"
    else:
        harness = Harness({}, tmp_path / "comfy")
        with harness.host():
            yield harness.output_dir


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _write(data: bytes):
    return lambda path: Path(path).write_bytes(data)


# ------------------------------------------------------------------ folders and models
def test_standalone_folders_follow_env_then_cwd(host, standalone, monkeypatch, tmp_path):
    assert host.get_output_directory() == standalone / "output"
    assert host.get_input_directory() == standalone / "input"
    assert host.get_temp_directory() == standalone / "temp"
    monkeypatch.delenv("QIL_OUTPUT_DIR")
    monkeypatch.chdir(tmp_path)
    assert host.get_output_directory() == tmp_path / "output"


def test_folders_come_from_comfyui_when_loaded(host, standalone, tmp_path):
    harness = Harness({}, tmp_path / "comfy")
    with harness.host():
        assert host.get_output_directory() == harness.output_dir
        assert host.get_input_directory() == harness.input_dir
        assert host.get_temp_directory() == harness.temp_dir
        assert harness.base / "models" / "vae" in host.model_folders("vae")
    assert host.get_output_directory() == standalone / "output"  # the stand-ins are gone again


def test_model_lookup_argument_env_and_comfyui(host, standalone, tmp_path, monkeypatch):
    arg_models, env_models = tmp_path / "argm", tmp_path / "envm"
    (arg_models / "diffusion_models" / "sub").mkdir(parents=True)
    (arg_models / "diffusion_models" / "sub" / "qwen_image_layered_bf16.safetensors").write_bytes(b"x")
    (arg_models / "diffusion_models" / "old.ckpt").write_bytes(b"x")
    (env_models / "unet").mkdir(parents=True)  # the legacy folder name is searched too
    (env_models / "unet" / "qwen_image_layered_fp8mixed.safetensors").write_bytes(b"x")
    (env_models / "diffusers" / "Qwen-Image-Layered" / "transformer").mkdir(parents=True)
    (env_models / "diffusers" / "Qwen-Image-Layered" / "model_index.json").write_text("{}")
    (env_models / "diffusers" / "Qwen-Image-Layered" / "transformer" / "config.json").write_text("{}")
    monkeypatch.setenv("QIL_MODELS_DIR", str(env_models))

    names = host.list_models("diffusion_models", arg_models)
    assert names == ["qwen_image_layered_fp8mixed.safetensors", "sub/qwen_image_layered_bf16.safetensors"]
    assert (
        host.find_model("diffusion_models", "sub/qwen_image_layered_bf16.safetensors", arg_models)
        == arg_models / "diffusion_models" / "sub" / "qwen_image_layered_bf16.safetensors"
    )
    assert host.list_models("diffusers") == ["Qwen-Image-Layered"]
    assert host.find_model("diffusers", "Qwen-Image-Layered").is_dir()

    harness = Harness({}, tmp_path / "comfy")
    (harness.base / "models" / "vae" / "qwen_image_layered_vae.safetensors").write_bytes(b"v")
    with harness.host():
        assert host.list_models("vae") == ["qwen_image_layered_vae.safetensors"]


def test_find_model_errors_name_the_folders_and_the_fix(host, standalone, tmp_path):
    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    with pytest.raises(ModelFileNotFoundError) as e:  # L1
        host.find_model("diffusion_models", "missing.safetensors", models)
    msg = str(e.value)
    assert "'missing.safetensors' not found in models/diffusion_models" in msg
    assert str(models / "diffusion_models") in msg
    with pytest.raises(WeightsError, match="only .safetensors"):  # L5
        host.find_model("diffusion_models", "model.ckpt", models)
    for bad in ("../x.safetensors", "/etc/x.safetensors", ""):
        with pytest.raises(ModelFileNotFoundError, match="not a path"):
            host.find_model("vae", bad, models)
    with pytest.raises(ValueError, match="unknown model kind"):
        host.model_folders("checkpoints")


# ------------------------------------------------------------------ save paths (S3-S7)
BAD_PREFIXES = [
    "../x",
    "../../etc/passwd",
    "/abs/x",
    "a/../../x",
    "%year%/../../x",
    "",
    "   ",
    ".",
    "..",
    ".hidden",
    "a/.hidden/x",
    "nul\x00byte",
    "line\nbreak",
    "x" * 300,
    "CON",
    "nul.psd",
    "a/COM1/x",
    "C:/Windows/x",
    "~/x",
    "trailing. ",
    "what?",
]


@pytest.mark.parametrize("prefix", BAD_PREFIXES, ids=lambda p: repr(p)[:24])
def test_unsafe_prefixes_are_rejected_and_write_nothing(host, out_root, prefix):
    outside = out_root.parent / "outside_marker"
    before = _tree(out_root.parent)
    with pytest.raises(OutputPathError, match="filename_prefix"):
        host.save_files(prefix, [(".psd", _write(b"PSD"))])
    assert _tree(out_root.parent) == before
    assert not outside.exists()


def test_symlink_inside_output_pointing_outside_is_rejected(host, out_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out_root / "link_out").symlink_to(elsewhere, target_is_directory=True)
    for prefix in ("link_out/pwned", "link_out/deeper/pwned"):  # S4: ComfyUI's abspath check lets these pass
        with pytest.raises(OutputPathError, match="outside the output folder"):
            host.save_files(prefix, [(".psd", _write(b"PSD"))])
    assert list(elsewhere.iterdir()) == []


def test_save_names_counters_and_subfolders(host, out_root):
    first = host.save_files("QwenLayered/layers", [(".psd", _write(b"one")), (".png", _write(b"img"))])
    assert [f.filename for f in first] == ["layers_00001_.psd", "layers_00001_.png"]
    assert first[0].subfolder == "QwenLayered" and first[0].type == "output"
    assert first[0].path == out_root / "QwenLayered" / "layers_00001_.psd"
    assert first[0].ui() == {"filename": "layers_00001_.psd", "subfolder": "QwenLayered", "type": "output"}
    second = host.save_files("QwenLayered/layers", [(".psd", _write(b"two"))])
    assert second[0].filename == "layers_00002_.psd"
    assert (out_root / "QwenLayered" / "layers_00001_.psd").read_bytes() == b"one"
    sized = host.save_files("%width%x%height%/名前", [(".psd", _write(b"u"))], 64, 32)
    assert sized[0].subfolder == "64x32" and sized[0].filename == "名前_00001_.psd"
    assert _tree(out_root) == sorted(
        [
            "QwenLayered",
            "QwenLayered/layers_00001_.psd",
            "QwenLayered/layers_00001_.png",
            "QwenLayered/layers_00002_.psd",
            "64x32",
            "64x32/名前_00001_.psd",
        ]
    )


def test_collision_with_another_writer_takes_the_next_counter_and_keeps_theirs(host, out_root):
    target = out_root / "race"

    def writer_racing_us(path: Path) -> None:
        # Another process takes our planned names after we listed the folder (S7): counter 1 for .psd, 2 for .png.
        target.mkdir(exist_ok=True)
        (target / "x_00001_.psd").write_bytes(b"theirs-1")
        (target / "x_00002_.png").write_bytes(b"theirs-2")
        path.write_bytes(b"ours")

    saved = host.save_files("race/x", [(".psd", writer_racing_us), (".png", _write(b"ours-png"))])
    assert [f.filename for f in saved] == ["x_00003_.psd", "x_00003_.png"]
    assert (target / "x_00001_.psd").read_bytes() == b"theirs-1"
    assert (target / "x_00002_.png").read_bytes() == b"theirs-2"
    assert not (target / "x_00002_.psd").exists()  # our half-claimed group at counter 2 was taken back
    assert (target / "x_00003_.psd").read_bytes() == b"ours"
    assert sorted(p.name for p in target.iterdir()) == ["x_00001_.psd", "x_00002_.png", "x_00003_.png", "x_00003_.psd"]


def test_failing_writer_leaves_no_partial_file(host, out_root):
    def half_then_fail(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    (out_root / "keep").mkdir()
    (out_root / "keep" / "f_00001_.psd").write_bytes(b"old")
    with pytest.raises(OutputPathError, match="check free space"):
        host.save_files("keep/f", [(".png", _write(b"ok")), (".psd", half_then_fail)])
    assert _tree(out_root / "keep") == ["f_00001_.psd"]
    assert (out_root / "keep" / "f_00001_.psd").read_bytes() == b"old"

    class Boom(Exception):
        pass

    def interrupted(path: Path) -> None:
        path.write_bytes(b"half")
        raise Boom()

    with pytest.raises(Boom):  # not translated: interrupts and unknown errors pass through, still cleaned up
        host.save_files("keep/f", [(".psd", interrupted)])
    assert _tree(out_root / "keep") == ["f_00001_.psd"]


def test_output_folder_that_is_a_file_is_reported(host, out_root):
    (out_root / "afile").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="afile"):
        host.save_files("afile/x", [(".psd", _write(b"y"))])
    assert (out_root / "afile").read_bytes() == b"x"


def test_folder_outputs_are_claimed_exclusively(host, out_root):
    def make_folder(path: Path) -> None:
        path.mkdir()
        (path / "00_background.png").write_bytes(b"bg")

    (out_root / "pngs").mkdir()
    (out_root / "pngs" / "set_00001_").mkdir()  # taken by someone else, even though empty
    saved = host.save_files("pngs/set", [("", make_folder), (".zip", _write(b"zip"))])
    assert [f.filename for f in saved] == ["set_00002_", "set_00002_.zip"]
    assert (out_root / "pngs" / "set_00002_" / "00_background.png").read_bytes() == b"bg"
    assert list((out_root / "pngs" / "set_00001_").iterdir()) == []


def test_temp_files_go_to_the_temp_folder(host, standalone):
    saved = host.save_files("preview/p", [(".png", _write(b"p"))], temp=True)
    assert saved[0].type == "temp" and saved[0].path == standalone / "temp" / "preview" / "p_00001_.png"


# ------------------------------------------------------------------ progress, interrupt, devices
def test_progress_logs_without_comfyui(host, standalone, caplog):
    caplog.set_level(logging.INFO, logger=host.__name__)
    bar = host.ProgressReporter(20, label="sampling")
    for step in range(1, 21):
        bar.update(step)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 11  # the first step (with an ETA), then every 10 %
    assert lines[0].startswith("sampling: 1/20 (5%)") and lines[-1].startswith("sampling: 20/20 (100%)")


def test_progress_interrupt_and_callback_inside_comfyui(host, standalone, tmp_path):
    harness = Harness({}, tmp_path / "comfy")
    from PIL import Image

    with harness.host() as record:
        bar = host.ProgressReporter(4, node_id="7")
        bar.update(1, preview=Image.new("RGBA", (8, 8)))
        callback = host.make_callback(3)
        callback(1, 3)
        callback(2, 3)
        record.interrupt_after = record.interrupt_checks + 1
        with pytest.raises(InterruptProcessingException):  # Cancel: raised before the bar moves
            callback(3, 3)
    assert record.progress == [("7", 1, 4), (None, 1, 3), (None, 2, 3)]
    host.check_interrupt()  # a no-op again outside the host


def test_devices_memory_and_model_patcher(host, standalone, tmp_path):
    module = torch.nn.Linear(4, 4)
    assert host.get_torch_device().type in ("cpu", "cuda", "mps")
    assert host.intermediate_device() == torch.device("cpu")
    host.free_memory(1 << 20, torch.device("cpu"))
    patcher = host.wrap_model_patcher(module, torch.device("cpu"), torch.device("cpu"))
    assert isinstance(patcher, host.StandalonePatcher) and patcher.model is module
    assert patcher.model_size() == 4 * 4 * 4 + 4 * 4
    module.to(torch.float64)
    host.load_models_gpu([patcher])
    assert next(module.parameters()).device.type == "cpu"

    harness = Harness({}, tmp_path / "comfy")
    with harness.host() as record:
        wrapped = host.wrap_model_patcher(module, torch.device("cpu"), torch.device("cpu"), size=123)
        assert type(wrapped) is sys.modules["comfy.model_patcher"].ModelPatcher and wrapped.size == 123
        host.load_models_gpu([wrapped])
        host.free_memory(5, torch.device("cpu"))
    assert record.loaded == [wrapped] and record.free_memory == [(5, torch.device("cpu"))]


def test_host_never_imports_comfyui(host, standalone):
    assert "folder_paths" not in sys.modules and "comfy.model_management" not in sys.modules
    host.get_output_directory()
    host.check_interrupt()
    host.ProgressReporter(2).update(1)
    assert "folder_paths" not in sys.modules and not any(m == "comfy" or m.startswith("comfy.") for m in sys.modules)
    assert os.environ["QIL_OUTPUT_DIR"]
