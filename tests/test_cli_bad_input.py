"""Bad input to every subcommand ends as one ``error:`` line on stderr naming the flag or the
file, exit status 2, never a traceback; an unexpected exception is one ``internal error`` line
and exit status 3 (the traceback with ``GRAFT_DEBUG=1``); Ctrl-C is 130.

The flag checks are argparse's, reached with no model at all; the file checks that sit behind a
model or a cache (``predict --csv``, ``fit-head --labels``) share one small real package (MTCNN
det3, converted in about a second) and a six-image cache. Everything runs in-process through
``cli.main``; three checks run a real process.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO.parent / "shared" / "testbed"
DET3 = TESTBED / "caffe" / "mtcnn"
FACES = TESTBED / "faces" / "imdbwiki"
needs_testbed = pytest.mark.skipif(not (DET3 / "det3.caffemodel").is_file() or not FACES.is_dir(),
                                   reason=f"test bed absent: {TESTBED}")


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    import cli

    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


def assert_bad_input(rc: int, err: str, *needles: str) -> str:
    """Exit status 2 and exactly one stderr line, ``error: ...``, holding every needle."""
    lines = err.strip("\n").splitlines()
    assert rc == 2, f"exit status {rc}, stderr:\n{err}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


# -- every numeric flag of every subcommand --------------------------------------------------------

#: the least each subcommand needs so that parsing reaches the flag under test
BASE = {
    "convert": ["convert", "--caffemodel", "x.caffemodel"],
    "extract": ["extract", "--model", "m", "--layer", "l", "--images", "."],
    "fit-head": ["fit-head", "--layer", "l"],
    "predict": ["predict", "--out", "p.csv"],
    "finetune": ["finetune", "--model", "m"],
    "faces": ["faces", "--detector", "ultraface", "--images", ".", "--out", "o"],
}

POSITIVE_INT = ("0", "-3", "abc", "2.5")
NON_NEGATIVE_INT = ("-3", "abc", "2.5")
POSITIVE_FLOAT = ("0", "-3", "abc", "nan", "inf")
NON_NEGATIVE_FLOAT = ("-3", "abc", "nan")
FRACTION = ("0", "1", "-0.5", "abc", "nan")
SIZE = ("-3", "abc", "1,2,3", "0,5", "2.5")
DEVICE = ("cuda:x", "gpu", "cuda:-1", "cuda:", "cpu:0")

#: (subcommand, flag) -> values it must refuse
NUMERIC = {
    ("convert", "--scale"): POSITIVE_FLOAT,
    ("convert", "--crop"): NON_NEGATIVE_INT,
    ("extract", "--scale"): POSITIVE_FLOAT,
    ("extract", "--resize"): SIZE,
    ("extract", "--crop"): SIZE,
    ("extract", "--mean"): ("abc", "1,2", "nan"),
    ("extract", "--batch-size"): POSITIVE_INT,
    ("extract", "--workers"): POSITIVE_INT,
    ("extract", "--shard-size"): POSITIVE_INT,
    ("extract", "--device"): DEVICE,
    ("extract", "--gpus-per-worker"): NON_NEGATIVE_FLOAT,
    ("extract", "--cpus-per-worker"): POSITIVE_FLOAT,
    ("fit-head", "--pca"): POSITIVE_INT,
    ("fit-head", "--alphas"): ("0", "-1", "abc", "1,-1", ""),
    ("fit-head", "--hidden"): ("0", "-3", "abc", "256,0", ""),
    ("fit-head", "--max-iter"): POSITIVE_INT,
    ("fit-head", "--clip-range"): ("abc", "5,1", "1", "1,2,3"),
    ("fit-head", "--cv"): ("0", "1", "-3", "abc"),
    ("fit-head", "--holdout"): FRACTION,
    ("fit-head", "--seed"): NON_NEGATIVE_INT,
    ("fit-head", "--test-size"): FRACTION,
    ("predict", "--top-k"): POSITIVE_INT,
    ("predict", "--batch-size"): POSITIVE_INT,
    ("predict", "--workers"): POSITIVE_INT,
    ("predict", "--device"): DEVICE,
    ("finetune", "--test-size"): FRACTION,
    ("finetune", "--lr"): POSITIVE_FLOAT,
    ("finetune", "--gamma"): ("abc", "nan", "inf"),
    ("finetune", "--power"): NON_NEGATIVE_FLOAT,
    ("finetune", "--stepsize"): POSITIVE_INT,
    ("finetune", "--stepvalue"): ("0", "-3", "abc", "100,0", ""),
    ("finetune", "--max-iter"): POSITIVE_INT,
    ("finetune", "--momentum"): NON_NEGATIVE_FLOAT,
    ("finetune", "--weight-decay"): NON_NEGATIVE_FLOAT,
    ("finetune", "--clip-gradients"): POSITIVE_FLOAT,
    ("finetune", "--epochs"): POSITIVE_INT,
    ("finetune", "--batch-size"): POSITIVE_INT,
    ("finetune", "--seed"): NON_NEGATIVE_INT,
    ("finetune", "--workers"): NON_NEGATIVE_INT,
    ("finetune", "--threads"): POSITIVE_INT,
    ("finetune", "--device"): DEVICE,
    ("faces", "--size"): POSITIVE_INT,
    ("faces", "--margin"): NON_NEGATIVE_FLOAT,
    ("faces", "--max-faces"): POSITIVE_INT,
    ("faces", "--sample-sheet"): NON_NEGATIVE_INT,
    ("faces", "--score-threshold"): FRACTION,
    ("faces", "--min-size"): POSITIVE_INT,
    ("faces", "--class-id"): NON_NEGATIVE_INT,
    ("faces", "--device"): DEVICE,
    ("faces", "--batch-size"): POSITIVE_INT,
    ("faces", "--workers"): POSITIVE_INT,
}


def _typed_flags() -> dict[tuple[str, str], Callable]:
    """(subcommand, flag) -> argparse ``type`` of every option that has one."""
    import argparse

    import cli

    parser = cli.build_parser([])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {(cmd, action.option_strings[-1]): action.type
            for cmd, p in sub.choices.items() for action in p._actions if action.type is not None and action.option_strings}


def test_every_numeric_flag_is_range_checked_and_in_the_table() -> None:
    """No option parses with a bare ``int``/``float`` (``--pca 0`` went through to scikit-learn);
    every typed option is in NUMERIC, so a new flag cannot skip the bad-value checks below."""
    typed = _typed_flags()
    bare = sorted(k for k, t in typed.items() if t in (int, float))
    assert not bare, f"flags parsed with a bare int/float, no range check: {bare}"
    assert sorted(typed) == sorted(NUMERIC), "NUMERIC differs from the typed flags of the command line"


@pytest.mark.parametrize(("cmd", "flag", "value"), [(c, f, v) for (c, f), vals in NUMERIC.items() for v in vals])
def test_bad_numeric_value_is_one_line_naming_the_flag(cmd: str, flag: str, value: str, capsys) -> None:
    rc, err = run_cli(capsys, *BASE[cmd], f"{flag}={value}")
    line = assert_bad_input(rc, err, f"argument {flag}", f"graft {cmd} --help")
    assert repr(value) in line


@pytest.mark.parametrize("argv", [[], ["nope"], ["fit-head"], ["extract", "--model", "m"], ["predict", "--out", "x", "--bogus"],
                                  ["fit-head", "--layer", "l", "--head", "svm"], ["inspect"]])
def test_usage_error_is_one_line(argv: list[str], capsys) -> None:
    assert_bad_input(*run_cli(capsys, *argv), "see graft")


def test_help_exits_0(capsys) -> None:
    import cli

    assert cli.main(["fit-head", "--help"]) == 0
    assert "--pca" in capsys.readouterr().out


# -- bad files --------------------------------------------------------------------------------------

def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def bad_file(tmp: Path, kind: str, monkeypatch: pytest.MonkeyPatch, malformed: bytes = b"a,b\n1,2\n3,4,5,6\n") -> Path:
    """A file flag's value that cannot be used: missing, a directory, unreadable, empty, binary,
    header-only or malformed (``malformed``: a CSV row with too many fields by default)."""
    path = tmp / f"{kind}.csv"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
        return path
    if kind == "unreadable":
        _write(path, b"path,label\na.jpg,1\n")
        make_unreadable(path, monkeypatch)
        return path
    data = {"empty": b"", "blank": b"\n\n", "binary": bytes(range(128, 256)) * 20 + os.urandom(2000),
            "header-only": b"path,label\n", "malformed": malformed}[kind]
    return _write(path, data)


def make_unreadable(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000; as root (which reads it anyway) every ``open`` of it raises PermissionError instead,
    which is what a non-root user gets from the chmod."""
    path.chmod(0)
    if os.geteuid() != 0:
        return
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == path.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)  # pathlib's read_text / read_bytes


