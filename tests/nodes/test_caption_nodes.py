"""Caption Image (Qwen2.5-VL) and Decompose Image's auto-caption switch, called directly on the tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from comfy_harness import pack_module
from qil_graphs import MODEL_FILES, ListHarness, harness, sample_picture

model_nodes = pack_module("nodes.model_nodes")
sample_nodes = pack_module("nodes.sample_nodes")
caption_nodes = pack_module("nodes.caption_nodes")
errors = pack_module("qil_core.errors")
SETTINGS = dict(
    negative_prompt=" ",
    layers=2,
    steps=1,
    cfg=4.0,
    cfg_normalize=True,
    seed=7,
    resolution="custom",
    max_side=64,
    output_size="processing",
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ListHarness, Any]]:
    h = harness(tmp_path_factory.mktemp("caption_nodes"))
    with h.host():
        (handle,) = model_nodes.QILLoadModel().load(
            *(MODEL_FILES[k].name for k in ("transformer", "vae", "text_encoder"))
        )
        yield h, handle


def _picture() -> torch.Tensor:
    return torch.from_numpy(sample_picture()).float()[None] / 255.0


def test_caption_node_equals_decompose_auto_caption(env) -> None:
    h, handle = env
    with h.host():
        out = caption_nodes.QILCaptionImage().caption(handle, _picture(), "en", 16, "custom", 64)
        dec = sample_nodes.QILDecompose().decompose(handle, _picture(), prompt="", **SETTINGS)
        typed = sample_nodes.QILDecompose().decompose(handle, _picture(), prompt="a box", **SETTINGS)
        off = sample_nodes.QILDecompose().decompose(handle, _picture(), prompt="", auto_caption=False, **SETTINGS)
    caption = out["result"][0]
    assert caption and out["ui"]["text"] == [caption]
    used = dec["result"][3]
    assert used and used.startswith(caption[:10])  # same resize and prompt; the node stopped after 16 tokens
    assert dec["ui"]["text"] == [used]
    assert typed["result"][3] == "a box" and off["result"][3] == ""


def test_prompt_text_socket_wins_and_bad_inputs(env) -> None:
    h, handle = env
    with h.host():
        dec = sample_nodes.QILDecompose().decompose(
            handle, _picture(), prompt="ignored", prompt_text="from a node", **SETTINGS
        )
        assert dec["result"][3] == "from a node"
        with pytest.raises(errors.InputError, match="caption_language"):
            caption_nodes.QILCaptionImage().caption(handle, _picture(), "fr", 16, "640", 1024)
        with pytest.raises(errors.InputError, match="max_new_tokens"):
            caption_nodes.QILCaptionImage().caption(handle, _picture(), "en", 0, "640", 1024)


def test_decompose_layer_node_captions_the_layer_and_takes_the_switches(env) -> None:
    h, handle = env
    layer_args = dict(negative_prompt=" ", sub_layers=2, steps=1, cfg=4.0, cfg_normalize=True, seed=3)
    size = dict(resolution="custom", max_side=64)
    with h.host():
        docs = sample_nodes.QILDecompose().decompose(handle, _picture(), prompt="a box", **SETTINGS)["result"][0]
        node = sample_nodes.QILDecomposeLayer()
        auto = node.decompose_layer(handle, docs[0], "-1", prompt=" ", **layer_args, **size)
        zh = node.decompose_layer(handle, docs[0], "-1", prompt="", caption_language="zh", **layer_args, **size)
        off = node.decompose_layer(handle, docs[0], "-1", prompt="", auto_caption=False, **layer_args, **size)
        wired = node.decompose_layer(handle, docs[0], "-1", prompt="", prompt_text="the lid", **layer_args, **size)
        with pytest.raises(errors.InputError, match="caption_language"):
            node.decompose_layer(handle, docs[0], "-1", prompt="", caption_language="fr", **layer_args, **size)
    caption = auto["result"][3]
    assert caption.strip() and auto["ui"]["text"] == [caption]
    assert zh["result"][3].strip() and zh["result"][3] != caption  # the Chinese instruction gives another caption
    assert off["result"][3] == "" and wired["result"][3] == "the lid"
    names = [item["name"] for item in auto["result"][0]["layers"]]
    assert names[-2:] == ["Layer 1 / 1", "Layer 1 / 2"]


def test_captioning_reports_progress_per_token_and_cancel_stops_it(env) -> None:
    from comfy_harness import InterruptProcessingException

    h, handle = env
    h.record.progress.clear()
    with h.host():
        caption_nodes.QILCaptionImage().caption(handle, _picture(), "en", 8, "custom", 64, unique_id="7")
    ticks = [p for p in h.record.progress if p[0] == "7"]
    assert ticks and ticks[0] == ("7", 1, 8) and [t[1] for t in ticks] == list(range(1, len(ticks) + 1))
    for press_at in (3, 1):  # Cancel in the middle of a caption, and before the first token
        h.record.interrupt_after = h.record.interrupt_checks + press_at
        h.record.progress.clear()
        try:
            with h.host(), pytest.raises(InterruptProcessingException):
                sample_nodes.QILDecompose().decompose(handle, _picture(), prompt="", unique_id="9", **SETTINGS)
        finally:
            h.record.interrupt_after = None
        # it stopped while captioning: only caption tokens (of 512) were reported, no denoising step
        assert [p[1:] for p in h.record.progress] == [(n, 512) for n in range(1, press_at)], h.record.progress
        assert not any(n.startswith("visual") for n, _ in handle.model.text_encoder.named_parameters())
    with h.host():  # and the next run captions from scratch, as before
        again = sample_nodes.QILDecompose().decompose(handle, _picture(), prompt="", **SETTINGS)
    assert again["result"][3]
