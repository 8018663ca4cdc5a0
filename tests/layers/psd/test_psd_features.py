"""PSD features designers use: masks, clipping, fill opacity, groups, flat files, 32-bit, profiles, damage.

Every file is built here (psd-tools' own API, or the byte-level builder in psd_craft.py). References:
- "psd-tools": psd-tools' renderer, `PSDImage.composite(force=True)` (renders from the layers);
- "formula": an independent computation in the test (the IEC 61966-2-1 sRGB curve, a Gaussian, LittleCMS
  through Pillow's ImageCms), named at each test.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image, ImageCms
from psd_craft import (
    CraftLayer,
    group_layers,
    mask_block,
    matrix_profile,
    psd_bytes,
    raw_channel,
    rect_vector_mask,
    rgba_layer,
    rle_channel,
    rle_rows,
)
from psd_tools import PSDImage
from psd_tools.api.layers import PixelLayer
from psd_tools.constants import BlendMode, Tag

from qil_core.errors import PSDError, ResourceError
from qil_core.layers import composite
from qil_core.layers.psd import load_psd, read_psd, read_psd_merged


def _ours(path, **kw) -> np.ndarray:
    return composite(read_psd(path, **kw))


def _ref(path) -> np.ndarray:
    """psd-tools' renderer, from the layers (not the stored preview), as straight RGBA float."""
    img = PSDImage.open(path).composite(force=True)
    return np.asarray(img.convert("RGBA"), np.float32) / 255


def _close(ours: np.ndarray, ref: np.ndarray, tol: float = 1.5 / 255) -> None:
    """Premultiplied comparison (colour under alpha 0 does not matter)."""
    a, b = ours[..., 3:], ref[..., 3:]
    np.testing.assert_allclose(ours[..., 3], ref[..., 3], atol=tol)
    np.testing.assert_allclose(ours[..., :3] * a, ref[..., :3] * b, atol=tol)


def _solid(w: int, h: int, rgba) -> Image.Image:
    return Image.new("RGBA", (w, h), rgba)


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# -- masks ---------------------------------------------------------------------------------------------------


def _masked(tmp_path, default: int, disabled: bool = False, **params):
    """A 6x4 red layer at (2, 1) with a 3x2 mask at (3, 2), white inside with a gradient column."""
    px = np.zeros((4, 6, 4), np.uint8)
    px[..., 0], px[..., 3] = 220, 255
    mask = np.full((2, 3), 255, np.uint8)
    mask[:, 2] = 128
    lay = rgba_layer("masked", 1, 2, px, mask=mask_block(2, 3, 4, 6, default, disabled, **params))
    lay.channels.append((-2, raw_channel(mask)))
    under = rgba_layer("under", 0, 0, np.full((8, 10, 4), (0, 0, 255, 255), np.uint8))
    return _write(tmp_path, f"mask{default}{disabled}.psd", psd_bytes(10, 8, [under, lay]))


@pytest.mark.parametrize("default", [0, 255])
def test_layer_mask_smaller_than_the_layer(tmp_path, default) -> None:
    """Reference: psd-tools. Outside the mask rectangle the default colour decides."""
    path = _masked(tmp_path, default)
    stack = read_psd(path)
    alpha = stack[1].pixels[..., 3]  # layer box rows 1..4, cols 2..7; mask rows 2..3, cols 3..5
    assert alpha[1, 1] == pytest.approx(1.0) and alpha[1, 3] == pytest.approx(128 / 255)
    assert alpha[0, 0] == pytest.approx(default / 255) and alpha[3, 5] == pytest.approx(default / 255)
    _close(_ours(path), _ref(path))


def test_disabled_mask_is_ignored(tmp_path) -> None:
    path = _masked(tmp_path, 0, disabled=True)
    assert np.all(read_psd(path)[1].pixels[..., 3] == 1)
    _close(_ours(path), _ref(path))


