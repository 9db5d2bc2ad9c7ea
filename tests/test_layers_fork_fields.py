"""Fork fields that change numerics, honoured: Faster R-CNN's ``dropout_param.scale_train``
(OpenCV's importer reads it: the reference) and DeepLab v1's ``convolution_param.hole`` (its
name for dilation: checked against a numpy convolution and against ``dilation``)."""

from __future__ import annotations

import numpy as np
import pytest
from _convert_helpers import assert_close, opencv_net, run_ort, run_torch
from test_convert_layers import conv_ref

COVERED_TYPES = {"Dropout", "Convolution"}

NET = """name: "t"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 3 dim: 9 dim: 11 }} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param {{ num_output: 4 kernel_size: 3 {conv} }} }}
{extra}
"""


def convert(tmp_path, text: str, name: str = "t"):
    from convert import convert_model
    from convert.generate import generate_caffemodel

    proto = tmp_path / f"{name}.prototxt"
    proto.write_text(text)
    weights = generate_caffemodel(proto, tmp_path / f"{name}.caffemodel", seed=3)
    return proto, weights, convert_model(proto, weights, tmp_path / name, name, log=lambda _m: None)


def batch2(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, 9, 11)).astype(np.float32)


@pytest.mark.parametrize("in_place", [True, False])
def test_dropout_scale_train_false_scales_at_test_time(tmp_path, in_place):
    top = "conv" if in_place else "drop"
    extra = (f'layer {{ name: "drop" type: "Dropout" bottom: "conv" top: "{top}" '
             "dropout_param { dropout_ratio: 0.3 scale_train: false } }")
    proto, weights, pkg = convert(tmp_path, NET.format(conv="", extra=extra))
    x = batch2()
    pre = "conv/pre_drop" if in_place else "conv"
    values = [pre, top]
    got_o = run_ort(pkg.onnx_path_for(values), {"data": x}, values)
    got_t = run_torch(__import__("convert").load_torch(pkg), x, values)
    for got, runtime in ((got_o, "onnx"), (got_t, "torch")):
        assert_close(got[pre] * np.float32(0.7), got[top], f"{runtime}: x·(1 − ratio)")
        assert np.abs(got[top]).max() > 0
    net = opencv_net(proto, weights)
    assert net is not None
    net.setInput(x)
    ref = net.forward("drop")
    assert_close(ref, got_o[top], "onnx vs OpenCV")
    assert_close(ref, got_t[top], "torch vs OpenCV")


def test_dropout_scale_train_false_trains_without_scaling(tmp_path):
    import torch

    from convert import load_torch

    extra = ('layer { name: "drop" type: "Dropout" bottom: "conv" top: "drop" '
             "dropout_param { dropout_ratio: 0.5 scale_train: false } }")
    _, _, pkg = convert(tmp_path, NET.format(conv="", extra=extra))
    net = load_torch(pkg).train()
    x = torch.from_numpy(batch2())
    torch.manual_seed(0)
    out = net(x, blobs=["conv", "drop"])
    kept = out["drop"] != 0
    assert 0.3 < kept.float().mean() < 0.7  # about half dropped
    assert torch.equal(out["drop"][kept], out["conv"][kept])  # the rest unscaled


def test_dropout_default_is_the_identity(tmp_path):
    extra = 'layer { name: "drop" type: "Dropout" bottom: "conv" top: "drop" dropout_param { dropout_ratio: 0.3 } }'
    _, _, pkg = convert(tmp_path, NET.format(conv="", extra=extra))
    got = run_ort(pkg.onnx_path_for(["conv", "drop"]), {"data": batch2()}, ["conv", "drop"])
    assert np.array_equal(got["conv"], got["drop"])


@pytest.mark.parametrize(("hole", "dil"), [("hole: 2", (2, 2)), ("hole_h: 2 hole_w: 3", (2, 3)), ("hole: 1", (1, 1))])
def test_convolution_hole_is_dilation(tmp_path, hole, dil):
    from convert import load_torch
    from convert.weights import read_caffemodel

    proto, weights, pkg = convert(tmp_path, NET.format(conv=f"pad: 1 {hole}", extra=""))
    x = batch2(1)
    w, b = read_caffemodel(weights).layers["conv"].blobs
    ref = conv_ref(x, np.asarray(w).reshape(4, 3, 3, 3), np.asarray(b), pad=(1, 1), dil=dil)
    assert tuple(pkg.blobs["conv"]["shape"][1:]) == ref.shape[1:]
    assert_close(ref, run_ort(pkg.onnx_path, {"data": x}, ["conv"])["conv"], f"{hole}: onnx vs numpy")
    assert_close(ref, run_torch(load_torch(pkg), x, ["conv"])["conv"], f"{hole}: torch vs numpy")


def test_hole_and_dilation_that_disagree_are_an_error(tmp_path):
    from convert import GraftError

    with pytest.raises(GraftError, match="layer 'conv': dilation .* and hole .* disagree"):
        convert(tmp_path, NET.format(conv="dilation: 2 hole: 3", extra=""))
