"""The Caffe forks' layers (Upsample, Interp, ConvolutionDepthwise / DepthwiseConvolution,
ShuffleChannel, BN, ReLU6, Clip, Swish), checked three ways:

* ONNX (onnxruntime) and torch against numpy references written here from the forks' C++
  (eric612/MobileNet-YOLO upsample_layer.cpp, relu6_layer.cpp, depthwise_conv_layer.cpp;
  yonghenglh6's conv_dw_layer.cpp; DeepLab-v2/PSPNet interp_layer.cpp + caffe_cpu_interp2;
  hszhao/PSPNet and alexgkendall/caffe-segnet bn_layer.cpp; farmingyard's
  shuffle_channel_layer.cpp; BVLC clip_layer.cpp and swish_layer.cpp), at batch 2;
* OpenCV's Caffe importer, for the layers and options it implements;
* whole zoo nets that need only these layers, blob by blob against OpenCV (fork types renamed
  to their exact standard equivalents in a temporary copy).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from _convert_helpers import CAFFE, TESTBED, as_shape, assert_close, needs_testbed, opencv_net, run_ort, run_torch
from test_convert_layers import Case, normal, render

COVERED_TYPES = {
    "Upsample", "Interp", "ConvolutionDepthwise", "DepthwiseConvolution", "ShuffleChannel", "BN",
    "ReLU6", "Clip", "Swish",
}

ZOO = CAFFE / "zoo"

# ----------------------------------------------------------------------------- numpy references


def nearest_ref(x, scale, out):
    """MobileNet-YOLO's Upsample loop: top (h, w) = bottom (h / scale, w / scale), integer division."""
    hi = np.arange(out[0]) // scale[0]
    wi = np.arange(out[1]) // scale[1]
    return x[:, :, hi][:, :, :, wi]


def interp_ref(x, out, pad_beg=0, pad_end=0):
    """caffe_cpu_interp2 on the cropped input, with its float32 coordinate arithmetic."""
    h_in, w_in = x.shape[2:]
    x = x[:, :, -pad_beg:h_in + pad_end, -pad_beg:w_in + pad_end].astype(np.float64)
    h1, w1 = x.shape[2:]
    h2, w2 = out
    if (h1, w1) == (h2, w2):
        return x

    def taps(size1, size2):
        r = np.float32(size1 - 1) / np.float32(size2 - 1) if size2 > 1 else np.float32(0)
        pos = (r * np.arange(size2, dtype=np.float32)).astype(np.float32)
        i0 = pos.astype(np.int64)
        step = (i0 < size1 - 1).astype(np.int64)
        lam = (pos - i0.astype(np.float32)).astype(np.float64)
        return i0, i0 + step, lam

    r0, r1, rl = taps(h1, h2)
    c0, c1, cl = taps(w1, w2)
    rl, cl = rl[:, None], cl[None, :]
    top = (1 - cl) * x[:, :, r0][:, :, :, c0] + cl * x[:, :, r0][:, :, :, c1]
    bottom = (1 - cl) * x[:, :, r1][:, :, :, c0] + cl * x[:, :, r1][:, :, :, c1]
    return (1 - rl) * top + rl * bottom


