"""Layers that move, join or combine blobs: Softmax, Eltwise, Concat, Slice, Split, Dropout,
Flatten, Reshape, Permute, Crop."""

from __future__ import annotations

import math

from ..errors import GraftError
from ..registry import Converter, register
from ._common import F, Lambda, TorchModule, axis_index, torch


@register
class Softmax(Converter):
    """Softmax over ``axis`` (1 by default, not the last axis)."""

    types = ("Softmax",)

    def _axis(self, node) -> int:
        return axis_index(node.param("softmax_param").axis, len(node.in_shapes[0]), node.name)

    def onnx(self, node, b):
        b.add("Softmax", node.inputs, node.outputs, name=node.name, axis=self._axis(node))

    def torch(self, node):
        axis = self._axis(node)
        return Lambda(lambda x: F.softmax(x, dim=axis), f"axis={axis}")


@register
class Identity(Converter):
    """Split copies its bottom to every top."""

    types = ("Split",)
    identity = True

    def onnx(self, node, b):
        for o in node.outputs:
            b.add("Identity", node.inputs[:1], [o], name=o if len(node.outputs) > 1 else node.name)

    def torch(self, node):
        n = len(node.outputs)
        return Lambda(lambda x: (x,) * n if n > 1 else x, "identity")


class _Dropout(TorchModule):
    """Caffe's dropout. Eval mode (inference, as emitted): the identity, or x·(1 − ratio) for the
    forks' ``scale_train: false``. Train mode: each value zeroed with probability ``ratio``, the
    rest scaled by 1/(1 − ratio) (not scaled with ``scale_train: false``)."""

    def __init__(self, ratio: float, scale_train: bool = True):
        super().__init__()
        self.ratio, self.scale_train = ratio, scale_train

    def forward(self, x):
        if self.ratio == 0.0:
            return x
        if not self.training:
            return x if self.scale_train else x * (1.0 - self.ratio)
        y = F.dropout(x, self.ratio, training=True)
        return y if self.scale_train else y * (1.0 - self.ratio)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}" + ("" if self.scale_train else ", scale_train=False")


@register
class Dropout(Identity):
    """The identity at inference (x·(1 − ratio) with the forks' ``scale_train: false``);
    ``net.train()`` turns on Caffe's train-time dropout."""

    types = ("Dropout",)

    def _test_scale(self, node) -> float:
        p = node.param("dropout_param")
        return 1.0 if p.scale_train else 1.0 - float(p.dropout_ratio)

    def onnx(self, node, b):
        scale = self._test_scale(node)
        if scale == 1.0:
            return super().onnx(node, b)
        b.add("Mul", [node.inputs[0], b.const(f"{node.name}/test_scale", scale)], node.outputs, name=node.name)

    def torch(self, node):
        p = node.param("dropout_param")
        return _Dropout(float(p.dropout_ratio), bool(p.scale_train))


_PROD, _SUM, _MAX = 0, 1, 2
_ELTWISE_OPS = {_PROD: "PROD", _SUM: "SUM", _MAX: "MAX"}


