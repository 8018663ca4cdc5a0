"""Safe output files: name rules (robustness 3.3, S5), containment (S3, S4), atomic never-overwrite writes (S6, S7)."""

from __future__ import annotations

import errno
import os
import resource
import signal

import pytest

from qil_core import fsutil
from qil_core.errors import OutputExistsError, OutputPathError
from qil_core.fsutil import (
    atomic_write,
    check_output_name,
    ensure_inside,
    next_counter,
    publish_group,
    safe_name,
)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("", "empty"),
        ("   ", "empty"),
        (".", "folder reference"),
        ("..", "folder reference"),
        (".hidden.psd", "starts with '.'"),
        ("nul\x00byte.psd", "control"),
        ("tab\there.psd", "control"),
        ("a" * 201, "201 bytes"),
        ("é" * 101, "202 bytes"),
        ("CON", "reserved"),
        ("nul.psd", "reserved"),
        ("com1.tar.gz", "reserved"),
        ("LPT9.psd", "reserved"),
        ("a/b.psd", "separator"),
        ("a\\b.psd", "separator"),
        ("trailing.", "ends with"),
    ],
)
def test_s5_bad_names_rejected_with_reason(name: str, reason: str) -> None:
    with pytest.raises(OutputPathError, match=reason):
        check_output_name(name)


@pytest.mark.parametrize(
    "name", ["layers_00001_.psd", "名前 レイヤー.psd", "-rf", "a" * 200, "console.psd", "COM10.psd"]
)
def test_good_names_pass(name: str) -> None:
    assert check_output_name(name) == name


def test_safe_name_makes_any_text_usable() -> None:
    assert safe_name('a/b\\c:d*e?f"g<h>i|j') == "a_b_c_d_e_f_g_h_i_j"
    assert safe_name("..") == "untitled" and safe_name("") == "untitled"
    assert safe_name("  .hidden. ") == "hidden"
    assert safe_name("nul") == "_nul" and safe_name("CON.txt") == "_CON.txt"
    assert safe_name("line\nbreak\x00") == "line_break_"
    long = safe_name("レ" * 100)
    assert len(long.encode()) <= 80 and long == "レ" * 26
    for text in ("レイヤー 😀", "x" * 500, "\x7f\x01", "a/../b"):
        check_output_name(safe_name(text) + ".png")


def test_s3_s4_ensure_inside_follows_symlinks(tmp_path) -> None:
    out = tmp_path / "output"
    out.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (out / "link_out").symlink_to(outside)
    assert ensure_inside(out / "sub" / "x.psd", out) == (out / "sub" / "x.psd").resolve()
    for bad in (out / ".." / "x.psd", out / "link_out" / "pwned.psd", tmp_path / "x.psd"):
        with pytest.raises(OutputPathError, match="outside the output folder"):
            ensure_inside(bad, out)


def test_atomic_write_creates_and_never_overwrites(tmp_path) -> None:
    target = tmp_path / "a.bin"
    assert atomic_write(target, lambda f: f.write(b"one")) == target
    assert target.read_bytes() == b"one"
    with pytest.raises(OutputExistsError, match="already exists"):
        atomic_write(target, lambda f: f.write(b"two"))
    assert target.read_bytes() == b"one"
    atomic_write(target, lambda f: f.write(b"three"), overwrite=True)
    assert target.read_bytes() == b"three"
    assert os.listdir(tmp_path) == ["a.bin"]
    assert isinstance(OutputExistsError("x"), FileExistsError)


