"""convert/ on the real pretrained Caffe models of the test bed, checked against independent
implementations: OpenCV's own Caffe importer (every layer output), the UltraFace authors' ONNX
export, and the models' known behaviour (LeNet reads digits, softmaxes sum to 1).

Each model is converted once per session (``convert_model``) into a temporary folder.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from _convert_helpers import (
    CAFFE,
    as_shape,
    assert_close,
    layer_outputs,
    needs_testbed,
    opencv_forward,
    opencv_net,
    run_ort,
    run_torch,
)

pytestmark = needs_testbed

cv2 = pytest.importorskip("cv2")

#: name -> (prototxt, caffemodel, preprocessing flags for build_preprocess)
MODELS = {
    "lenet": ("lenet/mnist_deploy.prototxt", "lenet/lenet_iter_10000.caffemodel",
              dict(channel_order="gray", scale=1 / 256)),
    "mtcnn-det1": ("mtcnn/det1.prototxt", "mtcnn/det1.caffemodel",
                   dict(channel_order="rgb", mean="127.5", scale=0.0078125)),
    "mtcnn-det2": ("mtcnn/det2.prototxt", "mtcnn/det2.caffemodel",
                   dict(channel_order="rgb", mean="127.5", scale=0.0078125)),
    "mtcnn-det3": ("mtcnn/det3.prototxt", "mtcnn/det3.caffemodel",
                   dict(channel_order="rgb", mean="127.5", scale=0.0078125)),
    "ultraface-rfb320": ("ultraface/RFB-320.prototxt", "ultraface/RFB-320.caffemodel",
                         dict(channel_order="rgb", mean="127", scale=1 / 128)),
    "open_nsfw": ("open_nsfw/deploy.prototxt", "open_nsfw/resnet_50_1by2_nsfw.caffemodel",
                  dict(channel_order="bgr", mean="104,117,123", resize="256", crop=224)),
}


def paths(name):
    proto, weights, _ = MODELS[name]
    return CAFFE / proto, CAFFE / weights


@pytest.fixture(scope="session")
def packages(tmp_path_factory):
    """Lazily convert each model once: ``packages(name)`` -> ModelPackage."""
    from convert import convert_model
    from convert.parse import load_net_spec
    from convert.preprocess import build_preprocess

    root = tmp_path_factory.mktemp("real-packages")
    cache = {}

    def get(name):
        if name not in cache:
            proto, weights = paths(name)
            shape = list(next(iter(load_net_spec(proto).inputs.values())))
            pre, _ = build_preprocess(shape, **MODELS[name][2])
            cache[name] = convert_model(proto, weights, root / name, name, preprocess=pre, log=lambda _m: None)
        return cache[name]

    return get


def model_input(pkg, batch: int = 1, seed: int = 0) -> np.ndarray:
    """Random 0..255 'images' through the package's mean and scale: the net's real input range."""
    shape = [batch] + pkg.input_shape[1:]
    x = np.random.default_rng(seed).uniform(0, 255, size=shape)
    pre = pkg.preprocess
    if pre.get("mean"):
        x = x - np.asarray(pre["mean"]).reshape(1, -1, 1, 1)
    return (x * pre["scale"]).astype(np.float32)


def all_values(pkg) -> list[str]:
    return [b for b, info in pkg.blobs.items() if info["kind"] != "input"]


# ----------------------------------------------------------------------------- vs OpenCV


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
@pytest.mark.parametrize("model", list(MODELS))
def test_every_layer_output_matches_opencv(packages, model, runtime):
    from convert import load_torch

    pkg = packages(model)
    x = model_input(pkg)
    values = all_values(pkg)
    if runtime == "onnx":
        ours = run_ort(pkg.onnx_path_for(values), {pkg.input_name: x}, values)
    else:
        ours = run_torch(load_torch(pkg), x, values)
    layers = {layer["name"]: layer["tops"][0] for layer in pkg.manifest["layers"]}
    # Split copies its bottom (OpenCV reports the copy under another id); all else is compared.
    names = [n for n, info in zip(layers, pkg.manifest["layers"]) if info["type"] != "Split"]
    net = opencv_net(*paths(model))
    assert net is not None, f"OpenCV cannot read {model}"
    ref = opencv_forward(net, x, names)
    assert len(names) == len(pkg.manifest["layers"]) - sum(1 for li in pkg.manifest["layers"] if li["type"] == "Split")
    for name in names:
        value = layers[name]
        assert_close(as_shape(ref[name], ours[value].shape), ours[value], f"{model} {runtime}: layer {name} -> {value}")


def test_onnx_and_torch_agree_on_every_blob(packages):
    """Round trip of the package: load_torch(pkg) and onnxruntime on the package's ONNX."""
    from convert import load_torch

    for model in ("open_nsfw", "ultraface-rfb320", "mtcnn-det3"):
        pkg = packages(model)
        x = model_input(pkg, seed=3)
        values = all_values(pkg)
        a = run_ort(pkg.onnx_path_for(values), {pkg.input_name: x}, values)
        b = run_torch(load_torch(pkg), x, values)
        for v in values:
            assert_close(a[v], b[v], f"{model}: {v} onnx vs torch")


