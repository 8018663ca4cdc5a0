"""Time to import the pack the way ComfyUI does, against the floor of starting Python with torch loaded.

ComfyUI imports every custom node pack at start-up with torch already loaded, so the pack's own import cost is
(python + torch + pack) - (python + torch). Each figure is the median of fresh interpreter runs (no warm modules):

  baseline   python -c "import torch"
  pack       python -c "import torch; <import the pack by path, as ComfyUI's loader does>"

Run: python bench/bench_import.py [--runs N]. Target: the pack adds well under a second (no model code, no
diffusers/transformers/psd-tools at import; tests/nodes/test_pack_import.py checks what the import loads).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PACK = (
    "import importlib.util, sys; p = sys.argv[1]; n = p.replace('.', '_x_'); "
    "s = importlib.util.spec_from_file_location(n, p + '/__init__.py', submodule_search_locations=[p]); "
    "m = importlib.util.module_from_spec(s); sys.modules[n] = m; s.loader.exec_module(m)"
)


def _median_seconds(code: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, str(ROOT)], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters per figure (median taken)")
    args = parser.parse_args()
    base = _median_seconds("import torch", args.runs)
    pack = _median_seconds("import torch; " + _PACK, args.runs)
    print(f"baseline (python + torch): {base:.3f} s")
    print(f"pack import on top:        {pack - base:.3f} s  ({pack / base:.2f}x the baseline start-up)")


if __name__ == "__main__":
    main()
