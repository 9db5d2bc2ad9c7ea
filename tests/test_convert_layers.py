"""Every registered layer type, in tiny generated nets, checked three ways:

* the package's ONNX (onnxruntime) and ``load_torch`` against a numpy reference written here
  from docs/caffe-semantics.md (batch of 2, so the dynamic batch is exercised everywhere);
* every layer output against OpenCV's independent Caffe importer, where OpenCV reads the net;
* ONNX against torch on every blob.

Nets are written in V2 syntax and, where every type has a V1 enum, in V1 syntax too; weights
are generated (``generate_caffemodel``) in the V1 and the V2 binary layouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from _convert_helpers import as_shape, assert_close, opencv_net, run_ort, run_torch

# V1 enum names, from caffe-semantics.md (independent of convert.parse's table)
V1_NAMES = {
    "Convolution": "CONVOLUTION", "InnerProduct": "INNER_PRODUCT", "Pooling": "POOLING", "ReLU": "RELU",
    "Softmax": "SOFTMAX", "Dropout": "DROPOUT", "LRN": "LRN", "Concat": "CONCAT", "Eltwise": "ELTWISE",
    "Flatten": "FLATTEN", "Split": "SPLIT", "Slice": "SLICE", "Sigmoid": "SIGMOID", "TanH": "TANH",
    "Power": "POWER", "AbsVal": "ABSVAL", "Deconvolution": "DECONVOLUTION", "BNLL": "BNLL", "Exp": "EXP",
    "Threshold": "THRESHOLD",
}


# ----------------------------------------------------------------------------- numpy references


def conv_ref(x, w, b=None, stride=(1, 1), pad=(0, 0), dil=(1, 1), group=1):
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    y = np.zeros((n, o, ho, wo))
    og = o // group
    for g in range(group):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w[g * og:(g + 1) * og].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                hi, wj = i * dil[0], j * dil[1]
                patch = xs[:, :, hi:hi + stride[0] * (ho - 1) + 1:stride[0], wj:wj + stride[1] * (wo - 1) + 1:stride[1]]
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def deconv_ref(x, w, b=None, stride=(1, 1), pad=(0, 0), dil=(1, 1), group=1):
    """Caffe Deconvolution: weight (C_in, num_output/group, kh, kw), scatter-add then crop pad."""
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    full_h = stride[0] * (h - 1) + dil[0] * (kh - 1) + 1
    full_w = stride[1] * (wd - 1) + dil[1] * (kw - 1) + 1
    y = np.zeros((n, og * group, full_h, full_w))
    cg = c // group
    for g in range(group):
        xs = x[:, g * cg:(g + 1) * cg].astype(np.float64)
        ws = w[g * cg:(g + 1) * cg].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                hi, wj = i * dil[0], j * dil[1]
                y[:, g * og:(g + 1) * og, hi:hi + stride[0] * (h - 1) + 1:stride[0],
                  wj:wj + stride[1] * (wd - 1) + 1:stride[1]] += np.einsum("nchw,co->nohw", xs, ws[:, :, i, j])
    y = y[:, :, pad[0]:full_h - pad[0], pad[1]:full_w - pad[1]]
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def pool_out(size, k, p, s):
    o = int(math.ceil((size + 2 * p - k) / s)) + 1
    if p > 0 and (o - 1) * s >= size + p:
        o -= 1
    return o


def pool_ref(x, kernel, stride=(1, 1), pad=(0, 0), mode="MAX", global_pool=False):
    """Caffe's pooling loop, literally (caffe-semantics.md, 'Pooling')."""
    n, c, h, w = x.shape
    if global_pool:
        kernel, stride, pad = (h, w), (1, 1), (0, 0)
    ho, wo = pool_out(h, kernel[0], pad[0], stride[0]), pool_out(w, kernel[1], pad[1], stride[1])
    y = np.zeros((n, c, ho, wo))
    for ph in range(ho):
        for pw in range(wo):
            hs, ws = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
            he, we = min(hs + kernel[0], h + pad[0]), min(ws + kernel[1], w + pad[1])
            size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            win = x[:, :, hs:he, ws:we].astype(np.float64)
            y[:, :, ph, pw] = win.max(axis=(2, 3)) if mode == "MAX" else win.sum(axis=(2, 3)) / size
    return y


def lrn_across_ref(x, n, alpha, beta, k=1.0):
    c = x.shape[1]
    sq = x.astype(np.float64) ** 2
    pre = (n - 1) // 2
    y = np.zeros_like(sq)
    for ch in range(c):
        lo, hi = max(0, ch - pre), min(c, ch - pre + n)
        y[:, ch] = x[:, ch] * (k + alpha / n * sq[:, lo:hi].sum(1)) ** (-beta)
    return y


