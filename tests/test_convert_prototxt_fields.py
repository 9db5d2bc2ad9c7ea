"""Fields a prototxt sets that graft's caffe.proto does not know: named, never silently dropped.

The oracle for "which fields are unknown" is the protobuf runtime itself: a strict
``text_format.Parse`` (no unknown fields allowed) accepts exactly the files with none, and the
lenient parse of a file with injected fork fields must equal the parse of the file without them
(the walk skipped each injected value without losing its place).
"""

from __future__ import annotations

import pytest
from _convert_helpers import CAFFE, needs_testbed

ZOO = CAFFE / "zoo"

#: what the 15 zoo prototxts hold today that caffe.proto lacks (everything else parses strictly)
ZOO_UNKNOWN = {
    "yolov3_darknet2caffe": ["layer 'detection_out' (Yolov3DetectionOutput): unknown parameter message "
                             "'yolov3_detection_output_param' ignored"],
}


def notes_of(text: str) -> list[str]:
    from convert.parse import unknown_field_notes

    return unknown_field_notes(text)


def strict_parse_ok(text: str) -> bool:
    from google.protobuf import text_format

    from convert.proto import pb

    try:
        text_format.Parse(text, pb.NetParameter())
    except text_format.ParseError:
        return False
    return True


def lenient(text: str):
    from google.protobuf import text_format

    from convert.proto import pb

    net = pb.NetParameter()
    text_format.Parse(text, net, allow_unknown_field=True)
    return net


@needs_testbed
def test_zoo_prototxts_unknown_fields():
    folders = sorted(p.parent.name for p in ZOO.glob("*/deploy.prototxt"))
    assert len(folders) == 15, folders
    for name in folders:
        text = (ZOO / name / "deploy.prototxt").read_text()
        got = notes_of(text)
        assert got == ZOO_UNKNOWN.get(name, []), name
        assert strict_parse_ok(text) == (not got), name  # protobuf agrees there is (or is not) something unknown


#: fork fields injected into the real MobileNet-YOLOv3 prototxt, in every text form the parser
#: accepts: several fields on one line, `f: { }` and `f { }`, `f < >`, nested messages, lists,
#: strings holding braces, comments holding braces, negative and special numbers
INJECT = [
    ("kernel_size: 4  stride: 2  pad: 1",
     'kernel_size: 4  fork_flag: true stride: 2  fork_msg: { a: 1 b { c: "x } {" d: [1, 2] } } pad: 1 fork_neg: -inf'),
    ('weight_filler: { type: "bilinear" }', 'weight_filler: { type: "bilinear" fork_sub: 0.5 }  # { not a brace'),
    ("  param { lr_mult: 0  decay_mult: 0 }", "  param { lr_mult: 0  decay_mult: 0 }\n  hole_param { hole: 2 nested < k: 1 > }"
                                              "\n  fork_list: [ { a: 1 }, { b: 2 } ]"),
]
EXPECTED_INJECTED = [
    "layers 'upsample', 'upsample2' (Deconvolution): unknown parameter message 'hole_param' ignored",
    "layers 'upsample', 'upsample2' (Deconvolution): unknown field 'fork_list' ignored",
    "layers 'upsample', 'upsample2' (Deconvolution): unknown field 'convolution_param.fork_flag' ignored",
    "layers 'upsample', 'upsample2' (Deconvolution): unknown field 'convolution_param.fork_msg' ignored",
    "layers 'upsample', 'upsample2' (Deconvolution): unknown field 'convolution_param.fork_neg' ignored",
    "layers 'upsample', 'upsample2' (Deconvolution): unknown field 'convolution_param.weight_filler.fork_sub' ignored",
]


@needs_testbed
def test_injected_fork_fields_in_a_real_prototxt_are_each_named_once():
    original = (ZOO / "mobilenet_yolov3_lite_tusimple" / "deploy.prototxt").read_text()
    text = original
    for old, new in INJECT:
        assert text.count(old) == 2, old  # both Deconvolution layers
        text = text.replace(old, new)
    assert notes_of(text) == EXPECTED_INJECTED
    assert lenient(text) == lenient(original)  # the known fields around them parsed unchanged
    assert not strict_parse_ok(text)


LAYER_FIRST = '''name: "t"
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
fork_net_flag: 1
layer {
  pooling_param: { pool: MAX kernel_size: 2 stride: 2 foo: 1 foo: 2 }
  name: "late_name" type: "Pooling" bottom: "data" top: "p1"
}
layer { type: "Pooling" bottom: "p1" top: "p2" pooling_param { kernel_size: 2 bar { x: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "p2" bottom: "label" top: "loss" loss_param { fork: 1 } }
'''


