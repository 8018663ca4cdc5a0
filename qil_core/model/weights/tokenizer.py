"""Qwen2 byte-level BPE tokenizer, loaded with the `tokenizers` library from either folder layout.

- `tokenizer.json` (what current transformers/diffusers `save_pretrained` writes): the library's native
  format, loaded as is, whenever it is present.
- `vocab.json` + `merges.txt` (+ the added tokens of tokenizer_config.json or added_tokens.json): the pipeline of
  transformers 5.x `Qwen2Tokenizer` is rebuilt (NFC normaliser, Qwen2 split regex, byte-level pre-tokenizer
  without prefix space, byte-level decoder, added tokens) so that ids equal the reference on the real vocabulary.
Both give the same ids; transformers is not imported at run time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ...assets import TOKENIZER_DIR
from ...errors import CorruptFileError, InputError, ModelFileNotFoundError

log = logging.getLogger(__name__)

# Qwen2's pre-tokenizer split: English contractions, letter runs with one optional leading non-letter,
# single digits, punctuation runs with trailing newlines, newline runs, and whitespace.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TOKENIZER_JSON = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
ADDED_TOKENS_FILE = "added_tokens.json"
# Tokens the prompt template needs; a folder without them is not a Qwen2.5 tokenizer.
REQUIRED_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Where ComfyUI keeps the tokenizer that its qwen_image text encoder uses, relative to its root.
COMFYUI_TOKENIZER_SUBDIR = Path("comfy") / "text_encoders" / "qwen25_tokenizer"


class QwenTokenizer:
    """A loaded Qwen2.5 tokenizer: `encode(text) -> ids` and `decode(ids) -> text`, special tokens included."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, int], folder: Path) -> None:
        self._tok = tokenizer
        self.special_tokens = dict(special_tokens)
        self.folder = folder
        self.pad_token_id = special_tokens["<|endoftext|>"]

    def __repr__(self) -> str:
        return f"QwenTokenizer(folder={str(self.folder)!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        """Number of ids: the BPE vocabulary plus the added tokens (151669 with the Qwen2.5-VL files)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) become their single id."""
        if not isinstance(text, str):
            raise InputError(
                f"tokenizer input must be str, got {type(text).__name__}; decode bytes first, e.g. "
                "data.decode('utf-8', errors='replace')"
            )
        return self._tok.encode(_replace_lone_surrogates(text), add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (byte-level decoding; incomplete UTF-8 sequences decode to U+FFFD)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}); use ids from encode()"
            )
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """Id of one token string (a vocabulary entry or an added token)."""
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise InputError(f"token {token!r} is not in the vocabulary of the tokenizer at {self.folder}")
        return idx


def _replace_lone_surrogates(text: str) -> str:
    """Replace lone surrogates (how undecodable bytes reach a str via 'surrogateescape') with U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        log.warning("prompt contains invalid UTF-8 (lone surrogates); they were replaced with U+FFFD")
        return "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)
    return text


def load_tokenizer(
    path: str | Path | None = None, *, search: Sequence[Path] = (), bundled: bool = True
) -> QwenTokenizer:
    """Find and load the Qwen2.5 tokenizer: at/next to `path`, then in `search`, then in a ComfyUI install.

    When none of those has it, the copy bundled with the package is used (`bundled=False`: raise instead, for a
    tokenizer the user named explicitly).
    """
    looked: list[Path] = []
    roots: list[Path] = [Path(path)] if path is not None else []
    roots += [Path(p) for p in search]
    roots += _default_roots()
    for root in roots:
        for folder in _candidate_dirs(root):
            if folder in looked:
                continue
            looked.append(folder)
            if _has_tokenizer(folder):
                return _load_folder(folder)
    if bundled:
        log.info("no Qwen2.5 tokenizer next to the weights or in a ComfyUI install; using the bundled copy")
        return _load_folder(TOKENIZER_DIR)
    where = "\n  ".join(str(p) for p in looked) or "(nowhere: no path given and no ComfyUI install found)"
    raise ModelFileNotFoundError(
        f"Qwen2.5 tokenizer not found: a folder needs either {TOKENIZER_JSON} (as saved by transformers/diffusers) "
        f"or {VOCAB_FILE} + {MERGES_FILE} + {CONFIG_FILE}. Looked in:\n  {where}\n"
        "Pass the diffusers model folder (it has tokenizer/), the tokenizer folder itself, or your ComfyUI folder "
        f"(it ships {COMFYUI_TOKENIZER_SUBDIR.as_posix()}/)."
    )


