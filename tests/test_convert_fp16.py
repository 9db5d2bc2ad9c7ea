"""fp16 caffemodels: OpenCV's ``shrinkCaffeModel`` format (blobs as half floats in
``raw_data`` with ``raw_data_type: FLOAT16``, the format of OpenCV's own res10 face detector).

Copies of real test-bed models are shrunk by OpenCV itself into pytest's tmp_path, converted,
and checked against OpenCV reading the same fp16 file: every learned blob bit for bit (both
widen half floats to float32 exactly), every layer output within the suite's tolerance, and the
precision recorded in the manifest against a count made with the protobuf runtime.
"""

from __future__ import annotations

import numpy as np
import pytest
from _convert_helpers import (
    CAFFE,
    as_shape,
    assert_close,
    needs_testbed,
    opencv_forward,
    opencv_net,
    run_ort,
    run_torch,
)

pytestmark = needs_testbed

cv2 = pytest.importorskip("cv2")

#: name -> (prototxt, caffemodel, layer types to shrink (None: OpenCV's default, Convolution +
#: InnerProduct), expected precision)
MODELS = {
    "lenet": ("lenet/mnist_deploy.prototxt", "lenet/lenet_iter_10000.caffemodel", None, "float16"),
    "mtcnn-det3": ("mtcnn/det3.prototxt", "mtcnn/det3.caffemodel", None, "mixed"),  # PReLU slopes stay float32
    "mtcnn-det3-all": ("mtcnn/det3.prototxt", "mtcnn/det3.caffemodel", ["Convolution", "InnerProduct", "PReLU"], "float16"),
    "ultraface-rfb320": ("ultraface/RFB-320.prototxt", "ultraface/RFB-320.caffemodel", None, "float16"),
    "open_nsfw": ("open_nsfw/deploy.prototxt", "open_nsfw/resnet_50_1by2_nsfw.caffemodel", None, "mixed"),  # BN, Scale
}


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    """``shrunk(name)`` -> (prototxt, fp16 caffemodel written by OpenCV, package), made once."""
    from convert import convert_model

    root = tmp_path_factory.mktemp("fp16")
    cache = {}

    def get(name):
        if name not in cache:
            proto, weights, types, _ = MODELS[name]
            half = root / f"{name}.fp16.caffemodel"
            cv2.dnn.shrinkCaffeModel(str(CAFFE / weights), str(half), types or [])
            pkg = convert_model(CAFFE / proto, half, root / name, name, log=lambda _m: None)
            cache[name] = (CAFFE / proto, half, pkg)
        return cache[name]

    return get


def stored_precisions(path) -> dict[tuple[str, int], str]:
    """(layer, blob index) -> how the file stores it, read with the protobuf runtime (not graft's reader)."""
    from convert.proto import pb

    net = pb.NetParameter.FromString(path.read_bytes())
    kinds = {}
    for layer in list(net.layer) + list(net.layers):
        for i, b in enumerate(layer.blobs):
            fp16 = b.HasField("raw_data") and b.raw_data_type == pb.BlobProto.FLOAT16
            kinds[layer.name, i] = "float16" if fp16 else ("other" if b.HasField("raw_data") else "float32")
    return kinds


def package_weights(pkg) -> dict[str, list[np.ndarray]]:
    from convert.store import WEIGHTS_FILE, group_by_layer, read_safetensors

    return group_by_layer(read_safetensors(pkg.dir / WEIGHTS_FILE))


@pytest.mark.parametrize("model", list(MODELS))
def test_fp16_blobs_match_opencv_and_manifest_records_precision(shrunk, model):
    from convert.weights import read_caffemodel

    proto, half, pkg = shrunk(model)
    kinds = stored_precisions(half)
    counts = {k: list(kinds.values()).count(k) for k in sorted(set(kinds.values()))}
    assert counts.get("float16", 0) > 0 and "other" not in counts, counts
    src = pkg.manifest["source"]["caffemodel"]
    assert src["precision"] == MODELS[model][3]
    assert src["blob_precisions"] == dict(sorted(counts.items()))
    assert "float16" in pkg.summary().splitlines()[2]  # inspect's caffemodel line

    net = opencv_net(proto, half)
    assert net is not None, f"OpenCV cannot read {half}"
    original = read_caffemodel(CAFFE / MODELS[model][1])
    ours = package_weights(pkg)
    assert ours, "no learned blobs in the package"
    for layer, blobs in ours.items():
        for i, w in enumerate(blobs):
            assert w.dtype == np.float32, f"{layer} blob {i}: {w.dtype}"
            cv = net.getParam(layer, i)
            assert cv.size == w.size, f"{layer} blob {i}: OpenCV holds {cv.shape}, graft {w.shape}"
            assert np.array_equal(cv.reshape(-1), w.reshape(-1)), f"{layer} blob {i} differs from OpenCV's"
            # and it is the float32 original rounded to half (or the original, where not shrunk)
            o = original.layers[layer].blobs[i]
            expected = o.astype(np.float16).astype(np.float32) if kinds[layer, i] == "float16" else o
            assert np.array_equal(w, expected.reshape(w.shape)), f"{layer} blob {i} is not the original rounded to half"
    original.close()


