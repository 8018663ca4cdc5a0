"""Command line of the pack: `python -m qil_core <command> ...` (layers bottom first everywhere).

`main()` builds one argparse parser from the sub-command modules listed in `COMMAND_MODULES`; each module
exposes `register(subparsers)` and attaches its handler with `parser.set_defaults(handler=fn)`, where
`fn(args) -> int`. A new family of commands (for example the model commands) is one more module in that
tuple. Exit codes: 0 success, 2 bad input or unusable path (one-line message on stderr, no traceback unless
`--verbose`), 1 other I/O failures (for example a full disk) and out of memory, 130 interrupted (Ctrl+C),
143 terminated (SIGTERM, handled like Ctrl+C: temporary files are removed).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NoReturn

from .. import __version__
from ..errors import QILError
from . import caption as cli_caption
from . import demo as cli_demo
from . import edit as cli_edit
from . import layers as cli_layers
from . import model as cli_model
from . import split as cli_split

logger = logging.getLogger(__name__)

PROG = "python -m qil_core"


def _prog() -> str:
    """The name the user typed: `qil` for the console script, `python -m qil_core` otherwise."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name and not name.endswith(".py") and name != "-c" else PROG


# Sub-command modules, in the order their commands appear in --help; each has `register(subparsers)`.
COMMAND_MODULES: tuple[ModuleType, ...] = (cli_layers, cli_edit, cli_demo, cli_model, cli_split, cli_caption)

# OSErrors that mean "the path the user gave is wrong" rather than "the machine failed".
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class UsageError(Exception):
    """A command line argparse rejected; carries its one-line message."""


class _ParserExit(Exception):
    """argparse asked to exit (after --help or --version) with this status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of calling sys.exit, so `main()` always returns a code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Any "-<digit>..." token is a value, not an option (no option here starts with a digit), so
        # "--move -10,5" and "--move-to -1:0" work; Python 3.13's argparse made the same change.
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> NoReturn:
        """Turn a usage error into an exception carrying a one-line message."""
        raise UsageError(f"{self.prog}: {message} (see --help)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        """Write argparse's message (if any) to stderr and stop parsing with `status`."""
        if message:
            sys.stderr.write(message)
        raise _ParserExit(status)


def _add_common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Add -v/-q to a parser; on sub-parsers the defaults are suppressed so they don't mask the top level."""
    default: object = False if top else argparse.SUPPRESS
    group = parser.add_argument_group("output detail")
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="debug logs, and tracebacks on errors"
    )
    group.add_argument("-q", "--quiet", action="store_true", default=default, help="only warnings and errors")


def build_parser() -> argparse.ArgumentParser:
    """The full parser: global options plus every registered sub-command."""
    parser = _Parser(
        prog=_prog(),
        description=(
            "Qwen-Image-Layered: decompose an image (or one layer of a document) into RGBA layers, caption it, "
            "and flatten, convert, edit and inspect layered documents (PSD or layer PNGs). Layers are always "
            "counted bottom first: index 0 is the bottom layer, -1 the top."
        ),
        epilog=f"Run '{_prog()} COMMAND --help' for the options of one command. Exit status: 0 success; 2 bad "
        "input or output path (a one-line message, -v adds the traceback); 1 other I/O failure or out "
        "of memory; 130 interrupted; 143 terminated. Existing files are never replaced without --overwrite.",
    )
    parser.add_argument("--version", action="version", version=f"qil_core {__version__}")
    _add_common_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMAND_MODULES:
        module.register(sub)
    # Every sub-command also accepts -v/-q after its own arguments.
    for sub_parser in sub.choices.values():
        _add_common_options(sub_parser, top=False)
    return parser


class _Formatter(logging.Formatter):
    """Plain messages for info, a level prefix for warnings and errors, full records when verbose."""

    def __init__(self, verbose: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        """Format one record; warnings get a 'warning: ' prefix in normal mode."""
        text = super().format(record)
        if not self.verbose and record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return text


def _one_line(exc: BaseException) -> str:
    """A single-line, human message for an exception shown to the user."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: sys.argv[1:]) and return the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except _ParserExit as stop:
        return stop.status
    except UsageError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2

    verbose = bool(args.verbose)
    level = logging.DEBUG if verbose else logging.WARNING if args.quiet else logging.INFO
    # Logging is configured here and only here (never at import), and undone on return so that repeated
    # in-process calls (tests, notebooks) neither stack handlers nor leak levels.
    pkg_logger = logging.getLogger("qil_core")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(verbose))
    old_level = pkg_logger.level
    pkg_logger.addHandler(handler)
    pkg_logger.setLevel(level)
    old_term = _catch_sigterm()
    try:
        logger.debug("command %s with %s", args.command, vars(args))
        return int(args.handler(args) or 0)
    except (QILError, ValueError, *_PATH_ERRORS) as exc:
        return _report(exc, verbose, code=2)
    except MemoryError as exc:  # a ResourceError (refused before allocating) is a QILError, handled above
        return _report(
            MemoryError(
                f"out of memory while running {args.command} ({exc or 'allocation failed'}); "
                "use smaller inputs or sizes, or free memory"
            ),
            verbose,
            code=1,
        )
    except OSError as exc:
        return _report(exc, verbose, code=1)
    except Terminated:
        sys.stderr.write("terminated\n")
        return 143
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        pkg_logger.removeHandler(handler)
        pkg_logger.setLevel(old_level)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwound like Ctrl+C, so every writer removes its temporary files."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _catch_sigterm() -> Any:
    """Handle SIGTERM like Ctrl+C while a command runs (main thread only); returns the previous handler."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return None
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except (ValueError, OSError):
        return None


def _report(exc: BaseException, verbose: bool, *, code: int) -> int:
    """Write the one-line error (and, when verbose, the traceback) to stderr; return `code`."""
    if verbose:
        logger.error("traceback of the failure below", exc_info=exc)
    sys.stderr.write(f"error: {_one_line(exc)}\n")
    return code
