"""What every subcommand's argparse wrapper shares: value parsers and SIGTERM handling.

Each parser raises ``argparse.ArgumentTypeError``, so a bad value is argparse's one-line usage
error naming the flag, never a traceback.
"""

from __future__ import annotations

import argparse
from typing import Any


def floats(text: str) -> list[float]:
    """``1,2,3`` (``x`` and spaces also separate): a list of numbers."""
    parts = [p for p in text.replace("x", ",").replace(" ", ",").split(",") if p]
    try:
        return [float(p) for p in parts]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from err


def ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _int(text: str, ok, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or not ok(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def positive(text: str) -> int:
    return _int(text, lambda v: v > 0, "a positive integer")


def non_negative(text: str) -> int:
    return _int(text, lambda v: v >= 0, "0 or a positive integer")


def fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return v


def size(text: str) -> list[int] | int:
    """``256`` (square), ``256,256`` or ``256x256`` (H, W); ``0`` for none."""
    vals = floats(text)
    if len(vals) == 1:
        return int(vals[0])
    if len(vals) == 2:
        return [int(v) for v in vals]
    raise argparse.ArgumentTypeError(f"expected N or H,W, got {text!r}")


def mean(text: str) -> list[float]:
    """One value (every channel) or three, in the model's channel order."""
    vals = floats(text)
    if len(vals) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected 1 or 3 values (model channel order), got {text!r}")
    return vals * 3 if len(vals) == 1 else vals


def sigterm_as_interrupt(signum: int, frame: Any) -> None:
    """Install for SIGTERM so a scheduler's kill unwinds like Ctrl-C: buffered work is flushed."""
    raise KeyboardInterrupt