CSV_KINDS = ("missing", "directory", "unreadable", "empty", "blank", "binary", "header-only", "malformed")
LIST_KINDS = ("missing", "directory", "unreadable", "empty", "binary", "malformed")


@pytest.mark.parametrize("kind", CSV_KINDS)
def test_extract_bad_csv(kind: str, tmp_path: Path, capsys, monkeypatch) -> None:
    f = bad_file(tmp_path, kind, monkeypatch)
    assert_bad_input(*run_cli(capsys, "extract", "--model", "m", "--layer", "l", "--csv", str(f)), "--csv", str(f))


@pytest.mark.parametrize("kind", LIST_KINDS)
def test_extract_bad_list(kind: str, tmp_path: Path, capsys, monkeypatch) -> None:
    f = bad_file(tmp_path, kind, monkeypatch, malformed=b"a.jpg 1\nb.jpg not-a-label\n")
    assert_bad_input(*run_cli(capsys, "extract", "--model", "m", "--layer", "l", "--list", str(f)), "--list", str(f))


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_extract_bad_images_folder(kind: str, tmp_path: Path, capsys) -> None:
    f = tmp_path / "x.jpg"
    if kind == "a file":
        f.write_bytes(b"x")
    assert_bad_input(*run_cli(capsys, "extract", "--model", "m", "--layer", "l", "--images", str(f)), "--images", str(f))


