"""Run the PSD reader over a folder of PSD/PSB files and compare each composite with Photoshop's merged image.

Run: python bench/bench_psd_corpus.py FOLDER [FOLDER ...] [--before OTHER_CHECKOUT] [--timeout 60] [--quiet]

Per file it prints: layers read, the warnings by feature, and our composite vs the stored merged image
(both flattened over white, so files with and without transparency compare alike) as mean / max absolute
difference in 1/255 and the % of pixels off by more than 8/255 in some channel. A file "matches" when at
most 1 % of its pixels are off by more than 8/255. The merged image is decoded by this checkout's
`read_psd_merged` (32-bit and profile aware). `--before PATH` also runs the reader of another checkout of
this project (its `qil_core`, imported under another name) on the same files, to count matches before and
after a change. Files are never modified; nothing is written.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qil_core.layers.composite import composite  # noqa: E402
from qil_core.layers.psd import load_psd, read_psd_merged  # noqa: E402

OFF = 8 / 255
MATCH_PCT = 1.0


class _Timeout(Exception):
    pass


def _alarm(_signum, _frame) -> None:
    raise _Timeout()


def load_other(root: Path) -> tuple[ModuleType, ModuleType]:
    """(layers.psd, layers.composite) of the `qil_core` package in another checkout, imported as qil_core_before."""
    name = "qil_core_before"
    spec = importlib.util.spec_from_file_location(
        name, root / "qil_core" / "__init__.py", submodule_search_locations=[str(root / "qil_core")]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"no qil_core package in {root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.layers.psd"), importlib.import_module(f"{name}.layers.composite")


def over_white(rgba: np.ndarray) -> np.ndarray:
    """Straight RGBA -> RGB flattened over white."""
    a = rgba[..., 3:4]
    return rgba[..., :3] * a + (1 - a)


def compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(mean, max in 1/255, % of pixels off by more than 8/255) between two straight RGBA images."""
    if ours.shape != ref.shape:
        return float("nan"), float("nan"), 100.0
    diff = np.abs(over_white(ours) - over_white(ref)).max(axis=-1)
    return float(diff.mean() * 255), float(diff.max() * 255), float((diff > OFF).mean() * 100)


