"""Groups of output files are all or nothing: a failure midway (a full disk, a kill signal) never leaves a partial
set, never deletes or changes the files an overwrite was replacing, and leftovers of killed runs are swept."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import pytest

from qil_core import fsutil
from qil_core.cli import main
from qil_core.demo.scene import sample_stack
from qil_core.errors import OutputPathError
from qil_core.layers.export import export_pngs
from qil_core.layers.psd import write_psd
from qil_core.layers.recolor import recolor_layer

SIZE = (96, 64)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) with its bytes."""
    return {os.fspath(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*")]


def _disk_full_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    """Make every os.fsync after the first `calls` fail with ENOSPC, as a disk that fills up midway."""
    real, count = os.fsync, [0]

    def fsync(fd: int) -> None:
        count[0] += 1
        if count[0] > calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.fixture()
def two_psds(tmp_path: Path) -> tuple[Path, Path]:
    """The sample scene, and the same scene with a recoloured layer (so a re-export changes every file's bytes)."""
    stack = sample_stack(SIZE)
    a, b = tmp_path / "a.psd", tmp_path / "b.psd"
    write_psd(stack, a)
    layers = [recolor_layer(layer, hue_shift=90, brightness=0.1) for layer in stack.layers]
    write_psd(stack.replace(layers=layers), b)
    return a, b


@pytest.mark.parametrize("calls", [0, 3, 7])
def test_overwrite_that_fails_midway_leaves_the_old_files_byte_identical(
    tmp_path: Path, two_psds: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, calls: int
) -> None:
    a, b = two_psds
    out = tmp_path / "layers"
    assert main(["psd-to-layers", str(a), "--out", str(out), "--prefix", "doc"]) == 0
    before = _snapshot(out)
    assert len(before) == 9  # 8 PNGs + the manifest
    _disk_full_after(monkeypatch, calls)
    assert main(["psd-to-layers", str(b), "--out", str(out), "--prefix", "doc", "--overwrite"]) != 0
    monkeypatch.undo()
    assert _snapshot(out) == before
    assert _leftovers(out) == []


@pytest.mark.parametrize("hard_links", [True, False])
def test_overwrite_that_fails_while_swapping_in_restores_the_files_already_replaced(
    tmp_path: Path, two_psds: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, hard_links: bool
) -> None:
    a, b = two_psds
    out = tmp_path / "layers"
    assert main(["psd-to-layers", str(a), "--out", str(out), "--prefix", "doc"]) == 0
    before = _snapshot(out)
    if not hard_links:  # FAT, some network file systems: the old files are kept as copies instead

        def no_link(src: object, dst: object) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_link)
    real, count = fsutil._publish, [0]

    def publish(tmp: Path, final: Path, overwrite: bool) -> None:
        count[0] += 1
        if count[0] == 5:  # four files of the group are already in place
            raise OSError(errno.EIO, "Input/output error")
        real(tmp, final, overwrite)

    monkeypatch.setattr(fsutil, "_publish", publish)
    assert main(["psd-to-layers", str(b), "--out", str(out), "--prefix", "doc", "--overwrite"]) != 0
    assert count[0] == 5
    assert _snapshot(out) == before
    assert _leftovers(out) == []


def test_library_png_export_is_one_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = sample_stack(SIZE)
    export_pngs(stack, tmp_path, prefix="s")
    before = _snapshot(tmp_path)
    _disk_full_after(monkeypatch, 4)
    with pytest.raises(OutputPathError, match="disk is full"):
        export_pngs(
            stack.replace(layers=[recolor_layer(x, invert=True) for x in stack.layers]),
            tmp_path,
            prefix="s",
            overwrite=True,
        )
    assert _snapshot(tmp_path) == before
    with pytest.raises(OutputPathError, match="disk is full"):
        export_pngs(stack, tmp_path / "new", prefix="s")
    monkeypatch.undo()
    assert not list((tmp_path / "new").iterdir())


def test_demo_on_a_full_disk_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _disk_full_after(monkeypatch, 6)  # a few files would fit
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "96x64", "--no-model"]) != 0
    monkeypatch.undo()
    assert _snapshot(out) == {} if out.exists() else True
    assert main(["demo", "--out", str(out), "--size", "96x64", "--no-model"]) == 0  # the rerun is not refused
    assert len(_snapshot(out)) == 4 + 8