@register
class Eltwise(Converter):
    """SUM (optional per-input ``coeff``), PROD, MAX over one or more bottoms of one shape.

    A single bottom is a copy (times its coeff for SUM); BVLC Caffe asks for two bottoms,
    the forks that allow one compute exactly this. ``stable_prod_grad`` only concerns training.
    """

    types = ("Eltwise",)

    def infer(self, node, shapes):
        if any(s != shapes[0] for s in shapes):
            raise GraftError(f"layer '{node.name}': Eltwise inputs differ in shape: {shapes}")
        self._op(node)
        return [shapes[0]]

    def _op(self, node) -> tuple[int, list[float]]:
        """(operation, one coeff per bottom: all 1 unless SUM's are given), checked as Caffe does."""
        p = node.param("eltwise_param")
        op, coeffs = int(p.operation), [float(c) for c in p.coeff]
        if op not in _ELTWISE_OPS:
            raise GraftError(f"layer '{node.name}': unknown Eltwise operation {op}")
        n = len(node.spec.bottoms)  # node.inputs is filled in after shape inference
        if coeffs and len(coeffs) != n:
            raise GraftError(f"layer '{node.name}': {len(coeffs)} coeffs for {n} bottoms")
        if coeffs and op != _SUM:
            raise GraftError(f"layer '{node.name}': Eltwise {_ELTWISE_OPS[op]} takes no coeff "
                             "(coefficients are only for SUM)")
        return op, coeffs or [1.0] * n

    def onnx(self, node, b):
        op, coeffs = self._op(node)
        ins = list(node.inputs)
        if len(ins) == 1:
            if coeffs[0] == 1.0:
                b.add("Identity", ins, node.outputs, name=node.name)
            else:
                b.add("Mul", [ins[0], b.const(f"{node.name}/coeff0", coeffs[0])], node.outputs, name=node.name)
            return
        if op == _SUM:
            ins = [x if c == 1.0 else b.op("Mul", [x, b.const(f"{node.name}/coeff{i}", c)], f"{node.name}/term{i}")
                   for i, (x, c) in enumerate(zip(ins, coeffs))]
        if op in (_SUM, _MAX):
            b.add("Sum" if op == _SUM else "Max", ins, node.outputs, name=node.name)
            return
        acc = ins[0]  # PROD: a chain of Mul, in Caffe's order
        for i, x in enumerate(ins[1:]):
            last = i == len(ins) - 2
            outs = node.outputs if last else [b.unique(f"{node.name}/prod{i}")]
            b.add("Mul", [acc, x], outs, name=node.name if last else outs[0])
            acc = outs[0]

    def torch(self, node):
        op, coeffs = self._op(node)
        if op == _SUM:
            return Lambda(lambda *xs: sum(c * x if c != 1.0 else x for c, x in zip(coeffs, xs)), f"SUM coeff={coeffs}")
        if op == _PROD:
            return Lambda(lambda *xs: math.prod(xs[1:], start=xs[0]), "PROD")
        return Lambda(lambda *xs: torch.stack(xs).amax(0), "MAX")


def _concat_axis(node, rank: int) -> int:
    p = node.param("concat_param")
    axis = p.axis if p.HasField("axis") or not p.HasField("concat_dim") else p.concat_dim
    return axis_index(axis, rank, node.name)


@register
class Concat(Converter):
    types = ("Concat",)

    def infer(self, node, shapes):
        a = _concat_axis(node, len(shapes[0]))
        for s in shapes[1:]:
            if len(s) != len(shapes[0]) or any(x != y for i, (x, y) in enumerate(zip(s, shapes[0])) if i != a):
                raise GraftError(f"layer '{node.name}': Concat inputs {shapes} differ outside axis {a}")
        out = list(shapes[0])
        out[a] = sum(s[a] for s in shapes)
        return [tuple(out)]

    def onnx(self, node, b):
        b.add("Concat", node.inputs, node.outputs, name=node.name, axis=_concat_axis(node, len(node.in_shapes[0])))

    def torch(self, node):
        a = _concat_axis(node, len(node.in_shapes[0]))
        return Lambda(lambda *xs: torch.cat(xs, dim=a), f"axis={a}")


