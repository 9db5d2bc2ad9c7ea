"""CLI start-up: ``python cli.py [<command>] --help`` vs a bare ``python -c "import numpy"``.

Every process is fresh (interpreter start included), rounds alternate the commands so machine
noise hits them alike, and the table gives medians. Target: each ``--help`` at most 3x the
numpy import (which is what any run of any command pays anyway).

    python bench/bench_startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import COMMANDS  # noqa: E402  (light: the command table only)

REFERENCE = "python -c 'import numpy'"


def cases() -> dict[str, list[str]]:
    """Label -> argv: the reference, then ``--help`` of graft and of each subcommand."""
    out = {REFERENCE: [sys.executable, "-c", "import numpy"], "cli.py --help": [sys.executable, "cli.py", "--help"]}
    for cmd in COMMANDS:
        out[f"cli.py {cmd} --help"] = [sys.executable, "cli.py", cmd, "--help"]
    return out


def wall(argv: list[str]) -> float:
    """Seconds from spawning ``argv`` to its exit (it must succeed)."""
    t = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    rounds = ap.parse_args().rounds
    todo = cases()
    for argv in todo.values():  # warm the page cache and .pyc files; not timed
        wall(argv)
    times: dict[str, list[float]] = {label: [] for label in todo}
    for _ in range(rounds):
        for label, argv in todo.items():
            times[label].append(wall(argv))
    ref = statistics.median(times[REFERENCE])
    print(f"| command (median of {rounds}) | wall s | × numpy import |")
    print("|---|---:|---:|")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"| `{label}` | {med:.3f} | {med / ref:.2f}× |")


if __name__ == "__main__":
    main()
