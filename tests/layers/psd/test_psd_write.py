"""PSD writer: PackBits against psd-tools' decoder, round trips through independent readers, S1-S15 rows."""

from __future__ import annotations

import logging
import os
import struct

import numpy as np
import pytest
from psd_readers import check_readers, imagemagick_result, read_pillow_merged, read_psd_tools, read_pytoshop
from psd_tools.compression import rle_impl

from qil_core.errors import InputError, OutputPathError, PSDError, ResourceError
from qil_core.layers import BLEND_MODES, Layer, LayerStack
from qil_core.layers.blend import PSD_APPROXIMATE_MODES, PSD_BLEND_KEYS
from qil_core.layers.composite import composite
from qil_core.layers.psd import lint_psd, pascal_name, read_psd, write_psd
from qil_core.layers.psd import write as psd_write
from qil_core.layers.psd.packbits import decode_rows, encode_rows

RNG = np.random.default_rng(1234)


def rgba(h: int, w: int, *, holes: float = 0.2, seed: int = 0) -> np.ndarray:
    """Random straight RGBA (h, w, 4) float32 with some fully transparent pixels."""
    rng = np.random.default_rng(seed)
    px = rng.random((h, w, 4), dtype=np.float32)
    px[..., 3] = np.where(rng.random((h, w)) < holes, 0, 0.2 + 0.8 * px[..., 3])
    return px


def blob(h: int, w: int, color: tuple[float, float, float]) -> np.ndarray:
    """An opaque disc of one colour with a soft edge, transparent corners."""
    y, x = np.mgrid[0:h, 0:w]
    r = np.hypot((y - h / 2 + 0.5) / (h / 2), (x - w / 2 + 0.5) / (w / 2))
    px = np.zeros((h, w, 4), np.float32)
    px[..., :3] = color
    px[..., 3] = np.clip((1 - r) * 4, 0, 1)
    return px


# ---------------------------------------------------------------- PackBits


def _packets(data: np.ndarray, counts: np.ndarray) -> list[tuple[str, int]]:
    """Walk the packets of encoded rows: ('lit'|'rep', length)."""
    out, pos, buf = [], 0, bytes(data)
    for c in counts.tolist():
        end = pos + c
        while pos < end:
            h = buf[pos]
            assert h != 128, "no-op header 128 must never be written"
            if h < 128:
                out.append(("lit", h + 1))
                pos += h + 2
            else:
                out.append(("rep", 257 - h))
                pos += 2
        assert pos == end
    return out


