"""Allocations that scale with user input are checked against the available RAM first (one check, one message
naming the size and the limit), hostile image headers are refused before decoding, and a MemoryError anywhere
is the CLI's one-line error."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from qil_core import resources
from qil_core.cli import main
from qil_core.demo.scene import sample_stack
from qil_core.errors import InputError, ResourceError
from qil_core.layers.composite import composite
from qil_core.layers.export import MAX_MANIFEST_BYTES, export_zip, read_layer_pngs
from qil_core.layers.psd import write_psd
from qil_core.layers.stack import LayerStack
from qil_core.layers.transform import resize_stack


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit RGBA) with a tiny, truncated image stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_one_ram_probe_honours_the_override_and_formats_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(resources.ENV_FREE_RAM, "100M")
    assert resources.available_ram_bytes() == 100 * 2**20
    with pytest.raises(
        ResourceError,
        match=r"not enough RAM for a test buffer: it needs 1\.00 GB, but only "
        r"104\.86 MB of RAM is available",
    ):
        resources.check_allocation(10**9, "a test buffer")
    assert resources.check_allocation(10, "a tiny buffer") == 10
    # the compositor uses the same probe (it used its own, which ignored the override)
    with pytest.raises(ResourceError, match="4000x4000 px"):
        composite(LayerStack(4000, 4000))
    monkeypatch.delenv(resources.ENV_FREE_RAM)
    from qil_core.model.runtime import memory

    assert memory.format_bytes is resources.format_bytes and memory.parse_bytes is resources.parse_bytes


def test_edit_resize_to_a_huge_canvas_is_refused_before_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "small.psd"
    write_psd(sample_stack((64, 48)), src)
    monkeypatch.setenv(resources.ENV_FREE_RAM, "2G")
    tracemalloc.start()
    code, err = _run(capsys, "edit", src, "--out", tmp_path / "big.psd", "--resize", "30000x30000")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert code == 2 and "30000x30000" in err and "needs 14.40 GB" in err and "2.15 GB" in err, err
    assert "Traceback" not in err and peak < 64 * 2**20
    assert not (tmp_path / "big.psd").exists()


def test_resize_counts_every_resized_layer_not_only_the_canvas(monkeypatch: pytest.MonkeyPatch) -> None:
    stack = sample_stack((64, 48))  # 8 layers, several of them full-canvas
    monkeypatch.setenv(resources.ENV_FREE_RAM, "200M")  # one 2000x2000 float32 canvas (64 MB) fits, 8 do not
    with pytest.raises(ResourceError, match=r"resizing 8 layers to 2000x2000 px"):
        resize_stack(stack, 2000, 2000)
    monkeypatch.delenv(resources.ENV_FREE_RAM)
    assert resize_stack(stack, 128, 96).size == (128, 96)


def test_png_layer_too_large_for_the_ram_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(png_header_only(12000, 12000))  # under Pillow's bomb limit; 3.5 GB as float32 RGBA
    monkeypatch.setenv(resources.ENV_FREE_RAM, "1G")
    code, err = _run(capsys, "info", big)
    assert code == 2 and "12000x12000" in err and "needs 3.46 GB" in err and "1.07 GB" in err, err
    assert "Traceback" not in err


def test_png_header_claiming_60000_squared_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(60000, 60000))
    for command in (
        ["info", bomb],
        ["compose", bomb, "--out", tmp_path / "o.png"],
        ["layers-to-psd", bomb, "--out", tmp_path / "o.psd"],
    ):
        code, err = _run(capsys, *command)
        assert code == 2 and "3,600,000,000 px" in err and "decompression-bomb limit of 178,956,970 px" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "o.psd").exists()


def test_decompose_input_claiming_60000_squared_is_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(60000, 60000))
    code, err = _run(
        capsys,
        "decompose",
        bomb,
        "--out",
        tmp_path / "o.psd",
        "--transformer",
        tmp_path / "none",
        "--vae",
        tmp_path / "none",
        "--device",
        "cpu",
    )
    assert code == 2 and "decompression-bomb limit" in err and "Traceback" not in err, err


def test_zip_manifest_size_is_bounded_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "layers.zip"
    export_zip(sample_stack((64, 48)), path)
    huge = tmp_path / "huge.zip"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(huge, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename != "manifest.json":
                dst.writestr(info, src.read(info))
        dst.writestr("manifest.json", b'{"layers": [' + b" " * MAX_MANIFEST_BYTES + b"]}")
    assert huge.stat().st_size < 2**20  # a small file that would expand to more than the limit
    tracemalloc.start()
    with pytest.raises(InputError, match=r"manifest\.json.*over the 16\.78 MB limit"):
        read_layer_pngs(huge)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 2**20


def test_memory_error_anywhere_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qil_core.cli import layers as cli_layers

    src = tmp_path / "a.psd"
    write_psd(sample_stack((64, 48)), src)

    def no_memory(*a: object, **k: object) -> np.ndarray:
        raise MemoryError("Unable to allocate 13.4 GiB for an array with shape (30000, 30000, 4)")

    monkeypatch.setattr(cli_layers, "composite", no_memory)
    code, err = _run(capsys, "compose", src, "--out", tmp_path / "o.png")
    assert code == 1 and err.startswith("error: out of memory while running compose") and "13.4 GiB" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_pillow_bomb_limit_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from qil_core.layers.image_file import read_rgba

    path = tmp_path / "img.png"
    Image.new("RGBA", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # a user or host lowering Pillow's limit
    with pytest.raises(InputError, match="decompression-bomb limit of 8,000 px"):
        read_rgba(path, "image")
    buf = io.BytesIO()
    Image.new("RGBA", (60, 60)).save(buf, "PNG")
    px, _ = read_rgba(buf.getvalue(), "small image")  # 3600 px: within twice the limit, as Pillow allows
    assert px.shape == (60, 60, 4)
