"""Compositor: placement, clipping, opacity, visibility, bad inputs C1-C7, and parity with psd-tools."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from qil_core.errors import InputError, ResourceError
from qil_core.layers import BLEND_MODES, MAX_CANVAS_SIDE, Layer, LayerStack, composite, source_over
from qil_core.layers.blend import PSD_APPROXIMATE_MODES, PSD_BLEND_KEYS


def solid(h: int, w: int, rgba: tuple[float, float, float, float]) -> np.ndarray:
    return np.broadcast_to(np.float32(rgba), (h, w, 4)).copy()


def reference(stack: LayerStack) -> np.ndarray:
    """Independent slow path: every visible layer pasted on a full canvas, then source_over one by one."""
    out = np.zeros((stack.height, stack.width, 4), np.float32)
    for layer in stack.layers:
        if not layer.visible:
            continue
        full = np.zeros_like(out)
        for j in range(layer.height):
            for i in range(layer.width):
                cx, cy = layer.x + i, layer.y + j
                if 0 <= cx < stack.width and 0 <= cy < stack.height:
                    full[cy, cx] = layer.pixels[j, i]
        out = source_over(out, full, layer.blend_mode, layer.opacity)
    return out


def test_layers_placed_by_offset_and_clipped() -> None:
    red = Layer(solid(2, 3, (1, 0, 0, 1)), x=-1, y=3)  # one column and one row stick out
    stack = LayerStack(4, 4, [red])
    out = composite(stack)
    assert out.shape == (4, 4, 4) and out.dtype == np.float32
    assert (out[3, 0:2] == [1, 0, 0, 1]).all()
    assert (out[3, 2:] == 0).all() and (out[:3] == 0).all()


def test_opacity_applied_once_and_hidden_skipped() -> None:
    white = Layer(solid(2, 2, (1, 1, 1, 1)))
    red = Layer(solid(2, 2, (1, 0, 0, 1)), opacity=0.5)
    blue = Layer(solid(2, 2, (0, 0, 1, 1)), visible=False)
    out = composite(LayerStack(2, 2, [white, red, blue]))
    np.testing.assert_allclose(out[0, 0], [1, 0.5, 0.5, 1], atol=1e-6)
    # Opacity and layer alpha multiply: alpha .5 x opacity .5 = .25 coverage.
    half = Layer(solid(1, 1, (0, 0, 0, 0.5)), opacity=0.5)
    out = composite(LayerStack(1, 1, [Layer(solid(1, 1, (1, 1, 1, 1))), half]))
    np.testing.assert_allclose(out[0, 0], [0.75, 0.75, 0.75, 1], atol=1e-6)


def test_opacity_zero_and_full() -> None:
    base = Layer(solid(1, 1, (0.2, 0.4, 0.6, 1)))
    top = Layer(solid(1, 1, (1, 1, 1, 1)), opacity=0.0)
    np.testing.assert_allclose(composite(LayerStack(1, 1, [base, top]))[0, 0], [0.2, 0.4, 0.6, 1], atol=1e-7)
    top = top.replace(opacity=1.0)
    np.testing.assert_allclose(composite(LayerStack(1, 1, [base, top]))[0, 0], [1, 1, 1, 1], atol=1e-7)


def test_translucent_result_is_straight_alpha() -> None:
    # Two half-transparent layers over nothing: ao = .5 + .5·.5 = .75, Co = (.5·1 + .5·.5·0) / .75 for red.
    a = Layer(solid(1, 1, (0, 0, 0, 0.5)))
    b = Layer(solid(1, 1, (1, 0, 0, 0.5)))
    out = composite(LayerStack(1, 1, [a, b]))
    np.testing.assert_allclose(out[0, 0], [0.5 / 0.75, 0, 0, 0.75], atol=1e-6)


def test_no_layers_or_all_hidden_gives_transparent_canvas_c4() -> None:
    assert composite(LayerStack(7, 5)).shape == (5, 7, 4)
    assert not composite(LayerStack(7, 5)).any()
    hidden = Layer(solid(3, 3, (1, 0, 0, 1)), visible=False)
    transparent = Layer(solid(3, 3, (1, 0, 0, 0)))
    out = composite(LayerStack(7, 5, [hidden, transparent]))
    assert out.shape == (5, 7, 4) and not out.any()


def test_background_and_canvas_rect() -> None:
    red = Layer(solid(1, 1, (1, 0, 0, 1)), x=2, y=1)
    out = composite(LayerStack(4, 3, [red]), background=(1, 1, 1, 1))
    assert (out[0, 0] == 1).all() and (out[1, 2] == [1, 0, 0, 1]).all()
    # A canvas rectangle that reaches past the stack's canvas keeps off-canvas parts.
    off = Layer(solid(1, 1, (0, 1, 0, 1)), x=-2, y=0)
    out = composite(LayerStack(4, 3, [off]), canvas=(-2, 0, 2, 3))
    assert out.shape == (3, 4, 4) and (out[0, 0] == [0, 1, 0, 1]).all()
    with pytest.raises(InputError, match="background"):
        composite(LayerStack(2, 2), background=(1, 1, 1, float("nan")))
    with pytest.raises(InputError, match="canvas must be 4 ints"):
        composite(LayerStack(2, 2), canvas=(0, 0, 2))  # type: ignore[arg-type]


def test_translucent_background_unpremultiplied_everywhere() -> None:
    out = composite(LayerStack(3, 1, [Layer(solid(1, 1, (1, 0, 0, 1)), x=1)]), background=(0, 0, 1, 0.5))
    np.testing.assert_allclose(out[0, 0], [0, 0, 1, 0.5], atol=1e-7)
    np.testing.assert_allclose(out[0, 1], [1, 0, 0, 1], atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_mixed_modes_match_independent_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(8):
        h, w = rng.integers(1, 9, size=2)
        px = rng.random((h, w, 4), dtype=np.float32)
        px[..., 3] = np.where(rng.random((h, w)) < 0.3, 1.0, px[..., 3])
        layers.append(
            Layer(
                px,
                x=int(rng.integers(-3, 12)),
                y=int(rng.integers(-3, 9)),
                name=f"l{i}",
                blend_mode=str(rng.choice(BLEND_MODES)),
                opacity=float(rng.random()),
                visible=bool(rng.random() > 0.15),
            )
        )
    stack = LayerStack(12, 9, layers)
    np.testing.assert_allclose(composite(stack), reference(stack), atol=2e-6)


def test_wide_layers_use_several_bands() -> None:
    # 600 x 300 px: more than one 64 Ki px band, so band seams would show as a mismatch.
    rng = np.random.default_rng(3)
    a = Layer(rng.random((300, 600, 4), dtype=np.float32))
    b = Layer(rng.random((300, 600, 4), dtype=np.float32), x=5, y=7, blend_mode="overlay", opacity=0.6)
    stack = LayerStack(610, 310, [a, b])
    full_b = np.zeros((310, 610, 4), np.float32)
    full_b[7:307, 5:605] = b.pixels
    full_a = np.zeros_like(full_b)
    full_a[:300, :600] = a.pixels
    want = source_over(source_over(np.zeros_like(full_a), full_a), full_b, "overlay", 0.6)
    np.testing.assert_allclose(composite(stack), want, atol=2e-6)


def test_200_layers_memory_linear_c5() -> None:
    rng = np.random.default_rng(5)
    layers = [
        Layer(
            rng.random((16, 16, 4), dtype=np.float32),
            x=int(rng.integers(-8, 256)),
            y=int(rng.integers(-8, 256)),
            blend_mode="multiply" if i % 7 == 0 else "normal",
        )
        for i in range(200)
    ]
    stack = LayerStack(256, 256, layers)
    canvas_bytes = 256 * 256 * 16
    tracemalloc.start()
    out = composite(stack)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # The output canvas plus band temporaries, never one canvas per layer (that would be 200x).
    assert peak < 3 * canvas_bytes, peak
    np.testing.assert_allclose(out, reference(stack), atol=5e-6)


def test_oversized_canvas_refused_before_allocating_c7() -> None:
    big = LayerStack(MAX_CANVAS_SIDE, 10)
    big.width = MAX_CANVAS_SIDE + 1  # the dataclass does not cap sides; composite must
    tracemalloc.start()
    with pytest.raises(InputError, match="30000 px per side"):
        composite(big)
    with pytest.raises(ResourceError, match=r"20000x20000 px.*needs 12\.80 GB.*only 1\.07 GB"):
        composite(LayerStack(20_000, 20_000), memory_limit=1 << 30)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # nothing canvas-sized was allocated


def _psd_tools_composite(stack: LayerStack) -> np.ndarray:
    """Build the PSD with psd-tools' own writer and let psd-tools composite it from the layers."""
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer
    from psd_tools.constants import BlendMode

    psd = PSDImage.new("RGBA", (stack.width, stack.height))
    for layer in stack.layers:
        pl = PixelLayer.fromarray(
            np.round(layer.pixels * 255).astype(np.uint8), psd, name=layer.name, top=layer.y, left=layer.x
        )
        pl.blend_mode = BlendMode(PSD_BLEND_KEYS[layer.blend_mode].encode("ascii"))
        pl.opacity = int(round(layer.opacity * 255))
        pl.visible = layer.visible
        if pl not in psd:
            psd.append(pl)
    buf = io.BytesIO()
    psd.save(buf)
    buf.seek(0)
    img = PSDImage.open(buf).composite(force=True, apply_icc=False)
    return np.asarray(img, np.float32) / 255


