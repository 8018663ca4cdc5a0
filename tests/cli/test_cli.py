"""The command line end to end, in-process through `main([...])`, on small canvases in a tmp folder."""

from __future__ import annotations

import json
import logging
import runpy
import sys
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from psd_readers import check_readers

from qil_core.cli.entry import main
from qil_core.demo.job import DemoReport, run_demo
from qil_core.demo.scene import sample_stack
from qil_core.layers.composite import composite
from qil_core.layers.psd import lint_psd, read_psd, write_psd
from qil_core.layers.stack import Layer, LayerStack

SIZE = (256, 192)
TOL = 1.0 / 255 + 1e-6  # one 8-bit step


def _png(path: Path) -> np.ndarray:
    """A PNG as (H, W, 4) float32 straight RGBA."""
    return np.asarray(Image.open(path).convert("RGBA"), np.float32) / 255.0


def _same_layers(a: LayerStack, b: LayerStack, *, pixels_exact: bool = True) -> None:
    """Names, offsets, sizes, properties and pixels of two stacks agree."""
    assert a.size == b.size
    assert [x.name for x in a] == [y.name for y in b]
    for x, y in zip(a, b):
        assert (x.x, x.y, x.width, x.height) == (y.x, y.y, y.width, y.height), x.name
        assert (x.blend_mode, x.visible) == (y.blend_mode, y.visible), x.name
        assert x.opacity == pytest.approx(y.opacity, abs=1 / 255), x.name
        if pixels_exact:
            assert np.array_equal(x.pixels, y.pixels), x.name
        else:  # premultiplied: colour under alpha that quantises to 0 is meaningless (and zeroed in files)
            px, py = x.pixels * x.pixels[..., 3:], y.pixels * y.pixels[..., 3:]
            assert np.abs(px - py).max() <= TOL, x.name


