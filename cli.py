"""graft's command line: one subcommand per step, each a thin call into a library function.

Each package contributes its subcommands through a ``register(subparsers)`` function
(``convert.commands``, ``extract.commands``, ``heads.commands``, ``finetune.commands``,
``faces.commands``); a
subcommand sets ``func(args) -> int``. Registering imports nothing heavy (no torch, scikit-learn,
onnx, cv2 or pandas), so ``--help`` is instant; a command imports what it uses when it runs.

Exit status: 0 all good; 1 the run completed but some images failed (extract, predict); 2 bad
input, reported as one ``error:`` line naming the flag, file, row or layer; 3 an internal error
(one line; ``GRAFT_DEBUG=1`` prints the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback
from typing import NoReturn

#: subcommand -> the module that registers it
COMMANDS = {
    "convert": "convert.commands",
    "inspect": "convert.commands",
    "extract": "extract.commands",
    "fit-head": "heads.commands",
    "predict": "heads.commands",
    "export": "heads.commands",
    "finetune": "finetune.commands",
    "faces": "faces.commands",
}

#: exit statuses (README, "Exit codes")
OK, PARTIAL, BAD_INPUT, INTERNAL, INTERRUPTED = 0, 1, 2, 3, 130

#: errno values that are the machine's state, not graft's bug: reported naming the path, exit 2
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class Parser(argparse.ArgumentParser):
    """argparse with graft's usage errors: one ``error:`` line (argparse's message names the flag)."""

    def error(self, message: str) -> NoReturn:
        self.exit(BAD_INPUT, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="graft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    argv = sys.argv[1:] if argv is None else argv
    wanted = _command(argv)
    modules = [COMMANDS[wanted]] if wanted in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a package not present: its commands are absent
            if err.name and name.startswith(err.name):
                continue
            raise
        module.register(sub)
    return parser


def _debug() -> bool:
    """``GRAFT_DEBUG=1`` (or the older ``GRAFT_TRACEBACK=1``): print internal errors' tracebacks."""
    return any(os.environ.get(v, "") not in ("", "0") for v in ("GRAFT_DEBUG", "GRAFT_TRACEBACK"))


def _one_line(text: str, limit: int = 400) -> str:
    return " ".join(text.split())[:limit]


def _written_to(args: argparse.Namespace | None) -> str | None:
    """Where the command writes (for a disk-full error that names no file)."""
    for flag in ("out", "run_dir", "cache"):
        value = getattr(args, flag, None)
        if value:
            return str(value)
    return None


def os_error_line(err: OSError, args: argparse.Namespace | None = None) -> str:
    """A missing, unreadable or unwritable file, a full disk: the message, naming the path."""
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"file not found: {err.filename}"
    reason = err.strerror or _one_line(str(err)) or type(err).__name__
    if err.filename:
        second = f" -> {err.filename2}" if err.filename2 else ""
        return f"{err.filename}{second}: {reason}"
    if err.errno in _NO_SPACE and _written_to(args):
        return f"{reason} (writing {_written_to(args)})"
    return reason


def _internal_error(err: BaseException) -> int:
    """A bug, not the user's input: one line (the traceback with GRAFT_DEBUG=1), exit status 3."""
    line = f"error: internal error: {type(err).__name__}: {_one_line(str(err))}"
    if _debug():
        traceback.print_exception(type(err), err, err.__traceback__)
        print(line, file=sys.stderr)
    else:
        print(f"{line} (set GRAFT_DEBUG=1 for the traceback)", file=sys.stderr)
    return INTERNAL


def _exit_status(stop: SystemExit) -> int:
    """argparse's exit (``--help``: 0; a usage error, already printed: 2) as main's return value."""
    return stop.code if isinstance(stop.code, int) else (OK if stop.code is None else BAD_INPUT)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; every failure is one stderr line and an exit status, never a traceback."""
    from convert.errors import GraftError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    try:
        try:
            args = build_parser(argv).parse_args(argv)
        except SystemExit as stop:
            return _exit_status(stop)
        return int(args.func(args) or 0)
    except GraftError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        print(f"error: {'; '.join(lines) or type(err).__name__}", file=sys.stderr)  # always one line
        return BAD_INPUT
    except BrokenPipeError:  # output piped into head/less that closed early
        return OK
    except OSError as err:  # missing / unreadable / a directory / disk full: the machine's state, named
        print(f"error: {os_error_line(err, args)}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return INTERRUPTED
    except Exception as err:
        return _internal_error(err)


#: commands whose process ends with os._exit: nothing of theirs is left to flush or join when
#: main() returns (packages are written and renamed in place), and the interpreter's own teardown
#: of torch and onnxruntime takes 0.7-1 s, a fifth of a VGG-Face convert
FAST_EXIT = {"convert", "inspect"}


def run(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rc = main(argv)
    if _command(argv) in FAST_EXIT:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (BrokenPipeError, OSError):  # output piped into head/less that closed early
                pass
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()
