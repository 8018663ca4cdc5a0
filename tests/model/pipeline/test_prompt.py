"""Prompt encoding against diffusers' QwenImageLayeredPipeline.encode_prompt (tiny random text encoder, CPU)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from qwen_tiny import build_reference, tiny_encoder

from qil_core.errors import InputError
from qil_core.model.pipeline.prompt import (
    DEFAULT_NEGATIVE_PROMPT,
    PROMPT_TEMPLATE,
    encode_prompts,
    template_prefix_length,
    tokenize_prompts,
)
from qil_core.model.weights.tokenizer import QwenTokenizer, load_tokenizer

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

LONG = ("Ein sehr langer Prompt über eine Stadt bei Nacht, 夜の街, مدينة في الليل, 🌃. " * 120)[:10_240]


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> QwenTokenizer:
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def models():
    ref = build_reference(seed=1)
    return ref, tiny_encoder(ref)


@pytest.fixture(scope="module")
def pipe(models, tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return diffusers.QwenImageLayeredPipeline(
        scheduler=None,
        vae=None,
        text_encoder=models[0],
        tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir)),
        processor=None,
        transformer=None,
    )


def test_prefix_is_computed_and_matches_diffusers(tok: QwenTokenizer, pipe) -> None:
    assert template_prefix_length(tok) == 34
    assert template_prefix_length(tok) == pipe.prompt_template_encode_start_idx
    assert PROMPT_TEMPLATE == pipe.prompt_template_encode


def test_kept_tokens_of_negative_and_empty(tok: QwenTokenizer) -> None:
    rows, drop = tokenize_prompts(tok, [DEFAULT_NEGATIVE_PROMPT, ""])
    assert rows[0][drop:] == [220, 151645, 198, 151644, 77091, 198]
    assert rows[1][drop:] == [151645, 198, 151644, 77091, 198]


@pytest.mark.parametrize(
    "prompts",
    [
        ["a red fox in the snow"],
        [" "],
        ["a red fox", " ", "一只橘猫坐在窗台上 🐈 مرحبا بالعالم", ""],
    ],
)
def test_equals_diffusers_encode_prompt(models, tok: QwenTokenizer, pipe, prompts: list[str]) -> None:
    ref_e, ref_m = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=512)
    e, m = encode_prompts(models[1], tok, prompts)
    assert e.shape == ref_e.shape and e.dtype == ref_e.dtype
    torch.testing.assert_close(e, ref_e, atol=1e-5, rtol=0)
    if ref_m is None:
        assert m is None
    else:
        assert m is not None and m.dtype == ref_m.dtype
        assert torch.equal(m, ref_m)
        assert torch.all(e[m == 0] == 0)


@pytest.mark.slow
def test_10kb_prompt_is_truncated_with_warning(models, tok, pipe, caplog: pytest.LogCaptureFixture) -> None:
    assert len(LONG.encode("utf-8")) > 10_000
    with caplog.at_level(logging.WARNING, logger="qil_core.model.pipeline.prompt"):
        e, m = encode_prompts(models[1], tok, [LONG, "short"], max_sequence_length=300)
    assert "only the first 300" in caplog.text
    ref_e, ref_m = pipe.encode_prompt([LONG, "short"], device=torch.device("cpu"), max_sequence_length=300)
    assert e.shape == (2, 300, 64)
    torch.testing.assert_close(e, ref_e, atol=1e-5, rtol=0)
    assert torch.equal(m, ref_m)
    e1, m1 = encode_prompts(models[1], tok, LONG)  # a bare str is one prompt; default 512
    assert e1.shape == (1, 512, 64) and m1 is None


def test_bad_prompts_and_lengths(models, tok: QwenTokenizer) -> None:
    enc = models[1]
    for bad in ([], [b"bytes"], ["ok", None], b"bytes", 42):
        with pytest.raises(InputError):
            encode_prompts(enc, tok, bad)  # type: ignore[arg-type]
    for length in (0, 1025, True, 3.5):
        with pytest.raises(InputError, match="max_sequence_length"):
            encode_prompts(enc, tok, ["x"], max_sequence_length=length)  # type: ignore[arg-type]
    e, m = encode_prompts(enc, tok, ["x"], max_sequence_length=1024)
    assert e.shape[1] == 6 and m is None


def test_invalid_utf8_is_replaced(models, tok: QwenTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    broken = b"Stra\xdfe bei Nacht".decode("utf-8", errors="surrogateescape")
    with caplog.at_level(logging.WARNING, logger="qil_core.model.weights.tokenizer"):
        e, _ = encode_prompts(models[1], tok, [broken])
    assert "invalid UTF-8" in caplog.text
    e2, _ = encode_prompts(models[1], tok, ["Stra\ufffde bei Nacht"])
    assert torch.equal(e, e2)


def test_embeddings_take_the_encoder_dtype(models, tok: QwenTokenizer) -> None:
    enc = tiny_encoder(models[0]).to(torch.bfloat16)
    e, m = encode_prompts(enc, tok, ["a", "a longer prompt"], device="cpu")
    assert e.dtype == torch.bfloat16 and m is not None and m.dtype == torch.long
    assert m.sum(dim=1).tolist() == [6, 8]