def test_mask_density(tmp_path) -> None:
    """Reference: psd-tools (density d shows d·m + 1 - d)."""
    path = _masked(tmp_path, 0, density=128)
    alpha = read_psd(path)[1].pixels[..., 3]
    assert alpha[0, 0] == pytest.approx(1 - 128 / 255, abs=1e-6)
    _close(_ours(path), _ref(path))


def test_mask_feather_is_a_gaussian(tmp_path) -> None:
    """Reference: formula (a true Gaussian of sigma = feather across the mask's step edge)."""
    px = np.full((40, 40, 4), 255, np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[:, 20:] = 255
    lay = rgba_layer("f", 0, 0, px, mask=mask_block(0, 0, 40, 40, 0, feather=3.0))
    lay.channels.append((-2, raw_channel(mask)))
    alpha = read_psd(_write(tmp_path, "f.psd", psd_bytes(40, 40, [lay])))[0].pixels[20, :, 3]
    x = np.arange(40) + 0.5 - 20
    from math import erf, sqrt

    want = np.array([0.5 * (1 + erf(v / (3.0 * sqrt(2)))) for v in x])
    np.testing.assert_allclose(alpha[8:32], want[8:32], atol=0.03)


@pytest.mark.parametrize("disabled", [False, True])
def test_vector_mask_is_rasterised(tmp_path, disabled) -> None:
    """Reference: formula (a rectangle path on pixel edges covers exactly those pixels). psd-tools does not
    apply a pixel layer's vector mask unless the layer also has a pixel mask, so it is not the reference here."""
    px = np.full((8, 10, 4), 255, np.uint8)
    vmsk = rect_vector_mask(0.2, 0.25, 0.7, 0.75, disabled=disabled)  # x 2..7, y 2..6 on a 10x8 canvas
    path = _write(tmp_path, "v.psd", psd_bytes(10, 8, [rgba_layer("v", 0, 0, px, blocks=[(b"vmsk", vmsk)])]))
    alpha = read_psd(path)[0].pixels[..., 3]
    want = np.zeros((8, 10), np.float32)
    want[2:6, 2:7] = 1
    np.testing.assert_allclose(alpha, 1 if disabled else want, atol=2e-3)


def test_adjustment_layer_warns(tmp_path) -> None:
    px = np.full((4, 4, 4), 200, np.uint8)
    invert = CraftLayer("Invert 1", (0, 0, 0, 0), [(c, b"\x00\x00") for c in (-1, 0, 1, 2)], blocks=[(b"nvrt", b"")])
    result = load_psd(_write(tmp_path, "adj.psd", psd_bytes(4, 4, [rgba_layer("px", 0, 0, px), invert])))
    assert [layer.name for layer in result.stack] == ["px"]
    assert any("adjustment layer 'Invert 1'" in w and "not applied" in w for w in result.warnings)


# -- clipping, fill opacity, groups ----------------------------------------------------------------------------


def _psd_tools_doc(tmp_path, name: str, build) -> object:
    psd = PSDImage.new("RGBA", (24, 16))
    build(psd)
    path = tmp_path / name
    psd.save(path)
    return path


def test_clipping_on_a_hard_base_keeps_layers(tmp_path) -> None:
    """Reference: psd-tools. The clipped layers stay layers, cut to the base's shape."""

    def build(psd):
        base = PixelLayer.frompil(_solid(8, 6, (0, 0, 255, 255)), psd, "base", top=2, left=3)
        over = PixelLayer.frompil(_solid(20, 4, (255, 0, 0, 200)), psd, "over", top=4, left=0)
        mult = PixelLayer.frompil(_solid(6, 12, (0, 255, 0, 255)), psd, "mult", top=0, left=5)
        mult.blend_mode = BlendMode.MULTIPLY
        psd.extend([base, over, mult])
        over.clipping = True
        mult.clipping = True

    path = _psd_tools_doc(tmp_path, "clip.psd", build)
    stack = read_psd(path)
    assert [layer.name for layer in stack] == ["base", "over", "mult"]
    assert stack[1].pixels[0, 0, 3] == 0  # outside the base
    _close(_ours(path), _ref(path))


def test_clipping_on_a_soft_base_merges(tmp_path, caplog) -> None:
    """Reference: psd-tools (Photoshop's clipping: clipped layers painted on the base, the base's alpha)."""

    def build(psd):
        grad = np.zeros((6, 8, 4), np.uint8)
        grad[..., 1] = 255
        grad[..., 3] = np.linspace(40, 255, 8).astype(np.uint8)
        base = PixelLayer.frompil(Image.fromarray(grad, "RGBA"), psd, "soft", top=2, left=3)
        base.opacity = 200
        over = PixelLayer.frompil(_solid(20, 4, (255, 0, 0, 255)), psd, "over", top=4, left=0)
        psd.extend([base, over])
        over.clipping = True

    path = _psd_tools_doc(tmp_path, "soft.psd", build)
    with caplog.at_level(logging.WARNING):
        stack = read_psd(path)
    assert [layer.name for layer in stack] == ["soft"] and "clipped layers 'over'" in caplog.text
    _close(_ours(path), _ref(path))


def test_fill_opacity(tmp_path) -> None:
    """Reference: psd-tools."""

    def build(psd):
        a = PixelLayer.frompil(_solid(10, 10, (255, 128, 0, 255)), psd, "fill", top=3, left=3)
        a.fill_opacity = 100
        a.opacity = 200
        psd.append(a)

    path = _psd_tools_doc(tmp_path, "fill.psd", build)
    assert read_psd(path)[0].opacity == pytest.approx(200 / 255 * 100 / 255)
    _close(_ours(path), _ref(path))


def _grouped(tmp_path, blend=BlendMode.PASS_THROUGH, opacity=255, b_blend=BlendMode.MULTIPLY):
    def build(psd):
        bg = PixelLayer.frompil(_solid(24, 16, (40, 120, 200, 255)), psd, "bg")
        a = PixelLayer.frompil(_solid(10, 8, (255, 0, 0, 255)), psd, "a", top=2, left=2)
        b = PixelLayer.frompil(_solid(10, 8, (250, 250, 0, 255)), psd, "b", top=5, left=8)
        b.blend_mode = b_blend
        psd.extend([bg, a, b])
        group = psd.create_group([a, b], name="grp")
        group.blend_mode = blend
        group.opacity = opacity

    return _psd_tools_doc(tmp_path, f"g{blend.name}{opacity}{b_blend.name}.psd", build)


def test_pass_through_group_keeps_its_children(tmp_path) -> None:
    """Reference: psd-tools."""
    path = _grouped(tmp_path)
    assert [layer.name for layer in read_psd(path)] == ["bg", "a", "b"]
    _close(_ours(path), _ref(path))
    assert [layer.name for layer in read_psd(path, groups="flatten")] == ["bg", "grp"]


@pytest.mark.parametrize(
    ("blend", "opacity", "b_blend"),
    [
        (BlendMode.SCREEN, 255, BlendMode.MULTIPLY),
        (BlendMode.NORMAL, 128, BlendMode.MULTIPLY),
        (BlendMode.PASS_THROUGH, 128, BlendMode.NORMAL),
    ],
)
def test_isolated_group_is_one_layer(tmp_path, blend, opacity, b_blend) -> None:
    """Reference: psd-tools (an isolated group: children composited alone, then blended; a pass-through group
    at some opacity whose layers are all normal composes the same way)."""
    path = _grouped(tmp_path, blend, opacity, b_blend)
    warnings: list[str] = []
    stack = read_psd(path, warnings=warnings)
    assert [layer.name for layer in stack] == ["bg", "grp"]
    assert any("group 'grp'" in w and "isolated" in w for w in warnings)
    _close(_ours(path), _ref(path))


def test_pass_through_group_with_opacity_fades_blending_children(tmp_path) -> None:
    """Reference: psd-tools, outside the rows where the two children overlap (there the per-layer fade is an
    approximation of Photoshop's blend-then-fade)."""
    path = _grouped(tmp_path, BlendMode.PASS_THROUGH, 128)
    warnings: list[str] = []
    stack = read_psd(path, warnings=warnings)
    assert [layer.name for layer in stack] == ["bg", "a", "b"]
    assert stack[2].opacity == pytest.approx(128 / 255) and stack[2].blend_mode == "multiply"
    assert any("group 'grp' is pass-through" in w for w in warnings)
    ours, ref = _ours(path), _ref(path)
    _close(ours[:5], ref[:5])
    _close(ours[10:], ref[10:])


def test_group_mask_applies_to_the_group(tmp_path) -> None:
    """Reference: psd-tools."""
    inner = rgba_layer("a", 2, 2, np.full((10, 12, 4), (255, 0, 0, 255), np.uint8))
    mask = np.full((16, 6), 255, np.uint8)
    mask[:, 3:] = 60
    layers = group_layers("masked group", [inner], mask=(mask_block(0, 0, 16, 6, 0), raw_channel(mask)))
    path = _write(tmp_path, "gm.psd", psd_bytes(24, 16, layers))
    stack = read_psd(path)
    assert [layer.name for layer in stack] == ["masked group"]
    _close(_ours(path), _ref(path))


def test_unrepresented_features_warn(tmp_path) -> None:
    def build(psd):
        a = PixelLayer.frompil(_solid(4, 4, (255, 0, 0, 255)), psd, "ko")
        a.tagged_blocks.set_data(Tag.KNOCKOUT_SETTING, 1)
        b = PixelLayer.frompil(_solid(4, 4, (0, 255, 0, 255)), psd, "dots")
        b.blend_mode = BlendMode.DISSOLVE
        psd.extend([a, b])

    result = load_psd(_psd_tools_doc(tmp_path, "warn.psd", build))
    assert result.features.get("knockout") == 1 and result.features.get("dissolve") == 1
    assert any("'ko'" in w and "knockout" in w for w in result.warnings)


# -- flat files, merged image ------------------------------------------------------------------------------------


def test_flat_file_is_one_background_layer(tmp_path) -> None:
    """Reference: the pixels we stored."""
    merged = np.zeros((6, 9, 3), np.uint8)
    merged[..., 0] = np.arange(9) * 20
    merged[..., 2] = 77
    path = _write(tmp_path, "flat.psd", psd_bytes(9, 6, [], merged=merged))
    stack = read_psd(path)
    assert [layer.name for layer in stack] == ["Background"]
    np.testing.assert_allclose(composite(stack)[..., :3], merged / 255, atol=1e-6)
    assert np.all(composite(stack)[..., 3] == 1)


def test_no_drawable_layer_falls_back_to_the_merged_image(tmp_path) -> None:
    merged = np.full((4, 4, 4), (10, 200, 30, 255), np.uint8)
    empty = CraftLayer("empty", (0, 0, 0, 0), [(c, b"\x00\x00") for c in (-1, 0, 1, 2)])
    result = load_psd(_write(tmp_path, "e.psd", psd_bytes(4, 4, [empty], merged=merged)))
    assert [layer.name for layer in result.stack] == ["Background"]
    assert result.features.get("no raster layers") == 1


def test_short_merged_image_is_a_warning_when_layers_are_intact(tmp_path) -> None:
    px = np.full((3, 3, 4), 255, np.uint8)
    path = _write(tmp_path, "short.psd", psd_bytes(5, 5, [rgba_layer("a", 1, 1, px)], merged_cut=40))
    result = load_psd(path)
    assert [layer.name for layer in result.stack] == ["a"] and result.features.get("merged image") == 1
    with pytest.raises(PSDError, match="short.psd.*merged image ends early"):
        read_psd_merged(path)


def test_use_merged_reads_the_stored_image(tmp_path) -> None:
    merged = np.zeros((4, 5, 4), np.uint8)
    merged[..., 1], merged[..., 3] = 99, 255
    px = np.full((4, 5, 4), 255, np.uint8)
    path = _write(tmp_path, "m.psd", psd_bytes(5, 4, [rgba_layer("white", 0, 0, px)], merged=merged))
    np.testing.assert_allclose(read_psd_merged(path)[0, 0], [0, 99 / 255, 0, 1], atol=1e-6)
    assert load_psd(path, merged=True).merged is not None


# -- colour --------------------------------------------------------------------------------------------------


def test_32_bit_linear_values_are_shown_as_srgb(tmp_path) -> None:
    """Reference: the issue's Photoshop reading of 32bit5x5.psd, linear (213, 226, 245) -> (236, 242, 251)."""
    px = np.empty((5, 5, 4), np.float32)
    px[...] = [213 / 255, 226 / 255, 245 / 255, 1.0]
    path = _write(tmp_path, "f32.psd", psd_bytes(5, 5, [rgba_layer("hdr", 0, 0, px, depth=32)], depth=32))
    got = read_psd(path)[0].pixels[2, 2] * 255
    np.testing.assert_allclose(got, [236, 242, 251, 255], atol=0.6)


def test_32_bit_nan_and_inf_are_made_finite(tmp_path) -> None:
    px = np.full((3, 4, 4), 0.5, np.float32)
    px[0, 0, 0], px[1, 1, 1], px[2, 2, 3], px[0, 3, 2] = np.nan, np.inf, np.nan, -np.inf
    path = _write(tmp_path, "nan.psd", psd_bytes(4, 3, [rgba_layer("bad", 0, 0, px, depth=32)], depth=32))
    result = load_psd(path)
    out = result.stack[0].pixels
    assert np.isfinite(out).all() and np.isfinite(composite(result.stack)).all()
    assert out[1, 1, 1] == pytest.approx(1.0) and out[2, 2, 3] == 0
    assert result.features.get("non-finite values") == 1 and "'bad'" in result.warnings[0]


def test_adobe_rgb_profile_is_converted(tmp_path) -> None:
    """Reference: LittleCMS (Pillow ImageCms) converting the same pixels with the same profile to sRGB."""
    adobe = matrix_profile(
        "Adobe RGB (1998) test",
        [(0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446)],
        563 / 256,
    )
    colours = np.array([[[200, 30, 40, 255], [20, 180, 60, 255], [128, 128, 128, 255], [250, 240, 10, 255]]], np.uint8)
    path = _write(tmp_path, "adobe.psd", psd_bytes(4, 1, [rgba_layer("c", 0, 0, colours)], resources=[(1039, adobe)]))
    got = read_psd(path)[0].pixels[..., :3] * 255
    src = ImageCms.ImageCmsProfile(__import__("io").BytesIO(adobe))
    want = ImageCms.profileToProfile(Image.fromarray(colours[..., :3], "RGB"), src, ImageCms.createProfile("sRGB"))
    np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=2.0)
    assert np.abs(got - colours[..., :3]).max() > 10  # the conversion did something


