"""Pooling with Caffe's exact rules (caffe-semantics.md, "Pooling").

Caffe rounds the output size up (unless ``round_mode: FLOOR`` or the forks' ``ceil_mode: false``
says down), drops a last window that would start in the padding, clips
MAX windows to the image, and divides AVE sums by the window size counted *before* clipping
to the image but *after* clipping to the padded extent. Rather than trusting each runtime's
``ceil_mode``/``count_include_pad`` corner cases, both emitters pad explicitly to exactly the
extent Caffe's windows cover, pool without padding, and (AVE) rescale by a constant map of
Caffe's divisors. ONNX and torch then compute the same thing by construction.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import GraftError
from ..registry import Converter, register
from ._common import F, TorchModule, hw, to_tensor


def out_size(size: int, k: int, p: int, s: int, ceil: bool = True) -> int:
    o = (math.ceil if ceil else math.floor)((size + 2 * p - k) / s) + 1
    if p > 0 and (o - 1) * s >= size + p:
        o -= 1
    return int(o)


def rounds_up(p, name: str) -> bool:
    """Whether the output size rounds up (Caffe's default) or down.

    Two spellings of one switch: BVLC's ``round_mode: CEIL|FLOOR`` and the forks' older
    ``ceil_mode: true|false`` (BVLC PR #3057, kept by OpenCV's caffe.proto and caffe-ssd
    derivatives). Either may be given, or both if they agree. The window rules are the same in
    both modes (the last-window-in-padding check never fires when rounding down).
    """
    votes = {}
    if p.HasField("round_mode"):
        votes["round_mode " + ("CEIL" if p.round_mode == 0 else "FLOOR")] = p.round_mode == 0
    if p.HasField("ceil_mode"):
        votes[f"ceil_mode {str(p.ceil_mode).lower()}"] = bool(p.ceil_mode)
    if len(set(votes.values())) > 1:
        raise GraftError(f"layer '{name}': {' and '.join(votes)} disagree; give one")
    return next(iter(votes.values()), True)


def geometry(node, shape) -> dict:
    """The window geometry of a Pooling layer on a 4-D ``shape``."""
    p = node.param("pooling_param")
    name = node.name
    _, _, h, w = shape
    if p.global_pooling:
        kernel, pad, stride = (h, w), (0, 0), (1, 1)
    else:
        kernel = hw(p.kernel_size if p.HasField("kernel_size") else [], p.kernel_h, p.kernel_w,
                    p.HasField("kernel_h"), None, "kernel_size", name)
        pad = (p.pad_h, p.pad_w) if (p.HasField("pad_h") or p.HasField("pad_w")) else (p.pad, p.pad)
        stride = (p.stride_h, p.stride_w) if (p.HasField("stride_h") or p.HasField("stride_w")) else (p.stride, p.stride)
    if p.pool == 2:
        raise GraftError(f"layer '{name}': STOCHASTIC pooling is not supported")
    return window_geometry(kernel, pad, stride, (h, w), p.pool == 0, rounds_up(p, name), name,
                           global_=bool(p.global_pooling))


def window_geometry(kernel, pad, stride, size: tuple[int, int], is_max: bool, ceil: bool, name: str,
                    global_: bool = False) -> dict:
    """Output size and explicit padding of Caffe's pooling windows (also SPP's levels)."""
    kernel, pad, stride = tuple(map(int, kernel)), tuple(map(int, pad)), tuple(map(int, stride))
    if any(pp >= k for pp, k in zip(pad, kernel)):
        raise GraftError(f"layer '{name}': pad {pad} must be smaller than kernel {kernel}")
    out = tuple(out_size(sz, k, pp, s, ceil) for sz, k, pp, s in zip(size, kernel, pad, stride))
    # explicit padding after the image so that a plain floor-mode pool yields exactly `out`
    extra = tuple(max(0, (o - 1) * s + k - sz - pp) for o, s, k, sz, pp in zip(out, stride, kernel, size, pad))
    return dict(kernel=kernel, pad=pad, stride=stride, out=out, extra=extra, max=is_max,
                global_=global_, size=tuple(size))


def ave_scale(g) -> np.ndarray | None:
    """k_h·k_w / Caffe's divisor at each output position, or None when it is 1 everywhere."""
    factors = []
    for o, k, p, s, size in zip(g["out"], g["kernel"], g["pad"], g["stride"], g["size"]):
        start = np.arange(o) * s - p
        end = np.minimum(start + k, size + p)
        factors.append((end - start).astype(np.float64))
    div = np.outer(factors[0], factors[1])
    scale = (g["kernel"][0] * g["kernel"][1]) / div
    if np.all(scale == 1.0):
        return None
    return scale.astype(np.float32).reshape(1, 1, *scale.shape)