def lrn_within_ref(x, n, alpha, beta):
    avg = pool_ref(x.astype(np.float64) ** 2, (n, n), (1, 1), ((n - 1) // 2, (n - 1) // 2), "AVE")
    return x * (1 + alpha * avg) ** (-beta)


def softmax_ref(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def ip_ref(x, w, b=None, axis=1, transpose=False):
    lead = x.shape[:axis]
    flat = x.reshape(int(np.prod(lead)), -1).astype(np.float64)
    wm = w.reshape(flat.shape[1], -1) if transpose else w.reshape(-1, flat.shape[1]).T
    y = flat @ wm
    if b is not None:
        y += b.reshape(1, -1)
    return y.reshape(*lead, -1)


def bn_ref(x, blobs, eps=1e-5):
    mean, var, s = (a.reshape(-1).astype(np.float64) for a in blobs)
    f = 0.0 if s[0] == 0 else 1.0 / s[0]
    return (x - (mean * f).reshape(1, -1, 1, 1)) / np.sqrt((var * f).reshape(1, -1, 1, 1) + eps)


def chan(v):
    return v.reshape(1, -1, 1, 1)


# ----------------------------------------------------------------------------- net cases


@dataclass
class Case:
    id: str
    shape: tuple[int, ...]
    layers: list[tuple]  # (name, type, bottoms, tops, params text)
    ref: Callable[[np.ndarray, dict], dict]  # (x, {layer: [blobs]}) -> {value: expected}
    make_input: Callable[[np.random.Generator, tuple], np.ndarray] = None
    input_form: str = "layer"  # V2: Input layer, or 'input_shape'
    expect_shapes: dict = field(default_factory=dict)  # value -> shape without the batch axis

    @property
    def types(self) -> set[str]:
        return {t for _, t, *_ in self.layers}

    @property
    def v1_ok(self) -> bool:
        return self.types <= set(V1_NAMES)


def render(case: Case, syntax: str) -> str:
    lines = [f'name: "{case.id}"']
    dims = " ".join(f"dim: {d}" for d in case.shape)
    if syntax == "V1":
        lines += ['input: "data"'] + [f"input_dim: {d}" for d in case.shape]
    elif case.input_form == "input_shape":
        lines += ['input: "data"', f"input_shape {{ {dims} }}"]
    else:
        lines.append(f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {dims} }} }} }}')
    for name, ltype, bottoms, tops, params in case.layers:
        kw, tstr = ("layers", V1_NAMES[ltype]) if syntax == "V1" else ("layer", f'"{ltype}"')
        body = [f'  name: "{name}"', f"  type: {tstr}"]
        body += [f'  bottom: "{b}"' for b in bottoms] + [f'  top: "{t}"' for t in tops]
        if params:
            body.append("  " + params)
        lines.append(kw + " {\n" + "\n".join(body) + "\n}")
    return "\n".join(lines) + "\n"


def normal(scale=2.0):
    return lambda rng, shape: (rng.standard_normal(shape) * scale).astype(np.float32)


CONV = "convolution_param"
CASES: list[Case] = []


def case(*args, **kw):
    CASES.append(Case(*args, **kw))


# Convolution: plain + in-place ReLU / Dropout chain
case("conv-inplace-relu-dropout", (1, 3, 9, 9), [
    ("conv", "Convolution", ["data"], ["conv"], f"{CONV} {{ num_output: 4 kernel_size: 3 pad: 1 stride: 2 }}"),
    ("relu", "ReLU", ["conv"], ["conv"], ""),
    ("drop", "Dropout", ["conv"], ["conv"], "dropout_param { dropout_ratio: 0.5 }"),
], lambda x, W: {
    "conv/pre_relu": conv_ref(x, *W["conv"][:1], W["conv"][1], (2, 2), (1, 1)),
    "conv/pre_drop": np.maximum(conv_ref(x, W["conv"][0], W["conv"][1], (2, 2), (1, 1)), 0),
    "conv": np.maximum(conv_ref(x, W["conv"][0], W["conv"][1], (2, 2), (1, 1)), 0),
}, expect_shapes={"conv": (4, 5, 5), "conv/pre_relu": (4, 5, 5)})

case("conv-group-dilation", (1, 4, 9, 9), [
    ("conv", "Convolution", ["data"], ["out"], f"{CONV} {{ num_output: 6 group: 2 kernel_size: 3 dilation: 2 pad: 1 }}"),
], lambda x, W: {"out": conv_ref(x, W["conv"][0].reshape(6, 2, 3, 3), W["conv"][1], pad=(1, 1), dil=(2, 2), group=2)},
    expect_shapes={"out": (6, 7, 7)})

case("conv-per-axis-hw-nobias", (1, 3, 9, 8), [
    ("conv", "Convolution", ["data"], ["out"],
     f"{CONV} {{ num_output: 5 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0 stride_h: 2 stride_w: 1 bias_term: false }}"),
], lambda x, W: {"out": conv_ref(x, W["conv"][0].reshape(5, 3, 3, 2), None, (2, 1), (1, 0))},
    expect_shapes={"out": (5, 5, 7)})

case("conv-repeated-per-axis", (1, 2, 7, 9), [
    ("conv", "Convolution", ["data"], ["out"],
     f"{CONV} {{ num_output: 3 kernel_size: 3 kernel_size: 1 pad: 1 pad: 0 stride: 1 stride: 2 }}"),
], lambda x, W: {"out": conv_ref(x, W["conv"][0].reshape(3, 2, 3, 1), W["conv"][1], (1, 2), (1, 0))},
    expect_shapes={"out": (3, 7, 5)})

case("conv-depthwise", (1, 4, 8, 8), [
    ("dw", "Convolution", ["data"], ["out"], f"{CONV} {{ num_output: 4 group: 4 kernel_size: 3 stride: 2 pad: 1 }}"),
], lambda x, W: {"out": conv_ref(x, W["dw"][0].reshape(4, 1, 3, 3), W["dw"][1], (2, 2), (1, 1), group=4)})

