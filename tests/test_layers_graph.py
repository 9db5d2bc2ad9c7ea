"""Graph-level layer types: Silence (a sink whose bottoms stay outputs), Parameter (a learned
blob as a value, not batch-wise) and Input with several tops (nets with several inputs).

Each net is converted as a package and run through onnxruntime and ``load_torch`` at batch 2,
against numpy references written here from Caffe's C++ semantics (silence_layer.cpp,
parameter_layer.hpp, input_layer.cpp) and, where OpenCV's importer reads the net, OpenCV.
"""

from __future__ import annotations

import numpy as np
import pytest
from _convert_helpers import CAFFE, assert_close, needs_testbed, opencv_net, run_ort
from test_convert_layers import Case, conv_ref, ip_ref, normal, render, softmax_ref

COVERED_TYPES = {"Silence", "Parameter", "Input"}


def make_package(tmp_path, text: str, name: str = "net", pre: dict | None = None, **kw):
    from convert import convert_model
    from convert.generate import generate_caffemodel

    proto = tmp_path / f"{name}.prototxt"
    proto.write_text(text)
    weights = generate_caffemodel(proto, tmp_path / f"{name}.caffemodel", seed=3)
    pkg = convert_model(proto, weights, tmp_path / name, name, preprocess=pre, log=lambda _m: None, **kw)
    return proto, weights, pkg


def blobs_of(weights) -> dict[str, list[np.ndarray]]:
    from convert.weights import read_caffemodel

    return {n: [np.array(b) for b in lw.blobs] for n, lw in read_caffemodel(weights).layers.items()}


def run_both(pkg, feeds: dict[str, np.ndarray], values: list[str]) -> tuple[dict, dict]:
    import torch

    from convert import load_torch

    onnx_out = run_ort(pkg.onnx_path_for(values), feeds, values)
    net = load_torch(pkg)
    with torch.inference_mode():
        out = net(*[torch.from_numpy(feeds[n]) for n in net.input_names], blobs=values)
    return onnx_out, {k: v.detach().numpy() for k, v in out.items()}


# ----------------------------------------------------------------------------- Silence

SILENCE = Case("silence", (1, 3, 6, 6), [
    ("conv", "Convolution", ["data"], ["conv"], "convolution_param { num_output: 4 kernel_size: 3 }"),
    ("prob", "Softmax", ["conv"], ["prob"], ""),
    ("ab", "Convolution", ["prob"], ["ab"], "convolution_param { num_output: 2 kernel_size: 1 }"),
    ("side", "Pooling", ["conv"], ["side"], "pooling_param { pool: MAX global_pooling: true }"),
    ("silence", "Silence", ["ab", "side"], [], ""),
], lambda x, W: {})


def test_silence_bottoms_are_the_outputs(tmp_path):
    """Like colorization_v2: Silence consumes the last blobs, which stay the net's outputs."""
    proto, weights, pkg = make_package(tmp_path, render(SILENCE, "V2"))
    assert pkg.outputs == ["ab", "side"]
    assert pkg.manifest["layers"][-1] == {"name": "silence", "type": "Silence", "bottoms": ["ab", "side"], "tops": [],
                                          "params": 0}
    W = blobs_of(weights)
    x = normal()(np.random.default_rng(0), (2, 3, 6, 6))
    conv = conv_ref(x, *W["conv"])
    ref = {"prob": softmax_ref(conv, 1), "ab": conv_ref(softmax_ref(conv, 1), *W["ab"]), "side": conv.max(axis=(2, 3), keepdims=True)}
    got_onnx, got_torch = run_both(pkg, {"data": x}, list(ref))
    for v, r in ref.items():
        assert_close(r, got_onnx[v], f"{v}: onnx vs numpy")
        assert_close(r, got_torch[v], f"{v}: torch vs numpy")
    net = opencv_net(proto, weights)  # OpenCV's importer has Silence too
    if net is not None:
        net.setInput(x[:1])
        assert_close(net.forward("ab"), got_onnx["ab"][:1], "ab: onnx vs OpenCV")