def test_default_onnx_outputs_are_the_net_outputs(packages):
    from convert import load_torch

    pkg = packages("mtcnn-det3")
    assert pkg.outputs == ["conv6-2", "conv6-3", "prob1"]
    assert pkg.onnx_path_for(pkg.outputs) == pkg.onnx_path
    x = model_input(pkg, seed=5)
    a = run_ort(pkg.onnx_path, {pkg.input_name: x}, pkg.outputs)
    with __import__("torch").inference_mode():
        b = {k: v.numpy() for k, v in load_torch(pkg)(__import__("torch").from_numpy(x)).items()}
    assert sorted(b) == sorted(pkg.outputs)
    for v in pkg.outputs:
        assert_close(a[v], b[v], v)
    np.testing.assert_allclose(a["prob1"].sum(axis=1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- dynamic batch


@pytest.mark.parametrize("model", ["mtcnn-det2", "ultraface-rfb320", "lenet"])
def test_batch_of_three_equals_three_single_runs(packages, model):
    from convert import load_torch

    pkg = packages(model)
    assert pkg.input_shape[0] is None
    values = all_values(pkg)
    xs = [model_input(pkg, seed=s) for s in (10, 11, 12)]
    batch = np.concatenate(xs)
    path = pkg.onnx_path_for(values)
    together = run_ort(path, {pkg.input_name: batch}, values)
    net = load_torch(pkg)
    together_torch = run_torch(net, batch, pkg.outputs)
    for i, x in enumerate(xs):
        single = run_ort(path, {pkg.input_name: x}, values)
        for v in values:
            # Permute may move the batch axis; the blob's manifest shape says where it is
            axis = pkg.blobs[v]["shape"].index(None) if None in pkg.blobs[v]["shape"] else 0
            part = np.take(together[v], [i], axis=axis)
            assert_close(single[v], part, f"{model}: {v} item {i} of a batch of 3")
        for v in pkg.outputs:
            assert_close(single[v], together_torch[v][i:i + 1], f"{model}: torch {v} item {i} of a batch of 3")


# ----------------------------------------------------------------------------- model behaviour


def _lenet_samples():
    files = sorted((CAFFE / "lenet" / "samples").glob("img_*_*.png"))
    return [(f, int(f.stem.split("_")[1])) for f in files]


@pytest.mark.parametrize("scale", [1 / 256, 1.0], ids=["recipe-1by256", "raw-0to255"])
def test_lenet_reads_the_sample_digits(packages, scale):
    from convert import load_torch

    pkg = packages("lenet")
    samples = _lenet_samples()
    assert len(samples) == 10
    imgs = []
    for f, _ in samples:
        img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        assert img is not None and img.shape == (28, 28), f
        imgs.append(img.astype(np.float32) * np.float32(scale))
    x = np.stack(imgs)[:, None]
    labels = np.array([d for _, d in samples])
    out = pkg.outputs[0]
    onnx_prob = run_ort(pkg.onnx_path, {pkg.input_name: x}, [out])[out]
    torch_prob = run_torch(load_torch(pkg), x, [out])[out]
    assert onnx_prob.shape == (10, 10)
    np.testing.assert_array_equal(onnx_prob.argmax(1), labels)
    np.testing.assert_array_equal(torch_prob.argmax(1), labels)
    np.testing.assert_allclose(onnx_prob.sum(1), 1.0, atol=1e-5)
    class_names = (CAFFE / "lenet" / "labels.txt").read_text().split()
    assert [class_names[i] for i in onnx_prob.argmax(1)] == [class_names[d] for d in labels]


def _nsfw_photo() -> np.ndarray:
    img = cv2.imread(str(CAFFE / "mtcnn" / "test1.jpg"), cv2.IMREAD_COLOR)  # BGR
    img = cv2.resize(img, (256, 256), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    img = img[16:240, 16:240] - np.array([104, 117, 123], np.float32)
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None])


def test_open_nsfw_real_photo_prob_matches_opencv(packages):
    from convert import load_torch

    pkg = packages("open_nsfw")
    x = _nsfw_photo()
    assert x.shape == (1, 3, 224, 224)
    net = opencv_net(*paths("open_nsfw"))
    ref = opencv_forward(net, x, ["prob", "pool"])
    ours = run_ort(pkg.onnx_path_for(["prob", "pool"]), {"data": x}, ["prob", "pool"])
    ours_t = run_torch(load_torch(pkg), x, ["prob", "pool"])
    assert ours["prob"].shape == (1, 2)
    np.testing.assert_allclose(ours["prob"].sum(), 1.0, atol=1e-5)
    for got in (ours, ours_t):
        assert_close(ref["prob"], got["prob"], "open_nsfw prob on a real photo")
        assert_close(as_shape(ref["pool"], got["pool"].shape), got["pool"], "open_nsfw pool on a real photo")
    assert ours["pool"].shape == (1, 1024, 1, 1)


def test_ultraface_matches_the_authors_onnx_export(packages):
    from convert import load_torch

    pkg = packages("ultraface-rfb320")
    img = cv2.cvtColor(cv2.imread(str(CAFFE / "mtcnn" / "test1.jpg")), cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (320, 240)).astype(np.float32)
    x = np.ascontiguousarray(((img - 127.0) / 128.0).transpose(2, 0, 1)[None])
    authors = CAFFE / "ultraface" / "version-RFB-320_without_postprocessing.onnx"
    ref = run_ort(authors, {"input": x}, ["boxes", "scores"])
    ours = run_ort(pkg.onnx_path, {pkg.input_name: x}, ["boxes", "scores"])
    ours_t = run_torch(load_torch(pkg), x, ["boxes", "scores"])
    assert ref["boxes"].shape == (1, 4420, 4) and ref["scores"].shape == (1, 4420, 2)
    for got in (ours, ours_t):
        assert_close(ref["boxes"], got["boxes"], "ultraface boxes vs authors' ONNX")
        assert_close(ref["scores"], got["scores"], "ultraface scores vs authors' ONNX")
    # a real photo with faces: some anchors are confident faces, and scores are softmaxes
    np.testing.assert_allclose(ours["scores"].sum(-1), 1.0, atol=1e-5)
    assert (ours["scores"][0, :, 1] > 0.7).any()


# ----------------------------------------------------------------------------- manifest


def test_open_nsfw_in_place_chain_is_named_and_correct(packages):
    from convert import load_torch
    from convert.weights import read_caffemodel

    pkg = packages("open_nsfw")
    chain = [("conv_1/pre_bn_1", "conv_1", "pre_in_place"), ("conv_1/pre_scale_1", "bn_1", "pre_in_place"),
             ("conv_1/pre_relu_1", "scale_1", "pre_in_place"), ("conv_1", "relu_1", "final")]
    for blob, layer, kind in chain:
        assert pkg.blobs[blob]["layer"] == layer, blob
        assert pkg.blobs[blob]["kind"] == kind, blob
        assert pkg.blobs[blob]["shape"] == [None, 64, 112, 112], blob
    by_name = {li["name"]: li for li in pkg.manifest["layers"]}
    assert by_name["bn_1"]["bottoms"] == ["conv_1/pre_bn_1"] and by_name["bn_1"]["tops"] == ["conv_1/pre_scale_1"]
    assert by_name["relu_1"]["tops"] == ["conv_1"]

    x = model_input(pkg, seed=7)
    names = [c[0] for c in chain]
    v = run_ort(pkg.onnx_path_for(names), {"data": x}, names)
    t = run_torch(load_torch(pkg), x, names)
    cm = read_caffemodel(paths("open_nsfw")[1])
    mean, var, s = (b.reshape(-1).astype(np.float64) for b in cm.layers["bn_1"].blobs)
    f = 0.0 if s[0] == 0 else 1.0 / s[0]
    gamma, beta = (b.reshape(-1).astype(np.float64) for b in cm.layers["scale_1"].blobs)
    bn = (v["conv_1/pre_bn_1"] - (mean * f)[:, None, None]) / np.sqrt(var * f + 1e-5)[:, None, None]
    scaled = bn * gamma[:, None, None] + beta[:, None, None]
    for got in (v, t):
        assert_close(bn, got["conv_1/pre_scale_1"], "BatchNorm with moving-average factor")
        assert_close(scaled, got["conv_1/pre_relu_1"], "Scale with bias")
        assert_close(np.maximum(scaled, 0), got["conv_1"], "in-place ReLU")
    assert (v["conv_1/pre_relu_1"] < 0).any() and (v["conv_1"] >= 0).all()


@pytest.mark.parametrize("model", list(MODELS))
def test_manifest_params_sources_and_verification(packages, model):
    from safetensors.numpy import load_file

    from convert.parse import load_net_spec
    from convert.weights import read_caffemodel

    pkg = packages(model)
    proto, weights = paths(model)
    m = json.loads((pkg.dir / "manifest.json").read_text())
    assert m["format"] == "graft-model/1" and m["name"] == model
    deploy = {layer.name for layer in load_net_spec(proto).layers}
    cm = read_caffemodel(weights)
    expected = sum(b.size for name, lw in cm.layers.items() if name in deploy for b in lw.blobs)
    assert m["params"]["total"] == expected
    assert sum(li["params"] for li in m["layers"]) == expected
    assert m["source"]["prototxt"]["sha256"] == hashlib.sha256(proto.read_bytes()).hexdigest()
    assert m["source"]["caffemodel"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert m["weights_sha256"] == hashlib.sha256((pkg.dir / "weights.safetensors").read_bytes()).hexdigest()
    assert m["source"]["prototxt"]["generation"] == "V2"
    ver = m["verification"]
    assert ver["passed"] is True and not ver["failed"]
    assert set(ver["blobs"]) == {b for b, i in m["blobs"].items() if i["kind"] != "input"}
    assert all(s["passed"] for s in ver["blobs"].values())
    # safetensors holds exactly the deploy layers' blobs, equal to the caffemodel's
    tensors = load_file(str(pkg.dir / "weights.safetensors"))
    assert sum(t.size for t in tensors.values()) == expected
    for key, arr in tensors.items():
        layer, _, idx = key.rpartition(".")
        assert layer in deploy, key
        src = cm.layers[layer].blobs[int(idx)]
        assert arr.size == src.size and arr.dtype == np.float32
        np.testing.assert_array_equal(arr.reshape(-1), src.reshape(-1), err_msg=key)
    for f in ("manifest.json", "model.onnx", "weights.safetensors", "deploy.prototxt"):
        assert (pkg.dir / f).is_file(), f


@pytest.mark.parametrize("model", ["mtcnn-det1", "mtcnn-det2", "mtcnn-det3"])
def test_mtcnn_training_only_layers_of_the_caffemodel_are_ignored(packages, model):
    from convert.parse import load_net_spec
    from convert.weights import read_caffemodel

    proto, weights = paths(model)
    cm = read_caffemodel(weights)
    deploy = {layer.name for layer in load_net_spec(proto).layers}
    extra = {n: lw.type for n, lw in cm.layers.items() if n not in deploy}
    assert {"HDF5Data", "SoftmaxWithLoss", "EuclideanLoss", "Accuracy"} <= set(extra.values())
    pkg = packages(model)
    names = {li["name"] for li in pkg.manifest["layers"]}
    assert names == deploy
    assert not names & set(extra)
    assert pkg.manifest["verification"]["passed"] is True
    # det2's caffemodel even has a trained InnerProduct 'conv5-3' the deploy net does not use
    if model == "mtcnn-det2":
        assert extra.get("conv5-3") == "InnerProduct" and cm.layers["conv5-3"].blobs
        assert "conv5-3" not in pkg.blobs


def test_fully_convolutional_pnet_at_another_input_size(tmp_path):
    """--input-size on det1 (PNet): shapes follow the new size and values still match OpenCV."""
    from convert import convert_model, load_torch
    proto, weights = paths("mtcnn-det1")
    pkg = convert_model(proto, weights, tmp_path / "pnet", "pnet", input_size=[30, 41], log=lambda _m: None)
    assert pkg.input_shape == [None, 3, 30, 41]
    assert pkg.blobs["prob1"]["shape"] == [None, 2, 10, 16]
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 30, 41)).astype(np.float32)
    net = opencv_net(proto, weights)
    ref = opencv_forward(net, x, ["prob1", "conv4-2"])
    ours = run_ort(pkg.onnx_path, {"data": x}, ["conv4-2", "prob1"])
    ours_t = run_torch(load_torch(pkg), x, ["conv4-2", "prob1"])
    for got in (ours, ours_t):
        for b in ("prob1", "conv4-2"):
            assert_close(ref[b], got[b], f"pnet 30x41 {b}")


