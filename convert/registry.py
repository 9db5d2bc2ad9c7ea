"""Caffe layer type -> converter. One converter per layer family, in ``convert/layers/``.

A converter knows four things about its layer type: the output shapes, the shapes of the
learned blobs it expects from the caffemodel, how to emit ONNX nodes, and how to build the
equivalent torch module. Registering a type twice is an error; asking for an unknown type
names the layer and lists what is supported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import GraftError

if TYPE_CHECKING:
    from .emit_onnx import OnnxBuilder
    from .ir import Node

Shape = tuple[int, ...]


class Converter:
    """Base class: subclasses override what their layer type needs."""

    types: tuple[str, ...] = ()
    #: computes nothing (Dropout, Split): emitted as identities
    identity: bool = False

    def keeps_batch(self, node: Node) -> bool:
        """Whether axis 0 of every output is the input's batch axis. False for outputs that do
        not grow with the batch: PriorBox's constant boxes, DetectionOutput's [1, 1, N, 7],
        a Reduction over axis 0, a Parameter blob."""
        return True

    def dynamic_axes(self, node: Node) -> dict[int, dict[int, str]]:
        """Output index -> {axis: symbolic name} for sizes that depend on the data, not the
        shapes (the number of detections); ``infer`` reports an upper bound for them."""
        return {}

    def batch_axes(self, node: Node, axes: list[int | None]) -> list[int | None]:
        """The batch axis of each output, given each input's (None: the value has none).

        By default the first batch-carrying input's axis where ``keeps_batch``, none
        otherwise; layers that move or regroup axes (Permute, Reshape, Flatten) override it.
        """
        if not self.keeps_batch(node):
            return [None] * len(node.out_shapes)
        a = next((x for x in axes if x is not None), None)
        return [a if a is not None and a < len(s) else None for s in node.out_shapes]

    def infer(self, node: Node, shapes: list[Shape]) -> list[Shape]:
        """Output shapes; by default one output shaped like the first input."""
        return [shapes[0]] * max(1, len(node.outputs))

    def weight_shapes(self, node: Node, shapes: list[Shape]) -> list[Shape]:
        """Shapes of the learned blobs, in Caffe's order and layout."""
        return []

    def onnx(self, node: Node, g: OnnxBuilder) -> None:
        raise NotImplementedError

    def torch(self, node: Node) -> Any:
        raise NotImplementedError

    def caffe_blobs(self, node: Node, module: Any) -> list[np.ndarray]:
        """The learned blobs read back from the torch module (after fine-tuning), in Caffe's
        order, layout and shapes: by default the module's parameters in order, reshaped."""
        params = list(module.parameters())
        if len(params) != len(node.weights):
            raise ValueError(f"layer '{node.name}': {len(params)} torch parameters for {len(node.weights)} Caffe blobs")
        return [p.detach().cpu().float().numpy().reshape(w.shape) for p, w in zip(params, node.weights)]


_REGISTRY: dict[str, Converter] = {}


def register(cls: type[Converter]) -> type[Converter]:
    """Class decorator: one instance serves every type string in ``cls.types``."""
    inst = cls()
    for t in cls.types:
        if t in _REGISTRY:
            raise RuntimeError(f"layer type {t!r} registered twice ({type(_REGISTRY[t]).__name__}, {cls.__name__})")
        _REGISTRY[t] = inst
    return cls


def get_converter(layer_type: str, layer_name: str) -> Converter:
    from . import layers  # noqa: F401  (fills the registry)

    try:
        return _REGISTRY[layer_type]
    except KeyError:
        raise GraftError(
            f"layer '{layer_name}': unsupported type '{layer_type}' (supported: {', '.join(supported_types())})"
        ) from None


def supported_types() -> list[str]:
    from . import layers  # noqa: F401

    return sorted(_REGISTRY)
