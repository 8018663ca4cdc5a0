"""decompose_layer: one layer of a stack split into sub-layers and spliced back in its place (tiny random model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qil_core.errors import InputError, LayerIndexError
from qil_core.layers.composite import paste_layer
from qil_core.layers.stack import Layer, LayerStack
from qil_core.model.loader import load_model
from qil_core.model.pipeline.decompose import decompose
from qil_core.model.pipeline.layer_split import decompose_layer
from qil_core.model.weights.tiny import write_tiny_model

OPTS = dict(prompt="a round badge", steps=2, resolution="custom", max_side=96, seed=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    paths = write_tiny_model(tmp_path_factory.mktemp("tiny"), layout="comfyui", seed=7)
    return load_model(
        transformer=paths["transformer"],
        vae=paths["vae"],
        text_encoder=paths["text_encoder"],
        dtype=torch.float32,
        device="cpu",
    )


def _disc(w: int, h: int, soft: bool = True) -> np.ndarray:
    """An RGBA disc (h, w, 4) with a soft edge on a transparent background."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2))
    px = np.zeros((h, w, 4), np.float32)
    px[..., 0], px[..., 1], px[..., 2] = 0.9, xx / w, yy / h
    px[..., 3] = np.clip((1 - r) * (6 if soft else 100), 0, 1)
    return px


@pytest.fixture()
def stack() -> LayerStack:
    bg = Layer(np.full((80, 120, 4), [0.2, 0.3, 0.8, 1.0], np.float32), name="Sky")
    badge = Layer(_disc(60, 40), x=30, y=25, name="Badge", opacity=0.8, blend_mode="multiply")
    top = Layer(np.full((10, 20, 4), [1, 1, 1, 1], np.float32), x=5, y=5, name="Tag")
    return LayerStack(120, 80, [bg, badge, top])


@pytest.mark.slow
def test_splices_sub_layers_in_place(model, stack: LayerStack) -> None:
    out = decompose_layer(model, stack, 1, layers=3, **OPTS)
    assert [layer.name for layer in out] == ["Sky", "Badge / 1", "Badge / 2", "Badge / 3", "Tag"]
    assert out.size == stack.size
    assert out.layers[0] is stack.layers[0] and out.layers[-1] is stack.layers[-1]  # the rest is untouched
    assert [layer.name for layer in stack] == ["Sky", "Badge", "Tag"]  # the input stack is not modified
    parent = stack.layers[1]
    limit = paste_layer(np.zeros((80, 120, 4), np.float32), parent)[..., 3]
    for sub in out.layers[1:4]:
        assert (sub.opacity, sub.blend_mode, sub.visible) == (0.8, "multiply", True)
        l, t, r, b = sub.bbox()
        if sub.pixels.size:  # inside the parent's rectangle, never more opaque than the parent anywhere
            assert l >= parent.x and t >= parent.y and r <= parent.x + parent.width and b <= parent.y + parent.height
        full = paste_layer(np.zeros((80, 120, 4), np.float32), sub)[..., 3]
        assert np.all(full <= limit + 1e-7)
    assert any(sub.pixels.size for sub in out.layers[1:4])


@pytest.mark.slow
def test_equals_decompose_of_the_layer_pixels_clipped_to_its_alpha(model, stack: LayerStack) -> None:
    """The sub-layers are decompose() of the parent's pixels at their size, alpha = min(sub, parent), moved.

    (recompose="model": the model's own colours; test_recompose.py covers the exact default.)
    """
    out = decompose_layer(model, stack, "Badge", layers=2, recompose="model", **OPTS)
    parent = stack.layers[1].cropped()  # the input is the layer cropped to its content
    assert parent.width < 60 and parent.height < 40
    direct = decompose(model, parent.pixels, layers=2, output_size="original", recompose="model", **OPTS)[0]
    for n, sub in enumerate(direct.layers):
        px = paste_layer(np.zeros((parent.height, parent.width, 4), np.float32), sub)
        px[..., 3] = np.minimum(px[..., 3], parent.alpha)
        want = Layer.from_canvas(px)
        got = out.layers[1 + n]
        assert (got.x, got.y) == (want.x + parent.x, want.y + parent.y)
        np.testing.assert_array_equal(got.pixels, want.pixels)


def test_thin_and_tiny_layers_are_padded_not_refused(model) -> None:
    line = Layer(_disc(200, 6, soft=False), x=10, y=50, name="Line")  # 33:1 and under 32 px tall
    dot = Layer(_disc(8, 8, soft=False), x=3, y=4, name="Dot")
    st = LayerStack(240, 100, [line, dot])
    out = decompose_layer(model, st, 0, layers=2, **OPTS)
    assert [layer.name for layer in out] == ["Line / 1", "Line / 2", "Dot"]
    for sub in out.layers[:2]:
        if sub.pixels.size:
            l, t, r, b = sub.bbox()
            assert l >= 10 and t >= 50 and r <= 210 and b <= 56
    out = decompose_layer(model, st, -1, layers=1, **OPTS)
    assert [layer.name for layer in out] == ["Line", "Dot / 1"]


def test_bad_requests(model, stack: LayerStack) -> None:
    with pytest.raises(LayerIndexError, match="layer 5 requested, 3 available"):
        decompose_layer(model, stack, 5, **OPTS)
    with pytest.raises(LayerIndexError, match="not found"):
        decompose_layer(model, stack, "Nope", **OPTS)
    empty = stack.replace(layers=[*stack.layers, Layer(np.zeros((4, 4, 4), np.float32), name="Ghost")])
    with pytest.raises(InputError, match="fully transparent"):
        decompose_layer(model, empty, "Ghost", **OPTS)
    with pytest.raises(InputError, match="do not pass image, mask, output_size"):
        decompose_layer(model, stack, 1, output_size="processing", **OPTS)
    with pytest.raises(InputError, match="layers must be in 1..20"):
        decompose_layer(model, stack, 1, layers=0, **OPTS)
    with pytest.raises(InputError, match="connect a Load Qwen-Layered node"):
        decompose_layer(None, stack, 1, **OPTS)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="must be a LayerStack"):
        decompose_layer(model, [stack], 1, **OPTS)  # type: ignore[arg-type]


def test_split_size_is_the_padded_layers_processing_size() -> None:
    from qil_core.model.pipeline.imaging import bucket_size
    from qil_core.model.pipeline.layer_split import split_size
    from qil_core.model.pipeline.options import DecomposeLayerOptions

    px = np.zeros((20, 600, 4), np.float32)
    px[..., 3] = 1  # 600 x 20: padded to 600 x 75 (at most 8:1) before bucketing
    stack = LayerStack(800, 400, [Layer(px, name="strip", x=5, y=7)])
    opts = DecomposeLayerOptions(resolution=640)
    assert split_size(stack, "strip", opts) == bucket_size(600, 75, 640) != bucket_size(600, 20, 640)
