"""What every subcommand's argparse wrapper shares: value parsers and SIGTERM handling.

Each parser raises ``argparse.ArgumentTypeError``, so a bad value is argparse's one-line usage
error naming the flag, never a traceback. Every numeric flag of every subcommand goes through
one of these, so ``0``, ``-3``, ``nan`` or ``abc`` are refused the same way everywhere.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def _split(text: str) -> list[str]:
    """``1,2,3``: ``x`` and spaces also separate (``256x256``)."""
    return [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]


def _float(text: str) -> float | None:
    """``text`` as a finite float, else None (``nan`` and ``inf`` are never a sensible setting)."""
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _check_float(text: str, ok: Callable[[float], bool], what: str) -> float:
    v = _float(text)
    if v is None or not ok(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def number(text: str) -> float:
    """Any finite number (e.g. a sigmoid policy's gamma, which may be negative)."""
    return _check_float(text, lambda v: True, "a number")


def positive_float(text: str) -> float:
    return _check_float(text, lambda v: v > 0, "a positive number")


def non_negative_float(text: str) -> float:
    return _check_float(text, lambda v: v >= 0, "0 or a positive number")


def floats(text: str) -> list[float]:
    """``1,2,3`` (``x`` and spaces also separate): a non-empty list of finite numbers."""
    vals = [_float(p) for p in _split(text)]
    if not vals or any(v is None for v in vals):
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
    return vals  # type: ignore[return-value]


def positive_floats(text: str) -> list[float]:
    """A non-empty list of positive numbers (penalties, learning rates)."""
    vals = [_float(p) for p in _split(text)]
    if not vals or any(v is None or v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas, got {text!r}")
    return vals  # type: ignore[return-value]


def _int(text: str, ok: Callable[[int], bool], what: str) -> int:
    try:
        v: int | None = int(text)
    except ValueError:
        v = None
    if v is None or not ok(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def positive(text: str) -> int:
    return _int(text, lambda v: v > 0, "a positive integer")


def non_negative(text: str) -> int:
    return _int(text, lambda v: v >= 0, "0 or a positive integer")


def at_least(low: int) -> Callable[[str], int]:
    """A parser of integers >= ``low`` (e.g. CV folds, at least 2)."""

    def parse(text: str) -> int:
        return _int(text, lambda v: v >= low, f"an integer of at least {low}")

    parse.__name__ = f"at_least_{low}"
    return parse


def _int_list(text: str) -> tuple[int, ...]:
    """``1,2,3`` as integers; empty when any part is not one."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        return ()


def ints(text: str) -> tuple[int, ...]:
    """``1,2,3``: a non-empty tuple of integers."""
    vals = _int_list(text)
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return vals


def positive_ints(text: str) -> tuple[int, ...]:
    """``256`` or ``512,128``: layer sizes, iteration numbers."""
    vals = _int_list(text)
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return vals


def fraction(text: str) -> float:
    v = _float(text)
    if v is None or not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return v


def size(text: str) -> list[int] | int:
    """``256`` (square), ``256,256`` or ``256x256`` (H, W); ``0`` for none."""
    try:
        vals = [int(p) for p in _split(text)]
    except ValueError:
        vals = []
    if len(vals) == 1 and vals[0] >= 0:
        return vals[0]
    if len(vals) == 2 and min(vals) > 0:
        return vals
    raise argparse.ArgumentTypeError(f"expected N or H,W (positive integers; 0: none), got {text!r}")


def mean(text: str) -> list[float]:
    """One value (every channel) or three, in the model's channel order."""
    vals = floats(text)
    if len(vals) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected 1 or 3 values (model channel order), got {text!r}")
    return vals * 3 if len(vals) == 1 else vals


def device(text: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N, checked by ``extract.backends.parse_device`` (the
    one parser; imported here only when a command line is parsed, never for ``--help``)."""
    from extract.backends import BackendError, parse_device

    try:
        kind, index = parse_device(text)
    except BackendError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N (N a GPU index: 0, 1, ...), got {text!r}") from None
    return kind if index is None else f"{kind}:{index}"


def sigterm_as_interrupt(signum: int, frame: Any) -> None:
    """Install for SIGTERM so a scheduler's kill unwinds like Ctrl-C: buffered work is flushed."""
    raise KeyboardInterrupt


def add_image_inputs(p: Any, title: str = "input (exactly one)", csv_help: str = "CSV with a path column; every other column is kept as a label") -> Any:
    """The image-input flags every command reading images shares (``extract.sources.load_records``
    takes them): ``--images``, ``--csv``, ``--list``, ``--path-column``, ``--root``. Returns the group."""
    src = p.add_argument_group(title)
    src.add_argument("--images", metavar="DIR", help="folder, recursive; the containing sub-folder becomes the `label` column")
    src.add_argument("--csv", metavar="FILE", help=csv_help)
    src.add_argument("--list", dest="list_file", metavar="FILE", help="Caffe list file: 'relative/path.jpg LABEL' per line")
    src.add_argument("--path-column", metavar="NAME", help="CSV column holding the image path (default: guessed: path, file, image, ...)")
    src.add_argument("--root", metavar="DIR", help="folder relative paths of --csv/--list resolve against (default: that file's folder)")
    return src
