"""A bounded, seeded fuzz of the layer readers: a few hundred mutants of a small PSD, a layer PNG and a layer ZIP.

The contract: every mutant is either read cleanly (a LayerStack) or refused with one of the project's typed errors
(QILError); never another exception, never a hang. The mutants run in a child process with a 3 GiB address-space
limit and QIL_ASSUME_FREE_RAM=1G, so a mutant claiming a huge size cannot take the machine's memory: it must be
refused by a memory check (a ResourceError), and a MemoryError counts as a failure.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261206
COUNTS = {"psd": 200, "png": 100, "zip": 100}
_EXTREMES = (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00\x00\x75\x30")


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One mutant: flipped bytes, an extreme 32-bit field, a cut, a duplicated or removed run."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            break
        kind = rng.randrange(6)
        pos = rng.randrange(len(buf))
        if kind == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[pos] = rng.randrange(256)
        elif kind == 2:
            buf[pos : pos + 4] = rng.choice(_EXTREMES)
        elif kind == 3:
            del buf[rng.randrange(len(buf)) :]
        elif kind == 4:
            n = rng.randint(1, 64)
            buf[pos:pos] = buf[pos : pos + n]
        else:
            del buf[pos : pos + rng.randint(1, 64)]
    return bytes(buf)


def _seeds(folder: Path) -> dict[str, Path]:
    """The three valid files mutants are made from."""
    from qil_core.demo.scene import sample_stack
    from qil_core.layers.export import export_pngs, export_zip
    from qil_core.layers.psd import write_psd

    stack = sample_stack((64, 48))
    write_psd(stack, folder / "seed.psd")
    export_zip(stack, folder / "seed.zip", full_canvas=False)
    png = export_pngs(stack.replace(layers=stack.layers[2:3]), folder / "png", prefix="seed", full_canvas=False)[0]
    return {"psd": folder / "seed.psd", "png": png, "zip": folder / "seed.zip"}


def run_fuzz(kind: str, count: int, seed: int) -> list[str]:
    """Read `count` mutants of the `kind` seed file; return one line per contract violation."""
    from qil_core.errors import QILError
    from qil_core.layers.export import read_layer_pngs
    from qil_core.layers.psd import read_psd

    rng = random.Random(f"{seed}-{kind}")
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = _seeds(folder)[kind]
        data = source.read_bytes()
        target = folder / f"mutant{source.suffix}"
        for i in range(count):
            target.write_bytes(mutate(data, rng))
            t0 = time.perf_counter()
            try:
                read_psd(target) if kind == "psd" else read_layer_pngs([target])
            except QILError:
                pass
            except BaseException as err:  # noqa: BLE001 - the contract violation is what we look for
                problems.append(f"{kind} mutant {i}: {type(err).__name__}: {' '.join(str(err).split())[:160]}")
            if time.perf_counter() - t0 > 5:
                problems.append(f"{kind} mutant {i}: took {time.perf_counter() - t0:.1f} s")
    return problems


def _child(kind: str) -> list[str]:
    env = {**os.environ, "QIL_ASSUME_FREE_RAM": "1G", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = (
        "import resource, sys, json; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import test_layer_fuzz as f; "
        f"print(json.dumps(f.run_fuzz({kind!r}, {COUNTS[kind]}, {SEED})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["png", "zip"])
def test_layer_png_and_zip_readers_give_clean_reads_or_typed_errors(kind: str) -> None:
    problems = _child(kind)
    assert problems == [], "\n".join(problems)


@pytest.mark.slow
def test_psd_reader_gives_clean_reads_or_typed_errors() -> None:
    problems = _child("psd")
    assert problems == [], "\n".join(problems)


def test_mutants_are_reproducible() -> None:
    data = bytes(range(256)) * 4
    a = [mutate(data, random.Random("x")) for _ in range(3)]
    b = [mutate(data, random.Random("x")) for _ in range(3)]
    assert a == b and any(m != data for m in a)