case("deconv", (1, 3, 5, 5), [
    ("up", "Deconvolution", ["data"], ["up"], f"{CONV} {{ num_output: 4 kernel_size: 4 stride: 2 pad: 1 }}"),
    ("upg", "Deconvolution", ["data"], ["upg"],
     f"{CONV} {{ num_output: 6 group: 3 kernel_size: 3 stride: 2 dilation: 2 bias_term: false }}"),
], lambda x, W: {
    "up": deconv_ref(x, W["up"][0].reshape(3, 4, 4, 4), W["up"][1], (2, 2), (1, 1)),
    "upg": deconv_ref(x, W["upg"][0].reshape(3, 2, 3, 3), None, (2, 2), (0, 0), (2, 2), group=3),
}, expect_shapes={"up": (4, 10, 10), "upg": (6, 13, 13)})


def _pool(kernel, stride, pad, mode, extra=""):
    return (f"pooling_param {{ pool: {mode} kernel_size: {kernel} stride: {stride} pad: {pad} {extra}}}")


case("pool-7x7-ceil-and-pad", (1, 3, 7, 7), [
    ("max_k3s2p1", "Pooling", ["data"], ["max_k3s2p1"], _pool(3, 2, 1, "MAX")),
    ("ave_k3s2p1", "Pooling", ["data"], ["ave_k3s2p1"], _pool(3, 2, 1, "AVE")),
    ("max_k2s2p1", "Pooling", ["data"], ["max_k2s2p1"], _pool(2, 2, 1, "MAX")),
    ("ave_k2s2p1", "Pooling", ["data"], ["ave_k2s2p1"], _pool(2, 2, 1, "AVE")),
], lambda x, W: {
    "max_k3s2p1": pool_ref(x, (3, 3), (2, 2), (1, 1), "MAX"),
    "ave_k3s2p1": pool_ref(x, (3, 3), (2, 2), (1, 1), "AVE"),
    "max_k2s2p1": pool_ref(x, (2, 2), (2, 2), (1, 1), "MAX"),
    "ave_k2s2p1": pool_ref(x, (2, 2), (2, 2), (1, 1), "AVE"),
}, make_input=lambda rng, s: (rng.standard_normal(s) * 2 - 3).astype(np.float32),  # mostly negative: padding must never win a MAX
    expect_shapes={"max_k3s2p1": (3, 4, 4), "ave_k3s2p1": (3, 4, 4), "max_k2s2p1": (3, 4, 4)})

case("pool-6x6-ceil-global", (1, 3, 6, 6), [
    ("max_k3s2", "Pooling", ["data"], ["max_k3s2"], _pool(3, 2, 0, "MAX")),
    ("ave_k3s2", "Pooling", ["data"], ["ave_k3s2"], _pool(3, 2, 0, "AVE")),
    ("ave_k3s3p1", "Pooling", ["data"], ["ave_k3s3p1"], _pool(3, 3, 1, "AVE")),
    ("ave_k2s2p1", "Pooling", ["data"], ["ave_k2s2p1"], _pool(2, 2, 1, "AVE")),
    ("gave", "Pooling", ["data"], ["gave"], "pooling_param { pool: AVE global_pooling: true }"),
    ("gmax", "Pooling", ["data"], ["gmax"], "pooling_param { pool: MAX global_pooling: true }"),
], lambda x, W: {
    "max_k3s2": pool_ref(x, (3, 3), (2, 2), (0, 0), "MAX"),
    "ave_k3s2": pool_ref(x, (3, 3), (2, 2), (0, 0), "AVE"),
    "ave_k3s3p1": pool_ref(x, (3, 3), (3, 3), (1, 1), "AVE"),
    "ave_k2s2p1": pool_ref(x, (2, 2), (2, 2), (1, 1), "AVE"),
    "gave": x.mean(axis=(2, 3), keepdims=True),
    "gmax": x.max(axis=(2, 3), keepdims=True),
}, expect_shapes={"max_k3s2": (3, 3, 3), "ave_k3s2": (3, 3, 3), "ave_k2s2p1": (3, 4, 4), "gave": (3, 1, 1)})

case("pool-per-axis-nonsquare", (1, 2, 8, 7), [
    ("ave_hw", "Pooling", ["data"], ["ave_hw"],
     "pooling_param { pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 1 }"),
    ("max_hw", "Pooling", ["data"], ["max_hw"],
     "pooling_param { pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 1 }"),
    ("gave", "Pooling", ["data"], ["gave"], "pooling_param { pool: AVE global_pooling: true }"),
], lambda x, W: {
    "ave_hw": pool_ref(x, (3, 2), (2, 3), (1, 1), "AVE"),
    "max_hw": pool_ref(x, (3, 2), (2, 3), (1, 1), "MAX"),
    "gave": x.mean(axis=(2, 3), keepdims=True),
}, input_form="input_shape")