def _has_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds either tokenizer layout (a partial vocab/merges pair counts, to report what lacks)."""
    return any((folder / name).is_file() for name in (TOKENIZER_JSON, VOCAB_FILE, MERGES_FILE))


def _default_roots() -> list[Path]:
    """ComfyUI installs to search when nothing else has the files: $COMFYUI_DIR and the one holding this pack."""
    roots = []
    env = os.environ.get("COMFYUI_DIR")
    if env:
        roots.append(Path(env))
    # <ComfyUI>/custom_nodes/<pack>/qil_core/model/weights/tokenizer.py; the pack may be a symlink into custom_nodes,
    # so look at the path as imported (absolute, links kept) as well as the resolved one.
    for here in (Path(os.path.abspath(__file__)), Path(__file__).resolve()):
        if len(here.parents) > 5 and here.parents[4].name == "custom_nodes" and here.parents[5] not in roots:
            roots.append(here.parents[5])
    return roots


def _candidate_dirs(root: Path) -> list[Path]:
    """Folders that may hold the files, given a tokenizer folder, a model folder, a weights file or a ComfyUI root."""
    base = root.parent if root.is_file() else root
    out = [base, base / "tokenizer", base / COMFYUI_TOKENIZER_SUBDIR]
    # diffusers text_encoder/ (or a shard inside it) -> sibling tokenizer/; ComfyUI models/text_encoders/x -> root
    out += [base.parent / "tokenizer", base.parent.parent / COMFYUI_TOKENIZER_SUBDIR]
    return out


def _load_folder(folder: Path) -> QwenTokenizer:
    """Load the tokenizer of one folder: its tokenizer.json if present, else vocab.json + merges.txt."""
    if (folder / TOKENIZER_JSON).is_file():
        return _load_tokenizer_json(folder)
    return _load_vocab_merges(folder)


def _load_tokenizer_json(folder: Path) -> QwenTokenizer:
    """Load a `tokenizers` tokenizer.json and check that it carries the Qwen2.5 chat-template tokens."""
    path = folder / TOKENIZER_JSON
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises plain Exception for bad JSON and for unknown components
        raise CorruptFileError(
            f"{path} is not a readable tokenizers file ({str(e)[:200]}); restore the original, or delete it to use "
            f"{VOCAB_FILE} + {MERGES_FILE} instead"
        ) from e
    tok.no_truncation()  # a saved tokenizer may carry truncation or padding settings; the prompt code owns those
    tok.no_padding()
    names = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    missing = [t for t in REQUIRED_SPECIAL if t not in names]
    if missing:
        raise CorruptFileError(
            f"{path} lacks the special tokens {missing} in its added_tokens; this is not a Qwen2.5 tokenizer"
        )
    log.info("loaded Qwen2.5 tokenizer from %s (%d ids)", path, tok.get_vocab_size(with_added_tokens=True))
    return QwenTokenizer(tok, names, folder)


def _load_vocab_merges(folder: Path) -> QwenTokenizer:
    """Build the tokenizer from one folder holding vocab.json, merges.txt and the added-token table."""
    for name in (VOCAB_FILE, MERGES_FILE):
        if not (folder / name).is_file():
            raise ModelFileNotFoundError(f"tokenizer folder {folder} has no {name}; copy the complete tokenizer folder")
    vocab = _read_json(folder / VOCAB_FILE)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise CorruptFileError(f"{folder / VOCAB_FILE} is not a token -> id table; restore the original file")
    merges = _read_merges(folder / MERGES_FILE)
    added = _read_added_tokens(folder)
    names = {t.content: i for i, t in added.items()}
    missing = [t for t in REQUIRED_SPECIAL if t not in names]
    if missing:
        raise CorruptFileError(
            f"tokenizer in {folder} lacks the special tokens {missing}; this is not a Qwen2.5 tokenizer folder "
            f"(expected them in {CONFIG_FILE} 'added_tokens_decoder' or {ADDED_TOKENS_FILE})"
        )
    by_id = {i: t for t, i in vocab.items()}
    clash = [
        (t.content, i) for i, t in added.items() if vocab.get(t.content, i) != i or by_id.get(i, t.content) != t.content
    ]
    if clash:
        raise CorruptFileError(f"added tokens {clash[:3]} in {folder} collide with ids of {VOCAB_FILE}")
    # Give the added tokens their ids inside the BPE vocabulary so that gaps or order cannot shift them.
    full_vocab = dict(vocab)
    full_vocab.update(names)
    tok = Tokenizer(BPE(vocab=full_vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    ordered = [added[i] for i in sorted(added)]
    tok.add_special_tokens([t for t in ordered if t.special])
    tok.add_tokens([t for t in ordered if not t.special])
    for i, t in added.items():
        if tok.token_to_id(t.content) != i:
            raise CorruptFileError(f"added token {t.content!r} in {folder} did not keep its id {i}")
    log.info("loaded Qwen2.5 tokenizer from %s (%d ids)", folder, tok.get_vocab_size(with_added_tokens=True))
    return QwenTokenizer(tok, names, folder)


def _read_json(path: Path) -> object:
    """Parse a JSON file, reporting an unreadable one as a corrupt tokenizer file."""
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid UTF-8 JSON ({e}); restore the original tokenizer file") from e


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """The BPE merge list: one 'left right' pair per line after an optional '#version' header."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path} is not UTF-8 text ({e}); restore the original merges.txt") from e
    merges = []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise CorruptFileError(f"{path} line {n} is not a 'left right' merge pair: {line[:40]!r}")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise CorruptFileError(f"{path} holds no merges; restore the original merges.txt")
    return merges


