"""The model commands' flags are generated from the options dataclasses: same defaults, choices, limits and help."""

from __future__ import annotations

import argparse

import pytest

from qil_core.cli.entry import build_parser
from qil_core.cli.model import POLICY_FLAGS, SAMPLING_FLAGS, SIZE_FLAGS
from qil_core.cli.options import flag, from_args
from qil_core.errors import InputError
from qil_core.model.pipeline.options import DecomposeOptions, TextToLayersOptions
from qil_core.model.policy import LoadPolicy, best_device
from qil_core.options import spec_of

CLI_DEFAULTS = {"negative_prompt", "resolution"}


def _command(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


@pytest.mark.parametrize(
    ("command", "cls", "names"),
    [
        ("decompose", DecomposeOptions, SAMPLING_FLAGS + SIZE_FLAGS + ["vae_tile"]),
        ("text-to-layers", TextToLayersOptions, [*SAMPLING_FLAGS[1:], "width", "height", "vae_tile"]),
        ("decompose", LoadPolicy, POLICY_FLAGS),
    ],
)
def test_flags_agree_with_the_option_fields(command: str, cls: type, names: list[str]) -> None:
    actions = _actions(_command(command))
    for name in names:
        f, spec = spec_of(cls, name)
        action = actions[name]
        assert spec.help.rstrip(".")[:30] in action.help.replace("%%", "%"), name
        if spec.kind is bool:
            assert action.default is f.default and action.option_strings[0].endswith(name.replace("_", "-"))
            continue
        assert action.option_strings == [flag(name)]
        own = name in CLI_DEFAULTS  # the command reads these itself (prompt files, --max-side implying custom)
        if spec.choices:
            assert tuple(action.choices) == spec.choices and action.default == (
                None if own or f.default is None else str(f.default)
            )
        else:
            assert action.default == (None if own else f.default) and action.choices is None
        if spec.lo is not None and spec.hi is not None:
            assert f"{spec.lo:g}..{spec.hi:g}" in action.help


def test_no_flags_give_the_default_options() -> None:
    args = _command("decompose").parse_args(["in.png", "--out", "o.psd", "--model-dir", "m"])
    names = [n for n in SAMPLING_FLAGS + SIZE_FLAGS + ["vae_tile"] if n not in CLI_DEFAULTS]
    assert from_args(DecomposeOptions, args, names) == DecomposeOptions()
    assert from_args(LoadPolicy, args, POLICY_FLAGS) == LoadPolicy()
    args = _command("text-to-layers").parse_args(["a cat", "--out", "o.psd"])
    got = from_args(TextToLayersOptions, args, ["width", "height", "layers"], extra={"prompt": args.text})
    assert got == TextToLayersOptions(prompt="a cat")


def test_errors_name_the_flags() -> None:
    args = _command("decompose").parse_args(["in.png", "--out", "o.psd", "--layers", "0", "--memory", "offload"])
    with pytest.raises(InputError, match=r"^--layers must be in 1\.\.20, got 0"):
        from_args(DecomposeOptions, args, SAMPLING_FLAGS)
    args = _command("decompose").parse_args(["in.png", "--out", "o.psd", "--device", "no-such-device"])
    with pytest.raises(InputError, match="--device must be a torch device"):
        from_args(LoadPolicy, args, POLICY_FLAGS)


def test_the_policy_owns_the_dtype_table_and_the_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    cpu = torch.device("cpu")
    assert LoadPolicy().torch_dtype(cpu) is torch.float32
    assert LoadPolicy(dtype="bf16").torch_dtype(cpu) is torch.bfloat16
    assert LoadPolicy().torch_dtype(torch.device("mps")) is torch.float16
    assert LoadPolicy(device="cpu").torch_device() == cpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert best_device() == torch.device("mps") == LoadPolicy().torch_device()  # the CLI now picks MPS too