case("innerproduct", (1, 3, 4, 4), [
    ("ip", "InnerProduct", ["data"], ["ip"], "inner_product_param { num_output: 5 }"),
    ("ip_t", "InnerProduct", ["data"], ["ip_t"], "inner_product_param { num_output: 6 transpose: true }"),
    ("ip_nb", "InnerProduct", ["data"], ["ip_nb"], "inner_product_param { num_output: 4 bias_term: false }"),
    ("ip2", "InnerProduct", ["ip"], ["ip2"], "inner_product_param { num_output: 3 }"),
], lambda x, W: {
    "ip": ip_ref(x, W["ip"][0], W["ip"][1]),
    "ip_t": ip_ref(x, W["ip_t"][0], W["ip_t"][1], transpose=True),
    "ip_nb": ip_ref(x, W["ip_nb"][0]),
    "ip2": ip_ref(ip_ref(x, W["ip"][0], W["ip"][1]), W["ip2"][0], W["ip2"][1]),
}, expect_shapes={"ip": (5,), "ip_t": (6,), "ip2": (3,)})

case("innerproduct-axis2", (1, 2, 3, 4), [
    ("ip", "InnerProduct", ["data"], ["ip"], "inner_product_param { num_output: 5 axis: 2 }"),
    ("ip_t", "InnerProduct", ["data"], ["ip_t"], "inner_product_param { num_output: 3 axis: 2 transpose: true bias_term: false }"),
], lambda x, W: {
    "ip": ip_ref(x, W["ip"][0], W["ip"][1], axis=2),
    "ip_t": ip_ref(x, W["ip_t"][0], axis=2, transpose=True),
}, expect_shapes={"ip": (2, 5), "ip_t": (2, 3)})

case("activations-v1", (1, 3, 5, 5), [
    ("relu", "ReLU", ["data"], ["relu"], ""),
    ("leaky", "ReLU", ["data"], ["leaky"], "relu_param { negative_slope: 0.1 }"),
    ("sig", "Sigmoid", ["data"], ["sig"], ""),
    ("tanh", "TanH", ["data"], ["tanh"], ""),
    ("abs", "AbsVal", ["data"], ["abs"], ""),
    ("bnll", "BNLL", ["data"], ["bnll"], ""),
    ("drop", "Dropout", ["data"], ["drop"], "dropout_param { dropout_ratio: 0.3 }"),
], lambda x, W: {
    "relu": np.maximum(x, 0), "leaky": np.where(x > 0, x, 0.1 * x), "sig": 1 / (1 + np.exp(-x.astype(np.float64))),
    "tanh": np.tanh(x), "abs": np.abs(x), "bnll": np.log1p(np.exp(x.astype(np.float64))),
    "drop": x,
})

case("threshold", (1, 3, 5, 5), [
    ("thr", "Threshold", ["data"], ["thr"], "threshold_param { threshold: 0.3 }"),
    ("thr0", "Threshold", ["data"], ["thr0"], ""),
], lambda x, W: {"thr": (x > 0.3).astype(np.float32), "thr0": (x > 0).astype(np.float32)})

case("activations-v2", (1, 3, 5, 5), [
    ("elu", "ELU", ["data"], ["elu"], "elu_param { alpha: 0.5 }"),
    ("elu1", "ELU", ["data"], ["elu1"], ""),
    ("prelu", "PReLU", ["data"], ["prelu"], ""),
    ("prelu_sh", "PReLU", ["data"], ["prelu_sh"], "prelu_param { channel_shared: true }"),
], lambda x, W: {
    "elu": np.where(x > 0, x, 0.5 * (np.exp(x.astype(np.float64)) - 1)),
    "elu1": np.where(x > 0, x, np.exp(x.astype(np.float64)) - 1),
    "prelu": np.where(x > 0, x, chan(W["prelu"][0]) * x),
    "prelu_sh": np.where(x > 0, x, W["prelu_sh"][0].reshape(()) * x),
})

case("power-exp", (1, 3, 5, 5), [
    ("abs", "AbsVal", ["data"], ["abs"], ""),
    ("sqrt", "Power", ["abs"], ["sqrt"], "power_param { power: 0.5 scale: 2 shift: 1 }"),
    ("cube", "Power", ["data"], ["cube"], "power_param { power: 3 scale: -0.5 shift: 0.25 }"),
    ("affine", "Power", ["data"], ["affine"], "power_param { scale: 2 shift: -1 }"),
    ("exp2", "Exp", ["data"], ["exp2"], "exp_param { base: 2 scale: 0.3 shift: -0.1 }"),
    ("expe", "Exp", ["data"], ["expe"], "exp_param { scale: 0.05 }"),
], lambda x, W: {
    "abs": np.abs(x), "sqrt": np.sqrt(1 + 2 * np.abs(x.astype(np.float64))),
    "cube": (0.25 - 0.5 * x.astype(np.float64)) ** 3, "affine": 2 * x - 1.0,
    "exp2": 2.0 ** (-0.1 + 0.3 * x.astype(np.float64)), "expe": np.exp(0.05 * x.astype(np.float64)),
})

case("log", (1, 3, 5, 5), [
    ("abs", "AbsVal", ["data"], ["abs"], ""),
    ("pos", "Power", ["abs"], ["pos"], "power_param { shift: 0.1 }"),
    ("log10", "Log", ["abs"], ["log10"], "log_param { base: 10 scale: 2 shift: 0.5 }"),
    ("ln", "Log", ["pos"], ["ln"], ""),
    ("log2", "Log", ["pos"], ["log2"], "log_param { base: 2 }"),
], lambda x, W: {
    "log10": np.log10(0.5 + 2 * np.abs(x.astype(np.float64))),
    "ln": np.log(0.1 + np.abs(x.astype(np.float64))),
    "log2": np.log2(0.1 + np.abs(x.astype(np.float64))),
})