# -- damage and limits ------------------------------------------------------------------------------------------


def _rle_layer(table=None, tail=b""):
    plane = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    chans = [(c, rle_channel(plane)) for c in (0, 1, 2)]
    chans[1] = (1, rle_channel(plane, table, tail))
    return CraftLayer("rows", (0, 0, 4, 6), chans), plane


def test_rle_row_table_past_the_data_is_an_error(tmp_path) -> None:
    layer, plane = _rle_layer()
    counts = [len(r) for r in rle_rows(plane)]
    counts[2] += 5  # the table claims more bytes than follow
    layer.channels[1] = (1, rle_channel(plane, counts))
    path = _write(tmp_path, "rle.psd", psd_bytes(6, 4, [layer]))
    with pytest.raises(PSDError, match=r"rle\.psd.*layer 'rows' channel green.*row table"):
        read_psd(path)


def test_rle_row_table_short_of_the_data_warns_and_decodes(tmp_path) -> None:
    layer, plane = _rle_layer(tail=b"\x05garbage")
    result = load_psd(_write(tmp_path, "tail.psd", psd_bytes(6, 4, [layer])))
    np.testing.assert_allclose(result.stack[0].pixels[..., 1], plane / 255, atol=1e-6)
    assert any("layer 'rows' channel green" in w and "row table" in w for w in result.warnings)