def _pads(g) -> tuple[int, int, int, int]:
    (pt, pl), (eb, er) = g["pad"], g["extra"]
    return pt, pl, eb, er


class Pool(TorchModule):
    """Caffe pooling of one window geometry (``geometry`` / ``window_geometry``)."""

    def __init__(self, g: dict):
        super().__init__()
        self.g = g
        self.is_max = g["max"]
        pt, pl, eb, er = _pads(g)
        self.pad = (pl, er, pt, eb)  # F.pad order: left, right, top, bottom
        scale = ave_scale(g) if not g["max"] else None
        self.register_buffer("scale", to_tensor(scale) if scale is not None else None, persistent=False)

    def forward(self, x):
        g = self.g
        if any(self.pad):
            x = F.pad(x, self.pad, value=float("-inf") if self.is_max else 0.0)
        if self.is_max:
            return F.max_pool2d(x, g["kernel"], g["stride"])
        y = F.avg_pool2d(x, g["kernel"], g["stride"])
        return y * self.scale if self.scale is not None else y

    def extra_repr(self) -> str:
        g = self.g
        return f"{'MAX' if g['max'] else 'AVE'} kernel={g['kernel']} stride={g['stride']} pad={g['pad']}"


def pool_onnx(b, x: str, g: dict, out: str, name: str) -> None:
    """Emit one Caffe pooling of geometry ``g`` from ``x`` into ``out``; the last node is ``name``."""
    if g["global_"]:
        b.add("GlobalMaxPool" if g["max"] else "GlobalAveragePool", [x], [out], name=name)
        return
    pt, pl, eb, er = _pads(g)
    if any((pt, pl, eb, er)):
        pads = b.const(f"{name}/pads", [0, 0, pt, pl, 0, 0, eb, er], dtype="int64")
        fill = b.const(f"{name}/fill", -np.inf if g["max"] else 0.0)
        x = b.op("Pad", [x, pads, fill], f"{name}/padded", mode="constant")
    attrs = dict(kernel_shape=list(g["kernel"]), strides=list(g["stride"]))
    if g["max"]:
        b.add("MaxPool", [x], [out], name=name, **attrs)
        return
    scale = ave_scale(g)
    if scale is None:
        b.add("AveragePool", [x], [out], name=name, **attrs)
        return
    y = b.op("AveragePool", [x], f"{name}/avg", **attrs)
    b.add("Mul", [y, b.const(f"{name}/divisor_scale", scale)], [out], name=name)


@register
class Pooling(Converter):
    types = ("Pooling",)

    def infer(self, node, shapes):
        if len(shapes[0]) != 4:
            raise GraftError(f"layer '{node.name}': pooling needs a 4-D input, got {shapes[0]}")
        g = geometry(node, shapes[0])
        n, c = shapes[0][:2]
        return [(n, c, *g["out"])]

    def onnx(self, node, b):
        pool_onnx(b, node.inputs[0], geometry(node, node.in_shapes[0]), node.outputs[0], node.name)

    def torch(self, node):
        return Pool(geometry(node, node.in_shapes[0]))

