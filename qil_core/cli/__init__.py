"""The command line, `python -m qil_core COMMAND` (a front end: nothing in the library imports it).

- `entry.py`: `main()` and the parser; each command module below has `register(subparsers)`.
- `common.py`: shared argument types and input readers of the commands.
- `options.py`: argparse flags generated from the library's options dataclasses, and the options back from args.
- `layers.py`: `compose`, `layers-to-psd`, `psd-to-layers`, `info`.
- `edit.py`: `edit` (per-layer and stack edits).
- `model.py`: `decompose`, `text-to-layers`, and the tiny-model part of `demo`.
- `demo.py`: `demo` (the layer demo, then the tiny-model decomposition).
- `lora.py`: the `--lora` and schedule options of the model commands.
"""

from .entry import main

__all__ = ["main"]
