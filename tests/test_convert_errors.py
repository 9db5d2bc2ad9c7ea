"""Bad inputs to ``convert``: one ``error:`` line on stderr naming the problem, exit status 2, no
traceback, and nothing written (no package, no temporary folder). A failed convert never
damages an existing package."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from _convert_helpers import CAFFE, cli, needs_testbed

NET = """name: "tiny"
input: "data"
input_shape {{ dim: 1 dim: 3 dim: 8 dim: 8 }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: {n} kernel_size: 3 }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param {{ num_output: 5 }} }}
layer {{ name: "prob" type: "Softmax" bottom: "fc" top: "prob" }}
"""


@pytest.fixture
def tiny(tmp_path):
    """A valid tiny net and its generated weights."""
    from convert.generate import generate_caffemodel

    proto = tmp_path / "tiny.prototxt"
    proto.write_text(NET.format(n=4))
    weights = generate_caffemodel(proto, tmp_path / "tiny.caffemodel", layout="V2", seed=1)
    return proto, weights


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    import cli as graft_cli

    rc = graft_cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, f"exit status {rc}, stderr: {err}"
    # besides the error, only warnings (a fork's fields the prototxt reader did not know)
    lines = [ln for ln in err.strip("\n").splitlines() if not ln.startswith("warning: ")]
    assert len(lines) == 1, f"expected exactly one stderr line besides warnings, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def assert_nothing_written(parent):
    leftovers = sorted(p.name for p in parent.iterdir()) if parent.exists() else []
    assert leftovers == [], f"left behind in {parent}: {leftovers}"


def convert_args(proto, weights, out):
    return ["convert", "--prototxt", str(proto), "--caffemodel", str(weights), "--out", str(out)]


# ----------------------------------------------------------------------------- bad caffemodels


def _truncated(tmp_path, tiny):
    data = tiny[1].read_bytes()
    (tmp_path / "half.caffemodel").write_bytes(data[: len(data) // 2])
    return tiny[0], tmp_path / "half.caffemodel", ("truncated",)


def _random_bytes(tmp_path, tiny):
    (tmp_path / "noise.caffemodel").write_bytes(np.random.default_rng(0).bytes(5000))
    return tiny[0], tmp_path / "noise.caffemodel", ("noise.caffemodel",)


def _jpeg(tmp_path, tiny):
    if not CAFFE.is_dir():
        pytest.skip("test bed absent")
    shutil.copy(CAFFE / "mtcnn" / "test1.jpg", tmp_path / "photo.caffemodel")
    return tiny[0], tmp_path / "photo.caffemodel", ("photo.caffemodel",)


def _empty(tmp_path, tiny):
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    return tiny[0], tmp_path / "empty.caffemodel", ("empty",)


def _missing_caffemodel(tmp_path, tiny):
    return tiny[0], tmp_path / "nope.caffemodel", ("nope.caffemodel",)


def _missing_prototxt(tmp_path, tiny):
    return tmp_path / "nope.prototxt", tiny[1], ("nope.prototxt",)


def _syntax_error(tmp_path, tiny):
    lines = NET.format(n=4).splitlines()
    lines[4] = lines[4].replace("num_output: 4", "num_output: 4 }}} oops")  # line 5
    (tmp_path / "bad.prototxt").write_text("\n".join(lines) + "\n")
    return tmp_path / "bad.prototxt", tiny[1], ("bad.prototxt", "line 5")


def _unknown_type(tmp_path, tiny):
    text = NET.format(n=4).replace('name: "relu1" type: "ReLU"', 'name: "relu1" type: "FancyReLU"')
    (tmp_path / "unknown.prototxt").write_text(text)
    return tmp_path / "unknown.prototxt", tiny[1], ("relu1", "FancyReLU", "Convolution", "InnerProduct", "PReLU")


def _shape_mismatch(tmp_path, tiny):
    (tmp_path / "wide.prototxt").write_text(NET.format(n=6))
    return tmp_path / "wide.prototxt", tiny[1], ("conv1", "(6, 3, 3, 3)", "(4, 3, 3, 3)")


def _no_weights(tmp_path, tiny):
    text = NET.format(n=4).replace(
        'layer { name: "prob"',
        'layer { name: "fc2" type: "InnerProduct" bottom: "fc" top: "fc2" inner_product_param { num_output: 5 } }\n'
        'layer { name: "prob"').replace('bottom: "fc" top: "prob"', 'bottom: "fc2" top: "prob"')
    (tmp_path / "more.prototxt").write_text(text)
    return tmp_path / "more.prototxt", tiny[1], ("fc2", "no weights")


def _undefined_bottom(tmp_path, tiny):
    text = NET.format(n=4).replace('type: "Softmax" bottom: "fc"', 'type: "Softmax" bottom: "logits"')
    (tmp_path / "dangling.prototxt").write_text(text)
    return tmp_path / "dangling.prototxt", tiny[1], ("prob", "logits")


BAD = {
    "truncated-caffemodel": _truncated,
    "random-bytes-caffemodel": _random_bytes,
    "jpeg-as-caffemodel": _jpeg,
    "empty-caffemodel": _empty,
    "missing-caffemodel": _missing_caffemodel,
    "missing-prototxt": _missing_prototxt,
    "prototxt-syntax-error": _syntax_error,
    "unknown-layer-type": _unknown_type,
    "blob-shape-mismatch": _shape_mismatch,
    "layer-without-weights": _no_weights,
    "undefined-bottom": _undefined_bottom,
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, tiny, capsys, case):
    proto, weights, needles = BAD[case](tmp_path, tiny)
    parent = tmp_path / "models"
    rc, out, err = run_cli(capsys, *convert_args(proto, weights, parent / "pkg"))
    assert_one_error(rc, err, *needles)
    assert_nothing_written(parent)


def test_real_truncated_caffemodel_through_a_subprocess(tmp_path):
    """End to end as a user runs it: ``python cli.py convert`` on half of a real caffemodel."""
    if not CAFFE.is_dir():
        pytest.skip(f"test bed absent: {CAFFE}")
    src = CAFFE / "mtcnn" / "det3.caffemodel"
    data = src.read_bytes()
    half = tmp_path / "det3-half.caffemodel"
    half.write_bytes(data[: len(data) // 2])
    parent = tmp_path / "models"
    proc = cli(*convert_args(CAFFE / "mtcnn" / "det3.prototxt", half, parent / "det3"))
    line = assert_one_error(proc.returncode, proc.stderr, "det3-half.caffemodel", "truncated")
    assert re.match(r"^error: \S", line)
    assert_nothing_written(parent)


@needs_testbed
def test_prototxt_passed_as_caffemodel(tmp_path, capsys):
    """A text file where the weights belong: still one clean error."""
    proto = CAFFE / "lenet" / "mnist_deploy.prototxt"
    rc, _, err = run_cli(capsys, *convert_args(proto, proto, tmp_path / "models" / "lenet"))
    assert_one_error(rc, err, "mnist_deploy.prototxt")
    assert_nothing_written(tmp_path / "models")


# ----------------------------------------------------------------------------- existing packages


def test_failed_convert_keeps_the_existing_package(tmp_path, tiny, capsys):
    from convert import load_package

    proto, weights = tiny
    out = tmp_path / "models" / "tiny"
    rc, _, err = run_cli(capsys, *convert_args(proto, weights, out))
    assert rc == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    manifest = json.loads((out / "manifest.json").read_text())

    bad = tmp_path / "half.caffemodel"
    bad.write_bytes(weights.read_bytes()[:100])
    rc, _, err = run_cli(capsys, *convert_args(proto, bad, out))
    assert_one_error(rc, err, "half.caffemodel")
    (tmp_path / "wide.prototxt").write_text(NET.format(n=6))
    rc, _, err = run_cli(capsys, *convert_args(tmp_path / "wide.prototxt", weights, out))
    assert_one_error(rc, err, "conv1")

    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]
    assert load_package(out).weights_sha256 == manifest["weights_sha256"]


def test_failure_after_writing_started_keeps_the_existing_package(tmp_path, tiny):
    """Verification fails (impossible tolerance) after the temporary package was written."""
    from convert import GraftError, convert_model, load_package

    proto, weights = tiny
    out = tmp_path / "models" / "tiny"
    good = convert_model(proto, weights, out, "tiny", log=lambda _m: None)
    sha = good.weights_sha256
    with pytest.raises(GraftError, match="verification failed"):
        convert_model(proto, weights, out, "tiny", atol=-1.0, rtol=0.0, log=lambda _m: None)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"], "temporary folder left behind"
    assert load_package(out).weights_sha256 == sha
    assert load_package(out).manifest["verification"]["passed"] is True


def test_successful_convert_replaces_the_package(tmp_path, tiny, capsys):
    from convert import load_package
    from convert.generate import generate_caffemodel

    proto, weights = tiny
    out = tmp_path / "models" / "tiny"
    assert run_cli(capsys, *convert_args(proto, weights, out))[0] == 0
    first = load_package(out).weights_sha256
    other = generate_caffemodel(proto, tmp_path / "other.caffemodel", seed=99)
    rc, stdout, err = run_cli(capsys, *convert_args(proto, other, out))
    assert rc == 0 and err == "", err
    assert "converted" in stdout
    pkg = load_package(out)
    assert pkg.weights_sha256 != first
    assert pkg.manifest["source"]["caffemodel"]["path"] == str(other)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


# ----------------------------------------------------------------------------- fuzz: never a traceback
# (capfd, not capsys: onnxruntime's own C++ log lines would reach the user's terminal too)

LENET = CAFFE / "lenet"


def _replace(old: str, new: str):
    """A prototxt mutation: the first ``old`` becomes ``new`` (which must change the text)."""

    def mutate(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)

    return mutate


#: prototxt mutations of the real LeNet deploy net that must fail cleanly
PROTOTXT_MUTATIONS = {
    "truncated": lambda t: t[: t.index("num_output: 50") + 5],
    "kernel_size-0": _replace("kernel_size: 5", "kernel_size: 0"),
    "num_output-0": _replace("num_output: 20", "num_output: 0"),
    "ip-num_output-0": _replace("num_output: 500", "num_output: 0"),
    "stride-0": _replace("stride: 1", "stride: 0"),
    "pool-stride-0": _replace("stride: 2", "stride: 0"),
    "group-0": _replace("kernel_size: 5\n    stride: 1", "kernel_size: 5\n    group: 0"),
    "group-not-dividing": _replace("num_output: 50", "num_output: 50 group: 3"),
    "pool-pad-ge-kernel": _replace("pool: MAX\n    kernel_size: 2", "pool: MAX\n    pad: 2\n    kernel_size: 2"),
    "ip-axis-out-of-range": _replace("num_output: 10", "num_output: 10 axis: 7"),
    "softmax-axis": _replace('bottom: "ip2"\n  top: "loss"', 'bottom: "ip2"\n  top: "loss"\n  softmax_param { axis: 4 }'),
    "negative-dim": _replace("dim: 28 dim: 28", "dim: -28 dim: 28"),
    "huge-dims": _replace("dim: 28 dim: 28", "dim: 100000 dim: 100000"),
    "huge-batch": _replace("dim: 1 dim: 1 dim: 28", "dim: 9000000000 dim: 1 dim: 28"),
    "zero-d-input": _replace("shape: { dim: 1 dim: 1 dim: 28 dim: 28 }", "shape: { }"),
    "input-without-shape": _replace("input_param { shape: { dim: 1 dim: 1 dim: 28 dim: 28 } }", ""),
    "bottom-before-produced": _replace('bottom: "conv1"\n  top: "pool1"', 'bottom: "conv2"\n  top: "pool1"'),
    "duplicate-tops": _replace('top: "conv1"', 'top: "conv1"\n  top: "conv1"'),
    "top-reused-not-in-place": _replace('bottom: "pool1"\n  top: "conv2"', 'bottom: "pool1"\n  top: "conv1"'),
    "two-tops-for-one": _replace('top: "pool1"', 'top: "pool1"\n  top: "pool1b"'),
    "unknown-type": _replace('type: "Pooling"', 'type: "Poooling"'),
    "reshape-bad-dims": _replace('type: "ReLU"\n  bottom: "ip1"\n  top: "ip1"',
                                 'type: "Reshape"\n  bottom: "ip1"\n  top: "ip1r"\n  reshape_param { shape { dim: 0 dim: 7 } }'),
    "lrn-local-size-0": _replace('type: "ReLU"\n  bottom: "ip1"\n  top: "ip1"',
                                 'type: "LRN"\n  bottom: "ip1"\n  top: "ip1"\n  lrn_param { local_size: 0 }'),
    "field-of-wrong-type": _replace("num_output: 20", 'num_output: "twenty"'),
    "unbalanced-braces": _replace("layer {", "layer {{"),
    "no-layers-no-input": lambda t: 'name: "empty"\n',
    "v1-and-v2-mixed": lambda t: t + '\nlayers { name: "x" type: RELU bottom: "loss" top: "loss" }\n',
}


@needs_testbed
@pytest.mark.parametrize("case", list(PROTOTXT_MUTATIONS))
def test_fuzzed_prototxt_is_one_error_line(tmp_path, capfd, case):
    text = PROTOTXT_MUTATIONS[case]((LENET / "mnist_deploy.prototxt").read_text())
    proto = tmp_path / "mutated.prototxt"
    proto.write_text(text)
    parent = tmp_path / "models"
    rc, _, err = run_cli(capfd, *convert_args(proto, LENET / "lenet_iter_10000.caffemodel", parent / "pkg"))
    assert_one_error(rc, err)
    assert_nothing_written(parent)


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]


def _caffemodel_mutations(data: bytes) -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, must fail). Flips inside float data may leave a valid caffemodel."""
    name_at = data.index(b"\x0a\x05conv1") + 3
    out = {
        "truncated-1-byte": (data[:-1], True),
        "truncated-header": (data[:7], True),
        "layer-name-flipped": (_flip(data, name_at), True),
        "first-byte-flipped": (_flip(data, 0), False),
        "length-varint-flipped": (_flip(data, 8), False),
        "zeros": (bytes(len(data)), True),
        "prototxt-text": ((LENET / "mnist_deploy.prototxt").read_bytes(), True),
    }
    rng = np.random.default_rng(7)
    for off in rng.integers(0, len(data), 6):
        out[f"flip-{int(off)}"] = (_flip(data, int(off)), False)
    return out


