"""graft's command line: one subcommand per step, each a thin call into a library function.

Each package contributes its subcommands through a ``register(subparsers)`` function
(``convert.commands``, ``extract.commands``, ``heads.commands``, ``finetune.commands``); a
subcommand sets ``func(args) -> int``. Only the package that owns the subcommand is
imported, so ``convert`` does not pay for scikit-learn. A :class:`convert.errors.GraftError`
(or a missing file) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: subcommand -> the module that registers it
COMMANDS = {
    "convert": "convert.commands",
    "inspect": "convert.commands",
    "extract": "extract.commands",
    "fit-head": "heads.commands",
    "predict": "heads.commands",
    "export": "heads.commands",
    "finetune": "finetune.commands",
}


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft", description=__doc__.splitlines()[0])
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


def main(argv: list[str] | None = None) -> int:
    from convert.errors import GraftError

    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GraftError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        print(f"error: {'; '.join(lines) or type(err).__name__}", file=sys.stderr)  # always one line
        return 2
    except FileNotFoundError as err:
        print(f"error: file not found: {err.filename or err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head/less that closed early
        return 0
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


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
