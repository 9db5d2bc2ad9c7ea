"""NetSpec + weights -> :class:`Graph`: every value named, shaped, its batch axis known, and its
weights checked.

Caffe reuses blob names (in-place layers write their output over their input). The graph
gives every value its own name: the last value written to a blob keeps the Caffe name, so
``fc7`` is what Caffe's blob ``fc7`` holds after the net ran (post-ReLU for VGG-Face); each
earlier value is named ``<blob>/pre_<layer>``, after the in-place layer that overwrote it. An
input blob overwritten in place (a BatchNorm on ``data``) is fed under that earlier name.

Shapes are Caffe's, at the declared batch B. Each value also records which axis, if any, is
the batch axis: that axis is left dynamic in the emitted models, and at run time holds
``d·N/B`` entries for a batch of N images (``d`` its declared size). A net that regroups its
batch (TSM's 8 frames -> one 1x8xCxHxW clip) therefore runs in multiples of the group
(:attr:`Graph.batch_multiple`), each group as Caffe runs the declared batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from .errors import GraftError
from .parse import LayerSpec, NetSpec
from .registry import Converter, Shape, get_converter

#: a value larger than this (float32 elements) is a parameter mistake, not a net
MAX_VALUE_SIZE = 2**31

#: exceptions a converter raises on parameters it did not anticipate: reported per layer
LAYER_ERRORS = (ValueError, IndexError, KeyError, TypeError, AttributeError, ZeroDivisionError, OverflowError,
                NotImplementedError, RuntimeError)


@contextlib.contextmanager
def layer_errors(name: str, ltype: str, what: str) -> Iterator[None]:
    """Turn a converter's unexpected exception into a one-line GraftError naming the layer."""
    try:
        yield
    except GraftError:
        raise
    except LAYER_ERRORS as err:
        detail = " ".join(str(err).split()) or type(err).__name__
        raise GraftError(f"layer '{name}' ({ltype}): cannot {what}: {type(err).__name__}: {detail}"[:600]) from None


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
    #: the batch axis of each input / output (None: that value does not grow with the batch)
    in_batch: list[int | None] = field(default_factory=list)
    out_batch: list[int | None] = field(default_factory=list)
    #: data-dependent axes of each input / output: {axis: symbol} (``Converter.dynamic_axes``)
    in_dynamic: list[dict[int, str]] = field(default_factory=list)
    out_dynamic: list[dict[int, str]] = field(default_factory=list)

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
    #: the declared batch (axis 0 of the main input)
    batch: int = 1
    #: value name -> its batch axis, or None
    batch_axes: dict[str, int | None] = field(default_factory=dict)
    #: value name -> {axis: symbol} for data-dependent sizes (``Converter.dynamic_axes``)
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def param_count(self) -> int:
        return int(sum(w.size for n in self.nodes for w in n.weights))

    @property
    def main_input(self) -> str:
        """The image input: the first 4-D input, else the first input."""
        return main_input(self.inputs)

    @property
    def batch_multiple(self) -> int:
        """The smallest batch step the graph accepts: 1 unless it regroups its batch (TSM: 8)."""
        step = 1
        for v, a in self.batch_axes.items():
            if a is not None:
                d = self.shapes[v][a]
                step = math.lcm(step, self.batch // math.gcd(self.batch, d))
        return step

    def batch_symbol(self, value: str) -> str | None:
        """The batch axis's symbolic size: ``N`` for a batch of N images, ``N/8`` for TSM's clips."""
        a = self.batch_axes.get(value)
        if a is None:
            return None
        return batch_symbol(self.shapes[value][a], self.batch)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


def main_input(inputs: Mapping[str, Sequence[int]]) -> str:
    """The image input: the first 4-D input, else the first input."""
    return next((n for n, s in inputs.items() if len(s) == 4), next(iter(inputs)))


def batch_symbol(declared: int, batch: int) -> str:
    """``N`` scaled by declared/batch, as a readable symbol (``N``, ``N/8``, ``2N``, ``3N/4``)."""
    f = Fraction(declared, batch)
    num = "N" if f.numerator == 1 else f"{f.numerator}N"
    return num if f.denominator == 1 else f"{num}/{f.denominator}"


def _matches(found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Blob shapes agree, allowing legacy 4-D (num, channels, height, width) padding with 1s."""
    if found == expected:
        return True
    strip = lambda s: tuple(s[next((i for i, d in enumerate(s) if d != 1), len(s)):])  # noqa: E731
    return strip(found) == strip(expected) and int(np.prod(found)) == int(np.prod(expected))


def _input_shapes(spec: NetSpec, overrides: Mapping[str, Sequence[int | None]] | None) -> dict[str, Shape]:
    """Declared input shapes with overrides (keyed by input name); a None dim keeps the declared one."""
    out = {}
    for name, declared in spec.inputs.items():
        shape = list(declared)
        given = (overrides or {}).get(name)
        if given is not None:
            given = list(given)
            shape = [int(d) if d is not None else (shape[i] if i < len(shape) else 1) for i, d in enumerate(given)]
        if not shape or any(d <= 0 for d in shape):
            raise GraftError(f"input '{name}': shape {shape} is not a list of positive dims")
        if math.prod(shape) > MAX_VALUE_SIZE:
            raise GraftError(f"input '{name}': shape {shape} holds {math.prod(shape):,} values; too large")
        out[name] = tuple(shape)
    return out


def _check_weights(node: Node, expected: list[Shape], weights: Mapping[str, list[np.ndarray]], source: str) -> None:
    ls = node.spec
    found = weights.get(ls.name)
    if not found:
        raise GraftError(f"layer '{ls.name}' ({ls.type}): no weights for this layer in the {source}")
    if len(found) != len(expected):
        raise GraftError(
            f"layer '{ls.name}' ({ls.type}): expected {len(expected)} blobs {expected}, "
            f"the {source} has {len(found)} {[tuple(a.shape) for a in found]}"
        )
    for i, (arr, exp) in enumerate(zip(found, expected)):
        if not _matches(tuple(arr.shape), exp):
            raise GraftError(
                f"layer '{ls.name}' ({ls.type}): blob {i} shape mismatch: prototxt implies {exp}, {source} has {tuple(arr.shape)}"
            )
    node.weights = [np.asarray(a).reshape(exp) for a, exp in zip(found, expected)]


def _place_free_axes(node: Node) -> None:
    """The outputs' batch axes and data-dependent axes, from the inputs' and the converter."""
    ls, conv = node.spec, node.converter
    with layer_errors(ls.name, ls.type, "place the batch axis"):
        node.out_batch = [None if a is None else int(a) for a in conv.batch_axes(node, node.in_batch)]
    if len(node.out_batch) != len(node.out_shapes) or any(
            a is not None and not 0 <= a < len(s) for a, s in zip(node.out_batch, node.out_shapes)):
        raise GraftError(f"layer '{ls.name}' ({ls.type}): batch axes {node.out_batch} do not fit outputs {node.out_shapes}")
    with layer_errors(ls.name, ls.type, "name its data-dependent axes"):
        declared = {int(i): {int(a): str(v) for a, v in d.items()} for i, d in conv.dynamic_axes(node).items()}
    # an output shaped like the first input keeps its data-dependent axes unless told otherwise
    first = (node.in_shapes[0], node.in_dynamic[0]) if node.in_shapes and node.in_dynamic else (None, {})
    node.out_dynamic = [declared.get(i, first[1] if s == first[0] else {}) for i, s in enumerate(node.out_shapes)]
    if any(not 0 <= a < len(s) for d, s in zip(node.out_dynamic, node.out_shapes) for a in d):
        raise GraftError(f"layer '{ls.name}' ({ls.type}): data-dependent axes {node.out_dynamic} do not fit outputs {node.out_shapes}")


def _shape_node(node: Node, weights: Mapping[str, list[np.ndarray]] | None, source: str) -> None:
    """Output shapes, batch axes and learned blobs of one layer (its inputs already known)."""
    ls, conv = node.spec, node.converter
    with layer_errors(ls.name, ls.type, f"compute output shape from inputs {node.in_shapes}"):
        node.out_shapes = [tuple(int(d) for d in s) for s in conv.infer(node, node.in_shapes)]
    if len(node.out_shapes) != len(ls.tops):
        raise GraftError(f"layer '{ls.name}' ({ls.type}): expected {len(node.out_shapes)} tops, found {len(ls.tops)}")
    if any(d <= 0 for s in node.out_shapes for d in s):
        raise GraftError(f"layer '{ls.name}' ({ls.type}): output shape {node.out_shapes} is empty for inputs {node.in_shapes}")
    big = [s for s in node.out_shapes if math.prod(s) > MAX_VALUE_SIZE]
    if big:
        raise GraftError(f"layer '{ls.name}' ({ls.type}): output shape {big[0]} holds {math.prod(big[0]):,} values; too large")
    _place_free_axes(node)
    with layer_errors(ls.name, ls.type, "compute its learned blob shapes"):
        expected = [tuple(int(d) for d in s) for s in conv.weight_shapes(node, node.in_shapes)]
    bad = [s for s in expected if not s or any(d <= 0 for d in s) or math.prod(s) > MAX_VALUE_SIZE]
    if bad:
        raise GraftError(f"layer '{ls.name}' ({ls.type}): its parameters imply a learned blob of shape {bad[0]}")
    if weights is not None and expected:
        _check_weights(node, expected, weights, source)


def build_graph(
    spec: NetSpec,
    weights: Mapping[str, list[np.ndarray]] | None,
    weights_source: str = "caffemodel",
    input_shapes: Mapping[str, Sequence[int | None]] | None = None,
) -> Graph:
    """Resolve names, shapes and batch axes, and attach each layer's blobs (checked against its type).

    ``weights=None`` skips weights (used by the weight generator, which asks the graph
    which shapes to generate). ``input_shapes`` overrides declared input shapes (by input
    name); a None dim keeps the declared one. ``spec.outputs``, when set (``--outputs``),
    names the graph's outputs; otherwise they are the values no layer reads.
    """
    inputs = _input_shapes(spec, input_shapes)
    batch = inputs[main_input(inputs)][0]
    current: dict[str, tuple[str, int]] = {}  # caffe blob -> (blob, version)
    writer: dict[str, str] = {}  # caffe blob -> the layer (or input) that wrote its current value
    shapes: dict[tuple[str, int], Shape] = {}
    axes: dict[tuple[str, int], int | None] = {}
    dynamic: dict[tuple[str, int], dict[int, str]] = {}
    overwritten_by: dict[tuple[str, int], str] = {}  # value -> layer that wrote the next version
    for name, shape in inputs.items():
        current[name] = (name, 0)
        writer[name] = f"input '{name}'"
        shapes[(name, 0)] = shape
        axes[(name, 0)] = 0 if shape[0] == batch else None
    raw_nodes: list[tuple[Node, list[tuple[str, int]], list[tuple[str, int]]]] = []
    for ls in spec.layers:
        try:
            conv = get_converter(ls.type, ls.name)
        except GraftError as err:
            if spec.outputs is not None or not ls.bottoms:
                raise
            # the usual case: a fork's post-processing at the end of a net whose trunk converts
            raise GraftError(f"{err}; to convert the net up to that layer: --outputs {','.join(ls.bottoms)}") from None
        ins = []
        for b in ls.bottoms:
            if b not in current:
                raise GraftError(f"layer '{ls.name}' ({ls.type}): bottom '{b}' is not produced by any earlier layer or input")
            ins.append(current[b])
        node = Node(name=ls.name, type=ls.type, inputs=[], outputs=list(ls.tops), spec=ls, converter=conv)
        node.in_shapes = [shapes[v] for v in ins]
        node.in_batch = [axes[v] for v in ins]
        node.in_dynamic = [dynamic.get(v, {}) for v in ins]
        _shape_node(node, weights, weights_source)
        outs = []
        for i, (top, shape) in enumerate(zip(ls.tops, node.out_shapes)):
            if top in current:
                # Caffe: a name may be written again only in place (top i is bottom i)
                if not (i < len(ls.bottoms) and ls.bottoms[i] == top):
                    raise GraftError(f"layer '{ls.name}' ({ls.type}): top '{top}' is already written by {writer[top]}; "
                                     f"Caffe reuses a blob name only in place (top {i} = bottom {i})")
                overwritten_by[current[top]] = ls.name
                v = (top, current[top][1] + 1)
            else:
                v = (top, 0)
            current[top] = v
            writer[top] = f"layer '{ls.name}'"
            shapes[v] = shape
            axes[v] = node.out_batch[i]
            if node.out_dynamic[i]:
                dynamic[v] = node.out_dynamic[i]
            outs.append(v)
        raw_nodes.append((node, ins, outs))

    def value_name(v: tuple[str, int]) -> str:
        if current.get(v[0]) == v:
            return v[0]
        return f"{v[0]}/pre_{overwritten_by[v]}"

    values: dict[str, dict] = {}
    graph_inputs: dict[str, Shape] = {}
    for name, shape in inputs.items():
        vn = value_name((name, 0))
        graph_inputs[vn] = shape
        values[vn] = {"layer": None, "kind": "input", "blob": name}
    consumed: set[tuple[str, int]] = set()
    nodes = []
    for node, ins, outs in raw_nodes:
        node.inputs = [value_name(v) for v in ins]
        node.outputs = [value_name(v) for v in outs]
        if outs:  # a layer without tops (Silence) consumes nothing: its bottoms stay outputs
            consumed.update(ins)
        for v, vn in zip(outs, node.outputs):
            values[vn] = {"layer": node.name, "kind": "final" if vn == v[0] else "pre_in_place", "blob": v[0]}
        nodes.append(node)
    final_shapes = {value_name(v): s for v, s in shapes.items()}
    if spec.outputs:
        unknown = [o for o in spec.outputs if o not in final_shapes]
        if unknown:
            raise GraftError(f"no blob {', '.join(map(repr, unknown))} in the net; blobs: {', '.join(final_shapes)}")
        outputs = list(dict.fromkeys(spec.outputs))
    else:
        # a blob modified in place and never read again is an output under its final name
        raw_inputs = {(name, 0) for name in inputs}
        outputs = list(dict.fromkeys(value_name(v) for v in current.values() if v not in consumed and v not in raw_inputs))
    if not outputs:
        raise GraftError("the net has no output blob")
    return Graph(name=spec.name, inputs=graph_inputs, nodes=nodes, shapes=final_shapes, outputs=outputs, values=values,
                 batch=batch, batch_axes={value_name(v): a for v, a in axes.items()},
                 dynamic={value_name(v): d for v, d in dynamic.items()})
