"""Shared pytest fixtures: the repository root and the shared data folder beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QIL_SHARED_DIR", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (where README.md and qil_core/ live)."""
    return ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared` beside the checkout: sample images and the real Qwen2.5 tokenizer files."""
    if not SHARED.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED}; set QIL_SHARED_DIR to the folder holding data/")
    return SHARED


@pytest.fixture(scope="session")
def tokenizer_dir(shared_dir: Path) -> Path:
    """The real Qwen2.5 tokenizer files (vocab.json, merges.txt, tokenizer_config.json)."""
    return shared_dir / "data" / "qwen25_tokenizer"


@pytest.fixture(scope="session")
def sample_images(shared_dir: Path) -> dict[str, Path]:
    """The sample images by stem: portrait_1006x1358, poster_selfie, wide_1664x928."""
    folder = shared_dir / "data" / "images"
    return {p.stem: p for p in sorted(folder.glob("*.png"))}
