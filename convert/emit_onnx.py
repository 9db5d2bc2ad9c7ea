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

from .ir import Graph, Node

OPSET = 17
BATCH = "N"


class OnnxBuilder:
    """What a layer converter writes into: nodes, inline constants, weight references."""

    def __init__(self, weight_refs: Mapping[str, tuple[str, int, int]]):
        #: safetensors tensor name -> (file name, byte offset, byte length)
        self.weight_refs = weight_refs
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._weight_views: dict[tuple[str, tuple[int, ...]], str] = {}

    def unique(self, hint: str) -> str:
        name, i = hint, 1
        while name in self._names:
            i += 1
            name = f"{hint}_{i}"
        self._names.add(name)
        return name

    def add(self, op_type: str, inputs: list[str], outputs: list[str], name: str | None = None, **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.unique(name or outputs[0]), **attrs))
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


def _value_info(name: str, shape: tuple[int, ...], batch_dynamic: bool) -> onnx.ValueInfoProto:
    dims: list = list(shape)
    if batch_dynamic and dims:
        dims[0] = BATCH
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


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
        node.converter.onnx(node, b)
    outs = outputs or graph.outputs
    batch = {n: s[0] for n, s in graph.inputs.items()}
    batch_size = next(iter(batch.values())) if batch else 1
    dynamic = batch_size == 1  # a declared batch of 1 is a placeholder: export N
    model_graph = helper.make_graph(
        b.nodes,
        graph.name or "caffe_net",
        [_value_info(n, s, dynamic) for n, s in graph.inputs.items()],
        [_value_info(o, graph.shapes[o], dynamic and _batch_first(graph, o)) for o in outs],
        initializer=b.initializers,
    )
    model = helper.make_model(model_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="graft")
    model.ir_version = 8
    return model


def _batch_first(graph: Graph, value: str) -> bool:
    """Whether axis 0 of ``value`` is the batch axis (not after a Permute moving it)."""
    producer = {o: n for n in graph.nodes for o in n.outputs}
    seen = value
    while seen in producer:
        node = producer[seen]
        if node.type == "Permute":
            order = list(node.param("permute_param").order)
            if order and order[0] != 0:
                return False
        if not node.inputs:
            break
        seen = node.inputs[0]
    return True