@pytest.mark.parametrize("side", [12000, 20000])
def test_huge_layer_is_refused_before_allocating(tmp_path, monkeypatch, side) -> None:
    monkeypatch.setenv("QIL_ASSUME_FREE_RAM", "1G")
    layer = CraftLayer("huge", (0, 0, side, side), [(c, b"\x00\x00") for c in (-1, 0, 1, 2)])
    path = _write(tmp_path, "huge.psd", psd_bytes(side, side, [layer], merged=np.zeros((1, 1, 4), np.uint8)))
    with pytest.raises(ResourceError, match=rf"huge\.psd.*'huge', {side}x{side} px.*GB.*1\.07 GB of RAM is available"):
        read_psd(path)


def test_header_limits_are_checked(tmp_path) -> None:
    path = _write(tmp_path, "wide.psd", psd_bytes(37681, 2, [], merged=np.zeros((1, 1, 3), np.uint8)))
    with pytest.raises(PSDError, match=r"wide\.psd.*37681x2.*30,000"):
        read_psd(path)


def test_errors_are_plain_words(tmp_path) -> None:
    data = bytearray(psd_bytes(4, 4, []))
    data[22:24] = (7).to_bytes(2, "big")  # depth 7
    with pytest.raises(PSDError) as err:
        read_psd(_write(tmp_path, "d7.psd", bytes(data)))
    assert "7 bits per channel" in str(err.value) and "Attribute(" not in str(err.value)