def test_silence_with_a_top_is_an_error(tmp_path, capsys):
    import cli as graft_cli
    from convert.generate import generate_caffemodel

    good = tmp_path / "good.prototxt"
    good.write_text(render(SILENCE, "V2"))
    weights = generate_caffemodel(good, tmp_path / "w.caffemodel")
    bad = tmp_path / "bad.prototxt"
    bad.write_text(render(SILENCE, "V2").replace('  bottom: "side"\n', '  bottom: "side"\n  top: "oops"\n'))
    rc = graft_cli.main(["convert", "--prototxt", str(bad), "--caffemodel", str(weights), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "silence" in err and "tops" in err, err


@needs_testbed
def test_colorization_keeps_its_outputs():
    """The zoo's colorization_v2 ends in Silence(class8_ab): class8_ab is the output, and the
    313-bin distribution class8_313_rh it is computed from stays a named blob."""
    from convert.ir import build_graph
    from convert.parse import load_net_spec

    spec = load_net_spec(CAFFE / "zoo" / "colorization_v2" / "deploy.prototxt")
    assert spec.layers[-1].type == "Silence"
    g = build_graph(spec, None)
    assert g.outputs == ["class8_ab"]
    assert g.shapes["class8_313_rh"] == (1, 313, 56, 56) and g.shapes["class8_ab"] == (1, 2, 56, 56)
    assert g.nodes[-1].outputs == [] and g.nodes[-1].inputs == ["class8_ab"]


# ----------------------------------------------------------------------------- Parameter

PARAMETER = Case("parameter", (1, 3, 4, 5), [
    ("gamma", "Parameter", [], ["gamma"], "parameter_param { shape { dim: 3 } }"),
    ("table", "Parameter", [], ["table"], "parameter_param { shape { dim: 2 dim: 6 } }"),
    ("scaled", "Scale", ["data", "gamma"], ["scaled"], ""),
    ("shifted", "Bias", ["scaled", "gamma"], ["shifted"], ""),
], lambda x, W: {})


def test_parameter_is_a_learned_value_outside_the_batch(tmp_path):
    _, weights, pkg = make_package(tmp_path, render(PARAMETER, "V2"))
    W = blobs_of(weights)
    assert [w.shape for w in W["gamma"]] == [(3,)] and [w.shape for w in W["table"]] == [(2, 6)]
    # not batch-wise: fixed shapes in the manifest, and the ONNX output has no batch axis
    assert pkg.blobs["gamma"]["shape"] == [3] and pkg.blobs["gamma"]["batch_axis"] is None
    assert pkg.blobs["table"]["shape"] == [2, 6]
    assert pkg.blobs["shifted"]["shape"] == [None, 3, 4, 5]
    assert pkg.manifest["params"]["total"] == 3 + 12
    x = normal()(np.random.default_rng(1), (2, 3, 4, 5))
    g = W["gamma"][0].reshape(1, 3, 1, 1)
    ref = {"gamma": W["gamma"][0], "table": W["table"][0], "scaled": x * g, "shifted": x * g + g}
    got_onnx, got_torch = run_both(pkg, {"data": x}, list(ref))
    for v, r in ref.items():
        assert_close(r, got_onnx[v], f"{v}: onnx vs numpy")
        assert_close(r, got_torch[v], f"{v}: torch vs numpy")


def test_parameter_round_trips_through_caffe_blobs(tmp_path):
    """The torch module holds the blob as its parameter, in Caffe's layout (fine-tuning exports it)."""
    from convert import load_torch

    _, weights, pkg = make_package(tmp_path, render(PARAMETER, "V2"))
    net = load_torch(pkg)
    from convert.ir import build_graph
    from convert.parse import load_net_spec

    graph = build_graph(load_net_spec(pkg.dir / "deploy.prototxt"), blobs_of(weights))
    node = graph.node("table")
    back = node.converter.caffe_blobs(node, net.layers["table"])
    np.testing.assert_array_equal(back[0], blobs_of(weights)["table"][0])


# ----------------------------------------------------------------------------- Input with several tops

TWO_INPUTS = """name: "two_inputs"
layer { name: "input" type: "Input" top: "data" top: "aux"
  input_param { shape { dim: 1 dim: 3 dim: 5 dim: 5 } shape { dim: 1 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 4 } }
layer { name: "sum" type: "Eltwise" bottom: "ip" bottom: "aux" top: "sum" }
"""

SHARED_SHAPE = """name: "shared"
layer { name: "input" type: "Input" top: "a" top: "b" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
layer { name: "prod" type: "Eltwise" bottom: "a" bottom: "b" top: "prod" eltwise_param { operation: PROD } }
"""

LEGACY_TWO = """name: "legacy"
input: "aux"
input_shape { dim: 1 dim: 4 }
input: "data"
input_shape { dim: 1 dim: 3 dim: 5 dim: 5 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 4 } }
layer { name: "sum" type: "Eltwise" bottom: "ip" bottom: "aux" top: "sum" }
"""


@pytest.mark.parametrize("text", [TWO_INPUTS, LEGACY_TWO], ids=["input-layer", "input_shape"])
def test_several_inputs_convert(tmp_path, text):
    """The image input (the first 4-D one, wherever it is declared) gets the preprocessing; the
    other is recorded with its shape; verification fed both; both run at any batch."""
    _, weights, pkg = make_package(tmp_path, text, pre=None)
    m = pkg.manifest
    assert pkg.input_name == "data" and pkg.input_shape == [None, 3, 5, 5]
    assert m["inputs"]["aux"] == {"blob": "aux", "shape": [None, 4], "image": False}
    assert m["inputs"]["data"]["image"] is True
    assert m["preprocess"]["input_size"] == [5, 5]
    assert m["verification"]["inputs"] == {"data": [2, 3, 5, 5], "aux": [2, 4]}
    W = blobs_of(weights)
    rng = np.random.default_rng(2)
    x, aux = normal()(rng, (2, 3, 5, 5)), normal()(rng, (2, 4))
    ref = {"sum": ip_ref(conv_ref(x, *W["conv"]), *W["ip"]) + aux}
    got_onnx, got_torch = run_both(pkg, {"data": x, "aux": aux}, ["sum"])
    assert_close(ref["sum"], got_onnx["sum"], "sum: onnx vs numpy")
    assert_close(ref["sum"], got_torch["sum"], "sum: torch vs numpy")


def test_input_layer_with_one_shared_shape(tmp_path):
    _, _, pkg = make_package(tmp_path, SHARED_SHAPE, pre={"scale": 1.0})
    assert {n: i["shape"] for n, i in pkg.manifest["inputs"].items()} == {"a": [None, 2, 3, 3], "b": [None, 2, 3, 3]}
    rng = np.random.default_rng(3)
    a, b = normal()(rng, (2, 2, 3, 3)), normal()(rng, (2, 2, 3, 3))
    got_onnx, got_torch = run_both(pkg, {"a": a, "b": b}, ["prod"])
    assert_close(a * b, got_onnx["prod"], "prod: onnx vs numpy")
    assert_close(a * b, got_torch["prod"], "prod: torch vs numpy")


def test_input_layer_shape_count_must_fit_its_tops(tmp_path):
    from google.protobuf import text_format

    from convert import GraftError
    from convert.parse import net_spec
    from convert.proto import pb

    text = SHARED_SHAPE.replace("shape { dim: 1 dim: 2 dim: 3 dim: 3 } }", "shape { dim: 1 } shape { dim: 2 } shape { dim: 3 } }")
    with pytest.raises(GraftError, match="'input' has 2 tops but 3 shapes"):
        net_spec(text_format.Parse(text, pb.NetParameter()))


def test_extract_refuses_a_multi_input_package(tmp_path):
    pd = pytest.importorskip("pandas")
    from extract.pipeline import extract

    _, _, pkg = make_package(tmp_path, TWO_INPUTS)
    with pytest.raises(ValueError, match="takes 2 inputs"):
        extract(pkg.dir, ["sum"], pd.DataFrame({"path": ["x.jpg"]}), cache=tmp_path / "cache", progress=False)


IN_PLACE_ON_INPUT = """name: "bn_on_data"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 5 dim: 5 } } }
layer { name: "data/bn" type: "BatchNorm" bottom: "data" top: "data" }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 3 } }
"""


def test_an_input_overwritten_in_place_is_fed_under_its_value_name(tmp_path):
    """shufflenet_v2 and wechat_qrcode_detect normalise ``data`` in place: the fed value is
    ``data/pre_data/bn``, and ``data`` is Caffe's final (normalised) blob."""
    from test_convert_layers import bn_ref

    _, weights, pkg = make_package(tmp_path, IN_PLACE_ON_INPUT)
    assert pkg.input_name == "data/pre_data/bn" and pkg.manifest["input"]["blob"] == "data"
    assert pkg.blobs["data"]["layer"] == "data/bn" and pkg.blobs["data/pre_data/bn"]["kind"] == "input"
    W = blobs_of(weights)
    x = normal()(np.random.default_rng(4), (2, 3, 5, 5))
    ref = {"data": bn_ref(x, W["data/bn"]), "conv": conv_ref(bn_ref(x, W["data/bn"]), *W["conv"])}
    got_onnx, got_torch = run_both(pkg, {"data/pre_data/bn": x}, list(ref))
    for v, r in ref.items():
        assert_close(r, got_onnx[v], f"{v}: onnx vs numpy")
        assert_close(r, got_torch[v], f"{v}: torch vs numpy")