def _check_encoding(a: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Encode, then decode with psd-tools' C decoder row by row and with our strict decoder."""
    counts, data = encode_rows(a, method=method)
    h, w = a.shape
    assert counts.shape == (h,) and int(counts.sum()) == data.size
    assert (counts <= w + (w + 127) // 128).all(), "worst case: raw + one header per 128 bytes"
    pos, raw = 0, bytes(data)
    for row, c in enumerate(counts.tolist()):
        dec = rle_impl.decode(raw[pos : pos + c], w)
        assert dec == a[row].tobytes(), f"{method}: row {row} differs after psd-tools' decoder"
        pos += c
    assert np.array_equal(decode_rows(data, counts, w), a)
    return counts, data


@pytest.mark.parametrize("method", ["runs", "blocks", "auto"])
def test_packbits_cross_checked_with_psd_tools(method: str) -> None:
    cases = []
    for w in (1, 2, 3, 127, 128, 129, 130, 255, 256, 257, 258, 385):
        cases += [
            np.zeros((2, w), np.uint8),
            RNG.integers(0, 256, (2, w), dtype=np.uint8),
            RNG.integers(0, 2, (3, w), dtype=np.uint8),
            np.tile(np.arange(w, dtype=np.uint8), (2, 1)),
        ]
        x = np.zeros((2, w), np.uint8)
        x[:, w // 2 :] = 7
        cases.append(x)
    for _ in range(60):
        h, w = int(RNG.integers(1, 5)), int(RNG.integers(1, 600))
        lens = RNG.integers(1, 300, w)
        row = np.repeat(RNG.integers(0, 3, w).astype(np.uint8), lens)[: h * w]
        cases.append(np.resize(row, (h, w)))
    for a in cases:
        _check_encoding(np.ascontiguousarray(a), method)


def test_packbits_worst_cases_use_full_128_byte_chunks() -> None:
    # 129 equal bytes cannot end on a 1-byte repeat: the exact encoder splits 127 + 2.
    a = np.full((1, 129), 9, np.uint8)
    counts, data = _check_encoding(a, "runs")
    assert _packets(data, counts) == [("rep", 127), ("rep", 2)]
    a = np.full((1, 300), 5, np.uint8)
    counts, data = _check_encoding(a, "runs")
    assert _packets(data, counts) == [("rep", 128), ("rep", 128), ("rep", 44)]
    noise = np.arange(300, dtype=np.uint8)[None] * 7 % 251  # no two neighbours equal
    for method in ("runs", "blocks"):
        counts, data = _check_encoding(noise.astype(np.uint8), method)
        assert _packets(data, counts) == [("lit", 128), ("lit", 128), ("lit", 44)]
    a = np.zeros((1, 257), np.uint8)  # blocks: a 1-byte tail block is a literal, never a 1-byte repeat
    counts, data = _check_encoding(a, "blocks")
    assert _packets(data, counts) == [("rep", 128), ("rep", 128), ("lit", 1)]


def test_packbits_compresses_flat_rows() -> None:
    a = np.zeros((64, 4096), np.uint8)
    a[:, 1000:3000] = 200
    counts, data = _check_encoding(a, "auto")
    assert data.size < a.size / 40


# ---------------------------------------------------------------- round trips through independent readers


def write_and_check(tmp_path, stack: LayerStack, name: str = "out.psd", **kw) -> dict:
    """Write with the default composite and check every reader plus the merged image."""
    names = kw.pop("_names", None)
    merged = composite(stack)
    path = write_psd(stack, tmp_path / name, merged=merged, **kw)
    return check_readers(path, stack, depth=kw.get("depth", 8), merged=merged, names=names)


def test_s1_unicode_names_luni_and_pascal_fallback(tmp_path) -> None:
    names = [
        "レイヤー 😀",
        "שכבה עליונה",
        "e\u0301te\u0301 cafe\u0301",
        "x" * 40 + " long name over 31 bytes",
        "一",
        "Ünïcödé façade",
    ]
    layers = [Layer(blob(12 + i, 15, (i / 6, 0.5, 1 - i / 6)), x=3 * i, y=2 * i, name=n) for i, n in enumerate(names)]
    stack = LayerStack(40, 30, layers)
    out = write_and_check(tmp_path, stack)
    im_names = [f["name"] for f in imagemagick_result(out)["layers"]]
    assert im_names[0] == b"???? ?"  # CJK and emoji have no legacy form (rule 4)
    assert im_names[1] == b"???? ??????"  # Hebrew likewise; full names come from luni
    assert im_names[2] == b"ete cafe"  # accents dropped, same bytes in every reader
    assert im_names[3] == b"x" * 31
    assert im_names[5] == b"Unicode facade"
    assert all(len(pascal_name(n)) <= 31 for n in names)
    assert [layer.name for layer in read_psd(tmp_path / "out.psd")] == names


def test_s2_names_sanitised_with_warnings(tmp_path, caplog) -> None:
    raw = ["n" * 300, "nul\x00byte", "two\nlines", "   ", "dup", "dup", ""]
    stack = LayerStack(20, 20, [Layer(blob(6, 6, (1, 0, 0)), x=i, y=i, name=n) for i, n in enumerate(raw)])
    want = ["n" * 255, "nul byte", "two lines", "   ", "dup", "dup", "Layer 7"]
    with caplog.at_level(logging.WARNING):
        write_and_check(tmp_path, stack, _names=want)
    text = caplog.text
    assert "truncated to 255" in text and "control characters" in text
    assert [layer.name for layer in read_psd(tmp_path / "out.psd")] == want


def test_opacity_visibility_and_every_blend_key(tmp_path) -> None:
    layers = [
        Layer(
            blob(8, 8, (0.2, 0.4, 0.6)),
            x=i % 6 * 5,
            y=i // 6 * 5,
            name=mode,
            blend_mode=mode,
            opacity=(i + 1) / 27,
            visible=i % 3 != 0,
        )
        for i, mode in enumerate(BLEND_MODES)
    ]
    stack = LayerStack(32, 32, layers)
    path = write_psd(stack, tmp_path / "modes.psd", merged=np.zeros((32, 32, 4), np.float32))
    assert lint_psd(path) == []
    pt = read_psd_tools(path)
    ps = read_pytoshop(path)
    for got, got2, layer in zip(pt["layers"], ps["layers"], layers):
        assert got["blend"] == PSD_BLEND_KEYS[layer.blend_mode] == got2["blend"]
        assert got["opacity"] == round(layer.opacity * 255) == got2["opacity"]
        assert got["visible"] == layer.visible == got2["visible"]
    back = read_psd(path)
    for got, layer in zip(back, layers):
        if layer.blend_mode not in PSD_APPROXIMATE_MODES:
            assert got.blend_mode == layer.blend_mode
        assert got.visible == layer.visible
        assert got.opacity == pytest.approx(layer.opacity, abs=0.5 / 255)


def test_s10_offsets_empty_one_pixel_and_off_canvas_layers(tmp_path) -> None:
    one = np.zeros((1, 1, 4), np.float32)
    one[0, 0] = (1, 0.5, 0.25, 1)
    layers = [
        Layer(rgba(10, 12, seed=1), x=-4, y=-3, name="top-left off canvas"),
        Layer(rgba(9, 9, seed=2), x=25, y=18, name="bottom-right off canvas"),
        Layer(np.zeros((6, 6, 4), np.float32), x=5, y=5, name="fully transparent"),
        Layer(np.zeros((0, 0, 4), np.float32), name="0x0"),
        Layer(one, x=7, y=8, name="1x1"),
        Layer(rgba(5, 5, seed=3), x=-50, y=-60, name="entirely outside"),
    ]
    stack = LayerStack(30, 24, layers)
    out = write_and_check(tmp_path, stack)
    pt = out["psd_tools"]["layers"]
    assert (pt[2]["w"], pt[2]["h"], pt[3]["w"]) == (0, 0, 0)  # kept as 0x0 layers (rule 7)
    assert (pt[4]["x"], pt[4]["y"], pt[4]["w"], pt[4]["h"]) == (7, 8, 1, 1)
    assert len(imagemagick_result(out)["layers"]) == 4  # ImageMagick drops the two empty ones, as documented
    back = read_psd(tmp_path / "out.psd")
    assert len(back) == 6 and back[2].pixels.shape == (0, 0, 4) and back[5].x == -50


def test_transparent_pixels_have_zero_rgb_and_merged_alpha_is_real(tmp_path) -> None:
    px = rgba(16, 16, holes=0.5, seed=5)
    stack = LayerStack(16, 16, [Layer(px, name="holes")])
    out = write_and_check(tmp_path, stack)
    got = out["pytoshop"]["layers"][0]["rgba"]
    assert (got[got[..., 3] == 0][:, :3] == 0).all()
    merged = read_pillow_merged(tmp_path / "out.psd")
    assert (merged[..., 3] == np.round(composite(stack)[..., 3] * 255)).all()
    assert (merged[..., 3] == 0).any() and (merged[..., 3] > 0).any()


def test_merged_defaults_to_our_composite(tmp_path) -> None:
    stack = LayerStack(
        24,
        20,
        [
            Layer(blob(20, 24, (0, 0, 1)), name="base"),
            Layer(blob(10, 10, (1, 0, 0)), x=5, y=4, name="mul", blend_mode="multiply", opacity=0.7),
        ],
    )
    path = write_psd(stack, tmp_path / "auto.psd")
    check_readers(path, stack, merged=composite(stack))


def test_s12_sixteen_bit_with_icc(tmp_path) -> None:
    from io import BytesIO

    from PIL import ImageCms

    stack = LayerStack(
        20,
        16,
        [Layer(rgba(8, 10, seed=7), x=2, y=3, name="16-bit 😀"), Layer(blob(16, 20, (0.3, 0.6, 0.9)), name="base")],
    )
    out = write_and_check(tmp_path, stack, name="deep.psd", depth=16)
    assert imagemagick_result(out)["merged"]["depth"] == 16
    from psd_tools import PSDImage

    icc = PSDImage.open(tmp_path / "deep.psd").image_resources.get_data(1039)
    profile = ImageCms.ImageCmsProfile(BytesIO(icc))
    assert "sRGB" in ImageCms.getProfileDescription(profile)
    back = read_psd(tmp_path / "deep.psd")
    np.testing.assert_allclose(back[0].pixels[..., 3], np.round(stack[0].pixels[..., 3] * 65535) / 65535, atol=1e-6)


def test_raw_compression_is_also_valid(tmp_path) -> None:
    stack = LayerStack(20, 16, [Layer(rgba(8, 10, seed=8), x=2, y=3, name="raw")])
    write_and_check(tmp_path, stack, name="raw.psd", compression="raw")


# ---------------------------------------------------------------- validation and refusals (S8, S9, S11, S13)


def test_s13_nan_pixels_raise_and_leave_no_file(tmp_path) -> None:
    px = rgba(6, 6)
    px[2, 3, 1] = np.nan
    stack = LayerStack(10, 10, [Layer(px, name="bad")])
    with pytest.raises(InputError, match="NaN"):
        write_psd(stack, tmp_path / "nan.psd", merged=np.zeros((10, 10, 4), np.float32))
    assert os.listdir(tmp_path) == []


def test_s13_out_of_range_pixels_are_clamped_with_a_warning(tmp_path, caplog) -> None:
    px = rgba(6, 6) * 3 - 1
    stack = LayerStack(10, 10, [Layer(px, name="loud")])
    with caplog.at_level(logging.WARNING):
        path = write_psd(stack, tmp_path / "clamp.psd", merged=np.zeros((10, 10, 4), np.float32))
    assert "clamped" in caplog.text
    clamped = LayerStack(10, 10, [Layer(np.clip(px, 0, 1), name="loud")])
    check_readers(path, clamped)


def test_s8_canvas_over_30000_refused() -> None:
    stack = LayerStack(30_001, 10, [Layer(np.ones((2, 2, 4), np.float32), name="a")])
    with pytest.raises(PSDError, match="30000 px per side"):
        write_psd(stack, "/nonexistent/never.psd")


def test_s9_memory_precheck(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(psd_write, "_available_memory", lambda: 1 << 30)
    stack = LayerStack(17_000, 17_000, [Layer(np.ones((2, 2, 4), np.float32), name="a")])
    with pytest.raises(ResourceError, match="17000x17000"):
        write_psd(stack, tmp_path / "big.psd")
    assert os.listdir(tmp_path) == []


def test_s11_layer_counts(tmp_path) -> None:
    with pytest.raises(PSDError, match="no layers"):
        write_psd(LayerStack(4, 4, []), tmp_path / "empty.psd")
    tiny = np.ones((1, 1, 4), np.float32)
    many = LayerStack(4, 4, [Layer(tiny, name=str(i)) for i in range(8001)])
    with pytest.raises(PSDError, match="at most 8000"):
        write_psd(many, tmp_path / "many.psd")
    assert os.listdir(tmp_path) == []


def test_merged_shape_checked(tmp_path) -> None:
    stack = LayerStack(8, 8, [Layer(rgba(2, 2), name="a")])
    with pytest.raises(InputError, match=r"\(8, 8, 4\)"):
        write_psd(stack, tmp_path / "m.psd", merged=np.zeros((8, 9, 4), np.float32))


# ---------------------------------------------------------------- atomicity (S6, S7, S14)


def _stack() -> LayerStack:
    return LayerStack(16, 16, [Layer(rgba(8, 8, seed=i), x=i, y=i, name=f"l{i}") for i in range(4)])


def test_s7_existing_file_never_overwritten(tmp_path) -> None:
    target = tmp_path / "keep.psd"
    target.write_bytes(b"precious")
    with pytest.raises(OutputPathError, match="already exists"):
        write_psd(_stack(), target)
    assert target.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["keep.psd"]
    write_psd(_stack(), target, overwrite=True)
    assert lint_psd(target) == []


def test_s14_interrupted_save_leaves_nothing(tmp_path, monkeypatch) -> None:
    real = psd_write._encode_layer
    calls = []

    def flaky(layer, index, *args):
        calls.append(index)
        if index == 2:
            raise KeyboardInterrupt("injected between layers")
        return real(layer, index, *args)

    monkeypatch.setattr(psd_write, "_encode_layer", flaky)
    target = tmp_path / "cut.psd"
    with pytest.raises(KeyboardInterrupt):
        write_psd(_stack(), target, workers=1)
    assert 2 in calls and os.listdir(tmp_path) == []
    target.write_bytes(b"previous version")
    with pytest.raises(KeyboardInterrupt):
        write_psd(_stack(), target, overwrite=True, workers=2)
    assert target.read_bytes() == b"previous version"
    assert os.listdir(tmp_path) == ["cut.psd"]


def test_s6_target_folder_is_a_file(tmp_path) -> None:
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="is a file"):
        write_psd(_stack(), tmp_path / "afile" / "out.psd")


def test_s6_disk_full_via_file_size_limit(tmp_path) -> None:
    import resource
    import signal

    target = tmp_path / "full.psd"
    target.write_bytes(b"old")
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    big = LayerStack(256, 256, [Layer(rgba(256, 256, seed=i), name=str(i)) for i in range(3)])
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, old_limit[1]))
        with pytest.raises(OutputPathError, match="larger than this system allows"):
            write_psd(big, target, overwrite=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["full.psd"]


def test_structure_details(tmp_path) -> None:
    """Channel order -1,0,1,2, negative count, luni padded to 4, 4 merged channels, layer info padded to 4."""
    path = write_psd(_stack(), tmp_path / "s.psd")
    assert lint_psd(path) == []
    data = path.read_bytes()
    assert data[:4] == b"8BPS" and struct.unpack(">H", data[12:14])[0] == 4
    i = data.index(b"luni")
    (length,) = struct.unpack(">I", data[i + 4 : i + 8])
    assert length % 4 == 0
    ps = read_pytoshop(path)
    assert all(layer["channel_ids"] == [-1, 0, 1, 2] for layer in ps["layers"])
    assert read_psd_tools(path)["layer_count"] == -4


def test_verify_lints_before_publishing(tmp_path, monkeypatch) -> None:
    path = write_psd(_stack(), tmp_path / "v.psd", verify=True)
    assert lint_psd(path) == []
    real = psd_write._layer_record

    def broken(rect, lengths, *args):  # a wrong channel length in every record
        return real(rect, [n + 2 for n in lengths], *args)

    monkeypatch.setattr(psd_write, "_layer_record", broken)
    with pytest.raises(PSDError, match="failed the structural check"):
        write_psd(_stack(), tmp_path / "bad.psd", verify=True)
    assert os.listdir(tmp_path) == ["v.psd"]
