"""NetSpec + weights -> :class:`Graph`: every value named, shaped, and its weights checked.

Caffe reuses blob names (in-place layers write their output over their input). The graph
gives every value its own name: the last value written to a blob keeps the Caffe name, so
``fc7`` is what Caffe's blob ``fc7`` holds after the net ran (post-ReLU for VGG-Face); each
earlier value is named ``<blob>/pre_<layer>``, after the in-place layer that overwrote it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .errors import GraftError
from .parse import LayerSpec, NetSpec
from .registry import Converter, Shape, get_converter


@dataclass
class Node:
    name: str
    type: str
    inputs: list[str]
    outputs: list[str]
    spec: LayerSpec = field(repr=False)
    converter: Converter = field(repr=False)
    weights: list[np.ndarray] = field(default_factory=list, repr=False)
    in_shapes: list[Shape] = field(default_factory=list)
    out_shapes: list[Shape] = field(default_factory=list)

    def param(self, field_name: str):
        return self.spec.param(field_name)


@dataclass
class Graph:
    name: str
    inputs: dict[str, Shape]
    nodes: list[Node]
    shapes: dict[str, Shape]
    outputs: list[str]
    #: value name -> {"layer": producing layer, "kind": "input"|"final"|"pre_in_place", "blob": Caffe blob}
    values: dict[str, dict]

    @property
    def param_count(self) -> int:
        return int(sum(w.size for n in self.nodes for w in n.weights))

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


def _matches(found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Blob shapes agree, allowing legacy 4-D (num, channels, height, width) padding with 1s."""
    if found == expected:
        return True
    strip = lambda s: tuple(s[next((i for i, d in enumerate(s) if d != 1), len(s)):])  # noqa: E731
    return strip(found) == strip(expected) and int(np.prod(found)) == int(np.prod(expected))


def build_graph(
    spec: NetSpec,
    weights: Mapping[str, list[np.ndarray]] | None,
    weights_source: str = "caffemodel",
    input_shapes: Mapping[str, Shape] | None = None,
) -> Graph:
    """Resolve names and shapes, and attach each layer's blobs (checked against its type).

    ``weights=None`` skips weights (used by the weight generator, which asks the graph
    which shapes to generate).
    """
    inputs = {k: tuple(int(d) for d in (input_shapes or {}).get(k, v)) for k, v in spec.inputs.items()}
    current: dict[str, tuple[str, int]] = {}  # caffe blob -> (blob, version)
    versions: dict[str, int] = {}
    shapes: dict[tuple[str, int], Shape] = {}
    overwritten_by: dict[tuple[str, int], str] = {}  # value -> layer that wrote the next version
    producer: dict[tuple[str, int], str] = {}
    for name, shape in inputs.items():
        current[name] = (name, 0)
        versions[name] = 0
        shapes[(name, 0)] = shape
    raw_nodes: list[tuple[Node, list[tuple[str, int]], list[tuple[str, int]]]] = []
    for ls in spec.layers:
        conv = get_converter(ls.type, ls.name)
        ins = []
        for b in ls.bottoms:
            if b not in current:
                raise GraftError(f"layer '{ls.name}' ({ls.type}): bottom '{b}' is not produced by any earlier layer or input")
            ins.append(current[b])
        node = Node(name=ls.name, type=ls.type, inputs=[], outputs=list(ls.tops), spec=ls, converter=conv)
        node.in_shapes = [shapes[v] for v in ins]
        try:
            node.out_shapes = [tuple(int(d) for d in s) for s in conv.infer(node, node.in_shapes)]
        except GraftError:
            raise
        except (ValueError, IndexError, ZeroDivisionError) as err:
            raise GraftError(f"layer '{ls.name}' ({ls.type}): cannot compute output shape from inputs {node.in_shapes}: {err}") from None
        if len(node.out_shapes) != len(ls.tops):
            raise GraftError(f"layer '{ls.name}' ({ls.type}): expected {len(node.out_shapes)} tops, found {len(ls.tops)}")
        if any(d <= 0 for s in node.out_shapes for d in s):
            raise GraftError(f"layer '{ls.name}' ({ls.type}): output shape {node.out_shapes} is empty for inputs {node.in_shapes}")
        expected = [tuple(int(d) for d in s) for s in conv.weight_shapes(node, node.in_shapes)]
        if weights is not None and expected:
            found = weights.get(ls.name)
            if not found:
                raise GraftError(f"layer '{ls.name}' ({ls.type}): no weights for this layer in the {weights_source}")
            if len(found) != len(expected):
                raise GraftError(
                    f"layer '{ls.name}' ({ls.type}): expected {len(expected)} blobs {expected}, "
                    f"the {weights_source} has {len(found)} {[tuple(a.shape) for a in found]}"
                )
            for i, (arr, exp) in enumerate(zip(found, expected)):
                if not _matches(tuple(arr.shape), exp):
                    raise GraftError(
                        f"layer '{ls.name}' ({ls.type}): blob {i} shape mismatch: prototxt implies {exp}, "
                        f"{weights_source} has {tuple(arr.shape)}"
                    )
            node.weights = [np.asarray(a).reshape(exp) for a, exp in zip(found, expected)]
        outs = []
        for top, shape in zip(ls.tops, node.out_shapes):
            if top in current:
                prev = current[top]
                overwritten_by[prev] = ls.name
                versions[top] += 1
            else:
                versions[top] = 0
            v = (top, versions[top])
            current[top] = v
            shapes[v] = shape
            producer[v] = ls.name
            outs.append(v)
        raw_nodes.append((node, ins, outs))

    def value_name(v: tuple[str, int]) -> str:
        if current.get(v[0]) == v:
            return v[0]
        return f"{v[0]}/pre_{overwritten_by[v]}"

    values: dict[str, dict] = {}
    for name in inputs:
        vn = value_name((name, 0))
        values[vn] = {"layer": None, "kind": "input" if vn == name else "pre_in_place", "blob": name}
    consumed: set[tuple[str, int]] = set()
    nodes = []
    for node, ins, outs in raw_nodes:
        node.inputs = [value_name(v) for v in ins]
        node.outputs = [value_name(v) for v in outs]
        consumed.update(ins)
        for v, vn in zip(outs, node.outputs):
            values[vn] = {"layer": node.name, "kind": "final" if vn == v[0] else "pre_in_place", "blob": v[0]}
        nodes.append(node)
    final_shapes = {value_name(v): s for v, s in shapes.items()}
    outputs = [value_name(v) for v in current.values() if v not in consumed and v[0] not in inputs]
    # a blob modified in place and never read again is an output under its final name
    outputs = list(dict.fromkeys(outputs))
    if not outputs:
        raise GraftError("the net has no output blob")
    return Graph(name=spec.name, inputs=inputs, nodes=nodes, shapes=final_shapes, outputs=outputs, values=values)
