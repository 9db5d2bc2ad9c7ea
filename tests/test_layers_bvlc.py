"""BVLC Caffe's remaining deploy-time layers (ArgMax, Reduction, MVN, Tile, Embed, SPP) and
Eltwise's corner cases, in tiny generated nets at batch 2, ONNX (onnxruntime) and torch each
against a reference:

* numpy references written here from Caffe's C++ (argmax_layer.cpp, reduction_layer.cpp,
  mvn_layer.cpp, tile_layer.cpp, embed_layer.cpp, spp_layer.cpp, eltwise_layer.cpp), with
  Caffe's pooling loop from test_convert_layers for SPP's levels;
* OpenCV's Caffe importer where it runs the layer (MVN, Eltwise with two or more bottoms;
  it cannot create ArgMax, Reduction, Embed or SPP, and its Tile wants ONNX's ``repeats``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _convert_helpers import CAFFE, as_shape, assert_close, needs_testbed, opencv_net, run_ort, run_torch
from test_convert_layers import Case, normal, pool_ref, render

COVERED_TYPES = {"ArgMax", "Reduction", "MVN", "Tile", "Embed", "SPP", "Eltwise"}

# V1 enum names of the types used here that have one (caffe-semantics.md, "Formats")
V1_NAMES = {"ArgMax": "ARGMAX", "MVN": "MVN", "Eltwise": "ELTWISE", "Power": "POWER", "AbsVal": "ABSVAL",
            "Slice": "SLICE", "Concat": "CONCAT"}


# ----------------------------------------------------------------------------- numpy references


def argmax_ref(x, top_k=1, out_max_val=False, axis=None):
    """argmax_layer.cpp: (value, index) pairs partially sorted with std::greater, so equal values
    come out with the higher index first; indices are stored as floats."""

    def top(row):
        return sorted(((float(v), j) for j, v in enumerate(row)), reverse=True)[:top_k]

    if axis is None:
        rows = x.reshape(x.shape[0], -1)
        out = np.zeros((x.shape[0], 2 if out_max_val else 1, top_k), np.float64)
        for i, row in enumerate(rows):
            pairs = top(row)
            out[i, 0] = [j for _, j in pairs]
            if out_max_val:
                out[i, 1] = [v for v, _ in pairs]
        return out.reshape(out.shape + (1,) * (x.ndim - 3))
    moved = np.moveaxis(x, axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    out = np.array([[v if out_max_val else j for v, j in top(row)] for row in flat])
    return np.moveaxis(out.reshape(moved.shape[:-1] + (top_k,)), -1, axis)


def reduction_ref(x, op, axis=0, coeff=1.0):
    """reduction_layer.cpp: every axis from ``axis`` to the end; MEAN divides coeff by their count."""
    x = x.astype(np.float64)
    axes = tuple(range(axis, x.ndim))
    f = {"SUM": lambda v: v, "MEAN": lambda v: v, "ASUM": np.abs, "SUMSQ": np.square}[op]
    dim = math.prod(x.shape[axis:])
    return f(x).sum(axis=axes) * (coeff / dim if op == "MEAN" else coeff)


def mvn_ref(x, normalize_variance=True, across_channels=False, eps=1e-9):
    """mvn_layer.cpp: y = (x - mean) / (sqrt(mean((x - mean)^2)) + eps): eps on the std deviation;
    the top is 4-D (N, C, H, W)."""
    x4 = x.astype(np.float64).reshape(x.shape + (1,) * (4 - x.ndim))
    axes = (1, 2, 3) if across_channels else (2, 3)
    y = x4 - x4.mean(axis=axes, keepdims=True)
    if normalize_variance:
        y = y / (np.sqrt((y**2).mean(axis=axes, keepdims=True)) + np.float32(eps))
    return y


def tile_ref(x, axis, tiles):
    reps = [1] * x.ndim
    reps[axis] = tiles
    return np.tile(x, reps)


def embed_ref(x, weight, bias=None):
    """embed_layer.cpp copies row static_cast<int>(x) (truncation); graft clamps to the table."""
    idx = np.clip(np.trunc(x), 0, weight.shape[0] - 1).astype(np.int64)
    y = weight.astype(np.float64)[idx]
    return y + bias if bias is not None else y


def spp_ref(x, pyramid_height, mode="MAX"):
    """spp_layer.cpp GetPoolingParam per level, then Caffe's pooling, flatten, concat."""
    h, w = x.shape[2:]
    outs = []
    for level in range(pyramid_height):
        bins = 2**level
        kh, kw = math.ceil(h / bins), math.ceil(w / bins)
        ph, pw = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
        outs.append(pool_ref(x, (kh, kw), (kh, kw), (ph, pw), mode))
    if pyramid_height == 1:
        return outs[0]
    return np.concatenate([o.reshape(x.shape[0], -1) for o in outs], axis=1)


