"""Element-wise layers: ReLU (negative_slope), PReLU, ELU, Sigmoid, TanH, AbsVal, BNLL, Power,
Exp, Log, Threshold."""

from __future__ import annotations

import math

from ..registry import Converter, register
from ._common import F, Lambda, TorchModule, param, torch


class _Elementwise(Converter):
    """One input, one output of the same shape."""

    def infer(self, node, shapes):
        return [shapes[0]]


@register
class ReLU(_Elementwise):
    types = ("ReLU",)

    def onnx(self, node, b):
        slope = node.param("relu_param").negative_slope
        if slope:
            b.add("LeakyRelu", node.inputs, node.outputs, name=node.name, alpha=float(slope))
        else:
            b.add("Relu", node.inputs, node.outputs, name=node.name)

    def torch(self, node):
        slope = float(node.param("relu_param").negative_slope)
        if slope:
            return Lambda(lambda x: F.leaky_relu(x, slope), f"negative_slope={slope}")
        return Lambda(F.relu, "relu")


class _PReLU(TorchModule):
    def __init__(self, node):
        super().__init__()
        self.weight = param(node.weights[0].reshape(-1))

    def forward(self, x):
        return F.prelu(x, self.weight)


@register
class PReLU(_Elementwise):
    types = ("PReLU",)

    def weight_shapes(self, node, shapes):
        return [(1,)] if node.param("prelu_param").channel_shared else [(shapes[0][1],)]

    def onnx(self, node, b):
        rank = len(node.in_shapes[0])
        w = node.weights[0]
        view = (w.size,) + (1,) * (rank - 2) if w.size > 1 else (1,)
        b.add("PRelu", [node.inputs[0], b.weight(node, 0, view)], node.outputs, name=node.name)

    def torch(self, node):
        return _PReLU(node)


@register
class ELU(_Elementwise):
    types = ("ELU",)

    def onnx(self, node, b):
        b.add("Elu", node.inputs, node.outputs, name=node.name, alpha=float(node.param("elu_param").alpha))

    def torch(self, node):
        alpha = float(node.param("elu_param").alpha)
        return Lambda(lambda x: F.elu(x, alpha), f"alpha={alpha}")


def _simple(type_name: str, onnx_op: str, fn, label: str):
    @register
    class _Simple(_Elementwise):
        types = (type_name,)

        def onnx(self, node, b):
            b.add(onnx_op, node.inputs, node.outputs, name=node.name)

        def torch(self, node):
            return Lambda(fn, label)

    _Simple.__name__ = type_name
    return _Simple


Sigmoid = _simple("Sigmoid", "Sigmoid", lambda x: torch.sigmoid(x), "sigmoid")
TanH = _simple("TanH", "Tanh", lambda x: torch.tanh(x), "tanh")
AbsVal = _simple("AbsVal", "Abs", lambda x: torch.abs(x), "abs")
BNLL = _simple("BNLL", "Softplus", lambda x: F.softplus(x), "log(1 + exp(x))")


def _affine(b, node, x: str, scale: float, shift: float, hint: str) -> str:
    if scale != 1.0:
        x = b.op("Mul", [x, b.const(f"{hint}/scale", scale)], f"{hint}/scaled")
    if shift != 0.0:
        x = b.op("Add", [x, b.const(f"{hint}/shift", shift)], f"{hint}/shifted")
    return x


@register
class Power(_Elementwise):
    """y = (shift + scale·x) ^ power."""

    types = ("Power",)

    def onnx(self, node, b):
        p = node.param("power_param")
        x = _affine(b, node, node.inputs[0], float(p.scale), float(p.shift), node.name)
        if p.power == 1.0:
            b.add("Identity", [x], node.outputs, name=node.name)
        else:
            b.add("Pow", [x, b.const(f"{node.name}/power", float(p.power))], node.outputs, name=node.name)

    def torch(self, node):
        p = node.param("power_param")
        power, scale, shift = float(p.power), float(p.scale), float(p.shift)
        return Lambda(lambda x: torch.pow(shift + scale * x, power), f"power={power}, scale={scale}, shift={shift}")


def _log_base(base: float) -> float:
    return 1.0 if base == -1.0 else math.log(base)


@register
class Exp(_Elementwise):
    """y = base ^ (shift + scale·x); base -1 means e."""

    types = ("Exp",)

    def onnx(self, node, b):
        p = node.param("exp_param")
        lb = _log_base(float(p.base))
        x = _affine(b, node, node.inputs[0], float(p.scale) * lb, float(p.shift) * lb, node.name)
        b.add("Exp", [x], node.outputs, name=node.name)

    def torch(self, node):
        p = node.param("exp_param")
        lb = _log_base(float(p.base))
        scale, shift = float(p.scale) * lb, float(p.shift) * lb
        return Lambda(lambda x: torch.exp(shift + scale * x), f"exp({shift} + {scale}·x)")


@register
class Log(_Elementwise):
    """y = log_base(shift + scale·x); base -1 means e."""

    types = ("Log",)

    def onnx(self, node, b):
        p = node.param("log_param")
        lb = _log_base(float(p.base))
        x = _affine(b, node, node.inputs[0], float(p.scale), float(p.shift), node.name)
        if lb == 1.0:
            b.add("Log", [x], node.outputs, name=node.name)
        else:
            y = b.op("Log", [x], f"{node.name}/ln")
            b.add("Mul", [y, b.const(f"{node.name}/inv_ln_base", 1.0 / lb)], node.outputs, name=node.name)

    def torch(self, node):
        p = node.param("log_param")
        lb = _log_base(float(p.base))
        scale, shift = float(p.scale), float(p.shift)
        return Lambda(lambda x: torch.log(shift + scale * x) * (1.0 / lb), f"log({shift} + {scale}·x)/{lb}")


@register
class Threshold(_Elementwise):
    """y = 1 if x > threshold else 0."""

    types = ("Threshold",)

    def onnx(self, node, b):
        t = float(node.param("threshold_param").threshold)
        g = b.op("Greater", [node.inputs[0], b.const(f"{node.name}/threshold", t)], f"{node.name}/greater")
        b.add("Cast", [g], node.outputs, name=node.name, to=1)

    def torch(self, node):
        t = float(node.param("threshold_param").threshold)
        return Lambda(lambda x: (x > t).to(x.dtype), f"threshold={t}")