case("softmax-axis", (1, 4, 3, 5), [
    ("sm", "Softmax", ["data"], ["sm"], ""),
    ("sm3", "Softmax", ["data"], ["sm3"], "softmax_param { axis: 3 }"),
    ("sm2", "Softmax", ["data"], ["sm2"], "softmax_param { axis: -2 }"),
], lambda x, W: {"sm": softmax_ref(x, 1), "sm3": softmax_ref(x, 3), "sm2": softmax_ref(x, 2)})

case("lrn", (1, 7, 6, 6), [
    ("across", "LRN", ["data"], ["across"], "lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 }"),
    ("across3", "LRN", ["data"], ["across3"], "lrn_param { local_size: 3 alpha: 0.3 beta: 0.6 }"),
    ("within", "LRN", ["data"], ["within"], "lrn_param { local_size: 3 alpha: 0.9 beta: 0.75 norm_region: WITHIN_CHANNEL }"),
    ("within5", "LRN", ["data"], ["within5"], "lrn_param { local_size: 5 alpha: 2 beta: 0.5 norm_region: WITHIN_CHANNEL }"),
], lambda x, W: {
    "across": lrn_across_ref(x, 5, 0.5, 0.75, 2.0), "across3": lrn_across_ref(x, 3, 0.3, 0.6, 1.0),
    "within": lrn_within_ref(x, 3, 0.9, 0.75), "within5": lrn_within_ref(x, 5, 2.0, 0.5),
})

case("batchnorm-scale-bias", (1, 3, 5, 4), [
    ("bn", "BatchNorm", ["data"], ["x"], ""),
    ("sc", "Scale", ["x"], ["x"], "scale_param { bias_term: true }"),
    ("bn_eps", "BatchNorm", ["data"], ["bn_eps"], "batch_norm_param { eps: 0.001 }"),
    ("sc_nb", "Scale", ["bn_eps"], ["sc_nb"], ""),
    ("sc_hw", "Scale", ["data"], ["sc_hw"], "scale_param { axis: 1 num_axes: 2 }"),
], lambda x, W: {
    "x/pre_sc": bn_ref(x, W["bn"]),
    "x": bn_ref(x, W["bn"]) * chan(W["sc"][0]) + chan(W["sc"][1]),
    "bn_eps": bn_ref(x, W["bn_eps"], 1e-3),
    "sc_nb": bn_ref(x, W["bn_eps"], 1e-3) * chan(W["sc_nb"][0]),
    "sc_hw": x * W["sc_hw"][0].reshape(1, 3, 5, 1),
})

case("bias", (1, 3, 5, 4), [
    ("bias", "Bias", ["data"], ["bias"], ""),
    ("bias_hw", "Bias", ["data"], ["bias_hw"], "bias_param { axis: 2 num_axes: 2 }"),
    ("b2", "Bias", ["data", "bias"], ["b2"], "bias_param { axis: 0 num_axes: -1 }"),
], lambda x, W: {
    "bias": x + chan(W["bias"][0]), "bias_hw": x + W["bias_hw"][0].reshape(1, 1, 5, 4),
    "b2": 2 * x + chan(W["bias"][0]),
})

case("scale-two-bottoms", (1, 3, 5, 5), [
    ("gp", "Pooling", ["data"], ["gp"], "pooling_param { pool: AVE global_pooling: true }"),
    ("fc", "InnerProduct", ["gp"], ["fc"], "inner_product_param { num_output: 3 }"),
    ("sc2", "Scale", ["data", "fc"], ["sc2"], "scale_param { axis: 0 }"),
    ("sc2b", "Scale", ["data", "fc"], ["sc2b"], "scale_param { axis: 0 bias_term: true }"),
], lambda x, W: {
    "sc2": x * ip_ref(x.mean(axis=(2, 3)), W["fc"][0], W["fc"][1])[:, :, None, None],
    "sc2b": x * ip_ref(x.mean(axis=(2, 3)), W["fc"][0], W["fc"][1])[:, :, None, None]
    + W["sc2b"][0].reshape(-1, 3)[:, :, None, None],
})

case("eltwise", (1, 3, 6, 6), [
    ("a", "Convolution", ["data"], ["a"], f"{CONV} {{ num_output: 4 kernel_size: 3 pad: 1 }}"),
    ("b", "Convolution", ["data"], ["b"], f"{CONV} {{ num_output: 4 kernel_size: 3 pad: 1 }}"),
    ("sum", "Eltwise", ["a", "b"], ["sum"], ""),
    ("sumc", "Eltwise", ["a", "b", "a"], ["sumc"], "eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 }"),
    ("prod", "Eltwise", ["a", "b"], ["prod"], "eltwise_param { operation: PROD }"),
    ("max", "Eltwise", ["a", "b", "sum"], ["max"], "eltwise_param { operation: MAX }"),
], lambda x, W: (lambda a, b: {
    "sum": a + b, "sumc": 1.5 * a - 2 * b, "prod": a * b, "max": np.maximum(np.maximum(a, b), a + b),
})(conv_ref(x, W["a"][0], W["a"][1], pad=(1, 1)), conv_ref(x, W["b"][0], W["b"][1], pad=(1, 1))))

