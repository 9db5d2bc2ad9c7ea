"""Any declared batch converts, and the package runs any batch with the same per-image results.

* a net declaring batch 10 (as BVLC AlexNet and VGG-16 do) runs batch 1 and batch 7;
* a Reshape that hard-codes a leading 1 keeps images apart (Caffe, fed N images, would put
  them all in one row);
* a net whose graph regroups its batch (TSM: 8 frames -> one 1x8xCxHxW clip) gives Caffe's
  result at its declared batch and runs multiples of it as independent clips;
* a Permute that moves the batch axis keeps it dynamic.

References are numpy, written here from Caffe's semantics (the helpers of
test_convert_layers); runs are onnxruntime on the package's ONNX and ``load_torch``.
"""

from __future__ import annotations

import numpy as np
import pytest
from _convert_helpers import CAFFE, assert_close, needs_testbed, ort_session
from test_convert_layers import conv_ref, ip_ref, normal, pool_ref, softmax_ref

BATCH10 = """name: "b10"
input: "data"
input_dim: 10
input_dim: 3
input_dim: 6
input_dim: 6
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "r0" type: "Reshape" bottom: "pool" top: "r0" reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "r10" type: "Reshape" bottom: "pool" top: "r10" reshape_param { shape { dim: 10 dim: -1 } } }
layer { name: "flat" type: "Flatten" bottom: "pool" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "r10" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""

LEADING_ONE = """name: "lead1"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "row" type: "Reshape" bottom: "conv" top: "row" reshape_param { shape { dim: 1 dim: -1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "row" top: "ip" inner_product_param { num_output: 3 } }
"""

# TSM's pattern at 4 frames: frames -> one clip (1x4xCxHxW), a temporal shift built from Slice,
# Concat and x - x (Eltwise coeff 1, -1), back to frames, a classifier, then per-clip scores
CLIP = """name: "clip"
input: "data"
input_dim: 4
input_dim: 3
input_dim: 5
input_dim: 5
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "view1" type: "Reshape" bottom: "conv" top: "clip" reshape_param { shape { dim: 1 dim: 4 dim: 4 dim: 5 dim: 5 } } }
layer { name: "sl" type: "Slice" bottom: "clip" top: "first" top: "rest" slice_param { axis: 1 slice_point: 1 } }
layer { name: "zero" type: "Eltwise" bottom: "first" bottom: "first" top: "zero" eltwise_param { operation: SUM coeff: 1 coeff: -1 } }
layer { name: "roll" type: "Concat" bottom: "rest" bottom: "first" top: "roll" concat_param { axis: 1 } }
layer { name: "shift" type: "Concat" bottom: "zero" bottom: "rest" top: "shift" concat_param { axis: 1 } }
layer { name: "view2" type: "Reshape" bottom: "shift" top: "frames" reshape_param { shape { dim: 4 dim: 4 dim: 5 dim: 5 } } }
layer { name: "pool" type: "Pooling" bottom: "frames" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "view3" type: "Reshape" bottom: "fc" top: "scores" reshape_param { shape { dim: 1 dim: 4 dim: 3 } } }
"""

PERMUTE = """name: "perm"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "swap" type: "Permute" bottom: "data" top: "swap" permute_param { order: 1 order: 0 order: 2 order: 3 } }
layer { name: "flat" type: "Flatten" bottom: "swap" top: "flat" }
layer { name: "back" type: "Permute" bottom: "swap" top: "back" permute_param { order: 1 order: 0 order: 2 order: 3 } }
"""


def package(tmp_path, text: str, name: str = "net", pre: dict | None = None):
    from convert import convert_model
    from convert.generate import generate_caffemodel
    from convert.weights import read_caffemodel

    proto = tmp_path / f"{name}.prototxt"
    proto.write_text(text)
    weights = generate_caffemodel(proto, tmp_path / f"{name}.caffemodel", seed=11)
    pkg = convert_model(proto, weights, tmp_path / name, name, preprocess=pre, log=lambda _m: None)
    W = {n: [np.array(b) for b in lw.blobs] for n, lw in read_caffemodel(weights).layers.items()}
    return pkg, W


class Runs:
    """onnxruntime and torch on one package, for any list of values."""

    def __init__(self, pkg):
        from convert import load_torch

        self.pkg, self.net = pkg, load_torch(pkg)
        self.sessions: dict[tuple[str, ...], object] = {}

    def __call__(self, x: np.ndarray, values: list[str]) -> tuple[dict, dict]:
        import torch

        key = tuple(values)
        if key not in self.sessions:
            self.sessions[key] = ort_session(self.pkg.onnx_path_for(values))
        sess = self.sessions[key]
        onnx_out = dict(zip(values, sess.run(values, {self.pkg.input_name: x})))
        with torch.inference_mode():
            out = self.net(torch.from_numpy(x), blobs=values)
        return onnx_out, {k: v.numpy() for k, v in out.items()}


def test_declared_batch_10_runs_batch_1_and_7(tmp_path):
    pkg, W = package(tmp_path, BATCH10)
    m = pkg.manifest
    assert m["batch"] == {"declared": 10, "multiple": 1}
    assert pkg.input_shape == [None, 3, 6, 6]
    assert {v: pkg.blobs[v]["shape"] for v in ("r0", "r10", "flat", "prob")} == {
        "r0": [None, 16], "r10": [None, 16], "flat": [None, 16], "prob": [None, 5]}
    assert m["verification"]["batch"] == 2  # not the declared 10: a baked batch would fail there
    sess = ort_session(pkg.onnx_path)
    assert pkg.outputs == ["r0", "flat", "prob"]
    assert sess.get_inputs()[0].shape == ["N", 3, 6, 6]
    assert {o.name: o.shape for o in sess.get_outputs()} == {"r0": ["N", 16], "flat": ["N", 16], "prob": ["N", 5]}

    run = Runs(pkg)
    values = ["conv", "pool", "r0", "r10", "flat", "ip", "prob"]
    x = normal(50.0)(np.random.default_rng(0), (7, 3, 6, 6))
    pool = pool_ref(np.maximum(conv_ref(x, *W["conv"]), 0), (2, 2), (2, 2))
    ip = ip_ref(pool.reshape(7, -1), *W["ip"])
    ref = {"pool": pool, "r0": pool.reshape(7, -1), "r10": pool.reshape(7, -1), "flat": pool.reshape(7, -1),
           "ip": ip, "prob": softmax_ref(ip, 1)}
    onnx7, torch7 = run(x, values)
    for v, r in ref.items():
        assert_close(r, onnx7[v], f"{v}: onnx batch 7 vs numpy")
        assert_close(r, torch7[v], f"{v}: torch batch 7 vs numpy")
    for i in range(7):  # batch 1, image by image: the same per-image results
        onnx1, torch1 = run(x[i:i + 1], values)
        for v in values:
            assert_close(onnx7[v][i:i + 1], onnx1[v], f"{v}: onnx image {i} alone vs in batch 7", rtol=1e-5, atol=1e-6)
            assert_close(torch7[v][i:i + 1], torch1[v], f"{v}: torch image {i} alone vs in batch 7", rtol=1e-5, atol=1e-6)


def test_a_leading_1_reshape_keeps_images_apart(tmp_path):
    """``dim: 1 dim: -1`` in a batch-1 net: one row per image at any batch (Caffe would make one
    row of all N images, and then fail the InnerProduct's input size)."""
    pkg, W = package(tmp_path, LEADING_ONE)
    assert pkg.blobs["row"]["shape"] == [None, 64] and pkg.blobs["ip"]["shape"] == [None, 3]
    x = normal()(np.random.default_rng(1), (3, 3, 4, 4))
    conv = conv_ref(x, *W["conv"])
    ref = ip_ref(conv.reshape(3, 64), *W["ip"])
    onnx_out, torch_out = Runs(pkg)(x, ["row", "ip"])
    assert_close(ref, onnx_out["ip"], "ip: onnx vs numpy, one row per image")
    assert_close(ref, torch_out["ip"], "ip: torch vs numpy, one row per image")
    assert_close(conv.reshape(3, 64), onnx_out["row"], "row: onnx")


def clip_ref(x: np.ndarray, W) -> dict[str, np.ndarray]:
    """Caffe's forward of CLIP at its declared batch of 4 frames (one clip)."""
    conv = conv_ref(x, *W["conv"], pad=(1, 1))
    clip = conv.reshape(1, 4, 4, 5, 5)
    first, rest = clip[:, :1], clip[:, 1:]
    shift = np.concatenate([first - first, rest], axis=1)
    pool = shift.reshape(4, 4, 5, 5).mean(axis=(2, 3), keepdims=True)
    fc = ip_ref(pool, *W["fc"])
    return {"clip": clip, "roll": np.concatenate([rest, first], axis=1), "shift": shift, "fc": fc,
            "scores": fc.reshape(1, 4, 3)}


def test_a_graph_that_groups_its_batch_runs_whole_groups(tmp_path):
    """4 frames make one clip: Caffe's result at the declared batch; 8 frames are two clips,
    each as if run alone; the batch axis of clip-level blobs is N/4."""
    pkg, W = package(tmp_path, CLIP)
    m = pkg.manifest
    assert m["batch"] == {"declared": 4, "multiple": 4}
    assert m["verification"]["batch"] == 8 and m["verification"]["passed"] is True
    assert pkg.blobs["clip"]["shape"] == [None, 4, 4, 5, 5] and pkg.blobs["clip"]["symbolic_shape"][0] == "N/4"
    assert "symbolic_shape" not in pkg.blobs["frames"] and pkg.blobs["scores"]["symbolic_shape"] == ["N/4", 4, 3]
    assert "multiples of 4" in pkg.summary()
    run = Runs(pkg)
    values = list(clip_ref(np.zeros((4, 3, 5, 5), np.float32), W))
    x = normal()(np.random.default_rng(2), (8, 3, 5, 5))
    onnx8, torch8 = run(x, values)
    for c in range(2):
        ref = clip_ref(x[4 * c:4 * c + 4], W)
        onnx4, torch4 = run(x[4 * c:4 * c + 4], values)
        for v, r in ref.items():
            assert_close(r, onnx4[v], f"{v}: onnx, declared batch, vs numpy")
            assert_close(r, torch4[v], f"{v}: torch, declared batch, vs numpy")
            assert_close(r, onnx8[v][c:c + 1] if v in ("clip", "roll", "shift", "scores") else onnx8[v][4 * c:4 * c + 4],
                         f"{v}: onnx clip {c} of a batch of 8 vs numpy")
            assert_close(r, torch8[v][c:c + 1] if v in ("clip", "roll", "shift", "scores") else torch8[v][4 * c:4 * c + 4],
                         f"{v}: torch clip {c} of a batch of 8 vs numpy")


def test_extract_refuses_a_grouped_batch(tmp_path):
    pd = pytest.importorskip("pandas")
    from extract.pipeline import extract

    pkg, _ = package(tmp_path, CLIP)
    with pytest.raises(ValueError, match="multiples of 4"):
        extract(pkg.dir, ["scores"], pd.DataFrame({"path": ["x.jpg"]}), cache=tmp_path / "cache", progress=False)


def test_permute_moves_the_batch_axis(tmp_path):
    pkg, _ = package(tmp_path, PERMUTE)
    assert pkg.blobs["swap"]["shape"] == [3, None, 4, 4] and pkg.blobs["swap"]["batch_axis"] == 1
    assert pkg.blobs["flat"]["symbolic_shape"] == [3, "16N"] and pkg.blobs["back"]["shape"] == [None, 3, 4, 4]
    x = normal()(np.random.default_rng(3), (2, 3, 4, 4))
    onnx_out, torch_out = Runs(pkg)(x, ["swap", "flat", "back"])
    ref = {"swap": x.transpose(1, 0, 2, 3), "flat": x.transpose(1, 0, 2, 3).reshape(3, -1), "back": x}
    for v, r in ref.items():
        assert_close(r, onnx_out[v], f"{v}: onnx")
        assert_close(r, torch_out[v], f"{v}: torch")
    out = ort_session(pkg.onnx_path_for(["swap"])).get_outputs()[0]
    assert out.shape == [3, "N", 4, 4]


@needs_testbed
@pytest.mark.parametrize(("folder", "batch", "step"), [("bvlc_alexnet", 10, 1), ("vgg16_ilsvrc", 10, 1),
                                                       ("resnet50_kaiming", 1, 1)])
def test_zoo_declared_batches(folder, batch, step):
    from convert.ir import build_graph
    from convert.parse import load_net_spec

    g = build_graph(load_net_spec(CAFFE / "zoo" / folder / "deploy.prototxt"), None)
    assert (g.batch, g.batch_multiple) == (batch, step)
    assert all(g.batch_axes[v] == 0 and g.batch_symbol(v) == "N" for v in g.shapes)


@needs_testbed
def test_tsm_groups_8_frames_into_a_clip():
    """TSM without its Reduction head (``--outputs``): 8 frames per clip, clip blobs N/8."""
    from convert.ir import build_graph
    from convert.parse import load_net_spec
    from convert.prune import prune

    spec = prune(load_net_spec(CAFFE / "zoo" / "tsm_resnet50_x2paddle" / "deploy.prototxt"), ["view_blob35"])
    g = build_graph(spec, None)
    assert (g.batch, g.batch_multiple) == (8, 8)
    assert g.shapes["view_blob2"] == (1, 8, 64, 56, 56) and g.batch_symbol("view_blob2") == "N/8"
    assert g.batch_symbol("view_blob3") == "N" and g.batch_symbol("fc_blob1") == "N"
    assert g.batch_symbol("view_blob35") == "N/8"
    reshapes = [n for n in g.nodes if n.type == "Reshape"]
    assert len(reshapes) == 34 and all(n.out_batch == [0] for n in reshapes)


@needs_testbed
def test_alexnet_declaring_batch_10_converts_and_runs_any_batch(tmp_path, capsys):
    """The issue's reproduction: AlexNet (Input 10x3x227x227) at --input-size 67, through the CLI."""
    import cli as graft_cli
    from convert import load_package
    from convert.generate import generate_caffemodel

    proto = CAFFE / "zoo" / "bvlc_alexnet" / "deploy.prototxt"
    weights = generate_caffemodel(proto, tmp_path / "alexnet.caffemodel", input_size=[67, 67])
    rc = graft_cli.main(["convert", "--prototxt", str(proto), "--caffemodel", str(weights), "--input-size", "67",
                         "--out", str(tmp_path / "alexnet")])
    out, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    pkg = load_package(tmp_path / "alexnet")
    assert pkg.input_shape == [None, 3, 67, 67] and pkg.manifest["batch"]["declared"] == 10
    sess = ort_session(pkg.onnx_path)
    x = normal(60.0)(np.random.default_rng(4), (3, 3, 67, 67))
    together = sess.run(["prob"], {"data": x})[0]
    alone = np.concatenate([sess.run(["prob"], {"data": x[i:i + 1]})[0] for i in range(3)])
    assert_close(together, alone, "alexnet prob: batch 3 vs one by one", rtol=1e-5, atol=1e-7)


DETECTIONS = """name: "dets"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 7 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 7 } }
layer { name: "det" type: "FakeDetections" bottom: "fc" top: "det" }
layer { name: "flat" type: "Flatten" bottom: "det" top: "flat" flatten_param { axis: 2 } }
"""


@pytest.fixture
def fake_detections(monkeypatch):
    """A DetectionOutput-like type: one [1, 1, K, 7] blob for the whole batch (keeps_batch
    False), K data-dependent (dynamic_axes); here K is just the number of rows it is given."""
    from convert import registry
    from convert.layers._common import Lambda

    class FakeDetections(registry.Converter):
        types = ("FakeDetections",)

        def keeps_batch(self, node):
            return False

        def dynamic_axes(self, node):
            return {0: {2: "detections"}}

        def infer(self, node, shapes):
            return [(1, 1, shapes[0][0], 7)]

        def onnx(self, node, b):
            b.add("Reshape", [node.inputs[0], b.const(f"{node.name}/shape", [1, 1, -1, 7], dtype="int64")], node.outputs,
                  name=node.name)

        def torch(self, node):
            return Lambda(lambda x: x.reshape(1, 1, -1, 7), "fake detections")

    monkeypatch.setitem(registry._REGISTRY, "FakeDetections", FakeDetections())


def test_keeps_batch_and_dynamic_axes_are_honoured(tmp_path, fake_detections):
    pkg, W = package(tmp_path, DETECTIONS, pre=None)
    det = pkg.blobs["det"]
    assert det["shape"] == [1, 1, None, 7] and det["batch_axis"] is None
    assert det["symbolic_shape"] == [1, 1, "detections", 7]
    assert pkg.blobs["fc"]["shape"] == [None, 7]
    sess = ort_session(pkg.onnx_path)
    # a Flatten after it keeps the data-dependent size free (no batch axis: none to keep)
    assert {o.name: o.shape for o in sess.get_outputs()} == {"flat": [1, 1, "7*detections"]}
    assert pkg.blobs["flat"]["shape"] == [1, 1, None] and pkg.blobs["flat"]["batch_axis"] is None
    x = normal()(np.random.default_rng(5), (3, 7))
    onnx_out, torch_out = Runs(pkg)(x, ["det", "flat"])
    ref = ip_ref(x, *W["fc"]).reshape(1, 1, 3, 7)
    for v, r in {"det": ref, "flat": ref.reshape(1, 1, 21)}.items():
        assert_close(r, onnx_out[v], f"{v}: onnx")
        assert_close(r, torch_out[v], f"{v}: torch")
