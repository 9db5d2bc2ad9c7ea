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
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err}"
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