@pytest.fixture(scope="module")
def scene_psd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 8-layer sample scene as a PSD (256x192)."""
    path = tmp_path_factory.mktemp("scene") / "scene.psd"
    write_psd(sample_stack(SIZE), path)
    return path


@pytest.fixture(scope="module")
def scene(scene_psd: Path) -> LayerStack:
    """The scene as read back from its PSD (the reference every command is compared with)."""
    return read_psd(scene_psd)


@pytest.fixture(scope="module")
def small_psd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer 64x48 PSD with a Unicode name, an offset layer, opacity and a blend mode."""
    rng = np.random.default_rng(0)
    back = np.ones((48, 64, 4), np.float32)
    back[..., :3] = rng.random((48, 64, 3), np.float32)
    square = np.ones((16, 20, 4), np.float32) * np.array([0.9, 0.1, 0.1, 1.0], np.float32)
    disc = np.zeros((12, 12, 4), np.float32)
    yy, xx = np.mgrid[0:12, 0:12]
    disc[..., 2] = 1.0
    disc[..., 3] = np.clip(6.0 - np.hypot(yy - 5.5, xx - 5.5), 0, 1)
    stack = LayerStack(
        64,
        48,
        [
            Layer(back, name="Back"),
            Layer(square, x=10, y=8, name="Red square", opacity=0.8, blend_mode="multiply"),
            Layer(disc, x=40, y=20, name="Blå ✓ disc").cropped(),
        ],
    )
    path = tmp_path_factory.mktemp("small") / "small.psd"
    write_psd(stack, path)
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """main() on stringified args; returns (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- entry point, help, logging


def test_module_help_runs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["qil_core", "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("qil_core", run_name="__main__", alter_sys=True)
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for command in ("compose", "layers-to-psd", "psd-to-layers", "edit", "info", "demo"):
        assert command in out


def test_command_help_and_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "edit", "--help")
    assert code == 0 and "--layer KEYS starts a group" in out and "--replace-color" in out
    code, _, err = _run(capsys)
    assert code == 2 and "COMMAND" in err


def test_import_configures_no_logging() -> None:
    # Importing the CLI must not add handlers; main() removes its own handler when it returns.
    assert not logging.getLogger("qil_core").handlers
    assert main(["info", "--help"]) == 0
    assert not logging.getLogger("qil_core").handlers


def test_usage_error_is_one_line(capsys: pytest.CaptureFixture[str], small_psd: Path) -> None:
    code, _, err = _run(capsys, "compose", small_psd)  # --out missing
    assert code == 2
    assert err.count("\n") == 1 and "--out" in err and "Traceback" not in err


# ---------------------------------------------------------------- compose


def test_compose_psd(capsys: pytest.CaptureFixture[str], tmp_path: Path, scene_psd: Path, scene: LayerStack) -> None:
    out = tmp_path / "flat.png"
    code, _, err = _run(capsys, "compose", scene_psd, "--out", out)
    assert code == 0, err
    assert "flat.png" in err  # the 'wrote' log line
    img = _png(out)
    assert img.shape == (SIZE[1], SIZE[0], 4)
    assert np.abs(img - composite(scene)).max() <= TOL


def test_compose_background_and_layer_pngs(capsys: pytest.CaptureFixture[str], tmp_path: Path, small_psd: Path) -> None:
    stack = read_psd(small_psd)
    names = []
    for i, layer in enumerate(stack):  # plain full-canvas PNGs with no layer record
        canvas = np.zeros((stack.height, stack.width, 4), np.float32)
        canvas[layer.y : layer.y + layer.height, layer.x : layer.x + layer.width] = layer.pixels
        names.append(tmp_path / f"l{i}.png")
        Image.fromarray(np.round(canvas * 255).astype(np.uint8), "RGBA").save(names[-1])
    out = tmp_path / "flat.png"
    assert _run(capsys, "compose", *names, "--out", out, "--background", "#ffffff")[0] == 0
    im = Image.open(out)
    assert im.mode == "RGB"  # opaque result is written without alpha
    plain = stack.replace(layers=[layer.replace(opacity=1.0, blend_mode="normal") for layer in stack])
    want = composite(plain, background=(1.0, 1.0, 1.0, 1.0))
    assert np.abs(_png(out) - want).max() <= TOL


# ---------------------------------------------------------------- layers-to-psd


def test_layers_to_psd_plain_pngs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    big = np.zeros((48, 64, 4), np.uint8)
    big[5:20, 7:30] = (255, 0, 0, 255)
    small = np.zeros((20, 30, 4), np.uint8)
    small[2:10, 3:9] = (0, 0, 255, 128)
    Image.fromarray(big, "RGBA").save(tmp_path / "background.png")
    Image.fromarray(small, "RGBA").save(tmp_path / "sticker.png")
    out = tmp_path / "out.psd"
    code, _, err = _run(capsys, "layers-to-psd", tmp_path / "background.png", tmp_path / "sticker.png", "--out", out)
    assert code == 0, err
    assert lint_psd(out) == []
    back = read_psd(out)
    assert back.size == (64, 48)  # the largest input
    assert [layer.name for layer in back] == ["background", "sticker"]
    assert [(layer.x, layer.y, layer.width, layer.height) for layer in back] == [(7, 5, 23, 15), (3, 2, 6, 8)]
    assert np.abs(back[1].pixels - np.array([0, 0, 1, 128 / 255], np.float32)).max() <= TOL
    expect = LayerStack(
        64,
        48,
        [
            Layer.from_canvas(big / np.float32(255), name="background"),
            Layer.from_canvas(small / np.float32(255), name="sticker"),
        ],
    )
    check_readers(out, expect)  # psd-tools, pytoshop and ImageMagick agree with what we meant to write

    out2 = tmp_path / "named.psd"
    argv = [
        "layers-to-psd",
        tmp_path / "background.png",
        tmp_path / "sticker.png",
        "--out",
        out2,
        "--names",
        "Fond",
        "Étiquette 🏷",
        "--canvas",
        "100x80",
        "--depth",
        "16",
    ]
    assert _run(capsys, *argv)[0] == 0
    assert lint_psd(out2) == []
    back2 = read_psd(out2)
    assert back2.size == (100, 80)
    assert [layer.name for layer in back2] == ["Fond", "Étiquette 🏷"]

    code, _, err = _run(
        capsys, "layers-to-psd", tmp_path / "background.png", "--out", tmp_path / "x.psd", "--names", "a", "b"
    )
    assert code == 2 and "2 names for 1 layers" in err
    code, _, err = _run(capsys, "layers-to-psd", out, "--out", tmp_path / "x.psd")
    assert code == 2 and "use 'edit'" in err
    assert not (tmp_path / "x.psd").exists()


# ---------------------------------------------------------------- psd-to-layers and the round trip


def test_psd_to_layers_round_trip(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, scene_psd: Path, scene: LayerStack
) -> None:
    out_dir = tmp_path / "layers"
    code, _, err = _run(capsys, "psd-to-layers", scene_psd, "--out", out_dir)
    assert code == 0, err
    pngs = sorted(out_dir.glob("scene_*.png"))
    assert [p.name for p in pngs] == [f"scene_{i:02d}_{layer.name}.png" for i, layer in enumerate(scene)]
    assert all(Image.open(p).size == SIZE for p in pngs)  # full canvas by default
    manifest = json.loads((out_dir / "scene_manifest.json").read_text("utf-8"))
    assert manifest["canvas"] == list(SIZE) and manifest["order"] == "bottom first"
    assert [(r["name"], r["x"], r["y"], r["blend_mode"]) for r in manifest["layers"]] == [
        (layer.name, layer.x, layer.y, layer.blend_mode) for layer in scene
    ]
    # Back to a PSD: names, offsets, opacity, blend and pixels survive exactly (both sides are 8-bit).
    rebuilt = tmp_path / "rebuilt.psd"
    assert _run(capsys, "layers-to-psd", *pngs, "--out", rebuilt)[0] == 0
    check_readers(rebuilt, scene)
    _same_layers(read_psd(rebuilt), scene)


def test_psd_to_layers_cropped_and_zip(capsys: pytest.CaptureFixture[str], tmp_path: Path, small_psd: Path) -> None:
    stack = read_psd(small_psd)
    out_dir = tmp_path / "crop"
    assert _run(capsys, "psd-to-layers", small_psd, "--out", out_dir, "--cropped", "--prefix", "s")[0] == 0
    pngs = sorted(out_dir.glob("s_*.png"))
    assert [Image.open(p).size for p in pngs] == [(layer.width, layer.height) for layer in stack]
    _same_layers(read_psd(small_psd), stack)

    zdir = tmp_path / "zipped"
    assert _run(capsys, "psd-to-layers", small_psd, "--out", zdir, "--zip")[0] == 0
    archive = zdir / "small.zip"
    assert sorted(p.name for p in zdir.iterdir()) == ["small.zip"]
    with zipfile.ZipFile(archive) as z:
        assert "manifest.json" in z.namelist() and len(z.namelist()) == 4
    flat = tmp_path / "from_zip.png"
    assert _run(capsys, "compose", archive, "--out", flat)[0] == 0
    assert np.abs(_png(flat) - composite(stack)).max() <= TOL


def test_psd_to_layers_refuses_taken_names(capsys: pytest.CaptureFixture[str], tmp_path: Path, small_psd: Path) -> None:
    out_dir = tmp_path / "o"
    assert _run(capsys, "psd-to-layers", small_psd, "--out", out_dir)[0] == 0
    manifest = out_dir / "small_manifest.json"
    manifest.write_text("mine", "utf-8")
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    code, _, err = _run(capsys, "psd-to-layers", small_psd, "--out", out_dir)
    assert code == 2 and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
    assert _run(capsys, "psd-to-layers", small_psd, "--out", out_dir, "--overwrite")[0] == 0
    assert json.loads(manifest.read_text("utf-8"))["canvas"] == [64, 48]


# ---------------------------------------------------------------- info


def test_info_columns_stay_aligned_with_wide_names(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Regression: CJK names take two terminal columns each; padding by len() pushed the next columns out of line.
    px = np.ones((4, 4, 4), np.float32)
    stack = LayerStack(16, 16, [Layer(px, name="背景レイヤー"), Layer(px, x=3, name="ab"), Layer(px, name="e\u0301")])
    path = write_psd(stack, tmp_path / "wide.psd")
    code, out, _ = _run(capsys, "info", path)
    assert code == 0
    rows = out.splitlines()[2:]
    cols = {
        sum(
            2 if unicodedata.east_asian_width(c) in "WF" else 0 if unicodedata.combining(c) else 1
            for c in row[: row.index(" normal")]
        )
        for row in rows
    }
    assert len(cols) == 1, out


def test_info_table_and_json(capsys: pytest.CaptureFixture[str], small_psd: Path) -> None:
    code, out, _ = _run(capsys, "info", small_psd)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "canvas 64x48, 3 layers, bottom first"
    assert lines[1].split()[:2] == ["#", "name"]
    assert "Red square" in lines[3] and "multiply" in lines[3] and "0.800" in lines[3] and lines[3].startswith("1")
    assert "Blå ✓ disc" in lines[4]
    code, out, _ = _run(capsys, "info", small_psd, "--json")
    doc = json.loads(out)
    assert [r["name"] for r in doc["layers"]] == ["Back", "Red square", "Blå ✓ disc"]
    assert (doc["layers"][1]["x"], doc["layers"][1]["y"]) == (10, 8)


# ---------------------------------------------------------------- edit


def test_edit_changes_only_addressed_layers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, scene_psd: Path, scene: LayerStack
) -> None:
    out, preview = tmp_path / "edited.psd", tmp_path / "edited.png"
    code, _, err = _run(
        capsys,
        "edit",
        scene_psd,
        "--out",
        out,
        "--preview",
        preview,
        "--layer",
        "2",
        "--move",
        "10,-5",
        "--scale",
        "1.5",
        "--layer",
        "Near hill",
        "--hue",
        "40",
        "--saturation",
        "0.2",
        "--layer",
        "Logo",
        "--opacity",
        "0.5",
        "--blend",
        "screen",
        "--rename",
        "Badge",
    )
    assert code == 0, err
    edited = read_psd(out)
    check_readers(out, edited)
    assert len(edited) == len(scene)
    for i in (0, 1, 3, 5, 6):  # untouched layers are bit-identical
        assert np.array_equal(edited[i].pixels, scene[i].pixels) and edited[i].bbox() == scene[i].bbox()
        assert edited[i].name == scene[i].name
    sun, sun0 = edited[2], scene[2]
    assert sun.width == pytest.approx(1.5 * sun0.width, abs=2)
    cx, cy = sun.x + sun.width / 2, sun.y + sun.height / 2
    assert cx == pytest.approx(sun0.x + sun0.width / 2 + 10, abs=1)
    assert cy == pytest.approx(sun0.y + sun0.height / 2 - 5, abs=1)
    hill, hill0 = edited[4], scene[4]
    assert hill.bbox() == hill0.bbox() and np.array_equal(hill.alpha, hill0.alpha)
    assert np.abs(hill.pixels[..., :3] - hill0.pixels[..., :3]).max() > 0.1
    logo = edited[7]
    assert (logo.name, logo.blend_mode, logo.opacity) == ("Badge", "screen", pytest.approx(0.5, abs=1 / 255))
    assert np.array_equal(logo.pixels, scene[7].pixels)
    assert np.abs(_png(preview) - composite(edited)).max() <= TOL


def test_edit_stack_operations(capsys: pytest.CaptureFixture[str], tmp_path: Path, small_psd: Path) -> None:
    stack = read_psd(small_psd)
    out = tmp_path / "ops.psd"
    code, _, err = _run(
        capsys,
        "edit",
        small_psd,
        "--out",
        out,
        "--duplicate",
        "Back",
        "--move-to",
        "-1:0",
        "--delete",
        "1",
        "--layer",
        "0",
        "--hide",
        "--layer",
        "Red square",
        "--flip-h",
        "--rotate",
        "90",
        "--move",
        "-3,2",
    )
    assert code == 0, err
    back = read_psd(out)
    # duplicate puts "Back copy" above Back; moving the top (disc) to the bottom, then deleting index 1 (Back).
    assert [layer.name for layer in back] == ["Blå ✓ disc", "Back copy", "Red square"]
    assert not back[0].visible and back[1].visible
    assert np.array_equal(back[1].pixels, stack[0].pixels)
    assert (back[2].width, back[2].height) == (stack[1].height, stack[1].width)  # rotated 90 degrees
    sq, sq0 = back[2], stack[1]  # turned about its centre, then moved by (-3, 2)
    assert sq.x + sq.width / 2 == pytest.approx(sq0.x + sq0.width / 2 - 3, abs=1)
    assert sq.y + sq.height / 2 == pytest.approx(sq0.y + sq0.height / 2 + 2, abs=1)

    out2 = tmp_path / "merged.psd"
    assert _run(capsys, "edit", small_psd, "--out", out2, "--merge-down", "2", "--keep", "1,0")[0] == 0
    merged = read_psd(out2)
    assert [layer.name for layer in merged] == ["Red square", "Back"]
    assert merged[0].bbox() == (10, 8, 52, 32)  # the union of the square and the disc


def test_edit_grouping_rules(capsys: pytest.CaptureFixture[str], tmp_path: Path, small_psd: Path) -> None:
    out = tmp_path / "x.psd"
    code, _, err = _run(capsys, "edit", small_psd, "--out", out, "--hue", "30")
    assert code == 2 and "put --layer" in err
    code, _, err = _run(capsys, "edit", small_psd, "--out", out, "--layer", "1", "--hue", "30", "--hue", "40")
    assert code == 2 and "conflicts" in err
    code, _, err = _run(capsys, "edit", small_psd, "--out", out, "--layer", "1", "--delete", "0", "--hue", "3")
    assert code == 2 and "after a stack edit" in err
    code, _, err = _run(capsys, "edit", small_psd, "--out", out)
    assert code == 2 and "no edit given" in err
    code, _, err = _run(capsys, "edit", small_psd, "--out", out, "--layer", "1", "--scale", "2", "--scale-x", "3")
    assert code == 2 and "--scale" in err
    assert not out.exists()


# ---------------------------------------------------------------- bad input: exit 2, one line, nothing lost


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["edit", "{psd}", "--out", "{tmp}/o.psd", "--layer", "5", "--hue", "10"], "layer 5 requested, 3 available"),
        (["edit", "{psd}", "--out", "{tmp}/o.psd", "--layer", "Nope", "--hue", "10"], "'Nope' not found"),
        (["edit", "{psd}", "--out", "{tmp}/o.psd", "--layer", "0", "--tint", "#zzz:0.5"], "#zzz"),
        (["compose", "{psd}", "--out", "{tmp}/o.png", "--background", "#zzz"], "#zzz"),
        # The option the user typed is named, not the library parameter behind it.
        (["edit", "{psd}", "--out", "{tmp}/o.psd", "--layer", "0", "--scale", "0"], "argument --scale: '0' is outside"),
        (["edit", "{psd}", "--out", "{tmp}/o.psd", "--layer", "0", "--scale-y", "200"], "argument --scale-y: '200'"),
        (["edit", "{psd}", "--out", "{tmp}/o.psd", "--layer", "0", "--opacity", "nan"], "opacity"),
        (["edit", "{psd}", "--out", "{tmp}/o.psd", "--layer", "0", "--blend", "glow"], "invalid choice"),
        (["compose", "{tmp}/missing.psd", "--out", "{tmp}/o.png"], "not found"),
        (["compose", "{psd}", "--out", "{tmp}/o.jpg"], "must end with .png"),
        (["compose", "{psd}", "--out", "{tmp}/.hidden.png"], "starts with '.'"),
        (["info", "{tmp}"], "not a regular file"),
    ],
)
def test_bad_input(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, small_psd: Path, argv: list[str], message: str
) -> None:
    args = [a.format(psd=small_psd, tmp=tmp_path) for a in argv]
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert not any(tmp_path.iterdir()), "nothing is written on bad input"


def test_corrupt_psd_is_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.psd"
    bad.write_bytes(b"8BPS not really a psd")
    code, _, err = _run(capsys, "compose", bad, "--out", tmp_path / "o.png")
    assert code == 2 and "bad.psd" in err and "Traceback" not in err


def test_existing_output_is_untouched(capsys: pytest.CaptureFixture[str], tmp_path: Path, small_psd: Path) -> None:
    out = tmp_path / "flat.png"
    out.write_bytes(b"precious")
    code, _, err = _run(capsys, "compose", small_psd, "--out", out)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"precious"
    edited = tmp_path / "e.psd"
    code, _, err = _run(capsys, "edit", small_psd, "--out", edited, "--preview", out, "--layer", "0", "--invert")
    assert code == 2 and not edited.exists(), "checked before anything is written"
    assert out.read_bytes() == b"precious"
    assert _run(capsys, "compose", small_psd, "--out", out, "--overwrite")[0] == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["flat.png"], "no temporary files left behind"


def test_output_through_a_regular_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, small_psd: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for argv in (
        ["compose", small_psd, "--out", blocker / "o.png"],
        ["psd-to-layers", small_psd, "--out", blocker / "dir"],
        ["psd-to-layers", small_psd, "--out", blocker],
        ["demo", "--out", blocker / "d", "--size", "64x48"],
    ):
        code, _, err = _run(capsys, *argv)
        assert code == 2, argv
        assert "Traceback" not in err and ("not a folder" in err or "is a file" in err or "Not a directory" in err)
    assert blocker.read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_verbose_shows_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path, small_psd: Path) -> None:
    code, _, err = _run(capsys, "edit", small_psd, "--out", tmp_path / "o.psd", "--layer", "7", "--invert", "-v")
    assert code == 2 and "Traceback" in err and "layer 7 requested, 3 available" in err


# ---------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "demo"
    code, _, err = _run(capsys, "demo", "--out", out, "--size", "256x192")
    assert code == 0, err
    for name in ("sample.png", "sample.psd", "sample_edited.png", "sample_edited.psd"):
        assert (out / name).is_file()
        assert name in err  # the summary names every file
    assert "total" in err and "timings" in err
    original, edited = read_psd(out / "sample.psd"), read_psd(out / "sample_edited.psd")
    check_readers(out / "sample.psd", original, imagemagick=False)
    check_readers(out / "sample_edited.psd", edited, imagemagick=False)
    _same_layers(original, sample_stack(SIZE), pixels_exact=False)
    changed = [
        i
        for i, (a, b) in enumerate(zip(original, edited))
        if a.bbox() != b.bbox() or not np.array_equal(a.pixels, b.pixels)
    ]
    assert changed == [1, 2, 4]  # glow and sun moved (sun scaled), near hill recoloured
    assert len(list((out / "layers").glob("sample_*.png"))) == len(original)
    assert Image.open(out / "sample_edited.png").size == SIZE

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = _run(capsys, "demo", "--out", out, "--size", "256x192")
    assert code == 2 and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_demo_default_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _run(capsys, "demo", "--size", "96x64")[0] == 0
    assert lint_psd(tmp_path / "qil_demo" / "sample_edited.psd") == []


def test_run_demo_reports_what_it_wrote(tmp_path: Path) -> None:
    report = run_demo(tmp_path / "d", size=(128, 96))
    assert isinstance(report, DemoReport)
    assert report.canvas == (128, 96) and report.layers == 8
    assert all(p.is_file() for p in report.files.values()) and len(report.files) == 4 + 8
    assert {"composite", "write psd", "edit", "verify"} <= set(report.timings)
    assert any("sample_edited.psd" in line for line in report.summary_lines())