@pytest.mark.parametrize("mode", [m for m in BLEND_MODES if m not in PSD_APPROXIMATE_MODES])
def test_matches_psd_tools_compositor_within_2_of_255_c1(mode: str) -> None:
    rng = np.random.default_rng(BLEND_MODES.index(mode))

    def px(h: int, w: int) -> np.ndarray:
        a = np.round(rng.random((h, w, 4), dtype=np.float32) * 255) / 255  # 8-bit values, as in the PSD
        a[..., 3] = np.where(rng.random((h, w)) < 0.4, 1.0, a[..., 3])
        return a.astype(np.float32)

    stack = LayerStack(
        20,
        14,
        [
            Layer(px(10, 12), x=1, y=2, name="base"),
            Layer(px(8, 9), x=8, y=5, name="top", blend_mode=mode, opacity=round(0.7 * 255) / 255),
            Layer(px(4, 4), x=-2, y=-1, name="corner", blend_mode=mode),
        ],
    )
    theirs = _psd_tools_composite(stack)
    ours = composite(stack)
    # Compare premultiplied colour (RGB under alpha 0 is undefined) and alpha.
    diff_rgb = np.abs(theirs[..., :3] * theirs[..., 3:] - ours[..., :3] * ours[..., 3:]).max()
    diff_a = np.abs(theirs[..., 3] - ours[..., 3]).max()
    assert diff_rgb <= 2 / 255 and diff_a <= 2 / 255, (mode, diff_rgb * 255, diff_a * 255)


