"""VGG-Face: the ``vgg-face`` preset against the real released prototxts, and the V1 path end to
end on a reduced-width VGG-Face (the real V1 prototxt text with every num_output / 16 and a
64x64 input; the 580 MB full-size net is too slow for the suite)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from _convert_helpers import CAFFE, assert_close, cli, needs_testbed, run_ort, run_torch

pytestmark = needs_testbed

VGG = CAFFE / "vggface"
V1_PROTO = VGG / "VGG_FACE_deploy.v1_to_fc7.prototxt"
V2_PROTO = VGG / "VGG_FACE_deploy.v2_upgraded.prototxt"
VGG_MEAN = [93.5940, 104.7624, 129.1863]


def describe(layer) -> dict:
    """What must agree between two descriptions of the same layer."""
    d = {"name": layer.name, "type": layer.type, "bottoms": layer.bottoms, "tops": layer.tops}
    if layer.type == "Convolution":
        p = layer.param("convolution_param")
        d.update(num_output=p.num_output, kernel=list(p.kernel_size), pad=list(p.pad), stride=list(p.stride),
                 group=p.group, bias=p.bias_term)
    elif layer.type == "Pooling":
        p = layer.param("pooling_param")
        d.update(pool=p.pool, kernel=p.kernel_size, stride=p.stride, pad=p.pad)
    elif layer.type == "InnerProduct":
        d.update(num_output=layer.param("inner_product_param").num_output)
    elif layer.type == "Dropout":
        d.update(ratio=round(layer.param("dropout_param").dropout_ratio, 6))
    return d


def preset_spec():
    from google.protobuf import text_format

    from convert.parse import net_spec
    from convert.presets import get_preset
    from convert.proto import pb

    net = pb.NetParameter()
    text_format.Parse(get_preset("vgg-face").prototxt, net)
    return net_spec(net, source="preset")


def test_preset_equals_the_released_v2_prototxt_layer_by_layer():
    from convert.parse import load_net_spec

    real = load_net_spec(V2_PROTO)
    preset = preset_spec()
    assert preset.inputs == real.inputs == {"data": [1, 3, 224, 224]}
    assert [layer.name for layer in preset.layers] == [layer.name for layer in real.layers]
    for a, b in zip(preset.layers, real.layers):
        assert describe(a) == describe(b), a.name
    assert len(real.layers) == 13 + 13 + 5 + 3 + 2 + 2 + 1  # convs, relus, pools, fcs, relu6/7, drop6/7, prob
    assert describe(real.layers[-2])["num_output"] == 2622


def test_preset_names_the_identities_and_preprocessing():
    from convert.presets import get_preset

    p = get_preset("vgg-face")
    assert p.preprocess["mean"] == pytest.approx(VGG_MEAN)
    assert p.preprocess["channel_order"] == "bgr" and p.preprocess["scale"] == 1.0
    assert p.preprocess["resize"] == [224, 224]
    names = (VGG / "names.txt").read_text().splitlines()
    assert len([n for n in names if n.strip()]) == 2622


def test_real_v1_prototxt_parses_as_v1_and_matches_v2_up_to_fc7():
    from convert.ir import build_graph
    from convert.parse import load_net_spec

    v1 = load_net_spec(V1_PROTO)
    v2 = load_net_spec(V2_PROTO)
    assert v1.generation == "V1" and v2.generation == "V2"
    assert v1.inputs == {"data": [1, 3, 224, 224]}
    n = len(v1.layers)
    assert v1.layers[-1].name == "fc7"
    for a, b in zip(v1.layers, v2.layers[:n]):
        assert describe(a) == describe(b), a.name

    g = build_graph(v1, None)
    # relu6/drop6 run in place on fc6: Caffe's fc6 is post-ReLU, the raw value keeps a derived name
    assert g.values["fc6"] == {"layer": "drop6", "kind": "final", "blob": "fc6"}
    assert g.values["fc6/pre_relu6"]["kind"] == "pre_in_place" and g.values["fc6/pre_relu6"]["layer"] == "fc6"
    assert g.values["fc6/pre_drop6"]["layer"] == "relu6"
    # this copy comments out relu7/drop7: its fc7 is the raw InnerProduct output
    assert g.values["fc7"]["layer"] == "fc7" and "fc7/pre_relu7" not in g.values
    assert g.shapes["fc7"] == (1, 4096) and g.outputs == ["fc7"]

    full = build_graph(v2, None)
    assert full.values["fc7"]["layer"] == "drop7" and full.values["fc7"]["kind"] == "final"
    assert full.values["fc7/pre_relu7"] == {"layer": "fc7", "kind": "pre_in_place", "blob": "fc7"}
    assert full.values["fc7/pre_drop7"]["layer"] == "relu7"
    assert full.shapes["prob"] == (1, 2622)


def reduced_v1_text() -> str:
    """The real V1 prototxt, relu7/drop7 un-commented (as released), widths / 16, 64x64 input."""
    lines = V1_PROTO.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#layers"))
    fc8 = next(i for i, line in enumerate(lines) if "facefc8" in line)
    end = max(i for i in range(start, fc8) if lines[i].startswith("#layers"))
    for i in range(start, end):
        lines[i] = lines[i].replace("#", "", 1)
    text = "\n".join(lines[:end]) + "\n"
    text = re.sub(r"num_output: (\d+)", lambda m: f"num_output: {int(m.group(1)) // 16}", text)
    text = re.sub(r"input_dim: 224", "input_dim: 64", text)
    return text


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    from convert import convert_model
    from convert.generate import generate_caffemodel
    from convert.preprocess import build_preprocess

    d = tmp_path_factory.mktemp("vgg-small")
    proto = d / "vgg_face_small.v1.prototxt"
    proto.write_text(reduced_v1_text())
    weights = generate_caffemodel(proto, d / "vgg_face_small.caffemodel", layout="V1", seed=0)
    pre, _ = build_preprocess([1, 3, 64, 64], mean=VGG_MEAN, channel_order="bgr")
    pkg = convert_model(proto, weights, d / "pkg", "vgg-face-small", preprocess=pre, log=lambda _m: None)
    return proto, weights, pkg


def test_reduced_vgg_face_v1_converts_and_verifies(reduced):
    from convert.parse import load_net_spec
    from convert.weights import read_caffemodel

    proto, weights, pkg = reduced
    spec = load_net_spec(proto)
    assert spec.generation == "V1"
    assert [layer.type for layer in spec.layers].count("Convolution") == 13
    assert "layers {" in proto.read_text() and "type: CONVOLUTION" in proto.read_text()
    m = pkg.manifest
    assert m["source"]["prototxt"]["generation"] == "V1"
    assert m["source"]["caffemodel"]["generation"] == "V1"
    assert m["verification"]["passed"] is True
    assert pkg.outputs == ["fc7"]
    assert pkg.blobs["fc7"]["shape"] == [None, 256]
    assert pkg.blobs["fc7"]["layer"] == "drop7"
    assert pkg.blobs["fc7/pre_relu7"] == {"shape": [None, 256], "layer": "fc7", "kind": "pre_in_place", "type": "InnerProduct"}
    cm = read_caffemodel(weights)
    assert cm.generation == "V1"
    assert m["params"]["total"] == sum(b.size for lw in cm.layers.values() for b in lw.blobs)
    # V1 InnerProduct blobs are legacy 4-D (1, 1, out, in); the package keeps Caffe's (out, in)
    assert cm.layers["fc6"].blobs[0].shape == (1, 1, 256, 128)


def test_reduced_vgg_face_fc7_is_post_relu(reduced):
    from convert import load_torch

    _, _, pkg = reduced
    rng = np.random.default_rng(0)
    x = (rng.uniform(0, 255, (4, 3, 64, 64)) - np.asarray(VGG_MEAN).reshape(1, 3, 1, 1)).astype(np.float32)
    blobs = ["fc7", "fc7/pre_relu7", "fc7/pre_drop7", "fc6", "fc6/pre_relu6"]
    onnx_out = run_ort(pkg.onnx_path_for(blobs), {"data": x}, blobs)
    torch_out = run_torch(load_torch(pkg), x, blobs)
    for out in (onnx_out, torch_out):
        assert (out["fc7"] >= 0).all()
        assert (out["fc7/pre_relu7"] < 0).any() and (out["fc7/pre_relu7"] > 0).any()
        assert_close(np.maximum(out["fc7/pre_relu7"], 0), out["fc7"], "fc7 = relu(fc7/pre_relu7)")
        assert_close(out["fc7/pre_drop7"], out["fc7"], "drop7 is the identity")
        assert_close(np.maximum(out["fc6/pre_relu6"], 0), out["fc6"], "fc6 = relu(fc6/pre_relu6)")
    for b in blobs:
        assert_close(onnx_out[b], torch_out[b], f"{b} onnx vs torch")


def test_reduced_vgg_face_matches_opencv(reduced):
    from _convert_helpers import opencv_forward, opencv_net

    proto, weights, pkg = reduced
    net = opencv_net(proto, weights)
    assert net is not None
    x = np.random.default_rng(1).uniform(-128, 128, (1, 3, 64, 64)).astype(np.float32)
    ref = opencv_forward(net, x, ["conv5_3", "pool5", "fc6", "fc7"])
    ours = run_ort(pkg.onnx_path_for(["conv5_3", "pool5", "fc6/pre_relu6", "fc7/pre_relu7"]), {"data": x},
                   ["conv5_3", "pool5", "fc6/pre_relu6", "fc7/pre_relu7"])
    assert_close(ref["pool5"], ours["pool5"], "pool5")
    assert_close(ref["fc6"], ours["fc6/pre_relu6"], "fc6 layer output")
    assert_close(ref["fc7"], ours["fc7/pre_relu7"], "fc7 layer output")


def test_inspect_prints_layers_and_verification(reduced):
    _, _, pkg = reduced
    proc = cli("inspect", str(pkg.dir))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for layer in ("conv1_1", "conv5_3", "pool5", "fc6", "relu7", "drop7"):
        assert re.search(rf"^\s+{re.escape(layer)}\s", out, re.M), layer
    assert "verification: passed" in out
    assert "[V1]" in out
    assert f"{pkg.manifest['params']['total']:,} parameters" in out
    assert "fc7/pre_relu7 (N, 256)" in out
    js = cli("inspect", str(pkg.dir), "--json")
    assert js.returncode == 0 and '"format": "graft-model/1"' in js.stdout


def test_round_trip_safetensors_and_torch_equal_the_v1_caffemodel(reduced):
    """weights.safetensors holds every blob in Caffe's layout (legacy V1 4-D shapes undone),
    bit-equal to the caffemodel; the torch module's parameters are those arrays."""
    from safetensors.numpy import load_file

    from convert import load_torch
    from convert.weights import read_caffemodel

    _, weights, pkg = reduced
    tensors = load_file(str(pkg.dir / "weights.safetensors"))
    cm = read_caffemodel(weights)
    expected_keys = {f"{n}.{i}" for n, lw in cm.layers.items() for i in range(len(lw.blobs))}
    assert set(tensors) == expected_keys
    assert tensors["conv1_1.0"].shape == (4, 3, 3, 3) and tensors["conv1_1.1"].shape == (4,)
    assert tensors["fc6.0"].shape == (256, 128) and tensors["fc7.0"].shape == (256, 256)
    for key, arr in tensors.items():
        layer, _, i = key.rpartition(".")
        np.testing.assert_array_equal(arr.reshape(-1), cm.layers[layer].blobs[int(i)].reshape(-1), err_msg=key)
    net = load_torch(pkg)
    np.testing.assert_array_equal(net.layers["conv5_3"].weight.detach().numpy(), tensors["conv5_3.0"])
    np.testing.assert_array_equal(net.layers["fc6"].weight.detach().numpy(), tensors["fc6.0"])
