"""Embed: a lookup table. Each input value is a row index (a float, truncated toward zero as
Caffe's ``static_cast<int>``); the output appends ``num_output`` to the input's shape.

Caffe leaves an index outside ``[0, input_dim)`` undefined (a debug-build check, else a read
past the table). graft clamps it to the nearest row: a defined, deterministic answer that the
verification's image-like random inputs exercise.
"""

from __future__ import annotations

import numpy as np

from ..errors import GraftError
from ..registry import Converter, register
from ._common import F, TorchModule, param


def _embed(node) -> tuple[int, int, bool]:
    """(input_dim K, num_output N, bias_term)."""
    p = node.param("embed_param")
    k, n = int(p.input_dim), int(p.num_output)
    if k < 1 or n < 1:
        raise GraftError(f"layer '{node.name}': embed_param needs positive input_dim and num_output, got {k} and {n}")
    return k, n, bool(p.bias_term)


class _Embed(TorchModule):
    def __init__(self, node):
        super().__init__()
        k, _, bias = _embed(node)
        self.last = float(k - 1)
        self.weight = param(node.weights[0])  # (input_dim, num_output), Caffe's layout
        self.bias = param(node.weights[1]) if bias else None

    def forward(self, x):
        y = F.embedding(x.clamp(0.0, self.last).long(), self.weight)
        return y + self.bias if self.bias is not None else y


@register
class Embed(Converter):
    types = ("Embed",)

    def infer(self, node, shapes):
        return [tuple(shapes[0]) + (_embed(node)[1],)]

    def weight_shapes(self, node, shapes):
        k, n, bias = _embed(node)
        return [(k, n), (n,)] if bias else [(k, n)]

    def onnx(self, node, b):
        k, _, bias = _embed(node)
        name = node.name
        # clamp in float first (no int overflow for huge values), then truncate toward zero
        clipped = b.op("Clip", [node.inputs[0], b.const(f"{name}/min", np.float32(0)),
                                b.const(f"{name}/max", np.float32(k - 1))], f"{name}/clamped")
        idx = b.op("Cast", [clipped], f"{name}/index", to=7)  # int64
        if not bias:
            b.add("Gather", [b.weight(node, 0), idx], node.outputs, name=name, axis=0)
            return
        rows = b.op("Gather", [b.weight(node, 0), idx], f"{name}/rows", axis=0)
        b.add("Add", [rows, b.weight(node, 1)], node.outputs, name=name)

    def torch(self, node):
        return _Embed(node)
