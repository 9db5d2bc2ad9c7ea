"""BatchNorm (moving-average factor), Scale, Bias, LRN (across / within channel), Normalize (SSD)."""

from __future__ import annotations

import numpy as np

from ..errors import GraftError
from ..registry import Converter, register
from ._common import F, TorchModule, axis_index, param, to_tensor, torch


def bn_stats(node) -> tuple[np.ndarray, np.ndarray, float]:
    """Caffe stores mean·s, var·s and s; the statistics are those divided by s (0 if s == 0)."""
    mean, var, s = (np.asarray(w, dtype=np.float64).reshape(-1) for w in node.weights)
    f = 0.0 if s[0] == 0 else 1.0 / s[0]
    return (mean * f).astype(np.float32), (var * f).astype(np.float32), float(node.param("batch_norm_param").eps)


class _BatchNorm(TorchModule):
    def __init__(self, node):
        super().__init__()
        mean, var, self.eps = bn_stats(node)
        # Caffe's three blobs stay parameters-in-layout so that weights round-trip by name.
        self.register_buffer("running_mean", to_tensor(mean))
        self.register_buffer("running_var", to_tensor(var))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)


@register
class BatchNorm(Converter):
    types = ("BatchNorm",)

    def infer(self, node, shapes):
        return [shapes[0]]

    def weight_shapes(self, node, shapes):
        c = shapes[0][1]
        return [(c,), (c,), (1,)]

    def onnx(self, node, b):
        mean, var, eps = bn_stats(node)
        c = mean.size
        ins = [node.inputs[0], b.const(f"{node.name}/gamma", np.ones(c)), b.const(f"{node.name}/beta", np.zeros(c)),
               b.const(f"{node.name}/mean", mean), b.const(f"{node.name}/var", var)]
        b.add("BatchNormalization", ins, node.outputs, name=node.name, epsilon=eps)

    def torch(self, node):
        return _BatchNorm(node)

    def caffe_blobs(self, node, module):
        # global statistics (use_global_stats) are never updated: Caffe's own three blobs stand
        return [np.array(w, dtype=np.float32) for w in node.weights]


def _span(node, shapes, param_name: str) -> tuple[int, tuple[int, ...]]:
    """Scale/Bias: the axis and the shape of the learned blob (from ``axis`` over ``num_axes``)."""
    p = node.param(param_name)
    rank = len(shapes[0])
    axis = axis_index(p.axis, rank, node.name) if rank else 0
    if len(shapes) > 1:
        return axis, tuple(shapes[1])
    n = rank - axis if p.num_axes == -1 else int(p.num_axes)
    return axis, tuple(shapes[0][axis:axis + n])


def _view(shape: tuple[int, ...], axis: int, rank: int) -> tuple[int, ...]:
    """Right-pad with 1s so that a blob covering axes [axis, axis+len) broadcasts."""
    return tuple(shape) + (1,) * (rank - axis - len(shape)) if shape else (1,)


class _Affine(TorchModule):
    """Scale (x·γ (+β)) or Bias (x+β); γ/β learned, or taken from the second bottom."""

    def __init__(self, node, scale: bool, has_bias: bool, two_bottoms: bool):
        super().__init__()
        axis, shape = _span(node, node.in_shapes, "scale_param" if scale else "bias_param")
        self.rank, self.axis = len(node.in_shapes[0]), axis
        view = _view(shape, axis, self.rank)
        self.is_scale, self.two = scale, two_bottoms
        weights = [w.reshape(view) for w in node.weights]
        self.weight = param(weights.pop(0)) if (scale and not two_bottoms) else None
        self.bias = param(weights.pop(0)) if ((has_bias or not scale) and weights) else None

    def forward(self, x, other=None):
        if self.two:
            other = other.reshape(tuple(other.shape) + (1,) * (self.rank - self.axis - other.dim()))
        if self.is_scale:
            y = x * (other if self.two else self.weight)
            return y + self.bias if self.bias is not None else y
        return x + (other if self.two else self.bias)


def _trailing(b, node, value: str, other_rank: int, axis: int) -> str:
    """Unsqueeze a second bottom so it broadcasts from ``axis`` (keeps a dynamic batch)."""
    k = len(node.in_shapes[0]) - axis - other_rank
    if k <= 0:
        return value
    axes = b.const(f"{node.name}/axes", list(range(other_rank, other_rank + k)), dtype="int64")
    return b.op("Unsqueeze", [value, axes], f"{node.name}/broadcast")


@register
class Scale(Converter):
    """y = x·γ (+ β); γ is a learned blob, or the second bottom."""

    types = ("Scale",)

    def infer(self, node, shapes):
        return [shapes[0]]

    def weight_shapes(self, node, shapes):
        _, shape = _span(node, shapes, "scale_param")
        bias = node.param("scale_param").bias_term
        if len(shapes) > 1:
            return [shape] if bias else []
        return [shape, shape] if bias else [shape]

    def onnx(self, node, b):
        axis, shape = _span(node, node.in_shapes, "scale_param")
        view = _view(shape, axis, len(node.in_shapes[0]))
        if len(node.inputs) > 1:
            g = _trailing(b, node, node.inputs[1], len(node.in_shapes[1]), axis)
            bias_i = 0
        else:
            g, bias_i = b.weight(node, 0, view), 1
        if node.param("scale_param").bias_term:
            y = b.op("Mul", [node.inputs[0], g], f"{node.name}/mul")
            b.add("Add", [y, b.weight(node, bias_i, view)], node.outputs, name=node.name)
        else:
            b.add("Mul", [node.inputs[0], g], node.outputs, name=node.name)

    def torch(self, node):
        return _Affine(node, scale=True, has_bias=node.param("scale_param").bias_term, two_bottoms=len(node.inputs) > 1)


