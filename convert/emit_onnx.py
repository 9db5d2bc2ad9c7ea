"""Graph -> ONNX ModelProto (opset 17, dynamic batch), weights as external data.

Learned blobs are not copied into the ModelProto: each initializer points (ONNX external
data, by offset and length) into ``weights.safetensors``, whose bytes are Caffe's own
little-endian float32 arrays. Small derived constants (BatchNorm statistics, pooling
divisors, shapes) are stored inline.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .ir import Graph, Node, layer_errors

OPSET = 17


def _fresh(hint: str, taken: set[str]) -> str:
    name, i = hint, 1
    while name in taken:
        i += 1
        name = f"{hint}_{i}"
    taken.add(name)
    return name


class OnnxBuilder:
    """What a layer converter writes into: nodes, inline constants, weight references."""

    def __init__(self, weight_refs: Mapping[str, tuple[str, int, int]]):
        #: safetensors tensor name -> (file name, byte offset, byte length)
        self.weight_refs = weight_refs
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()  # values and initializers
        self._node_names: set[str] = set()  # nodes: their own namespace in ONNX
        self._weight_views: dict[tuple[str, tuple[int, ...]], str] = {}

    def unique(self, hint: str) -> str:
        """A fresh value name."""
        return _fresh(hint, self._names)

    def add(self, op_type: str, inputs: list[str], outputs: list[str], name: str | None = None, **attrs) -> list[str]:
        """A node named ``name`` (the layer's name for its final node, so the deployed graph
        reads like the prototxt), made unique among nodes only."""
        node_name = _fresh(name or outputs[0], self._node_names)
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, **attrs))
        return outputs

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
        """Add a node with one fresh intermediate output and return that output's name."""
        out = self.unique(hint)
        self.add(op_type, inputs, [out], name=out, **attrs)
        return out

    def const(self, hint: str, value: np.ndarray | list | float, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.unique(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, node: Node, index: int, shape: tuple[int, ...] | None = None) -> str:
        """Blob ``index`` of ``node``'s layer, viewed with ``shape`` (same element count)."""
        arr = node.weights[index]
        shape = tuple(arr.shape) if shape is None else tuple(int(d) for d in shape)
        if int(np.prod(shape)) != arr.size:
            raise ValueError(f"cannot view blob {index} of '{node.name}' {arr.shape} as {shape}")
        key = f"{node.name}.{index}"
        if (key, shape) in self._weight_views:
            return self._weight_views[(key, shape)]
        name = self.unique(key if shape == tuple(arr.shape) else f"{key}:{'x'.join(map(str, shape))}")
        if key in self.weight_refs:
            location, offset, length = self.weight_refs[key]
            t = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
                e = t.external_data.add()
                e.key, e.value = k, v
            self.initializers.append(t)
        else:  # no file behind it (in-memory graphs): inline
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32).reshape(shape), name))
        self._weight_views[(key, shape)] = name
        return name


def value_dims(graph: Graph, value: str) -> list:
    """ONNX dims of a value: static, except its batch axis (``N``, or ``N/8`` where the graph
    regroups its batch) and data-dependent axes (the converter's symbol)."""
    dims: list = list(graph.shapes[value])
    for axis, symbol in graph.dynamic.get(value, {}).items():
        dims[axis] = symbol
    a = graph.batch_axes.get(value)
    if a is not None:
        dims[a] = graph.batch_symbol(value)
    return dims


def emit_onnx(
    graph: Graph,
    weight_refs: Mapping[str, tuple[str, int, int]] | None = None,
    outputs: list[str] | None = None,
) -> onnx.ModelProto:
    """Build the ModelProto; ``outputs`` defaults to the net's own output blobs."""
    b = OnnxBuilder(weight_refs or {})
    for name in graph.inputs:
        b._names.add(name)
    for node in graph.nodes:
        for o in node.outputs:
            b._names.add(o)
    for node in graph.nodes:
        with layer_errors(node.name, node.type, "emit ONNX"):
            node.converter.onnx(node, b)
    info = lambda v: helper.make_tensor_value_info(v, TensorProto.FLOAT, value_dims(graph, v))  # noqa: E731
    model_graph = helper.make_graph(
        b.nodes,
        graph.name or "caffe_net",
        [info(n) for n in graph.inputs],
        [info(o) for o in (outputs or graph.outputs)],
        initializer=b.initializers,
    )
    model = helper.make_model(model_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="graft")
    model.ir_version = 8
    return model