case("concat-slice-split", (1, 6, 4, 5), [
    ("sl", "Slice", ["data"], ["s1", "s2", "s3"], "slice_param { axis: 1 slice_point: 1 slice_point: 4 }"),
    ("cat", "Concat", ["s3", "s1"], ["cat"], ""),
    ("sl_h", "Slice", ["data"], ["h1", "h2"], "slice_param { slice_dim: 2 }"),
    ("cat_w", "Concat", ["h2", "h1"], ["cat_w"], "concat_param { concat_dim: 3 }"),
    ("split", "Split", ["s2"], ["t1", "t2"], ""),
    ("cat_t", "Concat", ["t1", "t2"], ["cat_t"], "concat_param { axis: 2 }"),
], lambda x, W: {
    "s1": x[:, :1], "s2": x[:, 1:4], "s3": x[:, 4:], "cat": np.concatenate([x[:, 4:], x[:, :1]], 1),
    "h1": x[:, :, :2], "h2": x[:, :, 2:], "cat_w": np.concatenate([x[:, :, 2:], x[:, :, :2]], 3),
    "t1": x[:, 1:4], "t2": x[:, 1:4], "cat_t": np.concatenate([x[:, 1:4], x[:, 1:4]], 2),
}, expect_shapes={"s2": (3, 4, 5), "cat": (3, 4, 5), "cat_w": (6, 2, 10), "cat_t": (3, 8, 5)})

case("flatten-v1", (1, 3, 4, 5), [
    ("flat", "Flatten", ["data"], ["flat"], ""),
    ("ip", "InnerProduct", ["flat"], ["ip"], "inner_product_param { num_output: 2 }"),
], lambda x, W: {"flat": x.reshape(x.shape[0], 60), "ip": ip_ref(x, W["ip"][0], W["ip"][1])},
    expect_shapes={"flat": (60,)})

case("reshape-flatten-axes", (1, 2, 3, 4), [
    ("r1", "Reshape", ["data"], ["r1"], "reshape_param { shape { dim: 0 dim: -1 dim: 4 } }"),
    ("r2", "Reshape", ["data"], ["r2"], "reshape_param { shape { dim: 0 dim: 0 dim: -1 } }"),
    ("r3", "Reshape", ["data"], ["r3"], "reshape_param { shape { dim: 6 } axis: 1 num_axes: 2 }"),
    ("r4", "Reshape", ["data"], ["r4"], "reshape_param { shape { dim: 3 dim: 1 } axis: 2 num_axes: 1 }"),
    ("f1", "Flatten", ["data"], ["f1"], "flatten_param { axis: 2 }"),
    ("f2", "Flatten", ["data"], ["f2"], "flatten_param { axis: 1 end_axis: 2 }"),
], lambda x, W: {
    "r1": x.reshape(x.shape[0], 6, 4), "r2": x.reshape(x.shape[0], 2, 12), "r3": x.reshape(x.shape[0], 6, 4),
    "r4": x.reshape(x.shape[0], 2, 3, 1, 4),
    "f1": x.reshape(x.shape[0], 2, 12), "f2": x.reshape(x.shape[0], 6, 4),
}, expect_shapes={"r1": (6, 4), "r2": (2, 12), "r3": (6, 4), "r4": (2, 3, 1, 4), "f1": (2, 12)})

case("reshape-negative-axis", (1, 2, 3, 4), [
    ("r5", "Reshape", ["data"], ["r5"], "reshape_param { shape { dim: -1 dim: 2 } axis: -2 }"),
    ("r6", "Reshape", ["data"], ["r6"], "reshape_param { shape { dim: 1 } axis: -1 num_axes: 0 }"),
], lambda x, W: {"r5": x.reshape(x.shape[0], 2, 3, 2, 2), "r6": x.reshape(x.shape[0], 2, 3, 4, 1)},
    # Caffe: a negative axis counts from *after* the last axis (-1 appends), so -2 spans the last axis
    expect_shapes={"r5": (2, 3, 2, 2), "r6": (2, 3, 4, 1)})

case("permute", (1, 2, 3, 4), [
    ("p1", "Permute", ["data"], ["p1"], "permute_param { order: 0 order: 2 order: 3 order: 1 }"),
    ("p3", "Permute", ["data"], ["p3"], "permute_param { order: 0 order: 1 order: 3 order: 2 }"),
    ("flat", "Flatten", ["p1"], ["flat"], ""),
], lambda x, W: {
    "p1": x.transpose(0, 2, 3, 1), "p3": x.transpose(0, 1, 3, 2),
    "flat": x.transpose(0, 2, 3, 1).reshape(x.shape[0], -1),
}, expect_shapes={"p1": (3, 4, 2)})

case("permute-partial-order", (1, 2, 3, 4), [
    ("p2", "Permute", ["data"], ["p2"], "permute_param { order: 0 order: 3 }"),
], lambda x, W: {"p2": x.transpose(0, 3, 1, 2)}, expect_shapes={"p2": (4, 2, 3)})