@register
class Bias(Converter):
    """y = x + β; β is a learned blob, or the second bottom."""

    types = ("Bias",)

    def infer(self, node, shapes):
        return [shapes[0]]

    def weight_shapes(self, node, shapes):
        return [] if len(shapes) > 1 else [_span(node, shapes, "bias_param")[1]]

    def onnx(self, node, b):
        axis, shape = _span(node, node.in_shapes, "bias_param")
        view = _view(shape, axis, len(node.in_shapes[0]))
        if len(node.inputs) > 1:
            beta = _trailing(b, node, node.inputs[1], len(node.in_shapes[1]), axis)
        else:
            beta = b.weight(node, 0, view)
        b.add("Add", [node.inputs[0], beta], node.outputs, name=node.name)

    def torch(self, node):
        return _Affine(node, scale=False, has_bias=True, two_bottoms=len(node.inputs) > 1)


def _lrn(node):
    p = node.param("lrn_param")
    return int(p.local_size), float(p.alpha), float(p.beta), float(p.k), int(p.norm_region)


class _LRN(TorchModule):
    def __init__(self, node):
        super().__init__()
        self.n, self.alpha, self.beta, self.k, self.region = _lrn(node)

    def forward(self, x):
        n = self.n
        sq = x * x
        if self.region == 0:  # ACROSS_CHANNELS: window of n channels, (n-1)//2 before
            pre = (n - 1) // 2
            s = F.pad(sq.unsqueeze(1), (0, 0, 0, 0, pre, n - 1 - pre)).squeeze(1)
            s = F.avg_pool3d(s.unsqueeze(1), (n, 1, 1), stride=1).squeeze(1) * n
            return x * torch.pow(self.k + (self.alpha / n) * s, -self.beta)
        pre = (n - 1) // 2  # WITHIN_CHANNEL: n×n AVE pool, pad (n-1)/2, Caffe divisor n²
        s = F.avg_pool2d(F.pad(sq, (pre, n - 1 - pre, pre, n - 1 - pre)), n, 1)
        return x * torch.pow(1.0 + self.alpha * s, -self.beta)


@register
class LRN(Converter):
    types = ("LRN",)

    def infer(self, node, shapes):
        n = _lrn(node)[0]
        if _lrn(node)[4] == 1 and n % 2 == 0:
            raise GraftError(f"layer '{node.name}': WITHIN_CHANNEL LRN needs an odd local_size, got {n}")
        return [shapes[0]]

    def onnx(self, node, b):
        n, alpha, beta, k, region = _lrn(node)
        x = node.inputs[0]
        if region == 0:
            b.add("LRN", [x], node.outputs, name=node.name, size=n, alpha=alpha, beta=beta, bias=k)
            return
        pre = (n - 1) // 2
        sq = b.op("Mul", [x, x], f"{node.name}/sq")
        pads = b.const(f"{node.name}/pads", [0, 0, pre, pre, 0, 0, n - 1 - pre, n - 1 - pre], dtype="int64")
        sq = b.op("Pad", [sq, pads], f"{node.name}/sq_padded", mode="constant")
        avg = b.op("AveragePool", [sq], f"{node.name}/avg", kernel_shape=[n, n], strides=[1, 1])
        d = b.op("Mul", [avg, b.const(f"{node.name}/alpha", alpha)], f"{node.name}/scaled")
        d = b.op("Add", [d, b.const(f"{node.name}/one", 1.0)], f"{node.name}/base")
        d = b.op("Pow", [d, b.const(f"{node.name}/neg_beta", -beta)], f"{node.name}/factor")
        b.add("Mul", [x, d], node.outputs, name=node.name)

    def torch(self, node):
        return _LRN(node)


class _Normalize(TorchModule):
    def __init__(self, node):
        super().__init__()
        p = node.param("norm_param")
        self.across, self.eps = bool(p.across_spatial), float(p.eps)
        w = node.weights[0].reshape(-1)
        self.weight = param(w.reshape((w.size, 1, 1)) if w.size > 1 else w)

    def forward(self, x):
        dims = tuple(range(1, x.dim())) if self.across else (1,)
        norm = torch.sqrt((x * x).sum(dim=dims, keepdim=True) + self.eps)
        return x / norm * self.weight


@register
class Normalize(Converter):
    """SSD's L2 normalisation: y = x / sqrt(Σx² + eps) · scale (over C, or over C,H,W)."""

    types = ("Normalize",)

    def infer(self, node, shapes):
        return [shapes[0]]

    def weight_shapes(self, node, shapes):
        return [(1,)] if node.param("norm_param").channel_shared else [(shapes[0][1],)]

    def onnx(self, node, b):
        p = node.param("norm_param")
        rank = len(node.in_shapes[0])
        x = node.inputs[0]
        axes = list(range(1, rank)) if p.across_spatial else [1]
        sq = b.op("Mul", [x, x], f"{node.name}/sq")
        s = b.op("ReduceSum", [sq, b.const(f"{node.name}/axes", axes, dtype="int64")], f"{node.name}/sum", keepdims=1)
        s = b.op("Add", [s, b.const(f"{node.name}/eps", float(p.eps))], f"{node.name}/sum_eps")
        norm = b.op("Sqrt", [s], f"{node.name}/norm")
        y = b.op("Div", [x, norm], f"{node.name}/unit")
        w = node.weights[0]
        view = (w.size,) + (1,) * (rank - 2) if w.size > 1 else (1,)
        b.add("Mul", [y, b.weight(node, 0, view)], node.outputs, name=node.name)

    def torch(self, node):
        return _Normalize(node)

