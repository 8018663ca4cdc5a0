"""Bad input gives one clear line, found before any long work: damaged layer records and archives, bogus devices
and weights, unwritable folders, out-of-range sizes, paths used as prefixes; and long prompts come from files."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from qil_core.cli import main
from qil_core.cli import model as cli_model
from qil_core.demo.scene import sample_stack
from qil_core.errors import OutputPathError
from qil_core.fsutil import atomic_write_bytes
from qil_core.layers.export import export_pngs, export_zip, read_layer_pngs
from qil_core.layers.psd import read_psd, write_psd
from qil_core.model.weights.tiny import write_tiny_model

FAST = ["--layers", "2", "--steps", "2", "--dtype", "fp32", "--device", "cpu"]


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_line(code: int, err: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_model(tmp_path_factory.mktemp("comfy"), layout="comfyui", seed=1)


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    yy, xx = np.mgrid[0:64, 0:96]
    path = tmp_path / "in.png"
    Image.fromarray(np.stack([xx * 2, yy * 3, (xx + yy) % 255], -1).astype(np.uint8), "RGB").save(path)
    return path


def _files(paths: dict[str, Path]) -> list[str]:
    return [
        "--transformer",
        str(paths["transformer"]),
        "--vae",
        str(paths["vae"]),
        "--text-encoder",
        str(paths["text_encoder"]),
    ]


def _png_with_record(path: Path, record: object | str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("qil:layer", record if isinstance(record, str) else json.dumps(record))
    Image.new("RGBA", (8, 6), (200, 10, 10, 255)).save(path, pnginfo=info)
    return path


# ------------------------------------------------------------------------------------ layer records and archives


def test_layer_record_without_canvas_is_read_with_a_fitted_canvas(tmp_path: Path) -> None:
    path = _png_with_record(
        tmp_path / "a.png", {"name": "Red", "x": 5, "y": 4, "full_canvas": False, "width": 8, "height": 6}
    )
    stack = read_layer_pngs([path])
    assert stack.size == (13, 10) and stack.layers[0].name == "Red" and (stack[0].x, stack[0].y) == (5, 4)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([1, 2, 3], "is a JSON list, not an object"),
        ('{"name": "x", ', "is not valid JSON"),
        ({"x": "abc", "full_canvas": False}, "field 'x' must be an integer, got 'abc'"),
        ({"opacity": "lots"}, "field 'opacity' must be a number"),
        ({"canvas": [0, "x"]}, "canvas must be [width, height]"),
    ],
)
def test_damaged_layer_records_name_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], record: object, message: str
) -> None:
    path = _png_with_record(tmp_path / "layer.png", record)
    code, err = _run(capsys, "info", path)
    _one_line(code, err)
    assert message in err and "layer.png" in err and "invalid literal" not in err


def _zip_with(tmp_path: Path, manifest: object) -> Path:
    good = tmp_path / "good.zip"
    export_zip(sample_stack((64, 48)), good)
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if info.filename != "manifest.json":
                dst.writestr(info, src.read(info))
        dst.writestr("manifest.json", manifest if isinstance(manifest, str) else json.dumps(manifest))
    return path


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({"canvas": [64, 48], "layers": [{"file": "missing.png"}]}, "'missing.png', which the archive does not hold"),
        ({"canvas": [64, 48], "layers": [{"file": "../../etc/passwd"}]}, "not a plain name inside the archive"),
        ({"canvas": [64, 48], "layers": [{"file": "/etc/passwd"}]}, "not a plain name inside the archive"),
        ({"canvas": [64, 48], "layers": ["layer_00_Sky.png"]}, "layer 0 of manifest.json"),
        ({"canvas": [64, 48]}, "has no list of layers"),
        ("[1, 2]", "is a JSON list"),
        ("{oops", "is not valid JSON"),
    ],
)
def test_damaged_zip_manifests_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], manifest: object, message: str
) -> None:
    path = _zip_with(tmp_path, manifest)
    code, err = _run(capsys, "info", path)
    _one_line(code, err)
    assert message in err and "bad.zip" in err


# ------------------------------------------------------------------------------------------- model commands


def test_bogus_device_is_refused_before_loading(
    capsys, comfy, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_model, "load_from_args", lambda args: pytest.fail("the model must not be loaded"))
    code, err = _run(
        capsys, "decompose", image, "--out", tmp_path / "a.psd", *_files(comfy), *FAST[:-2], "--device", "bogus"
    )
    _one_line(code, err)
    assert "--device must be a torch device" in err


def test_cuda_device_without_cuda_fails_clearly_before_loading(
    capsys, comfy, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cli_model, "load_from_args", lambda args: pytest.fail("the model must not be loaded"))
    code, err = _run(
        capsys, "decompose", image, "--out", tmp_path / "a.psd", *_files(comfy), *FAST[:-2], "--device", "cuda"
    )
    _one_line(code, err)
    assert "CUDA is not available" in err and "--device cpu" in err


@pytest.mark.slow
def test_int32_weights_are_a_one_line_error(capsys, comfy, image: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(comfy["vae"]))
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.ndim == 4)
    tensors[key] = (tensors[key] * 1000).int()
    bad = tmp_path / "vae_int.safetensors"
    save_file(tensors, str(bad))
    files = _files(comfy)
    files[files.index("--vae") + 1] = str(bad)
    code, err = _run(capsys, "decompose", image, "--out", tmp_path / "a.psd", *files, *FAST, "--max-side", "64")
    _one_line(code, err)
    assert "torch.int32" in err and key in err and not (tmp_path / "a.psd").exists()


def test_read_only_output_folder_is_found_before_loading(
    capsys, comfy, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro else real_access(p, mode, **k))
    monkeypatch.setattr(cli_model, "load_from_args", lambda args: pytest.fail("the model must not be loaded"))
    for extra in (["--out", ro / "a.psd"], ["--out", tmp_path / "a.psd", "--png-dir", ro / "sub"]):
        code, err = _run(capsys, "decompose", image, *extra, *_files(comfy), *FAST)
        _one_line(code, err)
        assert "read-only or not writable" in err and str(ro) in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["text-to-layers", "a cat", "--width", "0"], "--width must be"),
        (["text-to-layers", "a cat", "--height", "99999"], "--height must be"),
        (["text-to-layers", "a cat", "--vae-tile", "0"], "--vae-tile must be"),
        (["decompose", "IMAGE", "--vae-tile", "0"], "--vae-tile must be"),
        (["decompose", "IMAGE", "--resolution", "640", "--max-side", "96"], "--max-side applies only to"),
        (["text-to-layers"], "needs a prompt"),
    ],
)
def test_arguments_are_checked_before_loading(
    capsys, comfy, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str
) -> None:
    monkeypatch.setattr(cli_model, "load_from_args", lambda args: pytest.fail("the model must not be loaded"))
    argv = [str(image) if a == "IMAGE" else a for a in argv]
    code, err = _run(capsys, *argv, "--out", tmp_path / "a.psd", *_files(comfy), *FAST)
    _one_line(code, err)
    assert message in err


def test_max_side_alone_means_custom_resolution(capsys, comfy, image: Path, tmp_path: Path) -> None:
    code, err = _run(capsys, "decompose", image, "--out", tmp_path / "a.psd", *_files(comfy), *FAST, "--max-side", "64")
    assert code == 0, err
    assert read_psd(tmp_path / "a.psd").size == (64, 32)  # 96x64 -> longest side 64 (not the 640 bucket)


@pytest.mark.slow
def test_prompt_files_give_the_same_result_as_the_options(capsys, comfy, image: Path, tmp_path: Path) -> None:
    prompt = "a test scene with a red roof 🏠 and 日本語 text"
    (tmp_path / "p.txt").write_text(prompt + "\n", encoding="utf-8")
    (tmp_path / "n.txt").write_text("blurry", encoding="utf-8")
    base = [*_files(comfy), *FAST, "--max-side", "64"]
    code, err = _run(
        capsys,
        "decompose",
        image,
        "--out",
        tmp_path / "a.psd",
        *base,
        "--prompt",
        prompt,
        "--negative-prompt",
        "blurry",
    )
    assert code == 0, err
    code, err = _run(
        capsys,
        "decompose",
        image,
        "--out",
        tmp_path / "b.psd",
        *base,
        "--prompt-file",
        tmp_path / "p.txt",
        "--negative-prompt-file",
        tmp_path / "n.txt",
    )
    assert code == 0, err
    for x, y in zip(read_psd(tmp_path / "a.psd"), read_psd(tmp_path / "b.psd")):
        np.testing.assert_array_equal(x.pixels, y.pixels)
    code, err = _run(
        capsys,
        "decompose",
        image,
        "--out",
        tmp_path / "c.psd",
        *base,
        "--negative-prompt",
        "x",
        "--negative-prompt-file",
        tmp_path / "n.txt",
    )
    _one_line(code, err)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    code, err = _run(
        capsys, "decompose", image, "--out", tmp_path / "c.psd", *base, "--prompt-file", tmp_path / "latin1.txt"
    )
    _one_line(code, err)
    assert "is not UTF-8" in err and "latin1.txt" in err
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("a red house on a hill " * 8000, encoding="utf-8")  # 176 KB: over argv's 128 KiB
    code, err = _run(
        capsys,
        "text-to-layers",
        "--prompt-file",
        long_prompt,
        "--out",
        tmp_path / "t.psd",
        *_files(comfy),
        *FAST,
        "--width",
        "64",
        "--height",
        "64",
    )
    assert code == 0, err


# --------------------------------------------------------------------------------------------- messages


def test_prefix_with_a_path_is_called_a_path_outside_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "a.psd"
    write_psd(sample_stack((64, 48)), src)
    for prefix in ("../../x", "sub/x", "..\\x"):
        code, err = _run(capsys, "psd-to-layers", src, "--out", tmp_path / "out", "--prefix", prefix)
        _one_line(code, err)
        assert "outside the output folder" in err and "hidden" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(OutputPathError, match="path separator"):
        export_pngs(sample_stack((64, 48)), tmp_path / "o", prefix="../x")


def test_existing_file_message_names_the_command_line_option(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(OutputPathError, match="--overwrite on the command line"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"


def test_load_psd_path_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from comfy_harness import pack_module

    io_nodes = pack_module("nodes.io_nodes")
    InputError = pack_module("qil_core.errors").InputError  # noqa: N806 (the pack's own copy of the class)
    monkeypatch.setattr(io_nodes.host, "get_input_directory", lambda: tmp_path)
    monkeypatch.setattr(io_nodes.host, "get_output_directory", lambda: tmp_path)
    monkeypatch.setattr(io_nodes.host, "get_temp_directory", lambda: tmp_path)
    with pytest.raises(InputError, match="contains a NUL character"):
        io_nodes.resolve_psd("a.psd", "a\x00b.psd")
    with pytest.raises(InputError, match="contains a NUL character"):
        io_nodes.resolve_psd("a\x00.psd")
    (tmp_path / "d.psd").mkdir()
    with pytest.raises(InputError, match="is a folder, not a PSD file"):
        io_nodes.resolve_psd("d.psd")
    with pytest.raises(InputError, match="not found"):
        io_nodes.resolve_psd("missing.psd")
    assert "NUL" in io_nodes.QILLoadPSD.VALIDATE_INPUTS("a.psd", "x\x00.psd")


def test_damaged_psd_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "a.psd"
    write_psd(sample_stack((64, 48)), src)
    data = bytearray(src.read_bytes())
    data[40:60] = b"\xff" * 20  # the layer section's lengths
    bad = tmp_path / "bad.psd"
    bad.write_bytes(bytes(data))
    code, err = _run(capsys, "info", bad)
    _one_line(code, err)
    assert "bad.psd" in err