def test_stale_temporary_files_of_ours_are_swept_when_a_writer_starts(tmp_path: Path) -> None:
    old = time.time() - 7 * 3600
    ours_tmp = tmp_path / ".layer_00_Sky.png.0123456789ab.tmp"
    ours_dir = tmp_path / ".qil-staging-abc123"
    fresh = tmp_path / ".other.png.a1b2c3d4e5f6.tmp"
    foreign = [tmp_path / ".hidden.tmp", tmp_path / ".qil-staging-file", tmp_path / "keep.tmp"]
    ours_tmp.write_bytes(b"x" * 100)
    ours_dir.mkdir()
    (ours_dir / "big.psd").write_bytes(b"y" * 100)
    fresh.write_bytes(b"z")
    for p in foreign:
        p.write_bytes(b"user data")
    for p in [ours_tmp, ours_dir, *foreign]:
        os.utime(p, (old, old))
    fsutil.atomic_write_bytes(tmp_path / "new.txt", b"hello")
    assert not ours_tmp.exists() and not ours_dir.exists()
    assert fresh.exists(), "a temporary file of a writer that may still run was removed"
    assert all(p.read_bytes() == b"user data" for p in foreign), "a file that is not ours was touched"


def test_decompose_whose_pngs_fail_leaves_no_psd_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qil_core.cli import model as cli_model
    from qil_core.layers import export

    stack = sample_stack(SIZE)
    monkeypatch.setattr(cli_model, "load_from_args", lambda args: None)
    monkeypatch.setattr(cli_model, "plan_placement", lambda *a: None)
    monkeypatch.setattr("qil_core.model.pipeline.decompose.decompose", lambda *a, **k: [stack])
    image = tmp_path / "in.png"
    from qil_core.layers.composite import composite
    from qil_core.layers.export import write_png

    write_png(composite(stack), image)
    real, count = export._png_bytes, [0]

    def png_bytes(*a: object, **k: object) -> bytes:
        count[0] += 1
        if count[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(export, "_png_bytes", png_bytes)
    argv = [
        "decompose",
        str(image),
        "--out",
        str(tmp_path / "out.psd"),
        "--png-dir",
        str(tmp_path / "pngs"),
        "--transformer",
        "t",
        "--vae",
        "v",
        "--device",
        "cpu",
    ]
    assert main(argv) != 0
    assert not (tmp_path / "out.psd").exists()
    assert not (tmp_path / "pngs").exists() or not list((tmp_path / "pngs").iterdir())
    monkeypatch.setattr(export, "_png_bytes", real)
    assert main(argv) == 0  # the rerun is not refused by a leftover PSD
    assert (tmp_path / "out.psd").is_file() and len(list((tmp_path / "pngs").iterdir())) == len(stack)


def test_sigterm_is_handled_like_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qil_core.cli import layers as cli_layers

    stack = sample_stack(SIZE)
    src = tmp_path / "a.psd"
    write_psd(stack, src)
    real = cli_layers.png_items

    def terminated_midway(*a: object, **k: object) -> list:
        items = real(*a, **k)
        path, write = items[3]

        def write_then_term(staged: Path) -> object:
            result = write(staged)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler runs here
            return result

        items[3] = (path, write_then_term)
        return items

    monkeypatch.setattr(cli_layers, "png_items", terminated_midway)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["psd-to-layers", str(src), "--out", str(tmp_path / "out")]) == 143
    assert "terminated" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is removed again
    assert _snapshot(tmp_path / "out") == {}