class _Count(logging.Handler):
    """Counts warning records (the old reader only logs its warnings)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


def run_file(path: Path, before: tuple[ModuleType, ModuleType] | None) -> dict:
    """Read one file with this reader (and the other one); returns the measurements."""
    row: dict = {"file": path}
    try:
        ref = read_psd_merged(path)
    except Exception as err:  # noqa: BLE001 - a bench reports every failure and goes on
        ref = None
        row["ref_error"] = f"{type(err).__name__}: {err}"[:160]
    try:
        t0 = time.perf_counter()
        read = load_psd(path)
        flat = composite(read.stack)
        row.update(layers=len(read.stack), features=dict(read.features), seconds=time.perf_counter() - t0)
        row["after"] = compare(flat, ref) if ref is not None else None
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {err}"[:200]
    if before is not None:
        psd_mod, comp_mod = before
        counter = _Count()
        logging.getLogger("qil_core_before").addHandler(counter)
        try:
            stack = psd_mod.read_psd(path)
            row["before_layers"] = len(stack)
            row["before"] = compare(comp_mod.composite(stack), ref) if ref is not None else None
        except Exception as err:  # noqa: BLE001
            row["before_error"] = f"{type(err).__name__}: {err}"[:120]
        finally:
            logging.getLogger("qil_core_before").removeHandler(counter)
        row["before_warnings"] = counter.n
    return row


def _fmt(stats: tuple[float, float, float] | None) -> str:
    if stats is None:
        return "no merged image"
    mean, mx, pct = stats
    tag = "MATCH" if pct <= MATCH_PCT else "differs"
    return f"{tag:7s} mean {mean:5.2f} max {mx:6.1f} off>8 {pct:5.1f}%"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every file, print per-file lines and the summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--before", type=Path, help="another checkout whose reader to run too (before a change)")
    ap.add_argument("--timeout", type=int, default=60, help="seconds per file (default 60)")
    ap.add_argument("--quiet", action="store_true", help="summary only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # warnings are counted, not printed
    logging.getLogger("qil_core").setLevel(logging.ERROR)
    logging.getLogger("psd_tools").setLevel(logging.CRITICAL)
    before = load_other(args.before) if args.before else None
    if before is not None:
        logging.getLogger("qil_core_before").setLevel(logging.WARNING)
        logging.getLogger("qil_core_before").propagate = False
    files = sorted({p for f in args.folders for p in f.rglob("*") if p.suffix.lower() in (".psd", ".psb")})
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    for path in files:
        signal.alarm(args.timeout)
        try:
            row = run_file(path, before)
        except _Timeout:
            row = {"file": path, "error": f"timeout after {args.timeout} s"}
        finally:
            signal.alarm(0)
        rows.append(row)
        if not args.quiet:
            feats = ", ".join(f"{k} {v}" for k, v in sorted(row.get("features", {}).items())) or "-"
            line = f"{path.name[:44]:44s} layers {row.get('layers', '-')!s:>3s}  after: "
            line += row["error"] if "error" in row else _fmt(row.get("after"))
            if before is not None:
                line += "  before: " + (row["before_error"] if "before_error" in row else _fmt(row.get("before")))
            print(line + f"  warnings: {feats}", flush=True)
    _summary(rows, before is not None)
    return 0


def _summary(rows: list[dict], with_before: bool) -> None:
    n = len(rows)
    ok = [r for r in rows if "error" not in r]
    comparable = [r for r in ok if r.get("after") is not None]
    matched = [r for r in comparable if r["after"][2] <= MATCH_PCT]
    print(f"\n{n} files: {len(ok)} read, {n - len(ok)} errors, {len(comparable)} with a merged image to compare")
    print(
        f"after:  {len(matched)} of {len(comparable)} match the merged image (<= {MATCH_PCT:g} % of pixels off "
        f"by more than 8/255); {sum(r['layers'] for r in ok)} layers read"
    )
    if with_before:
        both = [r for r in comparable if r.get("before") is not None]
        b_match = [r for r in both if r["before"][2] <= MATCH_PCT]
        a_match = [r for r in both if r["after"][2] <= MATCH_PCT]
        b_err = sum("before_error" in r for r in rows)
        print(
            f"before: {len(b_match)} of {len(both)} match; after on the same files: {len(a_match)}; before "
            f"errors {b_err}; files whose warnings went from 0 to some: "
            f"{sum(1 for r in ok if r.get('before_warnings') == 0 and r.get('features'))}"
        )
        closer = sum(1 for r in both if r["after"][0] < r["before"][0] - 1e-3)
        worse = sum(1 for r in both if r["after"][0] > r["before"][0] + 1e-3)
        print(f"mean difference: closer on {closer} files, further on {worse}")
    feats: Counter = Counter()
    files_with: Counter = Counter()
    for r in ok:
        feats.update(r.get("features", {}))
        files_with.update(r.get("features", {}).keys())
    print(
        "warnings by feature (files / warnings): "
        + ", ".join(f"{k} {files_with[k]}/{v}" for k, v in feats.most_common())
    )
    silent = [r for r in comparable if r["after"][2] > MATCH_PCT and not r.get("features")]
    print(
        f"files that differ with no warning: {len(silent)}"
        + (
            "  (" + ", ".join(r["file"].name for r in silent[:20]) + (", ..." if len(silent) > 20 else "") + ")"
            if silent
            else ""
        )
    )
    errors = Counter(r["error"].split(":")[0] for r in rows if "error" in r)
    if errors:
        print("errors by type: " + ", ".join(f"{k} {v}" for k, v in errors.most_common()))


if __name__ == "__main__":
    raise SystemExit(main())
