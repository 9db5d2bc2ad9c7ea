"""SPP (spatial pyramid pooling): for level l, 2^l bins per side; each level is one Caffe
Pooling (kernel = ceil(H / bins), pad = (kernel·bins − H + 1) / 2, stride = kernel), flattened,
and the levels concatenated on axis 1. With ``pyramid_height: 1`` Caffe returns the single
pooling's 4-D output, not flattened."""

from __future__ import annotations

import math

from ..errors import GraftError
from ..registry import Converter, register
from ._common import TorchModule, nn, torch
from .pooling import Pool, pool_onnx, window_geometry


def levels(node, shape) -> list[dict]:
    """The pooling geometry of each pyramid level (spp_layer.cpp GetPoolingParam)."""
    if len(shape) != 4:
        raise GraftError(f"layer '{node.name}': SPP needs a 4-D input, got {shape}")
    p = node.param("spp_param")
    if p.pyramid_height < 1:
        raise GraftError(f"layer '{node.name}': spp_param.pyramid_height must be at least 1")
    if p.pool == 2:
        raise GraftError(f"layer '{node.name}': STOCHASTIC pooling is not supported")
    h, w = shape[2:]
    out = []
    for level in range(int(p.pyramid_height)):
        bins = 2**level
        kernel = tuple(math.ceil(s / bins) for s in (h, w))
        pad = tuple((k * bins - s + 1) // 2 for k, s in zip(kernel, (h, w)))
        if any(pp >= k for pp, k in zip(pad, kernel)):  # Caffe's PoolingLayer refuses it too
            raise GraftError(f"layer '{node.name}': pyramid level {level} ({bins}x{bins} bins) of a {h}x{w} input "
                             f"needs pad {pad} >= kernel {kernel}; use a lower pyramid_height")
        out.append(window_geometry(kernel, pad, kernel, (h, w), p.pool == 0, True, node.name))
    return out


class _SPP(TorchModule):
    def __init__(self, geometries: list[dict]):
        super().__init__()
        self.levels = nn.ModuleList(Pool(g) for g in geometries)

    def forward(self, x):
        if len(self.levels) == 1:
            return self.levels[0](x)
        return torch.cat([pool(x).flatten(1) for pool in self.levels], dim=1)


@register
class SPP(Converter):
    types = ("SPP",)

    def infer(self, node, shapes):
        gs = levels(node, shapes[0])
        n, c = shapes[0][:2]
        if len(gs) == 1:
            return [(n, c, *gs[0]["out"])]
        return [(n, sum(c * math.prod(g["out"]) for g in gs))]

    def onnx(self, node, b):
        gs = levels(node, node.in_shapes[0])
        x, name = node.inputs[0], node.name
        if len(gs) == 1:
            pool_onnx(b, x, gs[0], node.outputs[0], name)
            return
        flat = []
        for level, g in enumerate(gs):
            pooled = b.unique(f"{name}/level{level}")
            pool_onnx(b, x, g, pooled, pooled)
            flat.append(b.op("Flatten", [pooled], f"{name}/level{level}/flat", axis=1))
        b.add("Concat", flat, node.outputs, name=name, axis=1)

    def torch(self, node):
        return _SPP(levels(node, node.in_shapes[0]))
