"""Tokenizer parity with transformers' Qwen2Tokenizer on the real Qwen2.5 vocabulary, and file discovery errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from qil_core.assets import TOKENIZER_DIR
from qil_core.errors import CorruptFileError, InputError, ModelFileNotFoundError
from qil_core.model.weights.tokenizer import QwenTokenizer, load_tokenizer

TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)

TEXTS = [
    "",
    " ",
    "A red fox jumping over a lazy dog, 4K, ultra-detailed.",
    "一只橘猫坐在窗台上，阳光明媚。日本語のテキストも。한국어 문장입니다.",
    "Emoji: 🎉🦊👩🏽‍🚀 🇯🇵 ❤️‍🔥 and keycaps 1️⃣",
    "مرحبا بالعالم — שלום עולם (RTL mixed with LTR 123)",
    "Cafe\u0301 vs Café, Å vs A\u030a (NFC must merge them)",
    "I'LL don't WE'RE she's   multiple   spaces\tand\ttabs\r\nCRLF\n\n\nnewlines",
    "digits 1234567890 3.14159 -42 1e-6 0x1F",
    "<|im_start|>user\nhi<|im_end|><|endoftext|><tool_call>x</tool_call><|fim_prefix|><|vision_start|><|image_pad|>",
    "almost special <|im_start| and |im_end|> and <im_start>",
    "control \x00 \x07 \x1b[31m and non-breaking\u00a0space, zero\u200bwidth",
    "URL https://example.com/a?b=c&d=e#f and code `x = y ** 2`",
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> QwenTokenizer:
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def ref(tokenizer_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers(tok: QwenTokenizer, ref, text: str) -> None:
    assert tok.encode(text) == ref(text, add_special_tokens=False).input_ids
    assert tok.encode(TEMPLATE.format(text)) == ref(TEMPLATE.format(text)).input_ids


def test_long_text_equals_transformers(tok: QwenTokenizer, ref) -> None:
    text = " ".join(TEXTS[2:]) * 40  # about 15 kB of mixed scripts
    assert len(text.encode("utf-8")) > 10_000
    ids = tok.encode(TEMPLATE.format(text))
    assert ids == ref(TEMPLATE.format(text)).input_ids
    assert len(ids) > 3000


def test_constructor_reference_agrees(tokenizer_dir: Path, tok: QwenTokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.Qwen2Tokenizer(vocab=str(tokenizer_dir / "vocab.json"), merges=str(tokenizer_dir / "merges.txt"))
    text = "Qwen2Tokenizer built from vocab and merges: 猫 🦊 مرحبا"
    assert tok.encode(text) == ref(text).input_ids


def test_decode_round_trip_equals_transformers(tok: QwenTokenizer, ref) -> None:
    for text in TEXTS:
        ids = tok.encode(TEMPLATE.format(text))
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok.decode(tok.encode("plain text 世界")) == "plain text 世界"


def test_special_tokens(tok: QwenTokenizer) -> None:
    assert tok.token_to_id("<|im_start|>") == 151644
    assert tok.token_to_id("<|im_end|>") == 151645
    assert tok.pad_token_id == 151643
    assert tok.encode(" ") == [220]
    assert tok.vocab_size == 151669
    with pytest.raises(InputError, match="not in the vocabulary"):
        tok.token_to_id("<|no_such_token|>")


def test_bad_inputs(tok: QwenTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(InputError, match="must be str"):
        tok.encode(b"bytes prompt")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.decode([1, 10**7])
    # Undecodable bytes arrive in a str as lone surrogates (surrogateescape): replaced with U+FFFD and logged.
    text = b"caf\xe9 au lait".decode("utf-8", errors="surrogateescape")
    with caplog.at_level(logging.WARNING, logger="qil_core.model.weights.tokenizer"):
        ids = tok.encode(text)
    assert ids == tok.encode("caf\ufffd au lait")
    assert "invalid UTF-8" in caplog.text


def _copy(src: Path, dst: Path, names: tuple[str, ...] = ("vocab.json", "merges.txt", "tokenizer_config.json")) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)
    return dst


def test_found_next_to_diffusers_weights(tokenizer_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "Qwen-Image-Layered"
    _copy(tokenizer_dir, root / "tokenizer")
    (root / "text_encoder").mkdir()
    shard = root / "text_encoder" / "model-00001-of-00004.safetensors"
    shard.write_bytes(b"")
    for where in (root, root / "text_encoder", shard, root / "tokenizer"):
        assert load_tokenizer(where).folder == root / "tokenizer"


def test_found_in_comfyui_install(tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    comfy = tmp_path / "ComfyUI"
    _copy(tokenizer_dir, comfy / "comfy" / "text_encoders" / "qwen25_tokenizer")
    weights = comfy / "models" / "text_encoders" / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    expected = comfy / "comfy" / "text_encoders" / "qwen25_tokenizer"
    assert load_tokenizer(weights).folder == expected
    assert load_tokenizer(search=[comfy]).folder == expected
    monkeypatch.setenv("COMFYUI_DIR", str(comfy))
    assert load_tokenizer().folder == expected


def test_found_in_the_comfyui_install_holding_a_symlinked_pack(
    tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: the pack symlinked into custom_nodes resolved to its real folder and lost the ComfyUI root.
    import qil_core.model.weights.tokenizer as tokenizer_module

    comfy = tmp_path / "ComfyUI"
    _copy(tokenizer_dir, comfy / "comfy" / "text_encoders" / "qwen25_tokenizer")
    (comfy / "custom_nodes").mkdir()
    repo = Path(tokenizer_module.__file__).resolve().parents[3]
    (comfy / "custom_nodes" / "qwen_layered").symlink_to(repo, target_is_directory=True)
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    monkeypatch.setattr(
        tokenizer_module,
        "__file__",
        str(comfy / "custom_nodes" / "qwen_layered" / "qil_core" / "model" / "weights" / "tokenizer.py"),
    )
    assert load_tokenizer().folder == comfy / "comfy" / "text_encoders" / "qwen25_tokenizer"


def test_missing_files_name_where_it_looked(tokenizer_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileNotFoundError, match="Looked in") as e:
        load_tokenizer(empty, bundled=False)
    assert str(empty) in str(e.value) and str(empty / "tokenizer") in str(e.value)
    partial = _copy(tokenizer_dir, tmp_path / "partial", ("vocab.json",))
    with pytest.raises(ModelFileNotFoundError, match="merges.txt"):
        load_tokenizer(partial)
    no_cfg = _copy(tokenizer_dir, tmp_path / "no_cfg", ("vocab.json", "merges.txt"))
    with pytest.raises(ModelFileNotFoundError, match="added_tokens"):
        load_tokenizer(no_cfg)


def test_corrupt_files(tokenizer_dir: Path, tmp_path: Path) -> None:
    bad_vocab = _copy(tokenizer_dir, tmp_path / "bad_vocab")
    (bad_vocab / "vocab.json").write_bytes(b'{"a": 1, "b": ')
    with pytest.raises(CorruptFileError, match="vocab.json"):
        load_tokenizer(bad_vocab)
    bad_merges = _copy(tokenizer_dir, tmp_path / "bad_merges")
    (bad_merges / "merges.txt").write_text("#version: 0.2\nonly_one_part\n", encoding="utf-8")
    with pytest.raises(CorruptFileError, match="merge pair"):
        load_tokenizer(bad_merges)
    wrong = _copy(tokenizer_dir, tmp_path / "wrong")
    cfg = json.loads((wrong / "tokenizer_config.json").read_text(encoding="utf-8"))
    table = cfg["added_tokens_decoder"]
    cfg["added_tokens_decoder"] = {k: v for k, v in table.items() if v["content"] != "<|im_start|>"}
    (wrong / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(CorruptFileError, match="im_start"):
        load_tokenizer(wrong)


def test_added_tokens_json_fallback(tokenizer_dir: Path, tmp_path: Path, tok: QwenTokenizer) -> None:
    folder = _copy(tokenizer_dir, tmp_path / "old", ("vocab.json", "merges.txt"))
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    table = {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}
    (folder / "added_tokens.json").write_text(json.dumps(table), encoding="utf-8")
    text = TEMPLATE.format("a cat 猫")
    assert load_tokenizer(folder).encode(text) == tok.encode(text)


# ------------------------------------------------------------------ the tokenizer.json layout
def _save_tokenizer_json(src: Path, dest: Path) -> Path:
    """What current transformers' save_pretrained writes: tokenizer.json + tokenizer_config.json, no vocab/merges."""
    transformers = pytest.importorskip("transformers")
    transformers.Qwen2TokenizerFast.from_pretrained(str(src)).save_pretrained(str(dest))
    assert (dest / "tokenizer.json").is_file() and (dest / "tokenizer_config.json").is_file()
    assert not (dest / "vocab.json").exists() and not (dest / "merges.txt").exists()
    return dest