# -- command line ----------------------------------------------------------------------------------------------


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from qil_core.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_reads_flat_files_and_prints_warnings(capsys, tmp_path) -> None:
    merged = np.full((6, 9, 3), (30, 140, 250), np.uint8)
    flat = _write(tmp_path, "flat.psd", psd_bytes(9, 6, [], merged=merged))
    code, out, _ = _cli(capsys, "info", flat)
    assert code == 0 and "1 layers" in out and "Background" in out
    png = tmp_path / "flat.png"
    assert _cli(capsys, "compose", flat, "--out", png)[0] == 0
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGBA"))[2, 3], [30, 140, 250, 255])

    stored = np.zeros((4, 4, 4), np.uint8)
    stored[..., 0], stored[..., 3] = 180, 255
    ko = rgba_layer("ko", 0, 0, np.full((4, 4, 4), 255, np.uint8), blocks=[(b"knko", b"\x01\0\0\0")])
    path = _write(tmp_path, "ko.psd", psd_bytes(4, 4, [ko], merged=stored))
    code, _, err = _cli(capsys, "compose", path, "--out", tmp_path / "ko.png")
    assert code == 0 and "warning:" in err and "'ko'" in err and "knockout" in err
    code, _, _ = _cli(capsys, "compose", path, "--use-merged", "--out", tmp_path / "merged.png")
    assert code == 0
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "merged.png").convert("RGBA"))[1, 1], [180, 0, 0, 255]
    )


def test_cli_groups_option(capsys, tmp_path) -> None:
    path = _grouped(tmp_path)
    code, out, _ = _cli(capsys, "info", path, "--groups", "flatten", "--json")
    assert code == 0 and '"grp"' in out and '"a"' not in out
    code, out, _ = _cli(capsys, "info", path)
    assert code == 0 and "3 layers" in out