@pytest.mark.parametrize("mode", ["normal", "multiply", "screen", "overlay", "darken", "lighten", "difference"])
def test_our_psd_composited_by_psd_tools_matches_ours(mode: str, tmp_path: Path) -> None:
    """The PSD our writer produces, composited from its layers by psd-tools, equals our composite (C1)."""
    from psd_tools import PSDImage

    from qil_core.layers.psd import write_psd

    rng = np.random.default_rng(100 + BLEND_MODES.index(mode))

    def px(h: int, w: int) -> np.ndarray:
        a = np.round(rng.random((h, w, 4), dtype=np.float32) * 255) / 255
        a[..., 3] = np.where(rng.random((h, w)) < 0.4, 1.0, a[..., 3])
        return a.astype(np.float32)

    stack = LayerStack(
        24,
        16,
        [
            Layer(px(12, 14), x=2, y=1, name="base"),
            Layer(px(9, 10), x=10, y=6, name="top", blend_mode=mode, opacity=round(0.6 * 255) / 255),
            Layer(px(5, 6), x=-3, y=-2, name="corner", blend_mode=mode),
            Layer(px(4, 4), x=20, y=12, name="hidden", visible=False),
        ],
    )
    path = write_psd(stack, tmp_path / f"{mode}.psd")
    theirs = np.asarray(PSDImage.open(path).composite(force=True, apply_icc=False), np.float32) / 255
    ours = composite(stack)
    diff_rgb = np.abs(theirs[..., :3] * theirs[..., 3:] - ours[..., :3] * ours[..., 3:]).max()
    diff_a = np.abs(theirs[..., 3] - ours[..., 3]).max()
    assert diff_rgb <= 2 / 255 and diff_a <= 2 / 255, (mode, diff_rgb * 255, diff_a * 255)
