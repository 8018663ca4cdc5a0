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

import numpy as np

from ..errors import InputError, PSDError
from ..fsutil import check_free, write_group
from ..layers.composite import composite
from ..layers.edit_steps import LayerEdit, apply_edits
from ..layers.export import layer_file_names, png_items, write_png
from ..layers.psd import lint_psd, read_psd, write_psd
from ..layers.stack import LayerStack
from ..resources import format_bytes
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
            lines.append(f"  {label:<16} {os.fspath(path)} ({format_bytes(path.stat().st_size)})")
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


Items = list[tuple[Path, Callable[[Path], object]]]


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    size: tuple[int, int] = DEFAULT_SIZE,
    overwrite: bool = False,
    more: Callable[[DemoReport], Items] | None = None,
) -> DemoReport:
    """Build the sample stack, edit it, and write composites, PSDs and per-layer PNGs into `out_dir`.

    Everything is computed first and then published as one group (`fsutil.write_group`), together with the
    `(path, write)` items that `more(report)` returns (the model demo's files): on any failure, a full disk
    included, no file of the run appears and no old file changes.
    """
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
    check_free([*targets.values(), *(layer_dir / n for n in layer_file_names(stack, "sample"))], overwrite=overwrite)

    flat = _run(report, "composite", lambda: composite(stack))
    edited = _run(report, "edit", lambda: apply_edits(stack, demo_edits(stack.size)))
    flat_edited = _run(report, "composite edited", lambda: composite(edited))

    def psd_writer(doc: LayerStack, merged: np.ndarray, label: str) -> Callable[[Path], object]:
        def write(staged: Path) -> None:
            _run(report, label, lambda: write_psd(doc, staged, merged=merged))
            with report.timed("verify"):
                check_psd(staged, doc)

        return write

    items: Items = [
        (targets["composite"], lambda p: write_png(flat, p)),
        (targets["psd"], psd_writer(stack, flat, "write psd")),
        (targets["edited composite"], lambda p: write_png(flat_edited, p)),
        (targets["edited psd"], psd_writer(edited, flat_edited, "write edited psd")),
    ]
    pngs = png_items(stack, layer_dir, prefix="sample")
    extra = more(report) if more is not None else []
    out.mkdir(parents=True, exist_ok=True)
    written = _run(
        report, "write files", lambda: write_group(items + pngs + extra, overwrite=overwrite, make_dirs=True)
    )
    for label, path in zip(targets, written):
        report.files[label] = path
    for path in written[len(items) : len(items) + len(pngs)]:
        report.files[f"layer {path.stem.split('_')[1]}"] = path
    return report
