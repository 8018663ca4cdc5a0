"""Data files shipped inside the package: the Qwen2.5 tokenizer (qwen25_tokenizer/, Apache-2.0, see NOTICE)."""

from __future__ import annotations

from pathlib import Path

TOKENIZER_DIR = Path(__file__).resolve().parent / "qwen25_tokenizer"

__all__ = ["TOKENIZER_DIR"]
