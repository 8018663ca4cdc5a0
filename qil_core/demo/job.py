"""The demo job on the embedded sample: build layers, edit, flatten, export PSD and PNGs, check what was written.

`run_demo` is the layer half of `python -m qil_core demo`; it needs no weights and finishes in seconds. It
returns a `DemoReport` of every file written and every step's time, so a caller (for example the model
demo, which decomposes the sample image first) can add its own files and steps to the same report.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..errors import InputError, PSDError
from ..fsutil import check_free, human_bytes
from ..layers.composite import composite
from ..layers.edit_steps import LayerEdit, apply_edits
from ..layers.export import export_pngs, layer_file_names, write_png
from ..layers.psd import lint_psd, read_psd, write_psd
from ..layers.stack import LayerStack
from .scene import DEFAULT_SIZE, sample_stack

logger = logging.getLogger(__name__)

T = TypeVar("T")

def demo_edits(size: tuple[int, int]) -> tuple[LayerEdit, ...]:
    """The demo's edits: autumn colours for the near hill; the sun and its glow moved, the sun enlarged."""
    w, h = size
    return (
        LayerEdit("Near hill", {"hue_shift": -75.0, "saturation": 0.25}),
        # Rightwards only: the glow is clipped at the top and right canvas edges, and this move keeps both clips
        # outside the canvas, so no clipped edge becomes visible. Scales with the canvas.
        LayerEdit("Sun glow,Sun", {"move": (round(0.06 * w), 0)}),
        LayerEdit("Sun", {"scale": 1.4}),
    )


@dataclass
class DemoReport:
    """What a demo run wrote (label -> path, in order) and how long each step took (label -> seconds)."""

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    layers: int = 0
    canvas: tuple[int, int] = (0, 0)

    @contextmanager
    def timed(self, label: str) -> Iterator[None]:
        """Time the body of a `with` block under `label`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[label] = time.perf_counter() - t0

    def summary_lines(self) -> list[str]:
        """Human summary: canvas, each file with its size, each step with its time, and the total."""
        lines = [f"demo: {self.layers} layers on a {self.canvas[0]}x{self.canvas[1]} canvas in {self.out_dir}"]
        for label, path in self.files.items():
            lines.append(f"  {label:<16} {os.fspath(path)} ({human_bytes(path.stat().st_size)})")
        lines.append("  timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        lines.append(f"  total {sum(self.timings.values()):.2f} s")
        return lines


def _run(report: DemoReport, label: str, fn: Callable[[], T]) -> T:
    """Run one step under a timer."""
    with report.timed(label):
        return fn()


def check_psd(path: Path, expect: LayerStack) -> None:
    """Lint a PSD we wrote and read it back: the layer names and offsets must survive."""
    problems = lint_psd(path)
    if problems:
        raise PSDError(f"demo: {path} failed the structural check: {'; '.join(problems)}")
    back = read_psd(path)
    got = [(layer.name, layer.x, layer.y) for layer in back]
    want = [(layer.name, layer.x, layer.y) for layer in expect]
    if got != want:
        raise PSDError(f"demo: {path} read back as {got}, expected {want}")


def run_demo(out_dir: str | os.PathLike[str], *, size: tuple[int, int] = DEFAULT_SIZE,
             overwrite: bool = False) -> DemoReport:
    """Build the sample stack, edit it, and write composites, PSDs and per-layer PNGs into `out_dir`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"demo output {os.fspath(out)!r} is a file; give a folder (it is created if missing)")
    report = DemoReport(out)
    stack = _run(report, "draw sample", lambda: sample_stack(size))
    report.layers, report.canvas = len(stack), stack.size
    targets = {
        "composite": out / "sample.png",
        "psd": out / "sample.psd",
        "edited composite": out / "sample_edited.png",
        "edited psd": out / "sample_edited.psd",
    }
    layer_dir = out / "layers"
    # Everything is checked before anything is written, so a refused run leaves the folder as it was.
    check_free([*targets.values(), *(layer_dir / n for n in layer_file_names(stack, "sample"))],
               overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)

    flat = _run(report, "composite", lambda: composite(stack))
    report.files["composite"] = write_png(flat, targets["composite"], overwrite=overwrite)
    report.files["psd"] = _run(report, "write psd",
                               lambda: write_psd(stack, targets["psd"], overwrite=overwrite, merged=flat))
    edited = _run(report, "edit", lambda: apply_edits(stack, demo_edits(stack.size)))
    flat_edited = _run(report, "composite edited", lambda: composite(edited))
    report.files["edited composite"] = write_png(flat_edited, targets["edited composite"], overwrite=overwrite)
    report.files["edited psd"] = _run(
        report, "write edited psd",
        lambda: write_psd(edited, targets["edited psd"], overwrite=overwrite, merged=flat_edited),
    )
    pngs = _run(report, "export pngs",
                lambda: export_pngs(stack, layer_dir, prefix="sample", overwrite=overwrite))
    for path in pngs:
        report.files[f"layer {path.stem.split('_')[1]}"] = path
    with report.timed("verify"):
        check_psd(report.files["psd"], stack)
        check_psd(report.files["edited psd"], edited)
    return report