# UltraFace's Reshapes name batch 1 explicitly (dim: 1), so it runs at batch 1; the others at 2.
@pytest.mark.parametrize(("model", "batch"), [("lenet", 2), ("mtcnn-det3", 2), ("ultraface-rfb320", 1)])
def test_fp16_layer_outputs_match_opencv(shrunk, model, batch):
    from convert import load_torch

    proto, half, pkg = shrunk(model)
    x = np.random.default_rng(0).uniform(-1, 1, size=[batch] + pkg.input_shape[1:]).astype(np.float32)
    layers = {li["name"]: li["tops"][0] for li in pkg.manifest["layers"] if li["type"] != "Split"}
    ref = opencv_forward(opencv_net(proto, half), x, list(layers))
    got_onnx = run_ort(pkg.onnx_path_for(list(layers.values())), {pkg.input_name: x}, list(layers.values()))
    got_torch = run_torch(load_torch(pkg), x, list(layers.values()))
    for name, value in layers.items():
        assert_close(as_shape(ref[name], got_onnx[value].shape), got_onnx[value], f"{model}: {name} onnx vs OpenCV")
        assert_close(as_shape(ref[name], got_torch[value].shape), got_torch[value], f"{model}: {name} torch vs OpenCV")


def test_opencv_computes_fp16_models_in_float32(shrunk, tmp_path):
    """OpenCV (CPU) widens half floats at import and then computes in float32: the fp16 file and
    a float32 file holding the widened values give it bit-identical outputs."""
    from convert.proto import pb

    proto, half, pkg = shrunk("mtcnn-det3")
    net = pb.NetParameter.FromString(half.read_bytes())
    for layer in net.layer:
        for b in layer.blobs:
            if b.HasField("raw_data"):
                b.data.extend(np.frombuffer(b.raw_data, "<f2").astype(np.float32).tolist())
                b.ClearField("raw_data")
                b.ClearField("raw_data_type")
    wide = tmp_path / "det3.widened.caffemodel"
    wide.write_bytes(net.SerializeToString())
    x = np.random.default_rng(1).uniform(-1, 1, size=[1] + pkg.input_shape[1:]).astype(np.float32)
    outs = pkg.outputs
    a = opencv_forward(opencv_net(proto, half), x, outs)
    b = opencv_forward(opencv_net(proto, wide), x, outs)
    for o in outs:
        assert np.array_equal(a[o], b[o]), o


# ----------------------------------------------------------------------------- bad raw_data


def _tiny_fp16(tmp_path, mutate):
    """A generated 2-layer net shrunk by OpenCV, then one blob's raw_data edited by ``mutate``."""
    from convert.generate import generate_caffemodel
    from convert.proto import pb

    proto = tmp_path / "net.prototxt"
    proto.write_text('name: "t"\ninput: "data"\ninput_shape { dim: 1 dim: 2 dim: 5 dim: 5 }\n'
                     'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
                     'convolution_param { num_output: 3 kernel_size: 3 } }\n')
    full = generate_caffemodel(proto, tmp_path / "net.caffemodel", seed=0)
    half = tmp_path / "net.fp16.caffemodel"
    cv2.dnn.shrinkCaffeModel(str(full), str(half))
    net = pb.NetParameter.FromString(half.read_bytes())
    blob = net.layer[0].blobs[0]
    assert blob.raw_data_type == pb.BlobProto.FLOAT16
    patch = mutate(blob)
    data = net.SerializeToString()
    half.write_bytes(patch(data) if patch else data)
    return proto, half


def _type_9(blob):
    """raw_data_type 9 (no such enum value: the protobuf runtime refuses to set it, so patch the
    bytes of a UINT tag, field 10 varint 4, into 9)."""
    blob.raw_data_type = 4
    return lambda data: data.replace(b"\x50\x04", b"\x50\x09") if data.count(b"\x50\x04") == 1 else pytest.fail("tag")


@pytest.mark.parametrize(("mutate", "needles"), [
    (lambda b: setattr(b, "raw_data", b.raw_data[:-1]), ("odd", "FLOAT16 raw_data of 107 bytes", "2-byte")),
    (lambda b: setattr(b, "raw_data", b.raw_data[:-2]), ("short", "holds 54 values but the file has 53")),
    (lambda b: setattr(b, "raw_data_type", 3), ("int", "unsupported raw_data_type INT")),
    (_type_9, ("unknown", "unsupported raw_data_type 9")),
    (lambda b: b.ClearField("raw_data_type"), ("untyped", "raw_data without raw_data_type")),
    (lambda b: b.data.extend([1.0] * 54), ("both", "both float data and raw_data")),
], ids=lambda v: v[0] if isinstance(v, tuple) else "")
def test_bad_raw_data_is_one_line_naming_file_and_layer(tmp_path, mutate, needles):
    from convert import GraftError, convert_model

    proto, half = _tiny_fp16(tmp_path, mutate)
    with pytest.raises(GraftError) as err:
        convert_model(proto, half, tmp_path / "pkg", "t", preprocess={"scale": 1.0}, log=lambda _m: None)
    msg = str(err.value)
    assert "\n" not in msg
    for n in (str(half), "layer 'conv' blob 0", *needles[1:]):
        assert n in msg, f"{n!r} not in {msg!r}"
    assert not (tmp_path / "pkg").exists()


def test_float32_caffemodel_records_float32(tmp_path):
    from convert import convert_model
    from convert.generate import generate_caffemodel

    proto = tmp_path / "net.prototxt"
    proto.write_text('name: "t"\ninput: "data"\ninput_shape { dim: 1 dim: 3 dim: 5 dim: 5 }\n'
                     'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
                     'convolution_param { num_output: 2 kernel_size: 3 } }\n')
    pkg = convert_model(proto, generate_caffemodel(proto, tmp_path / "net.caffemodel"), tmp_path / "pkg", "t", log=lambda _m: None)
    src = pkg.manifest["source"]["caffemodel"]
    assert (src["precision"], src["blob_precisions"]) == ("float32", {"float32": 2})
    assert pkg.summary().splitlines()[2].endswith("  float32")
