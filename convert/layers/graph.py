"""Layers that shape the graph rather than compute: Input (the net's inputs), Silence (a sink),
Parameter (a learned blob as a value)."""

from __future__ import annotations

from ..errors import GraftError
from ..parse import input_layer_shapes
from ..registry import Converter, register
from ._common import Lambda, TorchModule, param, torch


@register
class Input(Converter):
    """``Input`` layers become graph inputs when the prototxt is read (``parse.net_spec``), one
    per top, shaped by ``input_param.shape`` (one per top, or one shared); they never become
    nodes. ``infer`` states their shapes for anyone who asks."""

    types = ("Input",)

    def infer(self, node, shapes):
        return [tuple(s) for s in input_layer_shapes(node.spec.msg, node.name, "prototxt").values()]

    def onnx(self, node, b):
        raise GraftError(f"layer '{node.name}' (Input): inputs are graph inputs, not layers")

    def torch(self, node):
        raise GraftError(f"layer '{node.name}' (Input): inputs are graph inputs, not layers")


@register
class Silence(Converter):
    """No tops, no computation. Its bottoms are not consumed: a blob only Silence reads is a
    net output (colorization's ``class8_ab``)."""

    types = ("Silence",)

    def infer(self, node, shapes):
        return []

    def batch_axes(self, node, axes):
        return []

    def onnx(self, node, b):
        return None

    def torch(self, node):
        return Lambda(lambda *xs: (), "silence")


class _Parameter(TorchModule):
    def __init__(self, node):
        super().__init__()
        self.weight = param(node.weights[0])

    def forward(self) -> torch.Tensor:
        return self.weight


@register
class Parameter(Converter):
    """A learned blob of ``parameter_param.shape`` as its top; it does not grow with the batch."""

    types = ("Parameter",)

    def _shape(self, node) -> tuple[int, ...]:
        if node.spec.bottoms:
            raise GraftError(f"layer '{node.name}': Parameter takes no bottom, found {len(node.spec.bottoms)}")
        return tuple(int(d) for d in node.param("parameter_param").shape.dim)

    def keeps_batch(self, node):
        return False

    def infer(self, node, shapes):
        return [self._shape(node)]

    def weight_shapes(self, node, shapes):
        return [self._shape(node)]

    def onnx(self, node, b):
        b.add("Identity", [b.weight(node, 0)], node.outputs, name=node.name)

    def torch(self, node):
        return _Parameter(node)
