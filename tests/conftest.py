"""Shared pytest fixtures: the repository root and the Qwen2.5 tokenizer bundled with the package."""

from __future__ import annotations

import sys
from collections.abc import Generator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_TOKENIZER = ROOT / "qil_core" / "assets" / "qwen25_tokenizer"
# Test helpers (comfy_harness, qwen_tiny, ...) live in tests/support and are imported by module name.
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (where README.md and qil_core/ live)."""
    return ROOT


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The real Qwen2.5 tokenizer files (vocab.json, merges.txt, tokenizer_config.json) shipped in the package."""
    return BUNDLED_TOKENIZER


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """A test whose body passed but could not run a system reader (see psd_readers) is reported as skipped."""
    from psd_readers import SKIPPED_READERS

    SKIPPED_READERS.clear()
    result = yield
    if SKIPPED_READERS:
        reasons = sorted(set(SKIPPED_READERS))
        SKIPPED_READERS.clear()
        pytest.skip("; ".join(reasons) + " (every other check in this test passed)")
    return result
