"""bench/gpu_bench.py runs end to end in --dry-run mode (tiny model, CPU), so the GPU script cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

VARIANTS = {
    "ours-bf16",
    "ours-bf16-batched",
    "diffusers-bf16",
    "ours-fp8",
    "ours-fp8-mm",
    "ours-fp8-swap",
    "ours-int8-convrot-ck",
    "ours-nvfp4-ck",
}


@pytest.fixture(scope="module")
def gpu_bench(repo_root: Path):
    spec = importlib.util.spec_from_file_location("gpu_bench", repo_root / "bench" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        yield module
    finally:
        sys.modules.pop("gpu_bench", None)


def test_cost_model_matches_performance_doc(gpu_bench) -> None:
    # performance.md: 50 steps with true CFG = 20.2 PFLOP at 640²/N=4 and 180 PFLOP at 1024²/N=8 (~120 text tokens)
    small = gpu_bench.Setting("640", 640, 640, 4, 120, 120)
    big = gpu_bench.Setting("1024", 1024, 1024, 8, 120, 120)
    assert small.img_tokens == 9600 and big.img_tokens == 40960
    assert 100 * gpu_bench.forward_flops(small.img_tokens + 120, 60) == pytest.approx(20.2e15, rel=0.01)
    assert 100 * gpu_bench.forward_flops(big.img_tokens + 120, 60) == pytest.approx(180e15, rel=0.01)
    assert gpu_bench.forward_flops(1000, 6) == pytest.approx(gpu_bench.forward_flops(1000, 60) / 10)


@pytest.mark.slow
def test_dry_run_reports_every_variant(gpu_bench, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    report = gpu_bench.main(["--dry-run", "--out", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    settings = [s["name"] for s in report["settings"]]
    assert len(settings) == 2
    seen = {(r["variant"], r["setting"]) for r in report["results"]}
    assert seen == {(v, s) for v in VARIANTS for s in settings}
    for row in report["results"]:
        assert row["s_per_step"] > 0 and row["tflops"] > 0 and row["s_per_step_60"] == row["s_per_step"]
    swap = [r for r in report["results"] if r["variant"] == "ours-fp8-swap"]
    assert all(r["uploaded_gb_per_step"] > 0 for r in swap)  # blocks really streamed
    assert set(report["ratios"]) == set(settings) and all(
        r["speedup_vs_diffusers"] > 0 for r in report["ratios"].values()
    )
    acc = report["accuracy"]
    assert acc["ours_vs_diffusers_bf16_rel_l2"] < 0.02  # same weights and inputs, bf16 rounding only
    assert 0 < acc["fp8_vs_bf16_rel_l2"] < 0.1 and 0 < acc["fp8mm_vs_bf16_rel_l2"] < 0.1
    assert len(report["projections_50_steps_s"]) == len(report["results"])
    assert report["vae"] and report["vae"][0]["decode_per_layer_s"] > 0
    assert "=== summary ===" in printed and "ours/diffusers" in printed and "dry run" in printed


def test_refuses_gpu_run_without_cuda(gpu_bench) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal only applies without CUDA")
    with pytest.raises(SystemExit):
        gpu_bench.main(["--quick"])