def test_names_after_the_field_unnamed_layers_top_level_and_training_layers():
    assert notes_of(LAYER_FIRST) == [
        "unknown field 'fork_net_flag' ignored",
        "layer 'late_name' (Pooling): unknown field 'pooling_param.foo' ignored",  # once, though set twice
        "layer #2 (Pooling): unknown field 'pooling_param.bar' ignored",
    ]  # the training-only SoftmaxWithLoss is dropped from the deploy net: not reported


V1_NET = '''name: "v1"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layers { name: "pool1" type: POOLING bottom: "data" top: "pool1" pooling_param { pool: MAX kernel_size: 2 fork: 3 } }
layers { name: "bn1" type: POOLING bottom: "data" top: "bn1" batch_norm_param { eps: 0.1 } }
'''


def test_v1_layers_report_the_v2_type_and_v2_only_params():
    """A V2-only parameter message inside a V1 layer is unknown to V1LayerParameter: named, since
    its values would otherwise fall back to defaults."""
    assert notes_of(V1_NET) == [
        "layer 'pool1' (Pooling): unknown field 'pooling_param.fork' ignored",
        "layer 'bn1' (Pooling): unknown parameter message 'batch_norm_param' ignored",
    ]


def test_many_layers_sharing_a_field_are_one_line():
    layers = "\n".join(f'layer {{ name: "c{i}" type: "ReLU" bottom: "data" top: "c{i}" relu_param {{ engine_x: 1 }} }}'
                       for i in range(6))
    text = 'input: "data"\ninput_shape { dim: 1 dim: 1 dim: 2 dim: 2 }\n' + layers
    assert notes_of(text) == ["layers 'c0', 'c1', 'c2' and 3 more (ReLU): unknown field 'relu_param.engine_x' ignored"]


NET = '''name: "t"
input: "data"
input_shape { dim: 1 dim: 3 dim: 9 dim: 9 }
layer { name: "pool1" type: "Pooling" bottom: "data" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 FORK } }
layer { name: "yolo" type: "ReLU" bottom: "pool1" top: "yolo" FORK_PARAM }
'''


def test_convert_warns_on_stderr_once_and_records_notes(tmp_path, capsys):
    """Through the command line (which reads the prototxt twice): one stderr line per unknown
    field, the same notes in the manifest, and in ``inspect``."""
    import cli as graft_cli
    from convert import load_package
    from convert.generate import generate_caffemodel

    clean = tmp_path / "clean.prototxt"
    clean.write_text(NET.replace("FORK_PARAM", "").replace("FORK", ""))
    weights = generate_caffemodel(clean, tmp_path / "net.caffemodel")
    proto = tmp_path / "fork.prototxt"
    proto.write_text(NET.replace("FORK_PARAM", "fork_relu_param { mode: 2 }").replace("FORK", "foo: 1"))
    capsys.readouterr()
    rc = graft_cli.main(["convert", "--prototxt", str(proto), "--caffemodel", str(weights), "--out", str(tmp_path / "pkg")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    expected = ["layer 'pool1' (Pooling): unknown field 'pooling_param.foo' ignored",
                "layer 'yolo' (ReLU): unknown parameter message 'fork_relu_param' ignored"]
    assert err.splitlines() == [f"warning: {proto}: {e}" for e in expected]
    pkg = load_package(tmp_path / "pkg")
    assert pkg.manifest["notes"][:2] == expected
    rc = graft_cli.main(["inspect", str(tmp_path / "pkg")])
    out, _ = capsys.readouterr()
    assert rc == 0 and all(f"note: {e}" in out for e in expected)


def test_read_prototxt_keeps_its_return_type_and_fills_notes(tmp_path):
    from convert.parse import read_prototxt
    from convert.proto import pb

    proto = tmp_path / "n.prototxt"
    proto.write_text(NET.replace("FORK_PARAM", "").replace("FORK", "foo: 1"))
    notes: list[str] = []
    net = read_prototxt(proto, notes=notes)
    assert isinstance(net, type(pb.NetParameter()))
    assert notes == ["layer 'pool1' (Pooling): unknown field 'pooling_param.foo' ignored"]
    assert read_prototxt(proto) == net  # without notes: same message


@pytest.mark.parametrize("text", ["layer { name: 'a' foo: ", "layer { name: 'a' foo { x: 1 ", "layer { foo: [1, 2",
                                  "layer { [ext.foo"])
def test_walk_of_broken_text_returns_what_it_found(text):
    """The walk runs after protobuf accepted the text; on text it did not, it stops quietly."""
    from convert.proto import pb
    from convert.prototxt_fields import unknown_fields

    found = unknown_fields(text, pb.NetParameter.DESCRIPTOR)
    assert [f.path for f in found] in ([], ["foo"], ["[ext.foo]"])
