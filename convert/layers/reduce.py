"""Layers that reduce a span of axes: ArgMax (top-k), Reduction (SUM/ASUM/SUMSQ/MEAN), MVN.

Caffe's ArgMax sorts (value, index) pairs with ``std::greater``: equal values come out with the
*higher* index first. ONNX TopK puts the lower index first, so both emitters reverse the axis,
take the top k there and map the indices back (``dim - 1 - i``): ties then match Caffe's order.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import GraftError
from ..registry import Converter, register
from ._common import Lambda, TorchModule, axis_index, torch

_INT64_MIN = -(2**63)


# ----------------------------------------------------------------------------- ArgMax


def _argmax(node, shape) -> tuple[int | None, int, bool]:
    """(axis or None for Caffe's per-image flatten, top_k, out_max_val), checked as Caffe does."""
    p = node.param("argmax_param")
    k = int(p.top_k)
    axis = axis_index(p.axis, len(shape), node.name) if p.HasField("axis") else None
    dim = shape[axis] if axis is not None else math.prod(shape[1:])
    if k < 1 or k > dim:
        where = f"axis {axis} (size {dim})" if axis is not None else f"the {dim} values of each image"
        raise GraftError(f"layer '{node.name}': top_k {k} must be between 1 and {where}")
    return axis, k, bool(p.out_max_val)


class _TopK(TorchModule):
    """Caffe's top k along ``axis``: (values, indices as float), ties broken by the higher index."""

    def __init__(self, axis: int | None, k: int, out_max_val: bool, rank: int):
        super().__init__()
        self.axis, self.k, self.out_max_val, self.rank = axis, k, out_max_val, rank

    def forward(self, x):
        a = 1 if self.axis is None else self.axis
        if self.axis is None:
            x = x.reshape(x.shape[0], -1)  # a 1-D blob too
        dim = x.shape[a]
        values, idx = torch.sort(x.flip(a), dim=a, descending=True, stable=True)
        values, idx = values.narrow(a, 0, self.k), idx.narrow(a, 0, self.k)
        index = (dim - 1 - idx).to(x.dtype)
        if self.axis is not None:
            return values if self.out_max_val else index
        y = torch.stack([index, values], 1) if self.out_max_val else index.unsqueeze(1)  # (N, 1|2, k)
        return y.reshape(y.shape + (1,) * (max(self.rank, 3) - 3))

    def extra_repr(self) -> str:
        return f"axis={self.axis}, top_k={self.k}, out_max_val={self.out_max_val}"


@register
class ArgMax(Converter):
    """Top-k indices (as floats) or values along ``axis``; without ``axis``, per image over the
    flattened C·H·W values: (N, 1, k) indices, or (N, 2, k) [indices; values] with ``out_max_val``
    (padded with trailing 1s to the input's rank, as Caffe's top)."""

    types = ("ArgMax",)

    def keeps_batch(self, node):
        return _argmax(node, node.in_shapes[0])[0] != 0

    def infer(self, node, shapes):
        axis, k, out_max_val = _argmax(node, shapes[0])
        if axis is not None:
            out = list(shapes[0])
            out[axis] = k
            return [tuple(out)]
        return [(shapes[0][0], 2 if out_max_val else 1, k) + (1,) * (len(shapes[0]) - 3)]

    def onnx(self, node, b):
        shape = node.in_shapes[0]
        axis, k, out_max_val = _argmax(node, shape)
        n = node.name
        x, a = node.inputs[0], 1 if axis is None else axis
        if axis is None and len(shape) != 2:
            x = b.op("Flatten", [x], f"{n}/flat", axis=1)
        dim = shape[a] if axis is not None else math.prod(shape[1:])
        i64 = lambda hint, v: b.const(f"{n}/{hint}", v, dtype="int64")  # noqa: E731
        rev = b.op("Slice", [x, i64("rev_starts", [-1]), i64("rev_ends", [_INT64_MIN]), i64("rev_axes", [a]),
                             i64("rev_steps", [-1])], f"{n}/reversed")
        rev_idx = b.unique(f"{n}/rev_indices")
        values_only = axis is not None and out_max_val
        values = node.outputs[0] if values_only else b.unique(f"{n}/values")
        b.add("TopK", [rev, i64("k", [k])], [values, rev_idx], name=n if values_only else f"{n}/topk",
              axis=a, largest=1, sorted=1)
        if values_only:
            return
        idx = b.op("Cast", [rev_idx], f"{n}/rev_indices_f", to=1)
        last = b.const(f"{n}/last_index", np.float32(dim - 1))
        if axis is not None:
            b.add("Sub", [last, idx], node.outputs, name=n)
            return
        idx = b.op("Sub", [last, idx], f"{n}/indices")
        trailing = list(range(3, len(shape)))  # Caffe's top has at least 3 axes, else the input's rank
        if not out_max_val:  # (N, k) -> (N, 1, k, 1...)
            b.add("Unsqueeze", [idx, i64("axes", [1] + trailing)], node.outputs, name=n)
            return
        pairs = [b.op("Unsqueeze", [v, i64(f"axis1_{i}", [1])], f"{n}/row{i}") for i, v in enumerate((idx, values))]
        if not trailing:
            b.add("Concat", pairs, node.outputs, name=n, axis=1)
            return
        y = b.op("Concat", pairs, f"{n}/pairs", axis=1)
        b.add("Unsqueeze", [y, i64("trailing", trailing)], node.outputs, name=n)

    def torch(self, node):
        axis, k, out_max_val = _argmax(node, node.in_shapes[0])
        return _TopK(axis, k, out_max_val, len(node.in_shapes[0]))


# ----------------------------------------------------------------------------- Reduction

_SUM, _ASUM, _SUMSQ, _MEAN = 1, 2, 3, 4
_OPS = {_SUM: "SUM", _ASUM: "ASUM", _SUMSQ: "SUMSQ", _MEAN: "MEAN"}


def _reduction(node, shape) -> tuple[int, int, np.float32]:
    """(op, first reduced axis, the factor Caffe multiplies the sums by)."""
    p = node.param("reduction_param")
    op = int(p.operation)
    if op not in _OPS:
        raise GraftError(f"layer '{node.name}': unknown reduction operation {op}")
    a = axis_index(p.axis, len(shape), node.name)
    coeff = np.float32(p.coeff)
    if op == _MEAN:  # Caffe: coeff_ /= dim_, in the blob's float type
        coeff = np.float32(coeff / np.float32(math.prod(shape[a:])))
    return op, a, coeff


@register
class Reduction(Converter):
    """SUM / ASUM / SUMSQ / MEAN over *every* axis from ``axis`` (default 0) to the end, times
    ``coeff``; the output keeps only the axes before ``axis`` (axis 0: one value, rank 0)."""

    types = ("Reduction",)

    def keeps_batch(self, node):
        return _reduction(node, node.in_shapes[0])[1] != 0

    def infer(self, node, shapes):
        _, a, _ = _reduction(node, shapes[0])
        return [tuple(shapes[0][:a])]

    def onnx(self, node, b):
        op, a, coeff = _reduction(node, node.in_shapes[0])
        n, x = node.name, node.inputs[0]
        axes = list(range(a, len(node.in_shapes[0])))
        out = node.outputs if coeff == 1.0 else [b.unique(f"{n}/{_OPS[op].lower()}")]
        name = n if coeff == 1.0 else out[0]
        if op in (_SUM, _MEAN):  # opset 13+: ReduceSum takes the axes as an input
            b.add("ReduceSum", [x, b.const(f"{n}/axes", axes, dtype="int64")], out, name=name, keepdims=0)
        else:  # opset 17: ReduceL1 / ReduceSumSquare take them as an attribute
            b.add("ReduceL1" if op == _ASUM else "ReduceSumSquare", [x], out, name=name, axes=axes, keepdims=0)
        if coeff != 1.0:
            b.add("Mul", [out[0], b.const(f"{n}/coeff", coeff)], node.outputs, name=n)

    def torch(self, node):
        op, a, coeff = _reduction(node, node.in_shapes[0])
        dims = tuple(range(a, len(node.in_shapes[0])))
        pre = {_ASUM: torch.abs, _SUMSQ: torch.square}.get(op, lambda x: x)
        c = float(coeff)
        if c == 1.0:
            return Lambda(lambda x: pre(x).sum(dim=dims), f"{_OPS[op]} over axes {dims}")
        return Lambda(lambda x: pre(x).sum(dim=dims) * c, f"{_OPS[op]} over axes {dims}, times {c:g}")


# ----------------------------------------------------------------------------- MVN


def _mvn(node, shape) -> tuple[list[int], bool, float]:
    """(reduced axes, normalize_variance, eps); Caffe's MVN reads the blob as legacy N,C,H,W."""
    if len(shape) > 4:
        raise GraftError(f"layer '{node.name}': MVN takes at most 4 axes (N, C, H, W), got {shape}")
    p = node.param("mvn_param")
    first = 1 if p.across_channels else 2
    return list(range(first, len(shape))), bool(p.normalize_variance), float(np.float32(p.eps))


class _MVN(TorchModule):
    def __init__(self, axes: list[int], normalize_variance: bool, eps: float, rank: int):
        super().__init__()
        self.axes, self.normalize_variance, self.eps = tuple(axes), normalize_variance, eps
        self.trailing = (1,) * (4 - rank)  # Caffe's top is N, C, H, W

    def forward(self, x):
        if self.axes:
            y = x - x.mean(dim=self.axes, keepdim=True)
        else:  # one value per mean: Caffe computes x - x
            y = x - x
        if self.normalize_variance:
            var = (y * y).mean(dim=self.axes, keepdim=True) if self.axes else y * y
            y = y / (var.sqrt() + self.eps)
        return y.reshape(y.shape + self.trailing) if self.trailing else y

    def extra_repr(self) -> str:
        return f"axes={self.axes}, normalize_variance={self.normalize_variance}, eps={self.eps:g}"


@register
class MVN(Converter):
    """(x − mean) / (std + eps) per image and channel (``across_channels``: per image); Caffe adds
    ``eps`` to the standard deviation, not to the variance. Without ``normalize_variance`` only
    the mean is removed. The output is 4-D, as Caffe's top (trailing 1s for a smaller input)."""

    types = ("MVN",)

    def infer(self, node, shapes):
        _mvn(node, shapes[0])
        return [tuple(shapes[0]) + (1,) * (4 - len(shapes[0]))]

    def onnx(self, node, b):
        axes, norm_var, eps = _mvn(node, node.in_shapes[0])
        n, x = node.name, node.inputs[0]
        rank = len(node.in_shapes[0])
        left = 1 + norm_var + (rank < 4)  # Sub, Div, Unsqueeze: the last one writes the output

        def chain(op: str, ins: list[str], hint: str) -> str:
            nonlocal left
            left -= 1
            if left == 0:
                return b.add(op, ins, node.outputs, name=n)[0]
            return b.op(op, ins, f"{n}/{hint}")

        def mean(v: str, hint: str) -> str:
            return b.op("ReduceMean", [v], f"{n}/{hint}", axes=axes, keepdims=1) if axes else v

        y = chain("Sub", [x, mean(x, "mean")], "centred")
        if norm_var:
            std = b.op("Sqrt", [mean(b.op("Mul", [y, y], f"{n}/squares"), "variance")], f"{n}/std")
            std = b.op("Add", [std, b.const(f"{n}/eps", np.float32(eps))], f"{n}/std_eps")
            y = chain("Div", [y, std], "normalized")
        if rank < 4:
            chain("Unsqueeze", [y, b.const(f"{n}/trailing", list(range(rank, 4)), dtype="int64")], "out")

    def torch(self, node):
        axes, norm_var, eps = _mvn(node, node.in_shapes[0])
        return _MVN(axes, norm_var, eps, len(node.in_shapes[0]))