def depthwise_ref(x, w, b=None, stride=(1, 1), pad=(0, 0), dil=(1, 1)):
    """ConvolutionDepthwiseLayer::Forward_cpu: channel c of the output from channel c only."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[2:]
    ho = (h + 2 * pad[0] - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
    wo = (wd + 2 * pad[1] - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    y = np.zeros((n, c, ho, wo))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dil[0]:i * dil[0] + stride[0] * (ho - 1) + 1:stride[0],
                       j * dil[1]:j * dil[1] + stride[1] * (wo - 1) + 1:stride[1]]
            y += patch * w[:, 0, i, j].reshape(1, c, 1, 1)
    return y + (b.reshape(1, c, 1, 1) if b is not None else 0)


def shuffle_ref(x, g):
    """Resize_cpu: bottom channel i·(C/g) + j -> top channel j·g + i."""
    c = x.shape[1]
    y = np.empty_like(x)
    for i in range(g):
        for j in range(c // g):
            y[:, j * g + i] = x[:, i * (c // g) + j]
    return y


def bn_pspnet_ref(x, blobs, eps=1e-5):
    slope, bias, mean, var = (a.reshape(1, -1, 1, 1).astype(np.float64) for a in blobs)
    return slope * (x - mean) / np.sqrt(var + eps) + bias


def bn_segnet_ref(x, blobs):
    scale, shift = (a.reshape(1, -1, 1, 1).astype(np.float64) for a in blobs)
    return scale * x + shift


def relu6_ref(x, slope=0.0):
    x = x.astype(np.float64)
    return np.minimum(np.maximum(x, 0) + slope * np.minimum(x, 0), 6.0)


def swish_ref(x, beta=1.0):
    x = x.astype(np.float64)
    return x / (1 + np.exp(-beta * x))


# ----------------------------------------------------------------------------- cases

CONV = "convolution_param"
CASES: list[Case] = []
#: case id -> the layers OpenCV implements exactly, and fork type -> the standard type it runs as
OPENCV: dict[str, tuple[list[str], dict[str, str]]] = {}


def case(*args, opencv: tuple[list[str], dict[str, str]] | None = None, **kw):
    c = Case(*args, **kw)
    CASES.append(c)
    if opencv:
        OPENCV[c.id] = opencv


case("upsample", (1, 3, 4, 5), [
    ("up2", "Upsample", ["data"], ["up2"], "upsample_param { scale: 2 }"),
    ("up_default", "Upsample", ["data"], ["up_default"], ""),
    ("up_hw", "Upsample", ["data"], ["up_hw"], "upsample_param { scale_h: 3 scale_w: 2 }"),
    ("up_pad", "Upsample", ["data"], ["up_pad"], "upsample_param { scale: 2 pad_out_h: true }"),
    ("up_size", "Upsample", ["data"], ["up_size"], "upsample_param { upsample_h: 11 upsample_w: 9 }"),
    ("up_chain", "Upsample", ["up2"], ["up_chain"], "upsample_param { scale: 3 }"),
], lambda x, W: {
    "up2": nearest_ref(x, (2, 2), (8, 10)), "up_default": nearest_ref(x, (2, 2), (8, 10)),
    "up_hw": nearest_ref(x, (3, 2), (12, 10)), "up_pad": nearest_ref(x, (2, 2), (7, 10)),
    "up_size": nearest_ref(x, (3, 2), (11, 9)), "up_chain": nearest_ref(nearest_ref(x, (2, 2), (8, 10)), (3, 3), (24, 30)),
}, expect_shapes={"up2": (3, 8, 10), "up_hw": (3, 12, 10), "up_pad": (3, 7, 10), "up_size": (3, 11, 9)})

case("interp", (1, 2, 5, 7), [
    ("zoom", "Interp", ["data"], ["zoom"], "interp_param { zoom_factor: 3 }"),
    ("hw", "Interp", ["data"], ["hw"], "interp_param { height: 9 width: 4 }"),
    ("one", "Interp", ["data"], ["one"], "interp_param { height: 1 width: 1 }"),
    ("same", "Interp", ["data"], ["same"], "interp_param { height: 5 width: 7 }"),
    ("shrink", "Interp", ["data"], ["shrink"], "interp_param { shrink_factor: 2 }"),
    ("both", "Interp", ["data"], ["both"], "interp_param { shrink_factor: 2 zoom_factor: 3 }"),
    ("zoom_wins", "Interp", ["data"], ["zoom_wins"], "interp_param { zoom_factor: 2 height: 3 width: 3 }"),
    ("crop", "Interp", ["data"], ["crop"], "interp_param { zoom_factor: 2 pad_beg: -1 pad_end: -1 }"),
    ("crop_end", "Interp", ["data"], ["crop_end"], "interp_param { height: 6 width: 6 pad_end: -2 }"),
    ("crop_only", "Interp", ["data"], ["crop_only"], "interp_param { zoom_factor: 1 pad_beg: -2 }"),
    ("like", "Interp", ["data", "zoom"], ["like"], ""),
], lambda x, W: {
    "zoom": interp_ref(x, (13, 19)), "hw": interp_ref(x, (9, 4)), "one": interp_ref(x, (1, 1)),
    "same": interp_ref(x, (5, 7)), "shrink": interp_ref(x, (3, 4)), "both": interp_ref(x, (7, 10)),
    "zoom_wins": interp_ref(x, (9, 13)), "crop": interp_ref(x, (5, 9), -1, -1),
    "crop_end": interp_ref(x, (6, 6), 0, -2), "crop_only": interp_ref(x, (3, 5), -2, 0), "like": interp_ref(x, (13, 19)),
}, expect_shapes={"zoom": (2, 13, 19), "shrink": (2, 3, 4), "both": (2, 7, 10), "crop": (2, 5, 9), "crop_only": (2, 3, 5)},
    opencv=(["zoom", "hw", "one", "same"], {}))

def pyramid_ref(x, W):
    """PSPNet's head in miniature: conv 3x3 -> AVE pool 4/4 -> Interp back -> Concat -> zoom 8."""
    w, b = W["conv"]
    n, _, h, wd = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = sum(np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j]) for i in range(3) for j in range(3))
    conv = conv + b.reshape(1, -1, 1, 1)
    pool = conv.reshape(n, 4, h // 4, 4, wd // 4, 4).mean(axis=(3, 5))
    up = interp_ref(pool, (h, wd))
    cat = np.concatenate([conv, up], 1)
    return {"conv": conv, "pool": pool, "up": up, "cat": cat, "zoom": interp_ref(cat, (8 * h - 7, 8 * wd - 7))}


case("pyramid-interp", (1, 3, 12, 12), [
    ("conv", "Convolution", ["data"], ["conv"], f"{CONV} {{ num_output: 4 kernel_size: 3 pad: 1 }}"),
    ("pool", "Pooling", ["conv"], ["pool"], "pooling_param { pool: AVE kernel_size: 4 stride: 4 }"),
    ("up", "Interp", ["pool"], ["up"], "interp_param { height: 12 width: 12 }"),
    ("cat", "Concat", ["conv", "up"], ["cat"], ""),
    ("zoom", "Interp", ["cat"], ["zoom"], "interp_param { zoom_factor: 8 }"),
], pyramid_ref, expect_shapes={"up": (4, 12, 12), "zoom": (8, 89, 89)},
    opencv=(["conv", "pool", "up", "cat", "zoom"], {}))

case("depthwise", (1, 4, 7, 7), [
    ("dw_a", "ConvolutionDepthwise", ["data"], ["dw_a"], f"{CONV} {{ num_output: 4 group: 4 kernel_size: 3 pad: 1 stride: 2 }}"),
    ("dw_b", "ConvolutionDepthwise", ["data"], ["dw_b"], f"{CONV} {{ kernel_size: 3 dilation: 2 pad: 2 bias_term: false }}"),
    ("dw_c", "DepthwiseConvolution", ["data"], ["dw_c"],
     f"{CONV} {{ num_output: 4 group: 4 kernel_h: 3 kernel_w: 1 pad_h: 1 pad_w: 0 engine: CAFFE }}"),
    ("dw_d", "DepthwiseConvolution", ["data"], ["dw_d"], f"{CONV} {{ num_output: 4 kernel_size: 3 stride: 2 }}"),
], lambda x, W: {
    "dw_a": depthwise_ref(x, W["dw_a"][0], W["dw_a"][1], (2, 2), (1, 1)),
    "dw_b": depthwise_ref(x, W["dw_b"][0], None, (1, 1), (2, 2), (2, 2)),
    "dw_c": depthwise_ref(x, W["dw_c"][0], W["dw_c"][1], (1, 1), (1, 0)),
    "dw_d": depthwise_ref(x, W["dw_d"][0], W["dw_d"][1], (2, 2)),
}, expect_shapes={"dw_a": (4, 4, 4), "dw_b": (4, 7, 7), "dw_c": (4, 7, 7), "dw_d": (4, 3, 3)},
    opencv=(["dw_a", "dw_c"], {"ConvolutionDepthwise": "Convolution", "DepthwiseConvolution": "Convolution"}))

case("shuffle", (1, 6, 3, 4), [
    ("sh2", "ShuffleChannel", ["data"], ["sh2"], "shuffle_channel_param { group: 2 }"),
    ("sh3", "ShuffleChannel", ["data"], ["sh3"], "shuffle_channel_param { group: 3 }"),
    ("sh1", "ShuffleChannel", ["data"], ["sh1"], ""),
    ("sh_twice", "ShuffleChannel", ["sh2"], ["sh_twice"], "shuffle_channel_param { group: 3 }"),
], lambda x, W: {
    "sh2": shuffle_ref(x, 2), "sh3": shuffle_ref(x, 3), "sh1": x, "sh_twice": shuffle_ref(shuffle_ref(x, 2), 3),
}, opencv=(["sh2", "sh3", "sh1", "sh_twice"], {}))

PSP_BN = ('bn_param { slope_filler { type: "constant" value: 1 } bias_filler { type: "constant" value: 0 } '
          'frozen: true momentum: 0.95 }')
case("bn", (1, 3, 4, 5), [
    ("conv", "Convolution", ["data"], ["conv"], f"{CONV} {{ num_output: 4 kernel_size: 1 bias_term: false }}"),
    ("conv_bn", "BN", ["conv"], ["conv"], PSP_BN),
    ("relu", "ReLU", ["conv"], ["conv"], ""),
    ("bn_eps", "BN", ["data"], ["bn_eps"], "bn_param { eps: 0.001 }"),
    ("bn_plain", "BN", ["data"], ["bn_plain"], ""),
    ("bn_segnet", "BN", ["data"], ["bn_segnet"], "bn_param { bn_mode: INFERENCE }"),
], lambda x, W: {
    "conv/pre_conv_bn": np.einsum("nchw,oc->nohw", x, W["conv"][0].reshape(4, 3)),
    "conv/pre_relu": bn_pspnet_ref(np.einsum("nchw,oc->nohw", x, W["conv"][0].reshape(4, 3)), W["conv_bn"]),
    "conv": np.maximum(bn_pspnet_ref(np.einsum("nchw,oc->nohw", x, W["conv"][0].reshape(4, 3)), W["conv_bn"]), 0),
    "bn_eps": bn_pspnet_ref(x, W["bn_eps"], 1e-3), "bn_plain": bn_pspnet_ref(x, W["bn_plain"]),
    "bn_segnet": bn_segnet_ref(x, W["bn_segnet"]),
})

case("activations", (1, 3, 4, 5), [
    ("relu6", "ReLU6", ["data"], ["relu6"], ""),
    ("relu6_leaky", "ReLU6", ["data"], ["relu6_leaky"], "relu6_param { negative_slope: 0.1 }"),
    ("clip", "Clip", ["data"], ["clip"], "clip_param { min: -1.5 max: 2 }"),
    ("swish", "Swish", ["data"], ["swish"], ""),
    ("swish_b", "Swish", ["data"], ["swish_b"], "swish_param { beta: 0.5 }"),
    ("relu6_inplace", "ReLU6", ["swish"], ["swish"], ""),
], lambda x, W: {
    "relu6": relu6_ref(x), "relu6_leaky": relu6_ref(x, 0.1), "clip": np.clip(x, -1.5, 2.0),
    "swish/pre_relu6_inplace": swish_ref(x), "swish": relu6_ref(swish_ref(x)), "swish_b": swish_ref(x, 0.5),
}, make_input=normal(5.0), opencv=(["relu6", "swish"], {}))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case -> (prototxt, caffemodel, package), converted once per module."""
    from convert import convert_model
    from convert.generate import generate_caffemodel

    root = tmp_path_factory.mktemp("fork-nets")
    cache = {}

    def get(c: Case):
        if c.id not in cache:
            d = root / c.id
            d.mkdir(exist_ok=True)
            proto = d / "net.prototxt"
            proto.write_text(render(c, "V2"))
            weights = generate_caffemodel(proto, d / "net.caffemodel", seed=len(cache))
            pre = None if c.shape[1] in (1, 3) else {"scale": 1.0}
            cache[c.id] = (proto, weights, convert_model(proto, weights, d / "pkg", c.id, preprocess=pre, log=lambda _m: None))
        return cache[c.id]

    return get


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_forks_match_numpy_reference(built, c):
    from convert import load_torch
    from convert.weights import read_caffemodel

    _, weights, pkg = built(c)
    assert pkg.manifest["verification"]["passed"] is True
    assert pkg.input_shape[0] is None  # the batch axis stays dynamic
    W = {n: lw.blobs for n, lw in read_caffemodel(weights).layers.items()}
    x = (c.make_input or normal())(np.random.default_rng(42), (2,) + c.shape[1:])
    for value, shape in c.expect_shapes.items():
        assert tuple(pkg.blobs[value]["shape"][1:]) == shape, value
    values = [b for b, i in pkg.blobs.items() if i["kind"] != "input"]
    got_onnx = run_ort(pkg.onnx_path_for(values), {"data": x}, values)
    got_torch = run_torch(load_torch(pkg), x, values)
    for v in values:
        assert got_onnx[v].shape[0] == 2, v
        assert_close(got_onnx[v], got_torch[v], f"{v}: torch vs onnx")
    for v, ref in c.ref(x, W).items():
        assert_close(ref, got_onnx[v], f"{v}: onnx vs numpy reference")
        assert_close(ref, got_torch[v], f"{v}: torch vs numpy reference")


def _opencv_copy(c: Case, keep: list[str], rename: dict[str, str]) -> Case:
    layers = [(n, rename.get(t, t), bs, ts, p) for n, t, bs, ts, p in c.layers if n in keep]
    return Case(c.id, c.shape, layers, c.ref)


@pytest.mark.parametrize("cid", list(OPENCV))
def test_forks_match_opencv(built, tmp_path, cid):
    from convert import load_torch

    c = next(c for c in CASES if c.id == cid)
    keep, rename = OPENCV[cid]
    _, weights, pkg = built(c)
    proto = tmp_path / "opencv.prototxt"
    proto.write_text(render(_opencv_copy(c, keep, rename), "V2"))
    net = opencv_net(proto, weights)
    assert net is not None, f"OpenCV cannot read {cid}"
    x = (c.make_input or normal())(np.random.default_rng(7), c.shape)
    tops = {li["name"]: li["tops"][0] for li in pkg.manifest["layers"]}
    net.setInput(x)
    ref = dict(zip(keep, net.forward(keep)))
    values = [tops[n] for n in keep]
    ours = run_ort(pkg.onnx_path_for(values), {"data": x}, values)
    ours_t = run_torch(load_torch(pkg), x, values)
    for n, v in zip(keep, values):
        assert_close(as_shape(ref[n], ours[v].shape), ours[v], f"layer {n}: onnx vs OpenCV")
        assert_close(as_shape(ref[n], ours_t[v].shape), ours_t[v], f"layer {n}: torch vs OpenCV")


def test_learned_blobs_round_trip(built):
    """``caffe_blobs`` of the torch modules gives back Caffe's blobs, in Caffe's layout."""
    from convert import load_torch
    from convert.ir import build_graph
    from convert.parse import load_net_spec
    from convert.store import WEIGHTS_FILE, group_by_layer, read_safetensors

    for cid in ("bn", "depthwise"):
        c = next(c for c in CASES if c.id == cid)
        _, _, pkg = built(c)
        net = load_torch(pkg)
        weights = group_by_layer(read_safetensors(pkg.dir / WEIGHTS_FILE))
        graph = build_graph(load_net_spec(pkg.dir / "deploy.prototxt"), weights)
        for node in graph.nodes:
            if node.weights:
                back = node.converter.caffe_blobs(node, net.layers[node.name])
                assert [b.shape for b in back] == [w.shape for w in node.weights], node.name
                for got, want in zip(back, node.weights):
                    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- bad parameters

BAD = {
    "upsample-mask": ('layer { name: "mask" type: "Pooling" bottom: "data" top: "mask" '
                      'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
                      'layer { name: "bad" type: "Upsample" bottom: "mask" bottom: "mask" top: "up" }', "mask bottom"),
    "upsample-scale0": ('layer { name: "bad" type: "Upsample" bottom: "data" top: "up" upsample_param { scale: 0 } }',
                        "positive integer"),
    "upsample-pad-out": ('layer { name: "bad" type: "Upsample" bottom: "data" top: "up" '
                         'upsample_param { scale: 3 pad_out_w: true } }', "pad_out_w"),
    "upsample-half": ('layer { name: "bad" type: "Upsample" bottom: "data" top: "up" upsample_param { scale_h: 2 } }',
                      "scale_h and scale_w"),
    "interp-nothing": ('layer { name: "bad" type: "Interp" bottom: "data" top: "i" }', "zoom_factor, shrink_factor"),
    "interp-height-only": ('layer { name: "bad" type: "Interp" bottom: "data" top: "i" interp_param { height: 4 } }',
                           "both height and width"),
    "interp-pad": ('layer { name: "bad" type: "Interp" bottom: "data" top: "i" interp_param { zoom_factor: 2 pad_beg: 1 } }',
                   "non-positive"),
    "interp-crop-all": ('layer { name: "bad" type: "Interp" bottom: "data" top: "i" '
                        'interp_param { zoom_factor: 2 pad_beg: -4 pad_end: -4 } }', "crop away"),
    "interp-zoom0": ('layer { name: "bad" type: "Interp" bottom: "data" top: "i" interp_param { zoom_factor: 0 } }',
                     "at least 1"),
    "bn-segnet-learn": ('layer { name: "bad" type: "BN" bottom: "data" top: "b" '
                        'bn_param { scale_filler { type: "constant" value: 1 } } }', "LEARN"),
    "clip-no-max": ('layer { name: "bad" type: "Clip" bottom: "data" top: "c" clip_param { min: 0 } }', "min and max"),
    "clip-inverted": ('layer { name: "bad" type: "Clip" bottom: "data" top: "c" clip_param { min: 2 max: 1 } }',
                      "greater than max"),
    "shuffle-group": ('layer { name: "bad" type: "ShuffleChannel" bottom: "data" top: "s" '
                      'shuffle_channel_param { group: 4 } }', "does not divide"),
    "depthwise-num-output": ('layer { name: "bad" type: "DepthwiseConvolution" bottom: "data" top: "d" '
                             'convolution_param { num_output: 6 group: 3 kernel_size: 3 } }', "num_output = group"),
    "depthwise-group": ('layer { name: "bad" type: "DepthwiseConvolution" bottom: "data" top: "d" '
                        'convolution_param { num_output: 3 group: 1 kernel_size: 3 } }', "num_output = group"),
}


@pytest.mark.parametrize("key", list(BAD))
def test_bad_parameters_are_one_line_errors_naming_the_layer(tmp_path, key):
    from convert.errors import GraftError
    from convert.ir import build_graph
    from convert.parse import load_net_spec

    layers, words = BAD[key]
    proto = tmp_path / "net.prototxt"
    proto.write_text('name: "bad"\ninput: "data"\ninput_shape { dim: 1 dim: 3 dim: 4 dim: 4 }\n' + layers + "\n")
    with pytest.raises(GraftError) as err:
        build_graph(load_net_spec(proto), None)
    msg = str(err.value)
    assert "layer 'bad'" in msg and words in msg and "\n" not in msg, msg


# ----------------------------------------------------------------------------- zoo nets


def _rename_types(text: str, rename: dict[str, str]) -> str:
    for old, new in rename.items():
        text = re.sub(rf'type:\s*"{old}"', f'type: "{new}"', text)
    return text


def _compare_with_opencv(pkg, opencv_proto: Path, weights: Path, x: np.ndarray, what: str) -> int:
    """Every layer output (Split excepted), ONNX and torch, against OpenCV; returns the count."""
    from convert import load_torch

    net = opencv_net(opencv_proto, weights)
    assert net is not None, f"OpenCV cannot read {opencv_proto}"
    layers = [li for li in pkg.manifest["layers"] if li["type"] != "Split"]
    names = [li["name"] for li in layers]
    values = [li["tops"][0] for li in layers]
    net.setInput(x)
    ref = dict(zip(names, net.forward(names)))
    ours = run_ort(pkg.onnx_path_for(values), {pkg.input_name: x}, values)
    ours_t = run_torch(load_torch(pkg), x, values)
    for n, v in zip(names, values):
        assert_close(as_shape(ref[n], ours[v].shape), ours[v], f"{what}: layer {n} -> {v}: onnx vs OpenCV")
        assert_close(as_shape(ref[n], ours_t[v].shape), ours_t[v], f"{what}: layer {n} -> {v}: torch vs OpenCV")
    return len(names)


def _convert_generated(tmp_path, proto: Path, seed: int = 0, input_size=None):
    from convert import convert_model
    from convert.generate import generate_caffemodel

    weights = generate_caffemodel(proto, tmp_path / "net.caffemodel", seed=seed, input_size=input_size)
    pkg = convert_model(proto, weights, tmp_path / "pkg", proto.parent.name, log=lambda _m: None,
                        input_size=list(input_size) if input_size else None)
    return proto, weights, pkg


def _random_input(pkg, seed: int = 0) -> np.ndarray:
    shape = [1] + pkg.input_shape[1:]
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


def _input_not_in_place(text: str) -> str:
    """ShuffleNet's first BatchNorm runs in place on the net input ``data``; graft's graph then
    loses the input (ir.py renames it ``data/pre_data/bn``, an engineer elsewhere owns that).
    The copy names the input ``image`` and lets the BatchNorm write ``data``: the same net."""
    text = text.replace('top: "data"', 'top: "image"', 1)
    return text.replace('bottom: "data"', 'bottom: "image"', 1)


@needs_testbed
def test_zoo_shufflenet_v2_matches_opencv(tmp_path):
    proto = tmp_path / "deploy.prototxt"
    proto.write_text(_input_not_in_place((ZOO / "shufflenet_v2_x0.5" / "deploy.prototxt").read_text()))
    _, weights, pkg = _convert_generated(tmp_path, proto)
    types = {li["type"] for li in pkg.manifest["layers"]}
    assert "ShuffleChannel" in types and pkg.manifest["verification"]["passed"]
    assert _compare_with_opencv(pkg, proto, weights, _random_input(pkg), "shufflenet") > 200


@needs_testbed
def test_zoo_shufflenet_v2_as_published_converts(tmp_path):
    """As published: BatchNorm and Scale run in place on the input ``data``."""
    _, _, pkg = _convert_generated(tmp_path, ZOO / "shufflenet_v2_x0.5" / "deploy.prototxt")
    assert pkg.manifest["verification"]["passed"]


@needs_testbed
def test_zoo_mobilenet_v3_small_matches_opencv(tmp_path):
    proto, weights, pkg = _convert_generated(tmp_path, ZOO / "mobilenet_v3_small" / "deploy.prototxt")
    types = {li["type"] for li in pkg.manifest["layers"]}
    assert {"ReLU6", "DepthwiseConvolution", "Scale"} <= types and pkg.manifest["verification"]["passed"]
    renamed = tmp_path / "opencv.prototxt"
    renamed.write_text(_rename_types(proto.read_text(), {"DepthwiseConvolution": "Convolution"}))
    assert _compare_with_opencv(pkg, renamed, weights, _random_input(pkg), "mobilenet_v3_small") > 250


def _face_512() -> np.ndarray:
    import cv2

    faces = sorted((TESTBED / "faces" / "imdbwiki").rglob("*.jpg"))
    assert faces, "no test-bed faces"
    img = cv2.resize(cv2.imread(str(faces[0])), (512, 512), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    return ((img - 127.5) * 0.007843).transpose(2, 0, 1)[None]


@needs_testbed
@pytest.mark.slow
def test_zoo_mobilenet_yolov3_lite_real_weights_match_opencv(tmp_path):
    """Real weights: DepthwiseConvolution, and grouped Deconvolutions with twice as many input
    channels as output channels (512 -> 256, group 256, weight 512x1x4x4)."""
    from convert import convert_model

    folder = ZOO / "mobilenet_yolov3_lite_tusimple"
    proto, weights = folder / "deploy.prototxt", folder / "mobilenet_yolov3_lite_deploy_iter_50000.caffemodel"
    pkg = convert_model(proto, weights, tmp_path / "pkg", "tusimple", log=lambda _m: None)
    assert pkg.manifest["verification"]["passed"]
    assert pkg.blobs["upsample"]["shape"][1] == 256 and pkg.blobs["sigmoid"]["shape"][1:] == [1, 128, 128]
    renamed = tmp_path / "opencv.prototxt"
    renamed.write_text(_rename_types(proto.read_text(), {"DepthwiseConvolution": "Convolution"}))
    assert _compare_with_opencv(pkg, renamed, weights, _face_512(), "tusimple") > 60


def _standard_copy(proto: Path, weights: Path, out_dir: Path, rewrite) -> tuple[Path, Path, dict[str, str]]:
    """A copy of a net for OpenCV in which ``rewrite(layer, blobs, out)`` replaces each layer it
    knows by exact standard layers (appended to the NetParameter ``out``; it returns their
    ``(name, type, blobs)`` or None to keep the layer). Returns the prototxt, the caffemodel and
    {rewritten layer: the standard layer that ends it}."""
    from google.protobuf import text_format

    from convert.generate import write_caffemodel
    from convert.parse import read_prototxt
    from convert.weights import read_caffemodel

    net = read_prototxt(proto)
    blobs = {n: lw.blobs for n, lw in read_caffemodel(weights).layers.items()}
    out = type(net)()
    out.CopyFrom(net)
    del out.layer[:]
    ends, layers = {}, []
    for layer in net.layer:
        done = rewrite(layer, blobs.get(layer.name, []), out)
        if done is None:
            out.layer.add().CopyFrom(layer)
            layers.append((layer.name, layer.type, blobs.get(layer.name, [])))
        else:
            layers += done
            ends[layer.name] = done[-1][0]
    std_proto = out_dir / "standard.prototxt"
    std_proto.write_text(text_format.MessageToString(out))
    return std_proto, write_caffemodel(out_dir / "standard.caffemodel", layers), ends


def _bn_as_batchnorm_scale(layer, blobs, out):
    """PSPNet's BN = BatchNorm (mean, variance, factor 1, same eps) + Scale (slope, bias)."""
    if layer.type != "BN":
        return None
    slope, bias, mean, var = (b.reshape(-1) for b in blobs)
    bn = out.layer.add(name=layer.name, type="BatchNorm", bottom=layer.bottom, top=layer.top)
    bn.batch_norm_param.use_global_stats = True
    bn.batch_norm_param.eps = layer.bn_param.eps
    scale = out.layer.add(name=f"{layer.name}/scale", type="Scale", bottom=layer.top, top=layer.top)
    scale.scale_param.bias_term = True
    return [(bn.name, "BatchNorm", [mean, var, np.ones(1, np.float32)]), (scale.name, "Scale", [slope, bias])]


def _upsample_as_deconvolution(channels: dict[str, int]):
    """Nearest x s upsampling = a depthwise s x s / stride s Deconvolution of ones, no bias."""
    def rewrite(layer, blobs, out):
        if layer.type != "Upsample":
            return None
        c, s = channels[layer.name], int(layer.upsample_param.scale)
        d = out.layer.add(name=layer.name, type="Deconvolution", bottom=layer.bottom, top=layer.top)
        d.convolution_param.num_output, d.convolution_param.group = c, c
        d.convolution_param.kernel_size.append(s)
        d.convolution_param.stride.append(s)
        d.convolution_param.bias_term = False
        return [(layer.name, "Deconvolution", [np.ones((c, 1, s, s), np.float32)])]
    return rewrite


def _compare_values(pkg, net, layers: list[dict], ends: dict[str, str], x: np.ndarray, what: str) -> None:
    """The named layers' outputs, ONNX then torch (one at a time: big blobs), against OpenCV."""
    from convert import load_torch

    names = [li["name"] for li in layers]
    values = [li["tops"][0] for li in layers]
    net.setInput(x)
    ref = dict(zip(names, net.forward([ends.get(n, n) for n in names])))
    for runtime in ("onnx", "torch"):
        if runtime == "onnx":
            ours = run_ort(pkg.onnx_path_for(values), {pkg.input_name: x}, values)
        else:
            ours = run_torch(load_torch(pkg), x, values)
        for n, v in zip(names, values):
            assert_close(as_shape(ref[n], ours[v].shape), ours[v], f"{what}: layer {n} -> {v}: {runtime} vs OpenCV")
        del ours


@needs_testbed
@pytest.mark.slow
def test_zoo_yolov3_darknet2caffe_matches_opencv(tmp_path):
    """darknet2caffe YOLOv3 with its two Upsample layers, without the custom
    Yolov3DetectionOutput head, at 160x160 (any multiple of 32 keeps the route Concats valid),
    generated weights; OpenCV runs an exact copy with each Upsample as a Deconvolution of ones.
    Every layer output is compared."""
    from google.protobuf import text_format

    from convert.parse import read_prototxt

    net = read_prototxt(ZOO / "yolov3_darknet2caffe" / "deploy.prototxt")
    keep = [layer for layer in net.layer if layer.type != "Yolov3DetectionOutput"]
    assert len(keep) == len(net.layer) - 1
    del net.layer[:]
    net.layer.extend(keep)
    proto = tmp_path / "yolov3_darknet2caffe" / "deploy.prototxt"
    proto.parent.mkdir()
    proto.write_text(text_format.MessageToString(net))
    _, weights, pkg = _convert_generated(tmp_path, proto, input_size=(160, 160))
    assert pkg.manifest["verification"]["passed"]
    assert pkg.blobs["layer86-upsample"]["shape"][1:] == [256, 10, 10]
    channels = {li["name"]: pkg.blobs[li["tops"][0]]["shape"][1] for li in pkg.manifest["layers"] if li["type"] == "Upsample"}
    std_proto, std_weights, ends = _standard_copy(proto, weights, tmp_path, _upsample_as_deconvolution(channels))
    cv = opencv_net(std_proto, std_weights)
    assert cv is not None
    x = _random_input(pkg)
    _compare_values(pkg, cv, [li for li in pkg.manifest["layers"] if li["type"] != "Split"], ends, x, "yolov3")


@needs_testbed
@pytest.mark.slow
def test_zoo_pspnet50_matches_opencv_on_a_standard_copy(tmp_path):
    """PSPNet-50 at its real 473x473 (only 471..478 keep conv5_3 at the 60x60 that its
    explicit Interp sizes and the Concat need), generated weights. OpenCV runs an exact copy
    with BN written as BatchNorm + Scale; compared: every BN, Interp, Pooling, Concat and
    Eltwise output (the net output is the last Interp)."""
    proto = ZOO / "pspnet50_ade20k" / "deploy.prototxt"
    _, weights, pkg = _convert_generated(tmp_path, proto)
    assert pkg.manifest["verification"]["passed"]
    assert pkg.blobs["conv6_interp"]["shape"] == [None, 150, 473, 473]
    std_proto, std_weights, ends = _standard_copy(proto, weights, tmp_path, _bn_as_batchnorm_scale)
    net = opencv_net(std_proto, std_weights)
    assert net is not None
    last = pkg.manifest["layers"][-1]
    assert last["name"] == "conv6_interp"
    layers = [li for li in pkg.manifest["layers"] if li["type"] in ("BN", "Interp", "Pooling", "Concat", "Eltwise")]
    assert sum(li["type"] == "BN" for li in layers) == 60 and sum(li["type"] == "Interp" for li in layers) == 5
    _compare_values(pkg, net, layers, ends, _random_input(pkg), "pspnet50")