@pytest.mark.parametrize("kind", CSV_KINDS)
def test_finetune_bad_csv(kind: str, tmp_path: Path, capsys, monkeypatch) -> None:
    f = bad_file(tmp_path, kind, monkeypatch)
    rc, err = run_cli(capsys, "finetune", "--model", "m", "--task", "gender", "--csv", str(f), "--run-dir", str(tmp_path / "run"))
    assert_bad_input(rc, err, "--csv", str(f))


@pytest.mark.parametrize("kind", ["missing", "directory", "unreadable", "binary", "malformed"])
def test_finetune_bad_solver(kind: str, tmp_path: Path, capsys, monkeypatch) -> None:
    f = bad_file(tmp_path, kind, monkeypatch, malformed=b"base_lr: 0.01\nlr_policy: {\n")
    rc, err = run_cli(capsys, "finetune", "--model", "m", "--task", "gender", "--images", ".", "--solver", str(f))
    assert_bad_input(rc, err, str(f))


@pytest.mark.parametrize("kind", ["missing", "directory", "a file", "malformed manifest"])
def test_inspect_bad_package(kind: str, tmp_path: Path, capsys) -> None:
    f = tmp_path / "pkg"
    if kind == "directory":
        f.mkdir()
    elif kind == "a file":
        f.write_text("x")
    elif kind == "malformed manifest":
        f.mkdir()
        (f / "manifest.json").write_bytes(b"{\"format\": ")
    assert_bad_input(*run_cli(capsys, "inspect", str(f)), str(f))


@pytest.mark.parametrize("kind", ["missing", "directory", "a file"])
def test_predict_and_export_bad_head(kind: str, tmp_path: Path, capsys) -> None:
    f = tmp_path / "head"
    if kind == "directory":
        f.mkdir()
    elif kind == "a file":
        f.write_text("x")
    assert_bad_input(*run_cli(capsys, "predict", "--head", str(f), "--images", ".", "--out", str(tmp_path / "p.csv")), str(f))
    assert_bad_input(*run_cli(capsys, "export", "--head", str(f), "--out", str(tmp_path / "h.onnx")), str(f))


# -- bad files behind a model or a cache: one real package, one small cache --------------------------

NET = """name: "tiny"
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 5 } }
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A valid tiny prototxt and generated weights (convert's file flags)."""
    from convert.generate import generate_caffemodel

    tmp = tmp_path_factory.mktemp("tiny")
    (tmp / "tiny.prototxt").write_text(NET)
    return tmp / "tiny.prototxt", generate_caffemodel(tmp / "tiny.prototxt", tmp / "tiny.caffemodel", layout="V2", seed=1)