case("normalize", (1, 4, 3, 3), [
    ("n_ch", "Normalize", ["data"], ["n_ch"], "norm_param { across_spatial: false channel_shared: false }"),
    ("n_all", "Normalize", ["data"], ["n_all"], "norm_param { across_spatial: true channel_shared: true }"),
    ("n_eps", "Normalize", ["data"], ["n_eps"], "norm_param { across_spatial: false channel_shared: true eps: 0.5 }"),
], lambda x, W: {
    "n_ch": x / np.sqrt((x.astype(np.float64) ** 2).sum(1, keepdims=True) + 1e-10) * chan(W["n_ch"][0]),
    "n_all": x / np.sqrt((x.astype(np.float64) ** 2).sum((1, 2, 3), keepdims=True) + 1e-10) * W["n_all"][0].reshape(()),
    "n_eps": x / np.sqrt((x.astype(np.float64) ** 2).sum(1, keepdims=True) + 0.5) * W["n_eps"][0].reshape(()),
})

case("crop", (1, 3, 9, 9), [
    ("c5", "Convolution", ["data"], ["c5"], f"{CONV} {{ num_output: 2 kernel_size: 5 }}"),
    ("crop", "Crop", ["data", "c5"], ["crop"], "crop_param { offset: 1 offset: 2 }"),
    ("crop1", "Crop", ["data", "c5"], ["crop1"], "crop_param { axis: 1 offset: 1 }"),
    ("crop0", "Crop", ["data", "c5"], ["crop0"], ""),
    ("crop3", "Crop", ["data", "c5"], ["crop3"], "crop_param { axis: 3 offset: 4 }"),
], lambda x, W: {
    "crop": x[:, :, 1:6, 2:7], "crop1": x[:, 1:3, 1:6, 1:6], "crop0": x[:, :, :5, :5], "crop3": x[:, :, :, 4:9],
}, expect_shapes={"crop": (3, 5, 5), "crop1": (2, 5, 5), "crop3": (3, 9, 5)})


def variants():
    out = []
    for c in CASES:
        # the V1 binary layout only exists for V1 layer types
        layouts = [("V2", "V2")]
        if c.v1_ok:
            layouts += [("V2", "V1"), ("V1", "V1"), ("V1", "V2")]
        for syntax, layout in layouts:
            out.append(pytest.param(c, syntax, layout, id=f"{c.id}-{syntax.lower()}proto-{layout}weights"))
    return out