def _read_added_tokens(folder: Path) -> dict[int, AddedToken]:
    """Added tokens by id from tokenizer_config.json ('added_tokens_decoder') or, failing that, added_tokens.json."""
    cfg_path = folder / CONFIG_FILE
    if cfg_path.is_file():
        cfg = _read_json(cfg_path)
        table = cfg.get("added_tokens_decoder") if isinstance(cfg, dict) else None
        if isinstance(table, dict) and table:
            out = {}
            for key, spec in table.items():
                if not (str(key).isdigit() and isinstance(spec, dict) and isinstance(spec.get("content"), str)):
                    raise CorruptFileError(f"{cfg_path}: malformed added_tokens_decoder entry {key!r}")
                out[int(key)] = AddedToken(
                    spec["content"],
                    single_word=bool(spec.get("single_word", False)),
                    lstrip=bool(spec.get("lstrip", False)),
                    rstrip=bool(spec.get("rstrip", False)),
                    normalized=bool(spec.get("normalized", False)),
                    special=bool(spec.get("special", True)),
                )
            return out
    added_path = folder / ADDED_TOKENS_FILE
    if added_path.is_file():
        table = _read_json(added_path)
        if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
            raise CorruptFileError(f"{added_path} is not a token -> id table")
        # Older exports: every entry of added_tokens.json is a special, unnormalised token.
        return {i: AddedToken(t, normalized=False, special=True) for t, i in table.items()}
    raise ModelFileNotFoundError(
        f"tokenizer folder {folder} has neither {CONFIG_FILE} (with added_tokens_decoder) nor {ADDED_TOKENS_FILE}; "
        "without them the chat-template tokens would be split into pieces. Copy the complete tokenizer folder."
    )