@needs_testbed
def test_fuzzed_caffemodel_is_one_error_line_or_a_package(tmp_path, capfd):
    data = (LENET / "lenet_iter_10000.caffemodel").read_bytes()
    for case, (blob, must_fail) in _caffemodel_mutations(data).items():
        weights = tmp_path / f"{case}.caffemodel"
        weights.write_bytes(blob)
        parent = tmp_path / f"models-{case}"
        rc, _, err = run_cli(capfd, *convert_args(LENET / "mnist_deploy.prototxt", weights, parent / "pkg"))
        assert "Traceback" not in err, case
        if rc == 0 and not must_fail:  # the flip hit a weight: a valid (different) model
            assert (parent / "pkg" / "manifest.json").is_file() and sorted(p.name for p in parent.iterdir()) == ["pkg"]
            continue
        assert_one_error(rc, err)
        assert_nothing_written(parent)


@needs_testbed
def test_wrong_kinds_of_files_are_one_error_line(tmp_path, capfd):
    proto, weights = LENET / "mnist_deploy.prototxt", LENET / "lenet_iter_10000.caffemodel"
    parent = tmp_path / "models"
    for args in (convert_args(weights, weights, parent / "a"),  # a binary file as the prototxt
                 convert_args(LENET, weights, parent / "b"),  # a directory as the prototxt
                 convert_args(proto, LENET, parent / "c"),  # a directory as the caffemodel
                 convert_args(proto, LENET / "samples" / "img_0_0.png", parent / "d")):
        rc, _, err = run_cli(capfd, *args)
        assert_one_error(rc, err)
    assert_nothing_written(parent)