VARIANTS = variants()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(case, syntax, layout) -> (prototxt, caffemodel, package), converted once per module."""
    from convert import convert_model
    from convert.generate import generate_caffemodel

    root = tmp_path_factory.mktemp("layer-nets")
    cache = {}

    def get(c: Case, syntax: str, layout: str):
        key = (c.id, syntax, layout)
        if key not in cache:
            d = root / f"{c.id}-{syntax}-{layout}"
            d.mkdir(exist_ok=True)
            proto = d / "net.prototxt"
            proto.write_text(render(c, syntax))
            weights = generate_caffemodel(proto, d / "net.caffemodel", layout=layout, seed=len(cache))
            # nets with neither 1 nor 3 input channels get an explicit (empty) preprocessing:
            # the default one fails for them (see test_default_preprocessing_for_other_channel_counts)
            pre = None if c.shape[1] in (1, 3) else {"scale": 1.0}
            pkg = convert_model(proto, weights, d / "pkg", c.id, preprocess=pre, log=lambda _m: None)
            cache[key] = (proto, weights, pkg)
        return cache[key]

    return get


@pytest.mark.parametrize("channels", [2, 4, 6])
def test_default_preprocessing_for_other_channel_counts(tmp_path, channels):
    """A net whose input has neither 1 nor 3 channels converts with default options (no flags given)."""
    from convert import convert_model
    from convert.generate import generate_caffemodel

    c = Case("chan", (1, channels, 5, 5), [("relu", "ReLU", ["data"], ["relu"], "")], lambda x, W: {})
    proto = tmp_path / "net.prototxt"
    proto.write_text(render(c, "V2"))
    weights = generate_caffemodel(proto, tmp_path / "net.caffemodel")
    pkg = convert_model(proto, weights, tmp_path / "pkg", "chan", log=lambda _m: None)
    assert pkg.manifest["verification"]["passed"] is True
    assert pkg.input_shape == [None, channels, 5, 5]


def test_verification_accepts_identical_infinities(tmp_path):
    """Exp overflows float32 on the 0..255 verification inputs; both runtimes give the same +inf,
    which is agreement, not a mismatch (max abs 'nan')."""
    from convert import convert_model
    from convert.generate import generate_caffemodel

    c = Case("overflow", (1, 3, 4, 4), [("exp", "Exp", ["data"], ["exp"], "")], lambda x, W: {})
    proto = tmp_path / "net.prototxt"
    proto.write_text(render(c, "V2"))
    weights = generate_caffemodel(proto, tmp_path / "net.caffemodel")
    pkg = convert_model(proto, weights, tmp_path / "pkg", "overflow", log=lambda _m: None)
    assert pkg.manifest["verification"]["passed"] is True
    x = np.full((1, 3, 4, 4), 2.0, np.float32)
    np.testing.assert_allclose(run_ort(pkg.onnx_path, {"data": x}, ["exp"])["exp"], np.exp(2.0), rtol=1e-6)


def _covered_elsewhere() -> set[str]:
    """Types the other layer test modules (``tests/test_layers_*.py``) cover: their ``COVERED_TYPES``."""
    import importlib.util
    from pathlib import Path

    types: set[str] = set()
    for path in sorted(Path(__file__).parent.glob("test_layers_*.py")):
        spec = importlib.util.spec_from_file_location(f"_coverage_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        types |= set(getattr(mod, "COVERED_TYPES", ()))
    return types


def test_every_registered_type_is_covered():
    from convert.registry import supported_types

    covered = set().union(*(c.types for c in CASES)) | _covered_elsewhere()
    assert set(supported_types()) <= covered, f"not covered: {set(supported_types()) - covered}"
    v1 = set().union(*(c.types for c in CASES if c.v1_ok))
    assert set(V1_NAMES) <= v1, f"V1 syntax not covered: {set(V1_NAMES) - v1}"


@pytest.mark.parametrize(("c", "syntax", "layout"), VARIANTS)
def test_layers_match_numpy_reference(built, c, syntax, layout):
    from convert import load_torch
    from convert.weights import read_caffemodel

    proto, weights, pkg = built(c, syntax, layout)
    m = pkg.manifest
    assert m["source"]["prototxt"]["generation"] == syntax
    assert m["source"]["caffemodel"]["generation"] == layout
    assert m["verification"]["passed"] is True
    assert [li["type"] for li in m["layers"]] == [t for _, t, *_ in c.layers]

    W = {n: lw.blobs for n, lw in read_caffemodel(weights).layers.items()}
    make = c.make_input or normal()
    x = make(np.random.default_rng(42), (2,) + c.shape[1:])  # batch 2 through a net declared with batch 1
    expected = c.ref(x, W)
    assert expected
    for value, shape in c.expect_shapes.items():
        assert tuple(pkg.blobs[value]["shape"][1:]) == shape, value
    values = [b for b, i in pkg.blobs.items() if i["kind"] != "input"]
    got_onnx = run_ort(pkg.onnx_path_for(values), {"data": x}, values)
    got_torch = run_torch(load_torch(pkg), x, values)
    for v in values:
        assert_close(got_onnx[v], got_torch[v], f"{v}: torch vs onnx")
    for v, ref in expected.items():
        assert tuple(pkg.blobs[v]["shape"][1:]) == ref.shape[1:], v
        assert_close(ref, got_onnx[v], f"{v}: onnx vs numpy reference")
        assert_close(ref, got_torch[v], f"{v}: torch vs numpy reference")


# Where OpenCV 4.14 itself deviates from Caffe (each checked against the numpy references
# above: OpenCV's output equals the formula with the option ignored), OpenCV is no oracle.
OPENCV_DEVIATES: dict[tuple[str, str], str] = {
    ("deconv", "upg"): "OpenCV ignores Deconvolution dilation (its output is 11x11, Caffe's 13x13)",
    ("innerproduct", "ip_t"): "OpenCV ignores inner_product_param.transpose",
    ("innerproduct-axis2", "ip_t"): "OpenCV ignores inner_product_param.transpose",
    ("lrn", "across"): "OpenCV ignores lrn_param.k (uses 1)",
    ("concat-slice-split", "sl_h"): "OpenCV ignores the legacy slice_param.slice_dim (slices axis 1)",
    ("concat-slice-split", "cat_w"): "reads sl_h's tops",
    ("scale-two-bottoms", "sc2b"): "OpenCV's two-bottom Scale with bias_term matches no form of x*s + beta",
    ("log", "log10"): "OpenCV ignores log_param base/scale/shift",
    ("log", "log2"): "OpenCV ignores log_param base",
}


@pytest.mark.parametrize(("c", "syntax", "layout"), [v for v in VARIANTS if v.values[2] == v.values[1]])
def test_layers_match_opencv(built, c, syntax, layout):
    proto, weights, pkg = built(c, syntax, layout)
    net = opencv_net(proto, weights)
    if net is None:
        pytest.skip(f"OpenCV cannot read this net ({', '.join(sorted(c.types))}); the numpy reference covers it")
    from convert import load_torch

    x = (c.make_input or normal())(np.random.default_rng(7), c.shape)
    layers = {li["name"]: li for li in pkg.manifest["layers"]}
    names = [n for n, li in layers.items() if li["type"] != "Split" and (c.id, n) not in OPENCV_DEVIATES]
    values = [layers[n]["tops"][0] for n in names]
    # OpenCV names a layer after its top when the two differ and nothing else claims the top
    cv_layers = set(net.getLayerNames())
    ids = [n if n in cv_layers else layers[n]["tops"][0] for n in names]
    missing = [i for i in ids if i not in cv_layers]
    assert not missing, f"OpenCV has no layer {missing}: {sorted(cv_layers)}"
    try:
        net.setInput(x)
        ref = dict(zip(names, net.forward(ids)))
    except Exception as err:  # cv2.error at forward: OpenCV does not support a layer's options
        pytest.skip(f"OpenCV cannot run this net: {str(err).splitlines()[-1][:200]}")
    ours = run_ort(pkg.onnx_path_for(values), {"data": x}, values)
    ours_t = run_torch(load_torch(pkg), x, values)
    for n, v in zip(names, values):
        assert_close(as_shape(ref[n], ours[v].shape), ours[v], f"layer {n} ({layers[n]['type']}): onnx vs OpenCV")
        assert_close(as_shape(ref[n], ours_t[v].shape), ours_t[v], f"layer {n}: torch vs OpenCV")
