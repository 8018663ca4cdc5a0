"""The structural checker: clean on our files, and each kind of damage is reported (robustness.md rule 5)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage
from psd_tools.api.layers import PixelLayer

from qil_core.layers import Layer, LayerStack
from qil_core.layers.psd import lint_psd, write_psd


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    rng = np.random.default_rng(0)
    px = rng.random((9, 11, 4), dtype=np.float32)
    stack = LayerStack(
        24,
        16,
        [
            Layer(px, x=-2, y=3, name="a 😀"),
            Layer(np.zeros((0, 0, 4), np.float32), name="e"),
            Layer(px[:4, :5], x=20, y=12, name="b"),
        ],
    )
    return write_psd(stack, tmp_path_factory.mktemp("lint") / "good.psd").read_bytes()


def _layout(data: bytes) -> dict:
    """Offsets of the sections of a PSD written by our writer (one image resource walk, then fixed fields)."""
    pos = 26
    (cm,) = struct.unpack(">I", data[pos : pos + 4])
    pos += 4 + cm
    (res,) = struct.unpack(">I", data[pos : pos + 4])
    pos += 4 + res
    lm = pos
    li = pos + 4
    first_record = li + 4 + 2
    return {"lm": lm, "li": li, "record": first_record}


def test_our_files_are_clean(good) -> None:
    assert lint_psd(good) == []


def test_wrong_channel_length(good) -> None:
    lay = _layout(good)
    ch0 = lay["record"] + 18 + 2  # after the rectangle and channel count, past the first channel id
    data = bytearray(good)
    (length,) = struct.unpack(">I", data[ch0 : ch0 + 4])
    data[ch0 : ch0 + 4] = struct.pack(">I", length + 2)
    problems = lint_psd(bytes(data))
    assert problems and any("channel" in p for p in problems), problems


def test_rle_row_table_mismatch(good) -> None:
    data = bytearray(good)
    start = _first_channel_data(good)
    assert struct.unpack(">H", data[start : start + 2])[0] == 1  # RLE
    (row0,) = struct.unpack(">H", data[start + 2 : start + 4])
    data[start + 2 : start + 4] = struct.pack(">H", row0 + 1)
    problems = lint_psd(bytes(data))
    assert any("row table sums" in p for p in problems), problems


def _first_channel_data(data: bytes) -> int:
    """Offset of the first layer's first channel data: walk the layer records by their own lengths."""
    lay = _layout(data)
    (count,) = struct.unpack(">h", data[lay["li"] + 4 : lay["li"] + 6])
    pos = lay["record"]
    for _ in range(abs(count)):
        (nch,) = struct.unpack(">H", data[pos + 16 : pos + 18])
        pos += 18 + 6 * nch + 12
        (extra,) = struct.unpack(">I", data[pos : pos + 4])
        pos += 4 + extra
    return pos


def test_corrupt_packbits_row_is_caught_by_decoding(good) -> None:
    data = bytearray(good)
    start = _first_channel_data(good)
    rows = 9
    first_row = start + 2 + 2 * rows
    data[first_row] = 127  # a 128-byte literal in an 11-pixel row
    problems = lint_psd(bytes(data))
    assert any("overruns" in p for p in problems), problems
    assert not any("overruns" in p for p in lint_psd(bytes(data), decode=False))


def test_truncated_and_not_psd(good) -> None:
    assert any("not a PSD" in p for p in lint_psd(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40))
    assert any("truncated" in p for p in lint_psd(good[: len(good) // 2]))
    lay = _layout(good)
    (lm_len,) = struct.unpack(">I", good[lay["lm"] : lay["lm"] + 4])
    no_image = good[: lay["lm"] + 4 + lm_len]
    assert any("no-image-data" in p for p in lint_psd(no_image))


def test_odd_layer_info_length(good) -> None:
    lay = _layout(good)
    data = bytearray(good)
    (li_len,) = struct.unpack(">I", data[lay["li"] : lay["li"] + 4])
    data[lay["li"] : lay["li"] + 4] = struct.pack(">I", li_len - 1)
    problems = lint_psd(bytes(data))
    assert any("odd" in p for p in problems), problems


def test_positive_layer_count_with_alpha_channel_is_flagged(tmp_path) -> None:
    """Regression for robustness.md rule 2: psd-tools 1.26 writes a positive count with 4 merged channels."""
    psd = PSDImage.new("RGBA", (8, 8))
    psd.append(PixelLayer.frompil(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), psd, "a"))
    path = tmp_path / "psdtools.psd"
    psd.save(path)
    problems = lint_psd(path)
    assert any("positive layer count" in p for p in problems), problems


def test_psb_row_tables_use_four_bytes() -> None:
    """A minimal PSB (version 2) with one RLE merged channel: 4-byte row counts are accepted, 2-byte ones not."""
    w, h = 4, 2
    row = bytes([256 - 3, 7])  # repeat 7 four times
    header = b"8BPS" + struct.pack(">H6xHIIHH", 2, 1, h, w, 8, 1)
    body = struct.pack(">I", 0) + struct.pack(">I", 0) + struct.pack(">Q", 0)
    good = header + body + struct.pack(">H", 1) + struct.pack(">II", 2, 2) + row * 2
    assert lint_psd(good) == []
    bad = header + body + struct.pack(">H", 1) + struct.pack(">HH", 2, 2) + row * 2
    assert lint_psd(bad) != []
