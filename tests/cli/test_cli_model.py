"""The model commands of the CLI (`decompose`, `text-to-layers`) and the model part of `demo`, tiny random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qil_core.cli import model as cli_model
from qil_core.cli.entry import main
from qil_core.layers.psd import lint_psd, read_psd
from qil_core.model.weights.tiny import write_tiny_model

FAST = ["--layers", "2", "--steps", "2", "--dtype", "fp32", "--device", "cpu", "--prompt", "a test scene"]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_model(tmp_path_factory.mktemp("comfy"), layout="comfyui", seed=1)


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("diffusers"), layout="diffusers", seed=1)["model_dir"]


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    yy, xx = np.mgrid[0:70, 0:100]
    rgb = np.stack([xx * 2.5, yy * 3.5, (xx + yy) % 255], axis=-1).astype(np.uint8)
    path = tmp_path / "in.png"
    Image.fromarray(rgb, "RGB").save(path)
    return path


def _files(paths: dict[str, Path]) -> list[str]:
    return [
        "--transformer",
        str(paths["transformer"]),
        "--vae",
        str(paths["vae"]),
        "--text-encoder",
        str(paths["text_encoder"]),
    ]


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_decompose_single_files_to_psd_and_pngs(capsys, comfy, image: Path, tmp_path: Path) -> None:
    out, pngs = tmp_path / "out.psd", tmp_path / "pngs"
    code, err = _run(
        capsys,
        "decompose",
        image,
        "--out",
        out,
        "--png-dir",
        pngs,
        *_files(comfy),
        *FAST,
        "--resolution",
        "custom",
        "--max-side",
        "96",
    )
    assert code == 0, err
    assert "RANDOM WEIGHTS" in err and "step 2/2" in err and "wrote" in err
    assert err.count("memory plan:") == 1, err  # regression: the plan was logged twice
    assert lint_psd(out) == []
    stack = read_psd(out)
    assert stack.size == (96, 64) and [layer.name for layer in stack] == ["Background", "Layer 1"]
    assert sorted(p.name for p in pngs.iterdir()) == ["out_00_Background.png", "out_01_Layer 1.png"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--memory", "offload"], ["--memory", "block_swap"], ["--vae-tile", "128"]])
def test_memory_modes_and_vae_tiling_give_the_resident_result(
    capsys, comfy, image: Path, tmp_path: Path, extra: list[str]
) -> None:
    args = [*_files(comfy), *FAST, "--resolution", "custom", "--max-side", "96"]
    code, err = _run(capsys, "decompose", image, "--out", tmp_path / "ref.psd", *args, "--memory", "resident")
    assert code == 0, err
    code, err = _run(capsys, "decompose", image, "--out", tmp_path / "alt.psd", *args, *extra)
    assert code == 0, err
    assert "memory plan" in err
    ref, alt = read_psd(tmp_path / "ref.psd"), read_psd(tmp_path / "alt.psd")
    assert [layer.bbox() for layer in alt] == [layer.bbox() for layer in ref]
    for a, b in zip(alt, ref):
        # A 96 px output fits one 128 px VAE tile, so tiling must change nothing (the tiling tests cover seams).
        np.testing.assert_array_equal(a.pixels, b.pixels)


@pytest.mark.slow
def test_fp8_option_quantises_the_transformer(
    capsys, comfy, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qil_core.model.weights import quant

    seen: list[int] = []
    original = quant.quantize_module_fp8

    def spy(module, **kwargs):
        out = original(module, **kwargs)
        seen.append(sum(isinstance(m, quant.Fp8Linear) for m in module.modules()))
        return out

    monkeypatch.setattr(quant, "quantize_module_fp8", spy)
    code, err = _run(
        capsys,
        "decompose",
        image,
        "--out",
        tmp_path / "fp8.psd",
        *_files(comfy),
        *FAST,
        "--resolution",
        "custom",
        "--max-side",
        "96",
        "--fp8",
    )
    assert code == 0, err
    assert seen and seen[0] > 0, "the transformer's Linear layers were not quantised"
    assert lint_psd(tmp_path / "fp8.psd") == []


@pytest.mark.slow
def test_decompose_model_dir_original_size(capsys, diffusers_dir: Path, image: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.psd"
    code, err = _run(
        capsys,
        "decompose",
        image,
        "--out",
        out,
        "--model-dir",
        diffusers_dir,
        *FAST,
        "--resolution",
        "custom",
        "--max-side",
        "96",
        "--output-size",
        "original",
        "--keep-composite",
        "--no-cfg-normalize",
        "--seed",
        "-1",
    )
    assert code == 0, err
    stack = read_psd(out)
    assert stack.size == (100, 70)
    assert [layer.name for layer in stack] == ["Background", "Layer 1", "Composite (model)"]
    assert not stack.layers[-1].visible


def test_outputs_are_checked_before_loading(
    capsys, comfy, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "taken.psd"
    out.write_bytes(b"keep me")
    monkeypatch.setattr(cli_model, "load_from_args", lambda args: pytest.fail("the model must not be loaded"))
    code, err = _run(capsys, "decompose", image, "--out", out, *_files(comfy), *FAST)
    assert code == 2 and "--overwrite" in err and out.read_bytes() == b"keep me"
    code, err = _run(capsys, "decompose", image, "--out", tmp_path / "x.png", *_files(comfy), *FAST)
    assert code == 2 and "must end with .psd" in err


def test_numbers_image_size_and_out_folder_are_checked_before_loading(
    capsys, comfy, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: --layers 0, --steps 0, a 1x1 image and a missing --out folder used to fail only after the
    # model had loaded (the folder only after the whole decomposition had run).
    monkeypatch.setattr(cli_model, "load_from_args", lambda args: pytest.fail("the model must not be loaded"))
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    out = tmp_path / "a.psd"
    cases = [
        ([image, "--out", out, "--layers", "0"], "layers must be in 1..20"),
        ([image, "--out", out, "--steps", "0"], "steps must be in 1..1000"),
        ([image, "--out", out, "--cfg", "0.5"], "cfg must be a finite number in 1..100"),
        ([tiny, "--out", out], "is 1x1 px; the shorter side must be at least 32 px"),
        ([image, "--out", tmp_path / "no" / "a.psd"], "does not exist; create it first"),
        ([image, "--out", image / "a.psd"], "is a file, not a folder"),
        ([image, "--out", out, "--sigmas", "0.5,0.9"], "decreasing"),
        ([image, "--out", out, "--lora", tmp_path / "gone.safetensors"], "file not found"),
    ]
    for argv, message in cases:
        code, err = _run(capsys, "decompose", *_files(comfy), *FAST, *argv)  # argv last: its options win
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    code, err = _run(capsys, "text-to-layers", "a cat", "--out", tmp_path / "no" / "t.psd", *_files(comfy), *FAST)
    assert code == 2 and "does not exist; create it first" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "tiny.png"]


@pytest.mark.slow
def test_decompose_turns_an_exif_rotated_photo_upright(capsys, comfy, tmp_path: Path) -> None:
    # Regression: the EXIF orientation was ignored, so a phone photo stored sideways was decomposed sideways
    # (and --output-size original gave the stored, not the displayed, size).
    stored = np.zeros((64, 96, 3), np.uint8)  # 96 wide, 64 high as stored
    stored[:, :48] = (255, 0, 0)  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    photo = tmp_path / "photo.jpg"
    Image.fromarray(stored, "RGB").save(photo, exif=exif.tobytes(), quality=95)
    out = tmp_path / "photo.psd"
    code, err = _run(
        capsys,
        "decompose",
        photo,
        "--out",
        out,
        *_files(comfy),
        *FAST,
        "--resolution",
        "custom",
        "--max-side",
        "96",
        "--output-size",
        "original",
    )
    assert code == 0, err
    assert read_psd(out).size == (64, 96)  # displayed: 64 wide, 96 high
    assert cli_model._read_image(photo).size == (64, 96)
    upright = np.asarray(cli_model._read_image(photo).convert("RGB"), np.float32)
    assert upright[:48, :, 0].mean() > 200 and upright[48:, :, 0].mean() < 50  # red on top once upright


def test_bad_options_give_one_line_errors(capsys, comfy, image: Path, tmp_path: Path) -> None:
    code, err = _run(capsys, "decompose", image, "--out", tmp_path / "a.psd", *FAST)
    assert code == 2 and "--model-dir DIR, or --transformer F and --vae F" in err
    code, err = _run(
        capsys, "decompose", image, "--out", tmp_path / "a.psd", *_files(comfy), *FAST, "--resolution", "custom"
    )
    assert code == 2 and "needs max_side" in err and "Traceback" not in err
    code, err = _run(
        capsys,
        "decompose",
        image,
        "--out",
        tmp_path / "a.psd",
        *_files(comfy),
        "--layers",
        "21",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
    )
    assert code == 2 and "layers must be in 1..20" in err
    code, err = _run(capsys, "decompose", tmp_path / "missing.png", "--out", tmp_path / "a.psd", *_files(comfy))
    assert code == 2 and "not found" in err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    code, err = _run(capsys, "decompose", tmp_path / "bad.png", "--out", tmp_path / "a.psd", *_files(comfy))
    assert code == 2 and "cannot read image" in err
    assert not (tmp_path / "a.psd").exists()


@pytest.mark.slow
def test_interrupt_leaves_nothing(capsys, comfy, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def stop(label: str, unit: str = "step"):
        def callback(step: int, total: int) -> None:
            raise KeyboardInterrupt

        return callback

    monkeypatch.setattr(cli_model, "progress_logger", stop)
    out, pngs = tmp_path / "never.psd", tmp_path / "pngs"
    code, err = _run(
        capsys,
        "decompose",
        image,
        "--out",
        out,
        "--png-dir",
        pngs,
        *_files(comfy),
        *FAST,
        "--resolution",
        "custom",
        "--max-side",
        "96",
    )
    assert code == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


@pytest.mark.slow
def test_text_to_layers_command(capsys, comfy, tmp_path: Path) -> None:
    out = tmp_path / "t2l.psd"
    code, err = _run(
        capsys,
        "text-to-layers",
        "a red balloon over a field",
        "--out",
        out,
        *_files(comfy),
        *FAST[:-2],
        "--width",
        "100",
        "--height",
        "64",
        "--layers",
        "3",
    )
    assert code == 0, err
    stack = read_psd(out)
    assert stack.size == (96, 64) and len(stack) == 3 and lint_psd(out) == []


@pytest.mark.slow
def test_demo_decomposes_the_sample_with_a_random_model(
    capsys, tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(cli_model.DEMO_SETTINGS, "max_side", 128)
    monkeypatch.setitem(cli_model.DEMO_SETTINGS, "steps", 2)
    out = tmp_path / "demo"
    code, err = _run(capsys, "demo", "--out", out, "--size", "96x64")
    assert code == 0, err
    assert "RANDOM" in err and "decomposed psd" in err and "sample.psd" in err
    stack = read_psd(out / "decomposed.psd")
    assert stack.size == (96, 64) and [layer.name for layer in stack] == ["Background", "Layer 1", "Layer 2", "Layer 3"]
    assert len(list((out / "decomposed_layers").glob("decomposed_*.png"))) == 4
    code, err = _run(capsys, "demo", "--out", out, "--size", "96x64")
    assert code == 2 and "--overwrite" in err

    other = tmp_path / "demo2"
    code, err = _run(capsys, "demo", "--out", other, "--image", image, "--size", "96x64")
    assert code == 0, err
    assert read_psd(other / "decomposed.psd").size == (100, 70)
    code, err = _run(capsys, "demo", "--out", tmp_path / "demo3", "--no-model", "--size", "96x64")
    assert code == 0 and not (tmp_path / "demo3" / "decomposed.psd").exists()
    assert (tmp_path / "demo3" / "sample.psd").is_file()