def _slices(node, shape) -> tuple[int, list[int]]:
    p = node.param("slice_param")
    axis = p.axis if p.HasField("axis") or not p.HasField("slice_dim") else p.slice_dim
    a = axis_index(axis, len(shape), node.name)
    n, total = len(node.outputs), shape[a]
    points = list(p.slice_point)
    if points:
        if len(points) != n - 1:
            raise GraftError(f"layer '{node.name}': {len(points)} slice points for {n} tops")
        bounds = [0] + points + [total]
        sizes = [bounds[i + 1] - bounds[i] for i in range(n)]
    else:
        if total % n:
            raise GraftError(f"layer '{node.name}': axis size {total} does not split evenly into {n} tops")
        sizes = [total // n] * n
    if any(s <= 0 for s in sizes):
        raise GraftError(f"layer '{node.name}': slice points {points} give empty slices of axis size {total}")
    return a, sizes


@register
class Slice(Converter):
    types = ("Slice",)

    def infer(self, node, shapes):
        a, sizes = _slices(node, shapes[0])
        return [tuple(s if i != a else size for i, s in enumerate(shapes[0])) for size in sizes]

    def onnx(self, node, b):
        a, sizes = _slices(node, node.in_shapes[0])
        b.add("Split", [node.inputs[0], b.const(f"{node.name}/sizes", sizes, dtype="int64")], node.outputs,
              name=node.name, axis=a)

    def torch(self, node):
        a, sizes = _slices(node, node.in_shapes[0])
        return Lambda(lambda x: tuple(torch.split(x, sizes, dim=a)), f"axis={a}, sizes={sizes}")


class _Reshapes(Converter):
    """Reshape and Flatten keep the batch axis dynamic: their ONNX target and torch shape are
    Caffe's output shape at the declared batch, with the batch axis left to -1 (or copied, 0).

    Which output axis is the batch axis is ``_batch_out``'s rule (each subclass). A leading
    axis that regroups the batch (TSM's 8 frames -> 1x8xCxHxW) stays the batch axis: a batch
    of 16 frames is then 2 clips, each as Caffe computes the declared 8. A hard-coded leading
    1 (``dim: 1 dim: -1``) in a batch-1 net keeps images apart where Caffe, at a batch of N,
    would put all N images into one row: the batch axis keeps one row per image.
    """

    def _batch_out(self, node, a: int) -> int:
        raise NotImplementedError

    def batch_axes(self, node, axes):
        a = axes[0] if axes else None
        return [None if a is None else self._batch_out(node, a)]

    def dynamic_axes(self, node):
        """A data-dependent input axis (a number of detections) moves as the batch axis would;
        its symbol is scaled when other axes merge into it."""
        dyn = node.in_dynamic[0] if node.in_dynamic else {}
        out = {}
        for a, symbol in dyn.items():
            b = self._batch_out(node, a)
            ratio = node.out_shapes[0][b] // max(1, node.in_shapes[0][a])
            out[b] = symbol if ratio == 1 else f"{ratio}*{symbol}"
        return {0: out} if out else {}

    def _target(self, node) -> list[int]:
        """Static dims; free axes (batch, data-dependent) copied (0) where they stay in place,
        else -1, which ONNX allows once."""
        target = list(node.out_shapes[0])
        free = {a: b for a, b in [(node.in_batch[0], node.out_batch[0])] if b is not None}
        free.update({a: b for a, b in zip(node.in_dynamic[0] if node.in_dynamic else {}, node.out_dynamic[0])})
        inferred = 0
        for a, b in free.items():
            if a == b and node.in_shapes[0][a] == target[b]:
                target[b] = 0
            else:
                target[b] = -1
                inferred += 1
        if inferred > 1:
            raise GraftError(f"layer '{node.name}': cannot reshape {node.in_shapes[0]} -> {node.out_shapes[0]} moving both the "
                             "batch axis and a data-dependent axis")
        return target

    def onnx(self, node, b):
        b.add("Reshape", [node.inputs[0], b.const(f"{node.name}/shape", self._target(node), dtype="int64")], node.outputs,
              name=node.name)

    def torch(self, node):
        target = self._target(node)
        copied = [i for i, d in enumerate(target) if d == 0]

        def reshape(x):  # 0 copies the input's dim at that position, as in ONNX
            return x.reshape([x.shape[i] if i in copied else d for i, d in enumerate(target)])

        return Lambda(reshape, f"-> {tuple(node.out_shapes[0])}, batch axis {node.out_batch[0]}")


def _flatten_span(node, rank: int) -> tuple[int, int]:
    p = node.param("flatten_param")
    return axis_index(p.axis, rank, node.name), axis_index(p.end_axis, rank, node.name)


@register
class Flatten(_Reshapes):
    """Flatten axes ``axis``..``end_axis`` into one."""

    types = ("Flatten",)

    def infer(self, node, shapes):
        s = shapes[0]
        a, e = _flatten_span(node, len(s))
        if e < a:
            raise GraftError(f"layer '{node.name}': flatten end_axis {e} comes before axis {a}")
        return [tuple(s[:a]) + (math.prod(s[a:e + 1]),) + tuple(s[e + 1:])]

    def _batch_out(self, node, a):
        start, end = _flatten_span(node, len(node.in_shapes[0]))
        return a if a < start else (start if a <= end else a - (end - start))


def _reshape_span(node, s) -> tuple[int, int, list[int]]:
    """Caffe's reshape span [start, end) of the input and its ``dim`` values."""
    p = node.param("reshape_param")
    rank = len(s)
    start = p.axis + rank + 1 if p.axis < 0 else p.axis
    end = rank if p.num_axes == -1 else start + p.num_axes
    if not (0 <= start <= rank and start <= end <= rank):
        raise GraftError(f"layer '{node.name}': reshape axis {p.axis}/num_axes {p.num_axes} out of range for {tuple(s)}")
    return start, end, [int(d) for d in p.shape.dim]


@register
class Reshape(_Reshapes):
    """Caffe Reshape: 0 copies the input dim, -1 infers one; ``axis``/``num_axes`` pick the span."""

    types = ("Reshape",)

    def infer(self, node, shapes):
        s = list(shapes[0])
        start, end, dims = _reshape_span(node, s)
        rank = len(s)
        new = []
        for i, d in enumerate(dims):
            if d == 0:
                if start + i >= rank:
                    raise GraftError(f"layer '{node.name}': dim 0 at position {i} copies an axis the input lacks")
                new.append(s[start + i])
            elif d < -1:
                raise GraftError(f"layer '{node.name}': reshape dim {d} is neither positive, 0 nor -1")
            else:
                new.append(d)
        if new.count(-1) > 1:
            raise GraftError(f"layer '{node.name}': more than one -1 in reshape dims {dims}")
        total = math.prod(s[start:end])
        if -1 in new:
            known = math.prod(d for d in new if d != -1)
            if known == 0 or total % known:
                raise GraftError(f"layer '{node.name}': cannot reshape {tuple(s)} with dims {dims}")
            new[new.index(-1)] = total // known
        if math.prod(new) != total:
            raise GraftError(f"layer '{node.name}': reshape dims {dims} hold {math.prod(new)} values, input span has {total}")
        return [tuple(s[:start] + new + s[end:])]

    def _batch_out(self, node, a):
        """Outside the span the batch axis moves with it; inside, it is the axis a 0 copies it
        to, else the span's leading axis when the batch leads the span, else the -1 axis."""
        start, end, dims = _reshape_span(node, node.in_shapes[0])
        if a < start:
            return a
        if a >= end:
            return a + len(dims) - (end - start)
        if a - start < len(dims) and dims[a - start] == 0:
            return a
        if a == start or -1 not in dims:
            return start
        return start + dims.index(-1)


def _order(node, rank: int) -> list[int]:
    order = [int(o) for o in node.param("permute_param").order]
    if sorted(order) != sorted(set(order)) or any(o >= rank for o in order):
        raise GraftError(f"layer '{node.name}': invalid permute order {order} for a {rank}-D blob")
    return order + [i for i in range(rank) if i not in order]


@register
class Permute(Converter):
    types = ("Permute",)

    def infer(self, node, shapes):
        order = _order(node, len(shapes[0]))
        return [tuple(shapes[0][i] for i in order)]

    def batch_axes(self, node, axes):
        a = axes[0] if axes else None
        return [None if a is None else _order(node, len(node.in_shapes[0])).index(a)]

    def onnx(self, node, b):
        b.add("Transpose", node.inputs, node.outputs, name=node.name, perm=_order(node, len(node.in_shapes[0])))

    def torch(self, node):
        order = _order(node, len(node.in_shapes[0]))
        return Lambda(lambda x: x.permute(*order).contiguous(), f"order={order}")


def _crop(node, shapes) -> tuple[int, list[int], list[int]]:
    p = node.param("crop_param")
    src, ref = shapes[0], shapes[1]
    a = axis_index(p.axis, len(src), node.name)
    n = len(src) - a
    offs = list(p.offset)
    if not offs:
        offs = [0] * n
    elif len(offs) == 1:
        offs = offs * n
    elif len(offs) != n:
        raise GraftError(f"layer '{node.name}': {len(offs)} crop offsets for {n} cropped axes")
    sizes = list(ref[a:])
    for i, (o, sz) in enumerate(zip(offs, sizes)):
        if o + sz > src[a + i]:
            raise GraftError(f"layer '{node.name}': crop offset {o} + size {sz} exceeds axis {a + i} of {tuple(src)}")
    return a, offs, sizes


@register
class Crop(Converter):
    """Crop bottom 0 to bottom 1's shape from ``axis`` on, starting at ``offset``."""

    types = ("Crop",)

    def infer(self, node, shapes):
        a, _, sizes = _crop(node, shapes)
        return [tuple(shapes[0][:a]) + tuple(sizes)]

    def onnx(self, node, b):
        a, offs, sizes = _crop(node, node.in_shapes)
        axes = list(range(a, a + len(offs)))
        ins = [node.inputs[0], b.const(f"{node.name}/starts", offs, dtype="int64"),
               b.const(f"{node.name}/ends", [o + s for o, s in zip(offs, sizes)], dtype="int64"),
               b.const(f"{node.name}/axes", axes, dtype="int64")]
        b.add("Slice", ins, node.outputs, name=node.name)

    def torch(self, node):
        a, offs, sizes = _crop(node, node.in_shapes)

        def crop(x, _ref):
            for i, (o, s) in enumerate(zip(offs, sizes)):
                x = x.narrow(a + i, o, s)
            return x

        return Lambda(crop, f"axis={a}, offset={offs}")