def test_existing_name_appearing_during_write_is_not_replaced(tmp_path) -> None:
    target = tmp_path / "race.bin"

    def write(f) -> None:
        f.write(b"mine")
        target.write_bytes(b"theirs")  # another writer takes the name while we write

    with pytest.raises(OutputExistsError):
        atomic_write(target, write)
    assert target.read_bytes() == b"theirs"
    assert os.listdir(tmp_path) == ["race.bin"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_error_inside_write_leaves_no_file(tmp_path, exc) -> None:
    def write(f) -> None:
        f.write(b"partial")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(tmp_path / "x.bin", write)
    assert os.listdir(tmp_path) == []


def test_no_hard_links_falls_back_to_checked_rename(tmp_path, monkeypatch) -> None:
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(fsutil.os, "link", no_link)
    target = tmp_path / "fat.bin"
    atomic_write(target, lambda f: f.write(b"1"))
    assert target.read_bytes() == b"1"

    def sneaky(f) -> None:
        f.write(b"2")
        target.write_bytes(b"other")

    target.unlink()
    with pytest.raises(OutputExistsError):
        atomic_write(target, sneaky)
    assert target.read_bytes() == b"other" and os.listdir(tmp_path) == ["fat.bin"]


def test_s6_folder_problems_are_translated(tmp_path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        atomic_write(tmp_path / "file" / "sub" / "x.bin", lambda f: f.write(b"1"))
    with pytest.raises(OutputPathError, match="does not exist"):
        atomic_write(tmp_path / "missing" / "x.bin", lambda f: f.write(b"1"))
    made = atomic_write(tmp_path / "new" / "deep" / "x.bin", lambda f: f.write(b"1"), make_dirs=True)
    assert made.read_bytes() == b"1"
    with pytest.raises(OutputPathError, match="not allowed"):
        atomic_write(tmp_path / "bad\x00name.bin", lambda f: f.write(b"1"))


def test_s6_disk_full_and_file_too_large(tmp_path, monkeypatch) -> None:
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old_limit[1]))
        with pytest.raises(OutputPathError, match="larger than this system allows"):
            atomic_write(tmp_path / "big.bin", lambda f: f.write(b"x" * (3 << 20)))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert os.listdir(tmp_path) == []

    def full(f) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputPathError, match="disk is full"):
        atomic_write(tmp_path / "full.bin", full)
    with pytest.raises(OutputPathError, match="read-only"):
        atomic_write(tmp_path / "ro.bin", lambda f: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only")))
    assert os.listdir(tmp_path) == []


def _writes(data: bytes):
    return lambda path: path.write_bytes(data)


def test_s7_counter_names_and_collisions(tmp_path, monkeypatch) -> None:
    assert next_counter(tmp_path, "img") == 1 and next_counter(tmp_path / "missing", "img") == 1
    (tmp_path / "img_00001_.psd").write_bytes(b"taken")
    assert next_counter(tmp_path, "img") == 2
    [p] = publish_group(tmp_path, "img", [(".psd", _writes(b"new"))])
    assert p.name == "img_00002_.psd" and p.read_bytes() == b"new"
    # Another instance takes the name between the listing and the publish: retry with the next counter.
    monkeypatch.setattr(fsutil, "next_counter", lambda *a: 3)
    real_publish = fsutil.publish_exclusive
    taken = []

    def racing(tmp, final):
        if not taken:
            final.write_bytes(b"other instance")
            taken.append(final.name)
        return real_publish(tmp, final)

    monkeypatch.setattr(fsutil, "publish_exclusive", racing)
    [p] = publish_group(tmp_path, "img", [(".psd", _writes(b"ours"))])
    assert taken == ["img_00003_.psd"] and p.name == "img_00004_.psd" and p.read_bytes() == b"ours"
    assert (tmp_path / "img_00003_.psd").read_bytes() == b"other instance"
    assert sorted(os.listdir(tmp_path)) == ["img_00001_.psd", "img_00002_.psd", "img_00003_.psd", "img_00004_.psd"]
    with pytest.raises(OutputPathError, match="starts with"):
        publish_group(tmp_path, ".hidden", [(".psd", _writes(b"x"))])


def test_a_group_is_claimed_whole_or_moved_to_the_next_counter(tmp_path) -> None:
    (tmp_path / "set_00001_.png").write_bytes(b"theirs")  # the .psd of counter 1 is free, its .png is not

    def folder_writer(path) -> None:
        path.mkdir()
        (path / "00_background.png").write_bytes(b"bg")

    group = [(".psd", _writes(b"psd")), (".png", _writes(b"png")), ("", folder_writer)]
    paths = publish_group(tmp_path, "set", group, counter=1, label="my prefix")
    assert [p.name for p in paths] == ["set_00002_.psd", "set_00002_.png", "set_00002_"]
    assert not (tmp_path / "set_00001_.psd").exists()  # our half-claimed group at counter 1 was taken back
    assert (tmp_path / "set_00001_.png").read_bytes() == b"theirs"
    assert (tmp_path / "set_00002_" / "00_background.png").read_bytes() == b"bg"
    assert sorted(os.listdir(tmp_path)) == ["set_00001_.png", "set_00002_", "set_00002_.png", "set_00002_.psd"]

    def full(path) -> None:
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputPathError, match="could not write 'my prefix'.*check free space"):
        publish_group(tmp_path, "set", [(".psd", _writes(b"ok")), (".png", full)], label="my prefix")
    with pytest.raises(OutputPathError, match="no free file name for 'set' .* after 1 counters"):
        publish_group(tmp_path, "set", [(".png", _writes(b"x"))], counter=1, max_tries=1)
    with pytest.raises(ValueError, match="suffixes must differ"):
        publish_group(tmp_path, "set", [(".png", _writes(b"a")), (".png", _writes(b"b"))])
    assert sorted(os.listdir(tmp_path)) == ["set_00001_.png", "set_00002_", "set_00002_.png", "set_00002_.psd"]


def test_one_byte_formatter_in_decimal_units() -> None:
    from qil_core import resources
    from qil_core.layers.psd import write as psd_write
    from qil_core.model.runtime import memory

    # the model code, the PSD writer and the CLI use the one formatter of qil_core.resources (the PSD writer now
    # only through resources.check_allocation; any formatter it holds must be that one)
    assert memory.format_bytes is resources.format_bytes
    assert getattr(psd_write, "format_bytes", resources.format_bytes) is resources.format_bytes
    assert [resources.format_bytes(n) for n in (0, 999, 1536, 40.86e9, 2.5e12)] == [
        "0 B",
        "999 B",
        "1.54 KB",
        "40.86 GB",
        "2.50 TB",
    ]
    assert not hasattr(fsutil, "human_bytes") and not hasattr(fsutil, "format_bytes")