def test_out_must_be_a_package_folder(tmp_path, tiny, capfd):
    """--out naming a file or a folder that is not a package: refused, and left untouched."""
    proto, weights = tiny
    (tmp_path / "afile").write_text("keep me")
    rc, _, err = run_cli(capfd, *convert_args(proto, weights, tmp_path / "afile"))
    assert_one_error(rc, err, "afile")
    assert (tmp_path / "afile").read_text() == "keep me"
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    rc, _, err = run_cli(capfd, *convert_args(proto, weights, home))
    assert_one_error(rc, err, "not a model package")
    assert [p.name for p in home.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(capfd, *convert_args(proto, weights, empty))[0] == 0


@pytest.mark.parametrize("case", ["missing", "no-manifest", "not-json", "json-list", "no-name", "no-layers", "binary"])
def test_inspect_of_a_damaged_package_is_one_error_line(tmp_path, tiny, capfd, case):
    from convert import convert_model

    pkg = convert_model(*tiny, tmp_path / "pkg", "tiny", log=lambda _m: None).dir
    manifest = pkg / "manifest.json"
    m = json.loads(manifest.read_text())
    if case == "missing":
        pkg = tmp_path / "nope"
    elif case == "no-manifest":
        manifest.unlink()
    elif case == "not-json":
        manifest.write_text("{not json")
    elif case == "json-list":
        manifest.write_text("[1, 2]")
    elif case == "no-name":
        manifest.write_text(json.dumps({k: v for k, v in m.items() if k != "name"}))
    elif case == "no-layers":
        manifest.write_text(json.dumps({**m, "layers": [{"name": "x"}]}))
    elif case == "binary":
        manifest.write_bytes(b"\xff\xfe\x00garbage")
    rc, _, err = run_cli(capfd, "inspect", str(pkg))
    assert_one_error(rc, err)


def test_a_converter_bug_is_one_error_line_naming_the_layer(tmp_path, tiny, capfd, monkeypatch):
    """An exception a converter did not anticipate (here an IndexError in its ONNX emitter)."""
    from convert.registry import get_converter

    conv = get_converter("ReLU", "-")

    def buggy(node, b):
        return [][1]

    monkeypatch.setattr(conv, "onnx", buggy)
    parent = tmp_path / "models"
    rc, _, err = run_cli(capfd, *convert_args(*tiny, parent / "pkg"))
    assert_one_error(rc, err, "layer 'relu1' (ReLU)", "emit ONNX", "IndexError")
    assert_nothing_written(parent)
