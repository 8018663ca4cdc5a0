"""Exact recomposition: the layers' composite gives back the input (tiny random model: its layers are noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import fast_cli_args

from qil_core.errors import InputError
from qil_core.layers import composite, recolor_layer, stack_from_document, stack_to_document
from qil_core.layers.psd import read_psd, write_psd
from qil_core.layers.recompose import RecomposeReport, fold_residual, snap_alpha
from qil_core.layers.stack import Layer, LayerStack
from qil_core.model.loader import load_model
from qil_core.model.pipeline.decompose import decompose
from qil_core.model.pipeline.layer_split import decompose_layer
from qil_core.model.weights.tiny import write_tiny_model

OPTS = dict(prompt="a poster", steps=2, resolution="custom", max_side=64, seed=3)


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


def _picture(w: int, h: int, seed: int, transparent: bool = False) -> np.ndarray:
    """An RGBA uint8 picture: smooth colours plus noise; optionally a transparent corner and a soft alpha ramp."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    px = np.empty((h, w, 4), np.float32)
    px[..., 0], px[..., 1], px[..., 2] = xx / w, yy / h, 0.5 + 0.4 * np.sin(xx / 5)
    px[..., :3] += rng.normal(0, 0.1, (h, w, 3))
    px[..., 3] = 1
    if transparent:
        px[: h // 3, : w // 3, 3] = 0
        px[h // 2 :, :, 3] = np.linspace(0.1, 1, w)[None, :]
    return np.round(np.clip(px, 0, 1) * 255).astype(np.uint8)


def _colour_error(stack: LayerStack, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Largest 8-bit colour difference where both the composite and the target are visible; the composite."""
    c = composite(stack)
    both = (c[..., 3] > 0) & (target[..., 3] > 0)
    diff = np.abs(np.round(c[..., :3] * 255) - target[..., :3].astype(np.float32))[both]
    return float(diff.max()) if diff.size else 0.0, c


def _alphas(stack: LayerStack) -> list[np.ndarray]:
    return [layer.alpha.copy() for layer in stack.layers]


@pytest.mark.slow
def test_opaque_input_recomposes_exactly_and_alpha_is_the_models(model) -> None:
    img = _picture(90, 70, 0)
    exact = decompose(model, img, output_size="original", **OPTS)[0]  # default: exact for "original"
    plain = decompose(model, img, output_size="original", recompose="model", **OPTS)[0]
    assert exact.size == (90, 70) and plain.size == (90, 70)
    before, _ = _colour_error(plain, img)
    assert before > 20  # noise layers: the model's composite is far from the input
    err, c = _colour_error(exact, img)
    assert err <= 1
    assert (c[..., 3] > 0).mean() > 0.99  # compared (nearly) everywhere
    # alpha: the model's, on the 8-bit grid, bit-identical to snapping the model-mode layers
    for a, b in zip(exact.layers, snap_alpha(plain).layers, strict=True):
        assert (a.x, a.y) == (b.x, b.y)
        np.testing.assert_array_equal(a.alpha, b.alpha)
    meta = exact.metadata["recompose"]
    assert meta["pixels"] > 0 and meta["max"] > 20 and meta["corrected_share"] > 0.5 and meta["remaining_max"] < 0.01
    assert "recompose" not in plain.metadata


def test_processing_size_defaults_to_the_models_colours(model) -> None:
    img = _picture(90, 70, 1)
    plain = decompose(model, img, **OPTS)[0]
    assert "recompose" not in plain.metadata and plain.size != (90, 70)
    exact = decompose(model, img, recompose="exact", **OPTS)[0]
    assert exact.size == plain.size and exact.metadata["recompose"]["remaining_max"] < 0.01
    with pytest.raises(InputError, match="recompose must be one of auto, exact, model"):
        decompose(model, img, recompose="nearly", **OPTS)


def test_partly_transparent_input(model) -> None:
    img = _picture(80, 64, 2, transparent=True)
    stack = decompose(model, img, output_size="original", **OPTS)[0]
    err, c = _colour_error(stack, img)
    assert err <= 1
    meta = stack.metadata["recompose"]
    # the noise layers paint the transparent corner: reported, left as the model made them
    assert meta["extra"] == int(((c[..., 3] > 0) & (img[..., 3] == 0)).sum()) > 0
    assert meta["alpha_max"] > 0


def test_batch_each_image_recomposes_to_itself(model) -> None:
    imgs = [_picture(72, 64, 4), _picture(72, 64, 5, transparent=True)]
    stacks = decompose(model, np.stack(imgs), output_size="original", **OPTS)
    assert len(stacks) == 2
    for stack, img in zip(stacks, imgs, strict=True):
        assert _colour_error(stack, img)[0] <= 1


def test_recursive_split_recomposes_to_the_parent(model) -> None:
    yy, xx = np.mgrid[0:50, 0:70].astype(np.float32)
    px = np.zeros((50, 70, 4), np.float32)
    px[..., 0], px[..., 1], px[..., 2] = 0.9, xx / 70, yy / 50
    px[..., 3] = np.clip(1.2 - np.hypot((xx - 35) / 35, (yy - 25) / 25), 0, 1)
    parent = Layer(np.round(px * 255) / 255, x=20, y=10, name="Badge", opacity=0.8, blend_mode="multiply")
    stack = LayerStack(120, 80, [Layer(np.full((80, 120, 4), 0.5, np.float32), name="Bg"), parent])
    out = decompose_layer(model, stack, "Badge", layers=3, **OPTS)
    subs = out.layers[1:4]
    assert [s.name for s in subs] == ["Badge / 1", "Badge / 2", "Badge / 3"]
    assert all((s.opacity, s.blend_mode) == (0.8, "multiply") for s in subs)
    group = LayerStack(120, 80, [s.replace(opacity=1.0, blend_mode="normal") for s in subs])
    target = np.zeros((80, 120, 4), np.float32)
    target[10:60, 20:90] = parent.pixels
    err, c = _colour_error(group, np.round(target * 255).astype(np.uint8))
    assert err <= 1
    assert ((c[..., 3] > 0) & (target[..., 3] > 0)).sum() > 1000
    for sub in subs:  # each sub-layer stays within the parent's alpha (the split's rule), alpha on the 8-bit grid
        canvas = np.zeros((80, 120), np.float32)
        canvas[sub.y : sub.y + sub.height, sub.x : sub.x + sub.width] = sub.alpha
        assert np.all(canvas <= target[..., 3] + 1e-7)
        np.testing.assert_array_equal(np.round(sub.alpha * 255) / np.float32(255), sub.alpha)
    assert out.metadata["recompose_split"]["Badge"]["remaining_max"] < 0.01


def test_fold_keeps_alpha_bit_identical_and_spreads_down() -> None:
    rng = np.random.default_rng(0)
    bottom = Layer(np.full((20, 30, 4), [0.2, 0.4, 0.6, 1.0], np.float32), name="Bg")
    faint = np.full((20, 30, 4), [0.5, 0.5, 0.5, 0.02], np.float32)
    stack = snap_alpha(LayerStack(30, 20, [bottom, Layer(faint, name="Faint")]))
    target = np.zeros((20, 30, 4), np.uint8)
    target[...] = [230, 20, 128, 255]
    out, report = fold_residual(stack, target)
    for a, b in zip(_alphas(stack), _alphas(out), strict=True):
        np.testing.assert_array_equal(a, b)
    assert isinstance(report, RecomposeReport) and report.corrected == 600 and report.uncovered == 0
    assert _colour_error(out, target)[0] <= 1
    # the faint top layer carries what it can (its colour hits 0 or 1); the rest goes to the background
    assert np.all((out.layers[1].pixels[..., 0] == 1) & (out.layers[1].pixels[..., 1] == 0))
    a = np.float32(5 / 255)  # 0.02 on the 8-bit grid
    assert np.allclose(out.layers[0].pixels[..., 0], (230 / 255 - a) / (1 - a), atol=1e-5)
    # with an opaque bottom layer the composite is the input in every channel, alpha included
    full = np.abs(np.round(composite(out) * 255) - target).max()
    assert full <= 1
    rand = LayerStack(30, 20, [bottom] + [Layer(rng.random((20, 30, 4)).astype(np.float32)) for _ in range(3)])
    out, _ = fold_residual(snap_alpha(rand), target)
    assert np.abs(np.round(composite(out) * 255) - target).max() <= 1


def test_honest_limits() -> None:
    half = Layer(np.full((10, 10, 4), [0.5, 0.5, 0.5, 1.0], np.float32), name="Half")
    stack = LayerStack(20, 10, [half])
    target = np.full((10, 20, 4), 200, np.uint8)
    out, report = fold_residual(stack, target)
    assert report.uncovered == 100 and report.pixels == 100  # the right half has no layer: not correctable
    assert composite(out)[:, 10:, 3].max() == 0
    with pytest.raises(InputError, match="blend mode 'screen'"):
        fold_residual(LayerStack(20, 10, [half.replace(blend_mode="screen")]), target)
    with pytest.raises(InputError, match="canvas size 20x10"):
        fold_residual(stack, target[:5])
    hidden = LayerStack(20, 10, [half.replace(blend_mode="screen", visible=False)])
    assert fold_residual(hidden, target)[1].uncovered == 200  # hidden layers take no part


def test_through_an_8bit_psd(model, tmp_path: Path) -> None:
    img = _picture(96, 64, 6, transparent=True)
    stack = decompose(model, img, output_size="original", **OPTS)[0]
    for depth in (8, 16):
        path = tmp_path / f"exact{depth}.psd"
        write_psd(stack, path, depth=depth)
        assert _colour_error(read_psd(path), img)[0] <= 1


def test_editing_one_layer_leaves_the_rest_of_the_picture_alone(model, tmp_path: Path) -> None:
    """Noise layers cover every pixel, so give layer 2 a footprint first (a disc), then fold, save, edit."""
    img = _picture(96, 64, 8)
    plain = decompose(model, img, output_size="original", recompose="model", **OPTS)[0]
    k = 2
    yy, xx = np.mgrid[0:64, 0:96]
    layer = plain.layers[k]
    disc = np.hypot(xx - 40, yy - 30)[layer.y : layer.y + layer.height, layer.x : layer.x + layer.width] < 20
    px = layer.pixels.copy()
    px[..., 3] *= disc
    stack, _ = fold_residual(
        snap_alpha(plain.replace(layers=[*plain.layers[:k], layer.replace(pixels=px), *plain.layers[k + 1 :]])), img
    )
    path = tmp_path / "local.psd"
    write_psd(stack, path)
    back = read_psd(path)
    edited = back.replace(
        layers=[*back.layers[:k], recolor_layer(back.layers[k], hue_shift=120, lightness=0.3), *back.layers[k + 1 :]]
    )
    c = np.round(composite(edited) * 255)
    footprint = np.zeros((64, 96), bool)
    top = back.layers[k]
    footprint[top.y : top.y + top.height, top.x : top.x + top.width] = top.alpha > 0
    outside = ~footprint & (c[..., 3] > 0)
    assert outside.sum() > 3000
    np.testing.assert_array_equal(c[..., :3][outside], img[..., :3][outside])
    assert np.abs(c[..., :3][footprint] - img[..., :3][footprint]).max() > 10  # the edit did change something


def test_metadata_travels_in_the_layers_document(model) -> None:
    stack = decompose(model, _picture(64, 64, 7), output_size="original", **OPTS)[0]
    doc = stack_to_document(stack)
    assert doc["metadata"]["recompose"] == stack.metadata["recompose"]
    assert stack_from_document(doc).metadata == stack.metadata
    assert "metadata" not in stack_to_document(LayerStack(4, 4, []))


def test_cli_recompose_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from qil_core.cli import main

    paths = write_tiny_model(tmp_path / "m", layout="comfyui", seed=1)
    img = _picture(100, 70, 9)
    src = tmp_path / "in.png"
    Image.fromarray(img[..., :3], "RGB").save(src)
    files = ["--transformer", paths["transformer"], "--vae", paths["vae"], "--text-encoder", paths["text_encoder"]]
    common = [*files, *fast_cli_args(), "--output-size", "original"]
    assert main([str(a) for a in ["decompose", src, "--out", tmp_path / "a.psd", *common]]) == 0
    err = capsys.readouterr().err
    assert "exact recomposition of the image: residual before folding" in err
    assert _colour_error(read_psd(tmp_path / "a.psd"), img)[0] <= 1
    assert main([str(a) for a in ["decompose", src, "--out", tmp_path / "b.psd", *common, "--recompose", "model"]]) == 0
    assert "exact recomposition" not in capsys.readouterr().err
    assert _colour_error(read_psd(tmp_path / "b.psd"), img)[0] > 20