def test_layer_output_map_is_consistent(packages):
    """Every manifest layer's tops are blobs produced by that layer (helper sanity for OpenCV mapping)."""
    from convert.ir import build_graph
    from convert.parse import load_net_spec
    from convert.weights import read_caffemodel

    pkg = packages("ultraface-rfb320")
    proto, weights = paths("ultraface-rfb320")
    cm = read_caffemodel(weights)
    graph = build_graph(load_net_spec(proto), {n: lw.blobs for n, lw in cm.layers.items()})
    assert layer_outputs(graph) == {li["name"]: li["tops"][0] for li in pkg.manifest["layers"]}
    for li in pkg.manifest["layers"]:
        for t in li["tops"]:
            assert pkg.blobs[t]["layer"] == li["name"]


def test_onnx_nodes_carry_the_layer_names(packages):
    """A deployed graph reads like the prototxt: each layer's (final) node is named after the
    layer, without a uniquifying suffix (node and value names are separate namespaces)."""
    import onnx

    for model in ("open_nsfw", "ultraface-rfb320"):
        pkg = packages(model)
        nodes = {n.name for n in onnx.load(str(pkg.onnx_path), load_external_data=False).graph.node}
        layers = [li["name"] for li in pkg.manifest["layers"]]
        missing = [n for n in layers if n not in nodes]
        assert not missing, f"{model}: no ONNX node named after layer(s) {missing[:5]}"
