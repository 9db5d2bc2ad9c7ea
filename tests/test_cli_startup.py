"""``graft --help`` and every subcommand's ``--help`` start as fast as a bare ``import numpy``:
registering the subcommands imports no heavy library (each command imports what it uses when it
runs). Timings are measured by ``bench/bench_startup.py`` (docs/benchmarks.md, "CLI start-up")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: what --help must not pay for (torch alone is seconds)
HEAVY = ("torch", "sklearn", "onnx", "onnxruntime", "cv2", "pandas", "scipy", "pyarrow", "matplotlib", "PIL", "joblib")

_PROBE = """
import sys, cli
argv = sys.argv[1:]
assert cli.main(argv) == 0
if not argv[1:]:  # no subcommand named: every command module was registered
    cli.build_parser([])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
print("HEAVY", sorted({{m.split(".")[0] for m in heavy}}))
"""


def _commands() -> list[str]:
    import cli

    return list(cli.COMMANDS)


@pytest.mark.parametrize("command", [None, *_commands()])
def test_help_imports_no_heavy_library(command: str | None) -> None:
    argv = [command, "--help"] if command else ["--help"]
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=set(HEAVY)), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: graft" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "HEAVY []", proc.stdout.splitlines()[-1]


def test_light_name_lists_match_the_libraries() -> None:
    """The names ``--help`` shows without importing their modules are the modules' own."""
    from extract.commands import RESIZE_FILTER_NAMES, RESIZE_MODE_NAMES
    from extract.preprocess import RESIZE_FILTERS, RESIZE_MODES
    from heads.commands import TASK_NAMES
    from heads.tasks import BUILTIN_TASKS

    assert TASK_NAMES == tuple(BUILTIN_TASKS)
    assert RESIZE_MODE_NAMES == tuple(RESIZE_MODES)
    assert RESIZE_FILTER_NAMES == tuple(RESIZE_FILTERS)


def test_package_names_still_resolve() -> None:
    """``from heads import fit_head`` and friends load their module on first use."""
    import convert
    import extract
    import heads

    for pkg in (convert, extract, heads):
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None, f"{pkg.__name__}.{name}"
    with pytest.raises(AttributeError):
        heads.nope  # noqa: B018