# ----------------------------------------------------------------------------- net cases


def ties(low=0, high=3):
    """Small integers: many equal values, so ArgMax's tie order is exercised."""
    return lambda rng, shape: rng.integers(low, high, shape).astype(np.float32)


def indices(k):
    """Embed inputs: integers, fractions (truncated) and values outside [0, k) (clamped)."""
    return lambda rng, shape: np.round(rng.uniform(-3, k + 3, shape), 1).astype(np.float32)


AM = "argmax_param"
CASES: list[Case] = []


def case(*args, **kw):
    CASES.append(Case(*args, **kw))


case("argmax-flat-and-axis", (1, 3, 2, 4), [
    ("am1", "ArgMax", ["data"], ["am1"], ""),
    ("am3", "ArgMax", ["data"], ["am3"], f"{AM} {{ top_k: 3 }}"),
    ("am3v", "ArgMax", ["data"], ["am3v"], f"{AM} {{ top_k: 3 out_max_val: true }}"),
    ("ax1", "ArgMax", ["data"], ["ax1"], f"{AM} {{ axis: 1 top_k: 2 }}"),
    ("ax1v", "ArgMax", ["data"], ["ax1v"], f"{AM} {{ axis: 1 top_k: 2 out_max_val: true }}"),
    ("axm1", "ArgMax", ["data"], ["axm1"], f"{AM} {{ axis: -1 top_k: 4 }}"),
], lambda x, W: {
    "am1": argmax_ref(x), "am3": argmax_ref(x, 3), "am3v": argmax_ref(x, 3, True),
    "ax1": argmax_ref(x, 2, axis=1), "ax1v": argmax_ref(x, 2, True, axis=1), "axm1": argmax_ref(x, 4, axis=3),
}, make_input=ties(), expect_shapes={"am1": (1, 1, 1), "am3": (1, 3, 1), "am3v": (2, 3, 1), "ax1": (2, 2, 4),
                                     "axm1": (3, 2, 4)})

case("argmax-2d", (1, 7), [
    ("am", "ArgMax", ["data"], ["am"], f"{AM} {{ top_k: 2 }}"),
    ("amv", "ArgMax", ["data"], ["amv"], f"{AM} {{ top_k: 7 out_max_val: true }}"),
], lambda x, W: {"am": argmax_ref(x, 2), "amv": argmax_ref(x, 7, True)},
    make_input=ties(-1, 2), expect_shapes={"am": (1, 2), "amv": (2, 7)})

