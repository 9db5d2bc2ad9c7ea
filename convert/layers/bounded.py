"""Element-wise layers from BVLC's later releases and the MobileNet forks: ReLU6, Clip, Swish."""

from __future__ import annotations

from ..errors import GraftError
from ..registry import register
from ._common import F, Lambda, torch
from .activation import _Elementwise


@register
class ReLU6(_Elementwise):
    """y = min(max(x, 0) + negative_slope·min(x, 0), 6) (``relu6_param``, slope 0 by default)."""

    types = ("ReLU6",)

    def onnx(self, node, b):
        slope = float(node.param("relu6_param").negative_slope)
        six = b.const(f"{node.name}/six", 6.0)
        if not slope:
            b.add("Clip", [node.inputs[0], b.const(f"{node.name}/zero", 0.0), six], node.outputs, name=node.name)
            return
        y = b.op("LeakyRelu", node.inputs, f"{node.name}/leaky", alpha=slope)
        b.add("Min", [y, six], node.outputs, name=node.name)

    def torch(self, node):
        slope = float(node.param("relu6_param").negative_slope)
        if not slope:
            return Lambda(lambda x: torch.clamp(x, 0.0, 6.0), "min(max(x, 0), 6)")
        return Lambda(lambda x: torch.clamp(F.leaky_relu(x, slope), max=6.0), f"negative_slope={slope}, max=6")


def _clip_bounds(node) -> tuple[float, float]:
    p = node.param("clip_param")
    if not (p.HasField("min") and p.HasField("max")):
        raise GraftError(f"layer '{node.name}': clip_param needs both min and max (required in Caffe)")
    lo, hi = float(p.min), float(p.max)
    if lo > hi:
        raise GraftError(f"layer '{node.name}': clip_param min {lo} is greater than max {hi}")
    return lo, hi


@register
class Clip(_Elementwise):
    """y = max(min, min(x, max)) (BVLC ``clip_param { min max }``, both required)."""

    types = ("Clip",)

    def infer(self, node, shapes):
        _clip_bounds(node)
        return [shapes[0]]

    def onnx(self, node, b):
        lo, hi = _clip_bounds(node)
        ins = [node.inputs[0], b.const(f"{node.name}/min", lo), b.const(f"{node.name}/max", hi)]
        b.add("Clip", ins, node.outputs, name=node.name)

    def torch(self, node):
        lo, hi = _clip_bounds(node)
        return Lambda(lambda x: torch.clamp(x, lo, hi), f"min={lo}, max={hi}")


@register
class Swish(_Elementwise):
    """y = x·sigmoid(β·x) (BVLC ``swish_param { beta }``, β = 1 by default)."""

    types = ("Swish",)

    def onnx(self, node, b):
        beta = float(node.param("swish_param").beta)
        x = node.inputs[0]
        z = x if beta == 1.0 else b.op("Mul", [x, b.const(f"{node.name}/beta", beta)], f"{node.name}/scaled")
        s = b.op("Sigmoid", [z], f"{node.name}/sigmoid")
        b.add("Mul", [x, s], node.outputs, name=node.name)

    def torch(self, node):
        beta = float(node.param("swish_param").beta)
        if beta == 1.0:
            return Lambda(lambda x: x * torch.sigmoid(x), "x·sigmoid(x)")
        return Lambda(lambda x: x * torch.sigmoid(beta * x), f"x·sigmoid({beta}·x)")