@pytest.fixture(scope="module")
def json_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tokenizer_json(tokenizer_dir, tmp_path_factory.mktemp("saved") / "tokenizer")


@pytest.fixture(scope="module")
def tok_json(json_dir: Path) -> QwenTokenizer:
    return load_tokenizer(json_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_json_layout_gives_identical_ids(tok: QwenTokenizer, tok_json: QwenTokenizer, text: str) -> None:
    assert tok_json.encode(text) == tok.encode(text)
    assert tok_json.encode(TEMPLATE.format(text)) == tok.encode(TEMPLATE.format(text))


def test_tokenizer_json_layout_long_text_decode_and_specials(tok: QwenTokenizer, tok_json: QwenTokenizer) -> None:
    text = TEMPLATE.format(" ".join(TEXTS[2:]) * 40)
    ids = tok_json.encode(text)
    assert ids == tok.encode(text) and len(ids) > 3000
    assert tok_json.decode(ids) == tok.decode(ids)
    assert tok_json.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert tok_json.vocab_size == tok.vocab_size == 151669
    assert tok_json.special_tokens == tok.special_tokens and tok_json.pad_token_id == 151643
    assert tok_json.token_to_id("<|im_start|>") == 151644


def test_tokenizer_json_found_in_a_saved_diffusers_folder(json_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "Qwen-Image-Layered"
    shutil.copytree(json_dir, root / "tokenizer")
    shard = root / "text_encoder" / "model-00001-of-00004.safetensors"
    shard.parent.mkdir()
    shard.write_bytes(b"")
    for where in (root, root / "text_encoder", shard, root / "tokenizer"):
        assert load_tokenizer(where).folder == root / "tokenizer"


def test_tokenizer_json_wins_over_vocab_and_merges(tokenizer_dir: Path, json_dir: Path, tmp_path: Path) -> None:
    both = _copy(tokenizer_dir, tmp_path / "both")
    shutil.copyfile(json_dir / "tokenizer.json", both / "tokenizer.json")
    (both / "merges.txt").write_text("#version: 0.2\nbroken\n", encoding="utf-8")  # not read: tokenizer.json wins
    assert load_tokenizer(both).encode("猫 🦊") == load_tokenizer(tokenizer_dir).encode("猫 🦊")


def test_bad_tokenizer_json(json_dir: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_bytes(b'{"version": "1.0", "model": ')
    with pytest.raises(CorruptFileError, match="tokenizer.json is not a readable tokenizers file"):
        load_tokenizer(corrupt)
    other = tmp_path / "other"
    other.mkdir()
    data = json.loads((json_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|im_end|>"]
    (other / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CorruptFileError, match=r"lacks the special tokens \['<\|im_end\|>'\]"):
        load_tokenizer(other)


def test_not_found_names_both_layouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text("{}", encoding="utf-8")  # config alone: not enough
    with pytest.raises(ModelFileNotFoundError) as e:
        load_tokenizer(tmp_path, bundled=False)
    msg = str(e.value)
    assert "tokenizer.json" in msg and "vocab.json + merges.txt" in msg and str(tmp_path / "tokenizer") in msg


@pytest.mark.slow
def test_decompose_model_dir_with_a_tokenizer_json_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The reported failure: `decompose --model-dir` on a folder saved by current diffusers/transformers.
    import numpy as np
    from PIL import Image

    from qil_core.cli import main
    from qil_core.layers.psd import read_psd
    from qil_core.model.weights.tiny import write_tiny_model

    model_dir = write_tiny_model(tmp_path / "model", layout="diffusers", seed=1)["model_dir"]
    tiny = model_dir / "tokenizer"
    saved = _save_tokenizer_json(tiny, tmp_path / "saved")
    shutil.rmtree(tiny)
    shutil.copytree(saved, tiny)
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8), "RGB").save(image)
    out = tmp_path / "out.psd"
    code = main(
        [
            "decompose",
            str(image),
            "--out",
            str(out),
            "--model-dir",
            str(model_dir),
            "--layers",
            "2",
            "--steps",
            "1",
            "--dtype",
            "fp32",
            "--device",
            "cpu",
            "--prompt",
            "猫 🦊 test",
            "--resolution",
            "custom",
            "--max-side",
            "64",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert [layer.name for layer in read_psd(out)] == ["Background", "Layer 1"]


def test_bundled_copy_when_nothing_else_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tok: QwenTokenizer
) -> None:
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    empty = tmp_path / "weights_without_tokenizer"
    empty.mkdir()
    found = load_tokenizer(empty)
    assert found.folder == TOKENIZER_DIR and (TOKENIZER_DIR / "vocab.json").is_file()
    text = "A poster: 红色的狐狸 on snow 🦊"
    assert found.encode(text) == tok.encode(text) and found.vocab_size == tok.vocab_size == 151669