case("reduction", (1, 3, 4, 5), [
    ("r_sum", "Reduction", ["data"], ["r_sum"], "reduction_param { operation: SUM axis: 1 }"),
    ("r_asum", "Reduction", ["data"], ["r_asum"], "reduction_param { operation: ASUM axis: 2 coeff: 0.5 }"),
    ("r_sumsq", "Reduction", ["data"], ["r_sumsq"], "reduction_param { operation: SUMSQ axis: -1 }"),
    ("r_mean", "Reduction", ["data"], ["r_mean"], "reduction_param { operation: MEAN axis: 1 coeff: 2 }"),
    ("r_all", "Reduction", ["data"], ["r_all"], ""),  # SUM over axis 0: the whole batch, one value
], lambda x, W: {
    "r_sum": reduction_ref(x, "SUM", 1), "r_asum": reduction_ref(x, "ASUM", 2, 0.5),
    "r_sumsq": reduction_ref(x, "SUMSQ", 3), "r_mean": reduction_ref(x, "MEAN", 1, 2.0),
    "r_all": reduction_ref(x, "SUM", 0),
}, expect_shapes={"r_sum": (), "r_asum": (3,), "r_sumsq": (3, 4)})

# TSM's temporal shift (zoo tsm_resnet50_x2paddle): Eltwise SUM of one slice with coeff 1, -1 is
# an exact zero block, concatenated back; the net ends in a Reduction MEAN from axis 1.
case("tsm-pattern", (1, 4, 3, 3), [
    ("split", "Slice", ["data"], ["s1", "s2"], "slice_param { axis: 1 slice_point: 1 }"),
    ("sub", "Eltwise", ["s1", "s1"], ["zero"], "eltwise_param { operation: SUM coeff: 1.0 coeff: -1.0 }"),
    ("cat", "Concat", ["s2", "zero"], ["cat"], "concat_param { axis: 1 }"),
    ("mean", "Reduction", ["cat"], ["mean"], "reduction_param { operation: MEAN axis: 1 }"),
], lambda x, W: {
    "zero": np.zeros_like(x[:, :1]), "cat": np.concatenate([x[:, 1:], 0 * x[:, :1]], 1),
    "mean": x[:, 1:].astype(np.float64).sum(axis=(1, 2, 3)) / 36,
}, input_form="input_shape")

case("mvn", (1, 3, 4, 5), [
    ("mvn", "MVN", ["data"], ["mvn"], ""),
    ("mvn_across", "MVN", ["data"], ["mvn_across"], "mvn_param { across_channels: true }"),
    ("mvn_mean", "MVN", ["data"], ["mvn_mean"], "mvn_param { normalize_variance: false }"),
    ("mvn_eps", "MVN", ["data"], ["mvn_eps"], "mvn_param { eps: 0.5 }"),
], lambda x, W: {
    "mvn": mvn_ref(x), "mvn_across": mvn_ref(x, across_channels=True), "mvn_mean": mvn_ref(x, False),
    "mvn_eps": mvn_ref(x, eps=0.5),
}, make_input=lambda rng, s: (rng.standard_normal(s) * 3 + 2).astype(np.float32))

case("mvn-2d", (1, 6), [
    ("mvn_across", "MVN", ["data"], ["mvn_across"], "mvn_param { across_channels: true }"),
    ("mvn_per_value", "MVN", ["data"], ["mvn_per_value"], ""),  # one value per (n, c): zeros
], lambda x, W: {"mvn_across": mvn_ref(x, across_channels=True), "mvn_per_value": mvn_ref(x)},
    expect_shapes={"mvn_across": (6, 1, 1), "mvn_per_value": (6, 1, 1)})

case("tile", (1, 2, 3, 4), [
    ("t1", "Tile", ["data"], ["t1"], "tile_param { tiles: 3 }"),
    ("t_last", "Tile", ["data"], ["t_last"], "tile_param { axis: -1 tiles: 2 }"),
    ("t_batch", "Tile", ["data"], ["t_batch"], "tile_param { axis: 0 tiles: 2 }"),
], lambda x, W: {"t1": tile_ref(x, 1, 3), "t_last": tile_ref(x, 3, 2), "t_batch": tile_ref(x, 0, 2)},
    expect_shapes={"t1": (6, 3, 4), "t_last": (2, 3, 8)})