#: class names are read leniently (undecodable bytes replaced): any bytes give names
CONVERT_FILES = [(f, k) for f in ("--prototxt", "--caffemodel", "--classes", "--mean-file")
                 for k in ("missing", "directory", "unreadable", "binary") if (f, k) != ("--classes", "binary")]


@pytest.mark.parametrize(("flag", "kind"), CONVERT_FILES)
def test_convert_bad_file(flag: str, kind: str, tiny: tuple[Path, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    f = bad_file(tmp_path, kind, monkeypatch)
    given = {"--prototxt": str(tiny[0]), "--caffemodel": str(tiny[1]), flag: str(f)}
    rc, err = run_cli(capsys, "convert", *[x for kv in given.items() for x in kv], "--out", str(tmp_path / "pkg"))
    assert_bad_input(rc, err, str(f))
    assert not (tmp_path / "pkg").exists()


@pytest.mark.parametrize(("flag", "value"), [("--input-size", "-3"), ("--input-size", "abc"), ("--resize", "-3"), ("--resize", "abc"),
                                             ("--mean", "abc"), ("--mean", "1,2")])
def test_convert_bad_text_values(flag: str, value: str, tiny: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    """convert's size and mean flags are parsed against the net's input (H,W vs channels)."""
    rc, err = run_cli(capsys, "convert", "--prototxt", str(tiny[0]), "--caffemodel", str(tiny[1]), f"{flag}={value}",
                      "--out", str(tmp_path / "pkg"))
    assert_bad_input(rc, err, flag)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """det3 converted and six faces extracted into a cache (``fit-head --labels`` reads it)."""
    if not (DET3 / "det3.caffemodel").is_file() or not FACES.is_dir():
        pytest.skip(f"test bed absent: {TESTBED}")
    import cli
    from convert import convert_model
    from convert.preprocess import build_preprocess

    tmp = tmp_path_factory.mktemp("cli-bad")
    pre, _ = build_preprocess([1, 3, 48, 48], mean="127.5", scale=0.0078125, channel_order="rgb")
    convert_model(DET3 / "det3.prototxt", DET3 / "det3.caffemodel", tmp / "det3", "det3", preprocess=pre, log=lambda _m: None)
    for cls in ("female", "male"):
        (tmp / "faces" / cls).mkdir(parents=True)
        for f in sorted((FACES / "gender-data" / "train" / cls).iterdir())[:3]:
            os.symlink(f, tmp / "faces" / cls / f.name)
    assert cli.main(["extract", "--model", str(tmp / "det3"), "--layer", "conv5", "--images", str(tmp / "faces"),
                     "--cache", str(tmp / "cache"), "--no-progress"]) == 0
    return {"pkg": tmp / "det3", "cache": tmp / "cache"}


@needs_testbed
@pytest.mark.parametrize("kind", CSV_KINDS)
def test_fit_head_bad_labels_csv(kind: str, world: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    capsys.readouterr()
    f = bad_file(tmp_path, kind, monkeypatch)
    rc, err = run_cli(capsys, "fit-head", "--cache", str(world["cache"]), "--layer", "conv5", "--labels", str(f),
                      "--label-column", "label", "--kind", "classification", "--quiet", "--out", str(tmp_path / "head"))
    assert_bad_input(rc, err, "--labels", str(f))
    assert not (tmp_path / "head").exists()


@needs_testbed
@pytest.mark.parametrize(("flags", "flag"), [(["--test-size", "0.1"], "--test-size"), (["--test-size", "0.9"], "--test-size"),
                                             (["--holdout", "0.1"], "--holdout")])
def test_fit_head_split_too_small_for_the_data(flags: list[str], flag: str, world: dict[str, Path], tmp_path: Path, capsys) -> None:
    """A fraction valid in itself that leaves a side without a row of each class (6 rows here)."""
    capsys.readouterr()
    rc, err = run_cli(capsys, "fit-head", "--cache", str(world["cache"]), "--layer", "conv5", "--label-column", "label",
                      "--kind", "classification", "--cv", "2", "--quiet", "--out", str(tmp_path / "head"), *flags)
    assert_bad_input(rc, err, flag, "one per class")


@needs_testbed
@pytest.mark.parametrize("kind", CSV_KINDS)
def test_predict_bad_csv(kind: str, world: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    capsys.readouterr()
    f = bad_file(tmp_path, kind, monkeypatch)
    rc, err = run_cli(capsys, "predict", "--model", str(world["pkg"]), "--csv", str(f), "--cache", str(world["cache"]),
                      "--out", str(tmp_path / "p.csv"), "--no-progress")
    assert_bad_input(rc, err, "--csv", str(f))


# -- the machine's state, bugs, Ctrl-C ----------------------------------------------------------------

def _export_raising(monkeypatch: pytest.MonkeyPatch, err: BaseException) -> None:
    """``export`` fails with ``err`` (registration reads ``run_export`` when the parser is built)."""
    import heads.commands

    def run_export(args):
        raise err

    monkeypatch.setattr(heads.commands, "run_export", run_export)


EXPORT = ("export", "--head", "h", "--out", "out/h.onnx")


@pytest.mark.parametrize(("err", "expected"), [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), f"error: {os.strerror(errno.ENOSPC)} (writing out/h.onnx)"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/h.onnx.tmp"), f"error: out/h.onnx.tmp: {os.strerror(errno.ENOSPC)}"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "out/h.onnx"), f"error: out/h.onnx: {os.strerror(errno.EACCES)}"),
    (IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), "out/h.onnx"), f"error: out/h.onnx: {os.strerror(errno.EISDIR)}"),
    (FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "h/card.json"), "error: file not found: h/card.json"),
])
def test_os_errors_name_the_path(err: OSError, expected: str, monkeypatch, capsys) -> None:
    _export_raising(monkeypatch, err)
    assert assert_bad_input(*run_cli(capsys, *EXPORT)) == expected


def test_unexpected_exception_is_one_line_exit_3(monkeypatch, capsys) -> None:
    monkeypatch.delenv("GRAFT_DEBUG", raising=False)
    monkeypatch.delenv("GRAFT_TRACEBACK", raising=False)
    _export_raising(monkeypatch, RuntimeError("boom\n  second line"))
    rc, err = run_cli(capsys, *EXPORT)
    assert rc == 3 and err == "error: internal error: RuntimeError: boom second line (set GRAFT_DEBUG=1 for the traceback)\n", err


def test_graft_debug_prints_the_traceback(monkeypatch, capsys) -> None:
    monkeypatch.setenv("GRAFT_DEBUG", "1")
    _export_raising(monkeypatch, ValueError("boom"))
    rc, err = run_cli(capsys, *EXPORT)
    assert rc == 3 and err.startswith("Traceback") and "ValueError: boom" in err, err
    assert err.splitlines()[-1] == "error: internal error: ValueError: boom"


def test_interrupt_is_130(monkeypatch, capsys) -> None:
    _export_raising(monkeypatch, KeyboardInterrupt())
    rc, err = run_cli(capsys, *EXPORT)
    assert rc == 130 and "interrupted" in err


_BOOM = ("import sys, cli, heads.commands as h\n"
         "def boom(args):\n    raise RuntimeError('boom')\n"
         "h.run_export = boom\nsys.exit(cli.main(sys.argv[1:]))\n")


@pytest.mark.parametrize("debug", ["", "1"])
def test_internal_error_as_a_user_sees_it(debug: str) -> None:
    """A real process: exit status 3; one line, or the traceback with GRAFT_DEBUG=1."""
    env = {k: v for k, v in os.environ.items() if k not in ("GRAFT_DEBUG", "GRAFT_TRACEBACK")}
    env["GRAFT_DEBUG"] = debug
    proc = subprocess.run([sys.executable, "-c", _BOOM, *EXPORT], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    if debug:
        assert "Traceback" in proc.stderr and proc.stderr.splitlines()[-1] == "error: internal error: RuntimeError: boom"
    else:
        assert proc.stderr == "error: internal error: RuntimeError: boom (set GRAFT_DEBUG=1 for the traceback)\n"


def test_bad_flag_as_a_user_sees_it() -> None:
    proc = subprocess.run([sys.executable, "cli.py", "fit-head", "--layer", "x", "--pca", "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: argument --pca: expected a positive integer, got '0' (see graft fit-head --help)\n"
