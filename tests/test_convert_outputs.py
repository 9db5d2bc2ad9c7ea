"""``convert --outputs BLOB[,BLOB]``: only the layers those blobs need are converted; the rest,
supported or not, is left out and listed (manifest ``left_out``, ``inspect``).

Names are the package's: a Caffe blob name is its final value (later in-place writers are
kept), ``<blob>/pre_<layer>`` the value before that layer. References: numpy (Caffe's
convolution/ReLU/pooling from test_convert_layers).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _convert_helpers import CAFFE, assert_close, needs_testbed, run_ort
from test_convert_errors import assert_nothing_written, assert_one_error, run_cli

TRUNK = """name: "trunk"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "head_a" type: "Convolution" bottom: "conv1" top: "head_a" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "pool" type: "Pooling" bottom: "conv1" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "head_b" type: "Convolution" bottom: "pool" top: "head_b" convolution_param { num_output: 3 kernel_size: 1 } }
layer { name: "decode" type: "FancyDetectionOutput" bottom: "head_a" bottom: "head_b" top: "detections"
  fancy_param { anchors: 3 } }
layer { name: "unused" type: "AlsoUnknown" bottom: "detections" top: "final" }
"""


@pytest.fixture
def trunk(tmp_path):
    """The net, and weights for its supported layers (what a real caffemodel would hold)."""
    from convert.generate import write_caffemodel

    proto = tmp_path / "trunk.prototxt"
    proto.write_text(TRUNK)
    rng = np.random.default_rng(0)
    blobs = {"conv1": [rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)],
             "head_a": [rng.standard_normal((2, 4, 1, 1)), rng.standard_normal(2)],
             "head_b": [rng.standard_normal((3, 4, 1, 1)), rng.standard_normal(3)]}
    blobs = {k: [v.astype(np.float32) for v in vs] for k, vs in blobs.items()}
    weights = write_caffemodel(tmp_path / "trunk.caffemodel", [(k, "Convolution", v) for k, v in blobs.items()])
    return proto, weights, blobs


def convert_args(proto, weights, out, *extra):
    return ["convert", "--prototxt", str(proto), "--caffemodel", str(weights), "--out", str(out), *extra]


def test_trunk_converts_without_its_post_processing(tmp_path, trunk, capsys):
    from test_convert_layers import conv_ref, pool_ref

    from convert import load_package, load_torch

    proto, weights, W = trunk
    out = tmp_path / "models" / "trunk"
    rc, stdout, err = run_cli(capsys, *convert_args(proto, weights, out, "--outputs", "head_a,head_b"))
    # the only stderr: the left-out layer's fork parameters, named as unknown when the prototxt was read
    assert rc == 0 and all(line.startswith("warning:") and "fancy_param" in line for line in err.splitlines()), err
    assert "2 layers left out (--outputs)" in stdout
    pkg = load_package(out)
    m = pkg.manifest
    assert pkg.outputs == ["head_a", "head_b"]
    assert m["left_out"] == [{"name": "decode", "type": "FancyDetectionOutput"}, {"name": "unused", "type": "AlsoUnknown"}]
    assert [layer["name"] for layer in m["layers"]] == ["conv1", "relu1", "head_a", "pool", "head_b"]
    assert "left out   2 layer(s) not needed for --outputs: decode (FancyDetectionOutput), unused (AlsoUnknown)" in pkg.summary()
    assert "FancyDetectionOutput" not in (out / "deploy.prototxt").read_text()
    rc, stdout, _ = run_cli(capsys, "inspect", str(out))
    assert rc == 0 and "decode (FancyDetectionOutput)" in stdout

    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    conv1 = np.maximum(conv_ref(x, *W["conv1"]), 0)
    ref = {"head_a": conv_ref(conv1, *W["head_a"]), "head_b": conv_ref(pool_ref(conv1, (2, 2), (2, 2)), *W["head_b"])}
    got = run_ort(pkg.onnx_path, {"data": x}, list(ref))
    import torch

    with torch.inference_mode():
        got_t = load_torch(pkg)(torch.from_numpy(x))
    for v, r in ref.items():
        assert_close(r, got[v], f"{v}: onnx vs numpy")
        assert_close(r, got_t[v].numpy(), f"{v}: torch vs numpy")


def test_a_pre_in_place_name_keeps_the_later_writers(tmp_path, trunk):
    """Asking for conv1/pre_relu1 keeps relu1: the package's conv1 is Caffe's (post-ReLU) conv1."""
    from convert import convert_model

    proto, weights, _ = trunk
    pkg = convert_model(proto, weights, tmp_path / "pkg", "pre", outputs=["conv1/pre_relu1"], log=lambda _m: None)
    assert pkg.outputs == ["conv1/pre_relu1"]
    assert [layer["name"] for layer in pkg.manifest["layers"]] == ["conv1", "relu1"]
    assert pkg.blobs["conv1"]["kind"] == "final" and pkg.blobs["conv1"]["layer"] == "relu1"
    assert {x["name"] for x in pkg.manifest["left_out"]} == {"head_a", "pool", "head_b", "decode", "unused"}
    x = np.random.default_rng(2).standard_normal((2, 3, 6, 6)).astype(np.float32)
    got = run_ort(pkg.onnx_path_for(["conv1/pre_relu1", "conv1"]), {"data": x}, ["conv1/pre_relu1", "conv1"])
    assert (got["conv1/pre_relu1"] < 0).any() and np.array_equal(got["conv1"], np.maximum(got["conv1/pre_relu1"], 0))


def test_unknown_output_name_is_one_error_listing_the_blobs(tmp_path, trunk, capsys):
    proto, weights, _ = trunk
    rc, _, err = run_cli(capsys, *convert_args(proto, weights, tmp_path / "models" / "pkg", "--outputs", "head_a,nope"))
    assert_one_error(rc, err, "--outputs", "'nope'", "blobs: data, conv1/pre_relu1, conv1, head_a, pool, head_b, detections")
    assert_nothing_written(tmp_path / "models")
    rc, _, err = run_cli(capsys, *convert_args(proto, weights, tmp_path / "models" / "pkg", "--outputs", " , "))
    assert_one_error(rc, err, "--outputs: no blob names given")


def test_manifest_without_outputs_has_no_left_out(tmp_path):
    from convert import convert_model
    from convert.generate import generate_caffemodel

    text = TRUNK.split('layer { name: "decode"')[0]
    proto = tmp_path / "t.prototxt"
    proto.write_text(text)
    pkg = convert_model(proto, generate_caffemodel(proto, tmp_path / "t.caffemodel"), tmp_path / "pkg", "t", log=lambda _m: None)
    assert "left_out" not in json.loads((pkg.dir / "manifest.json").read_text())
    assert "left out" not in pkg.summary()


@needs_testbed
def test_yolov3_trunk_leaves_its_detection_head_out():
    """darknet2caffe YOLOv3: its Yolov3DetectionOutput cannot be converted; its three conv
    outputs can. Pruning happens before converters are looked up."""
    from convert import GraftError
    from convert.ir import build_graph
    from convert.parse import load_net_spec
    from convert.prune import prune
    from convert.registry import supported_types

    spec = load_net_spec(CAFFE / "zoo" / "yolov3_darknet2caffe" / "deploy.prototxt")
    heads = ["layer83-yolo", "layer95-yolo", "layer106-conv"]
    assert [ls.bottoms for ls in spec.layers if ls.type == "Yolov3DetectionOutput"] == [heads]
    pruned = prune(spec, heads)
    assert pruned.left_out == [("detection_out", "Yolov3DetectionOutput")]
    assert len(pruned.layers) == len(spec.layers) - 1 and pruned.outputs == heads
    if "Upsample" not in supported_types():
        with pytest.raises(GraftError, match="unsupported type 'Upsample'"):  # the next blocker, not the head
            build_graph(pruned, None)
        pytest.skip("Upsample is not registered yet: the trunk's shapes cannot be checked")
    g = build_graph(pruned, None, input_shapes={"data": [1, 3, 416, 416]})
    assert g.outputs == heads
    assert [g.shapes[h] for h in heads] == [(1, 255, 13, 13), (1, 255, 26, 26), (1, 255, 52, 52)]


def test_unknown_post_processing_fails_without_outputs(tmp_path, trunk, capsys):
    proto, weights, _ = trunk
    rc, _, err = run_cli(capsys, *convert_args(proto, weights, tmp_path / "models" / "pkg"))
    assert_one_error(rc, err, "decode", "FancyDetectionOutput", "to convert the net up to that layer: --outputs ")
    assert_nothing_written(tmp_path / "models")