case("embed", (1, 6), [
    ("emb", "Embed", ["data"], ["emb"], "embed_param { num_output: 3 input_dim: 5 }"),
    ("emb_nb", "Embed", ["data"], ["emb_nb"], "embed_param { num_output: 2 input_dim: 4 bias_term: false }"),
], lambda x, W: {"emb": embed_ref(x, W["emb"][0], W["emb"][1]), "emb_nb": embed_ref(x, W["emb_nb"][0])},
    make_input=indices(5), expect_shapes={"emb": (6, 3), "emb_nb": (6, 2)})

case("embed-3d", (1, 2, 3), [
    ("emb", "Embed", ["data"], ["emb"], "embed_param { num_output: 4 input_dim: 7 }"),
], lambda x, W: {"emb": embed_ref(x, W["emb"][0], W["emb"][1])}, make_input=indices(7),
    expect_shapes={"emb": (2, 3, 4)})

case("spp", (1, 2, 7, 6), [
    ("spp_max", "SPP", ["data"], ["spp_max"], "spp_param { pyramid_height: 3 }"),
    ("spp_ave", "SPP", ["data"], ["spp_ave"], "spp_param { pyramid_height: 3 pool: AVE }"),
    ("spp1", "SPP", ["data"], ["spp1"], "spp_param { pyramid_height: 1 }"),
], lambda x, W: {"spp_max": spp_ref(x, 3), "spp_ave": spp_ref(x, 3, "AVE"), "spp1": spp_ref(x, 1)},
    make_input=lambda rng, s: (rng.standard_normal(s) * 2 - 3).astype(np.float32),  # padding must never win a MAX
    expect_shapes={"spp_max": (2 * (1 + 4 + 16),), "spp1": (2, 1, 1)})

case("spp-odd", (1, 3, 9, 5), [
    ("spp", "SPP", ["data"], ["spp"], "spp_param { pyramid_height: 2 pool: AVE }"),
], lambda x, W: {"spp": spp_ref(x, 2, "AVE")})

case("eltwise-one-bottom", (1, 3, 4, 4), [
    ("max1", "Eltwise", ["data"], ["max1"], "eltwise_param { operation: MAX }"),
    ("prod1", "Eltwise", ["data"], ["prod1"], "eltwise_param { operation: PROD }"),
    ("sum1", "Eltwise", ["data"], ["sum1"], "eltwise_param { operation: SUM coeff: 2.5 }"),
    ("sum1i", "Eltwise", ["data"], ["sum1i"], ""),
], lambda x, W: {"max1": x, "prod1": x, "sum1": 2.5 * x.astype(np.float64), "sum1i": x})

case("eltwise-many", (1, 3, 4, 4), [
    ("neg", "Power", ["data"], ["neg"], "power_param { scale: -1 shift: 0.5 }"),
    ("abs", "AbsVal", ["data"], ["abs"], ""),
    ("zero", "Eltwise", ["data", "data"], ["zero"], "eltwise_param { coeff: 1 coeff: -1 }"),
    ("max3", "Eltwise", ["data", "neg", "abs"], ["max3"], "eltwise_param { operation: MAX }"),
    ("prod3", "Eltwise", ["data", "neg", "abs"], ["prod3"], "eltwise_param { operation: PROD }"),
    ("sum3", "Eltwise", ["data", "neg", "abs"], ["sum3"], "eltwise_param { coeff: 0.5 coeff: -2 coeff: 1 }"),
], lambda x, W: (lambda a, n, b: {
    "zero": 0 * a, "max3": np.maximum(np.maximum(a, n), b), "prod3": a * n * b, "sum3": 0.5 * a - 2 * n + b,
})(x.astype(np.float64), 0.5 - x.astype(np.float64), np.abs(x.astype(np.float64))))


