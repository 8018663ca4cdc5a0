"""bench/gpu_caption.py (the caption step of gpu_bench) runs in dry-run mode on the CPU, so it cannot rot."""

from __future__ import annotations

import torch

from bench.gpu_caption import run_caption


def test_caption_step_dry_run() -> None:
    lines: list[str] = []
    out = run_caption(torch.device("cpu"), True, log=lines.append)
    assert out["new_tokens"] == 4 and out["prompt_tokens"] > 10
    assert 0 < out["ms_per_token"] <= out["ms_per_token_projected_28_layers"]
    assert out["peak_bytes"] is None and lines and "ms/token" in lines[0]
