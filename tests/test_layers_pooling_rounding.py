"""Pooling's output rounding: BVLC's ``round_mode: FLOOR`` and the forks' ``ceil_mode: false``
(BVLC PR #3057, kept in OpenCV's own caffe.proto and in caffe-ssd derivatives).

Tiny generated nets, batch 2 through a net declared with batch 1, ONNX (onnxruntime) and torch
each against a numpy transcription of Caffe's pooling loop with the rounding switch, and the
``ceil_mode`` layers against OpenCV, whose Caffe importer reads ``ceil_mode`` itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _convert_helpers import assert_close, opencv_forward, opencv_net, run_ort, run_torch
from test_convert_layers import Case, render

COVERED_TYPES = {"Pooling"}


def out_size(size: int, k: int, p: int, s: int, ceil: bool) -> int:
    """PoolingLayer::Reshape: ceil or floor of (H + 2p - k)/s, plus 1; then, with padding, drop a
    last window that would start in the padding."""
    o = (math.ceil if ceil else math.floor)((size + 2 * p - k) / s) + 1
    if p > 0 and (o - 1) * s >= size + p:
        o -= 1
    return o


def pool_ref(x, kernel, stride, pad, mode, ceil):
    """PoolingLayer::Forward_cpu: MAX over the window clipped to the image; AVE sum over the
    clipped window divided by the window clipped only to the padded extent."""
    n, c, h, w = x.shape
    ho, wo = (out_size(sz, k, p, s, ceil) for sz, k, p, s in zip((h, w), kernel, pad, stride))
    y = np.zeros((n, c, ho, wo))
    for ph in range(ho):
        for pw in range(wo):
            hs, ws = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
            he, we = min(hs + kernel[0], h + pad[0]), min(ws + kernel[1], w + pad[1])
            size = (he - hs) * (we - ws)
            win = x[:, :, max(hs, 0):min(he, h), max(ws, 0):min(we, w)].astype(np.float64)
            y[:, :, ph, pw] = win.max(axis=(2, 3)) if mode == "MAX" else win.sum(axis=(2, 3)) / size
    return y


#: (layer name, pooling_param body, kernel, stride, pad, mode, rounds up)
LAYERS = [
    ("max_k3s2_floor", "pool: MAX kernel_size: 3 stride: 2 ceil_mode: false", (3, 3), (2, 2), (0, 0), "MAX", False),
    ("ave_k3s2_floor", "pool: AVE kernel_size: 3 stride: 2 ceil_mode: false", (3, 3), (2, 2), (0, 0), "AVE", False),
    ("max_k3s2p1_floor", "pool: MAX kernel_size: 3 stride: 2 pad: 1 ceil_mode: false", (3, 3), (2, 2), (1, 1), "MAX", False),
    ("ave_k3s2p1_floor", "pool: AVE kernel_size: 3 stride: 2 pad: 1 ceil_mode: false", (3, 3), (2, 2), (1, 1), "AVE", False),
    ("ave_k3s3p1_floor", "pool: AVE kernel_size: 3 stride: 3 pad: 1 ceil_mode: false", (3, 3), (3, 3), (1, 1), "AVE", False),
    ("ave_k3s2p1_ceil", "pool: AVE kernel_size: 3 stride: 2 pad: 1 ceil_mode: true", (3, 3), (2, 2), (1, 1), "AVE", True),
    ("max_hw_floor", "pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 1 ceil_mode: false",
     (3, 2), (2, 3), (1, 1), "MAX", False),
    ("ave_hw_floor", "pool: AVE kernel_h: 2 kernel_w: 2 stride_h: 3 stride_w: 2 pad_h: 1 pad_w: 0 ceil_mode: false",
     (2, 2), (3, 2), (1, 0), "AVE", False),
]
#: BVLC's spelling (OpenCV's caffe.proto has no round_mode, so these are checked against numpy only)
BVLC_LAYERS = [
    ("max_k3s2_round_floor", "pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR", (3, 3), (2, 2), (0, 0), "MAX", False),
    ("ave_k3s2p1_round_floor", "pool: AVE kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR", (3, 3), (2, 2), (1, 1), "AVE", False),
    ("ave_both_floor", "pool: AVE kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR ceil_mode: false",
     (3, 3), (2, 2), (1, 1), "AVE", False),
    ("max_round_ceil", "pool: MAX kernel_size: 3 stride: 2 round_mode: CEIL", (3, 3), (2, 2), (0, 0), "MAX", True),
]
SHAPE = (1, 3, 8, 9)  # 8 and 9: sizes where floor and ceil give different outputs


def case(cid: str, layers) -> Case:
    return Case(cid, SHAPE, [(n, "Pooling", ["data"], [n], f"pooling_param {{ {body} }}") for n, body, *_ in layers],
                lambda x, W: {n: pool_ref(x, k, s, p, m, c) for n, _, k, s, p, m, c in layers})


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    from convert import convert_model
    from convert.generate import generate_caffemodel

    root = tmp_path_factory.mktemp("pool-rounding")
    out = {}
    for c in (case("ceil-mode", LAYERS), case("round-mode", BVLC_LAYERS)):
        proto = root / f"{c.id}.prototxt"
        proto.write_text(render(c, "V2"))
        weights = generate_caffemodel(proto, root / f"{c.id}.caffemodel")
        out[c.id] = (c, proto, weights, convert_model(proto, weights, root / c.id, c.id, log=lambda _m: None))
    return out


def test_floor_sizes_differ_from_ceil():
    """The cases exercise the switch: each floor layer has a smaller output than ceil would give."""
    for _, _, k, s, p, _, ceil in LAYERS + BVLC_LAYERS:
        if not ceil:
            sizes = [(out_size(sz, kk, pp, ss, False), out_size(sz, kk, pp, ss, True)) for sz, kk, pp, ss in zip(SHAPE[2:], k, p, s)]
            assert any(f < c for f, c in sizes), (k, s, p, sizes)


@pytest.mark.parametrize("cid", ["ceil-mode", "round-mode"])
def test_rounding_matches_numpy_reference(packages, cid):
    from convert import load_torch

    c, _, _, pkg = packages[cid]
    assert pkg.manifest["verification"]["passed"] is True
    x = (np.random.default_rng(3).standard_normal((2,) + SHAPE[1:]) * 2 - 1).astype(np.float32)
    expected = c.ref(x, {})
    names = list(expected)
    got_onnx = run_ort(pkg.onnx_path_for(names), {"data": x}, names)
    got_torch = run_torch(load_torch(pkg), x, names)
    for n in names:
        assert tuple(pkg.blobs[n]["shape"][1:]) == expected[n].shape[1:], n
        assert_close(expected[n], got_onnx[n], f"{n}: onnx vs numpy reference")
        assert_close(expected[n], got_torch[n], f"{n}: torch vs numpy reference")


def test_ceil_mode_matches_opencv(packages):
    from convert import load_torch

    c, proto, weights, pkg = packages["ceil-mode"]
    net = opencv_net(proto, weights)
    assert net is not None, "OpenCV cannot read the ceil_mode net"
    x = (np.random.default_rng(4).standard_normal((2,) + SHAPE[1:]) * 2 - 1).astype(np.float32)
    names = [n for n, *_ in LAYERS]
    ref = opencv_forward(net, x, names)
    got_onnx = run_ort(pkg.onnx_path_for(names), {"data": x}, names)
    got_torch = run_torch(load_torch(pkg), x, names)
    for n in names:
        assert_close(ref[n], got_onnx[n], f"{n}: onnx vs OpenCV")
        assert_close(ref[n], got_torch[n], f"{n}: torch vs OpenCV")


def test_conflicting_round_mode_and_ceil_mode_is_an_error(tmp_path):
    from convert import GraftError, convert_model
    from convert.generate import generate_caffemodel

    c = case("conflict", [("pool1", "pool: MAX kernel_size: 3 stride: 2 round_mode: CEIL ceil_mode: false", None, None, None, None, None)])
    proto = tmp_path / "net.prototxt"
    proto.write_text(render(c, "V2"))
    with pytest.raises(GraftError, match=r"layer 'pool1': round_mode CEIL and ceil_mode false disagree"):
        convert_model(proto, generate_caffemodel(proto, tmp_path / "net.caffemodel"), tmp_path / "pkg", "c", log=lambda _m: None)