def render_v1(c: Case) -> str:
    """The case in V1 syntax (``layers { type: ENUM }``, ``input_dim``)."""
    lines = [f'name: "{c.id}"', 'input: "data"'] + [f"input_dim: {d}" for d in c.shape]
    for name, ltype, bottoms, tops, params in c.layers:
        body = [f'name: "{name}"', f"type: {V1_NAMES[ltype]}"] + [f'bottom: "{b}"' for b in bottoms]
        lines.append("layers { " + " ".join(body + [f'top: "{t}"' for t in tops] + [params]) + " }")
    return "\n".join(lines) + "\n"


def variants():
    out = []
    for c in CASES:
        out.append(pytest.param(c, "V2", "V2", id=f"{c.id}-v2"))
        if c.types <= set(V1_NAMES) and len(c.shape) == 4:  # V1 input_dim is 4-D
            out.append(pytest.param(c, "V1", "V1", id=f"{c.id}-v1"))
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(case, syntax, layout) -> (prototxt, caffemodel, package), converted once per module."""
    from convert import convert_model
    from convert.generate import generate_caffemodel

    root = tmp_path_factory.mktemp("bvlc-nets")
    cache = {}

    def get(c: Case, syntax: str, layout: str):
        key = (c.id, syntax, layout)
        if key not in cache:
            d = root / f"{c.id}-{syntax}-{layout}"
            d.mkdir()
            proto = d / "net.prototxt"
            proto.write_text(render_v1(c) if syntax == "V1" else render(c, "V2"))
            weights = generate_caffemodel(proto, d / "net.caffemodel", layout=layout, seed=len(cache))
            pre = None if len(c.shape) != 4 or c.shape[1] in (1, 3) else {"scale": 1.0}
            pkg = convert_model(proto, weights, d / "pkg", c.id, preprocess=pre, log=lambda _m: None)
            cache[key] = (proto, weights, pkg)
        return cache[key]

    return get


def _outputs(pkg, x: np.ndarray) -> tuple[list[str], dict, dict]:
    from convert import load_torch

    values = [b for b, i in pkg.blobs.items() if i["kind"] != "input"]
    return values, run_ort(pkg.onnx_path_for(values), {"data": x}, values), run_torch(load_torch(pkg), x, values)


@pytest.mark.parametrize(("c", "syntax", "layout"), variants())
def test_layers_match_caffe_reference(built, c, syntax, layout):
    from convert.weights import read_caffemodel

    proto, weights, pkg = built(c, syntax, layout)
    assert pkg.manifest["verification"]["passed"] is True
    assert pkg.manifest["source"]["prototxt"]["generation"] == syntax
    W = {n: lw.blobs for n, lw in read_caffemodel(weights).layers.items()}
    x = (c.make_input or normal())(np.random.default_rng(42), (2,) + c.shape[1:])  # batch 2
    expected = c.ref(x, W)
    for value, shape in c.expect_shapes.items():
        assert tuple(pkg.blobs[value]["shape"][1:]) == shape, value
    values, got_onnx, got_torch = _outputs(pkg, x)
    for v in values:
        assert_close(got_onnx[v], got_torch[v], f"{v}: torch vs onnx")
    for v, ref in expected.items():
        assert got_onnx[v].shape == ref.shape, f"{v}: onnx shape {got_onnx[v].shape}, Caffe's {ref.shape}"
        assert_close(ref, got_onnx[v], f"{v}: onnx vs Caffe reference")
        assert_close(ref, got_torch[v], f"{v}: torch vs Caffe reference")


# OpenCV runs these layers; where it deviates from Caffe it is no oracle.
OPENCV_LAYERS = {
    "mvn": ["mvn", "mvn_across", "mvn_mean"],
    "mvn-2d": ["mvn_across"],  # OpenCV refuses a per-channel MVN of a 2-D blob
    "eltwise-many": ["zero", "max3", "prod3", "sum3"],  # OpenCV refuses a one-bottom Eltwise
}
OPENCV_DEVIATES = {
    ("mvn", "mvn_eps"): "OpenCV adds eps to the variance (sqrt(var + eps)); Caffe adds it to the std deviation",
}


@pytest.mark.parametrize("c", [c for c in CASES if c.id in OPENCV_LAYERS], ids=lambda c: c.id)
def test_layers_match_opencv(built, c):
    proto, weights, pkg = built(c, "V2", "V2")
    net = opencv_net(proto, weights)
    assert net is not None, "OpenCV refuses the net"
    x = (c.make_input or normal())(np.random.default_rng(7), (2,) + c.shape[1:])
    names = OPENCV_LAYERS[c.id]
    net.setInput(x)
    ref = dict(zip(names, net.forward(names)))
    _, ours, ours_t = _outputs(pkg, x)
    for n in names:
        assert_close(as_shape(ref[n], ours[n].shape), ours[n], f"layer {n}: onnx vs OpenCV")
        assert_close(as_shape(ref[n], ours_t[n].shape), ours_t[n], f"layer {n}: torch vs OpenCV")


def test_opencv_mvn_eps_deviates_from_caffe(built):
    """The documented deviation: OpenCV's MVN is (x - m)/sqrt(var + eps), Caffe's (x - m)/(std + eps)."""
    c = next(c for c in CASES if c.id == "mvn")
    proto, weights, pkg = built(c, "V2", "V2")
    net = opencv_net(proto, weights)
    x = c.make_input(np.random.default_rng(3), (2,) + c.shape[1:])
    net.setInput(x)
    cv = net.forward("mvn_eps")
    x64 = x.astype(np.float64)
    d = x64 - x64.mean(axis=(2, 3), keepdims=True)
    assert_close(d / np.sqrt((d**2).mean(axis=(2, 3), keepdims=True) + 0.5), cv, "OpenCV's own formula")
    ours = run_ort(pkg.onnx_path_for(["mvn_eps"]), {"data": x}, ["mvn_eps"])["mvn_eps"]
    assert np.abs(ours - cv).max() > 1e-2  # Caffe's eps placement, not OpenCV's


def test_tsm_difference_is_exactly_zero(built):
    c = next(c for c in CASES if c.id == "tsm-pattern")
    _, _, pkg = built(c, "V2", "V2")
    x = normal(50.0)(np.random.default_rng(1), (2,) + c.shape[1:])
    _, got_onnx, got_torch = _outputs(pkg, x)
    assert np.all(got_onnx["zero"] == 0) and np.all(got_torch["zero"] == 0)
    assert pkg.blobs["mean"]["shape"] == [None]


def test_argmax_ties_take_the_higher_index_first(built):
    """std::partial_sort with std::greater on (value, index): [1, 3, 3, 0, 3] -> 4, 2, 1 (ONNX TopK
    alone would give 1, 2, 4)."""
    c = next(c for c in CASES if c.id == "argmax-2d")
    _, _, pkg = built(c, "V2", "V2")
    x = np.array([[1, 3, 3, 0, 3, -1, 3], [2, 2, 2, 2, 2, 2, 2]], np.float32)
    _, got_onnx, got_torch = _outputs(pkg, x)
    for got in (got_onnx, got_torch):
        np.testing.assert_array_equal(got["am"], [[[6, 4]], [[6, 5]]])
        np.testing.assert_array_equal(got["amv"][:, 0], [[6, 4, 2, 1, 0, 3, 5], [6, 5, 4, 3, 2, 1, 0]])
        np.testing.assert_array_equal(got["amv"][0, 1], [3, 3, 3, 3, 1, 0, -1])


def _graph(layer: str, shape=(1, 3, 8, 8), bottoms: str = 'bottom: "data"'):
    from google.protobuf import text_format

    from convert.ir import build_graph
    from convert.parse import net_spec
    from convert.proto import pb

    dims = " ".join(f"dim: {d}" for d in shape)
    text = f'input: "data" input_shape {{ {dims} }}\nlayer {{ name: "l" {bottoms} top: "l" {layer} }}'
    return build_graph(net_spec(text_format.Parse(text, pb.NetParameter())), None)


def test_keeps_batch():
    """Outputs whose axis 0 is not the batch: a Reduction or ArgMax over axis 0, a Tile of axis 0."""
    cases = {
        'type: "Reduction" reduction_param { axis: 0 }': False,
        'type: "Reduction" reduction_param { axis: 1 }': True,
        'type: "ArgMax" argmax_param { axis: 0 }': False,
        'type: "ArgMax" argmax_param { top_k: 2 }': True,
        'type: "Tile" tile_param { axis: 0 tiles: 3 }': False,
        'type: "Tile" tile_param { axis: 1 tiles: 3 }': True,
        'type: "MVN"': True, 'type: "SPP" spp_param { pyramid_height: 2 }': True,
    }
    for layer, keeps in cases.items():
        node = _graph(layer).nodes[0]
        assert node.converter.keeps_batch(node) is keeps, layer


BAD = [
    ('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', "PROD takes no coeff"),
    ('type: "Eltwise" eltwise_param { operation: MAX coeff: 1 coeff: 2 }', "MAX takes no coeff"),
    ('type: "Eltwise" eltwise_param { coeff: 1 coeff: 2 coeff: 3 }', "3 coeffs for 2 bottoms"),
    ('type: "ArgMax" argmax_param { top_k: 193 }', "top_k 193"),
    ('type: "ArgMax" argmax_param { axis: 1 top_k: 4 }', "top_k 4"),
    ('type: "ArgMax" argmax_param { axis: 4 }', "axis 4 out of range"),
    ('type: "ArgMax" argmax_param { top_k: 0 }', "top_k 0"),
    ('type: "Reduction" reduction_param { axis: -5 }', "axis -5 out of range"),
    ('type: "MVN"', "at most 4 axes"),
    ('type: "Tile"', "tiles is not set"),
    ('type: "Tile" tile_param { tiles: 0 }', "tiles must be positive"),
    ('type: "Embed" embed_param { num_output: 3 }', "positive input_dim"),
    ('type: "SPP"', "pyramid_height must be at least 1"),
    ('type: "SPP" spp_param { pyramid_height: 5 }', "pyramid level 4"),
    ('type: "SPP" spp_param { pyramid_height: 2 pool: STOCHASTIC }', "STOCHASTIC"),
]


@pytest.mark.parametrize(("layer", "needle"), BAD, ids=[n for _, n in BAD])
def test_bad_parameters_are_one_line_errors(layer, needle):
    from convert.errors import GraftError

    shape = (1, 3, 8, 8, 2) if '"MVN"' in layer else (1, 3, 8, 8)
    bottoms = 'bottom: "data" bottom: "data"' if '"Eltwise"' in layer else 'bottom: "data"'
    with pytest.raises(GraftError) as err:
        _graph(layer, shape, bottoms)
    msg = str(err.value)
    assert msg.startswith("layer 'l'") and needle in msg and "\n" not in msg, msg


@needs_testbed
def test_tsm_zoo_shapes():
    """The zoo's TSM: Eltwise coeff 1, -1 on one slice; Reduction MEAN from axis 1 of 1x8x4 -> (1,)."""
    from convert.ir import build_graph
    from convert.parse import load_net_spec

    proto = CAFFE / "zoo" / "tsm_resnet50_x2paddle" / "deploy.prototxt"
    if not proto.is_file():
        pytest.skip(f"zoo net absent: {proto}")
    g = build_graph(load_net_spec(proto), None)
    assert g.shapes["view_blob35"] == (1, 8, 4)
    assert g.shapes["mean_blob1"] == (1,)
    assert g.shapes["sub_blob1"] == g.shapes["split_blob1"] == (1, 8, 8, 56, 56)
    assert "mean_blob1" in g.outputs
