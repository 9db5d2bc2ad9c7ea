"""InnerProduct: flatten from ``axis`` in C,H,W order, y = x·Wᵀ + b (``transpose``: W is (in, out))."""

from __future__ import annotations

import math

import numpy as np

from ..registry import Converter, register
from ._common import F, TorchModule, axis_index, param


def _ip(node):
    p = node.param("inner_product_param")
    return int(p.num_output), bool(p.bias_term), bool(p.transpose), int(p.axis)


class _InnerProduct(TorchModule):
    def __init__(self, node):
        super().__init__()
        _, bias, transpose, axis = _ip(node)
        self.axis = axis_index(axis, len(node.in_shapes[0]), node.name)
        w = node.weights[0].T if transpose else node.weights[0]
        self.weight = param(w)  # (out, in) as torch expects; Caffe's transpose=true is undone here
        self.bias = param(node.weights[1]) if bias else None

    def forward(self, x):
        return F.linear(x.flatten(self.axis), self.weight, self.bias)


@register
class InnerProduct(Converter):
    types = ("InnerProduct",)

    def infer(self, node, shapes):
        n_out, _, _, axis = _ip(node)
        a = axis_index(axis, len(shapes[0]), node.name)
        return [tuple(shapes[0][:a]) + (n_out,)]

    def weight_shapes(self, node, shapes):
        n_out, bias, transpose, axis = _ip(node)
        a = axis_index(axis, len(shapes[0]), node.name)
        k = math.prod(shapes[0][a:])
        ws = [(k, n_out) if transpose else (n_out, k)]
        return ws + [(n_out,)] if bias else ws

    def onnx(self, node, b):
        n_out, bias, transpose, axis = _ip(node)
        a = axis_index(axis, len(node.in_shapes[0]), node.name)
        x = node.inputs[0]
        if a == 1 and len(node.in_shapes[0]) != 2:
            x = b.op("Flatten", [x], f"{node.name}/flatten", axis=1)
        if a == 1:
            ins = [x, b.weight(node, 0)] + ([b.weight(node, 1)] if bias else [])
            b.add("Gemm", ins, node.outputs, name=node.name, transB=0 if transpose else 1)
            return
        lead = [0] * a  # keep the leading axes
        flat = b.op("Reshape", [x, b.const(f"{node.name}/shape", lead + [-1], dtype="int64")], f"{node.name}/flat")
        w = b.weight(node, 0)
        if not transpose:
            w = b.op("Transpose", [w], f"{node.name}/wT", perm=[1, 0])
        y = b.op("MatMul", [flat, w], f"{node.name}/matmul") if bias else None
        if bias:
            b.add("Add", [y, b.weight(node, 1)], node.outputs, name=node.name)
        else:
            b.add("MatMul", [flat, w], node.outputs, name=node.name)

    def torch(self, node):
        return _InnerProduct(node)

    def caffe_blobs(self, node, module):
        if not _ip(node)[2]:
            return super().caffe_blobs(node, module)
        blobs = [p.detach().cpu().float().numpy() for p in module.parameters()]
        blobs[0] = np.ascontiguousarray(blobs[0].T)  # transpose: true stores W as (in, out)
        return blobs
