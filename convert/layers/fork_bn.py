"""``BN``: the batch norm of the segmentation forks, with its own ``bn_param`` and its affine
part built in (unlike BVLC's BatchNorm + Scale).

* PSPNet / DeepLab-style (hszhao/PSPNet bn_layer.cpp): four blobs slope, bias, mean, variance,
  each 1xCx1x1, stored as they are (no moving-average factor). At TEST (and when ``frozen``)
  y = slope·(x − mean)/sqrt(variance + eps) + bias, eps = ``bn_param.eps`` (1e-5).
* SegNet (alexgkendall/caffe-segnet): two blobs scale, shift (1xCx1x1). ``bn_mode: INFERENCE``
  is y = scale·x + shift (compute_bn_statistics.py folds the statistics into the blobs);
  ``LEARN`` normalises with the statistics of the current batch even at test time, which no
  fixed graph reproduces per image, and is refused.
"""

from __future__ import annotations

from ..errors import GraftError
from ..registry import Converter, register
from ._common import F, TorchModule, param

_LEARN, _INFERENCE = 0, 1


def bn_flavour(node) -> str:
    """'pspnet' or 'segnet' (bn_mode INFERENCE); a SegNet LEARN-mode BN is an error."""
    p = node.param("bn_param")
    segnet = p.HasField("bn_mode") or p.HasField("scale_filler") or p.HasField("shift_filler")
    if not segnet:
        return "pspnet"
    if p.bn_mode == _INFERENCE:
        return "segnet"
    raise GraftError(
        f"layer '{node.name}': SegNet BN in LEARN mode normalises with the statistics of each batch; "
        "fold them into the weights (SegNet's compute_bn_statistics.py) and set bn_mode: INFERENCE"
    )


class _PSPNetBN(TorchModule):
    """The four blobs as parameters in Caffe's 1xCx1x1 layout (``caffe_blobs`` reads them back)."""

    def __init__(self, node, eps: float):
        super().__init__()
        self.slope, self.bias, self.mean, self.variance = (param(w) for w in node.weights)
        self.eps = eps

    def forward(self, x):
        flat = [t.reshape(-1) for t in (self.mean, self.variance, self.slope, self.bias)]
        return F.batch_norm(x, *flat, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"channels={self.slope.numel()}, eps={self.eps}"


class _SegNetBN(TorchModule):
    def __init__(self, node):
        super().__init__()
        self.scale, self.shift = (param(w) for w in node.weights)

    def forward(self, x):
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.reshape(view) + self.shift.reshape(view)


@register
class BN(Converter):
    types = ("BN",)

    def infer(self, node, shapes):
        if len(shapes[0]) < 2:
            raise GraftError(f"layer '{node.name}': BN needs a blob with a channel axis, got {shapes[0]}")
        bn_flavour(node)
        return [shapes[0]]

    def weight_shapes(self, node, shapes):
        c = shapes[0][1]
        return [(1, c, 1, 1)] * (4 if bn_flavour(node) == "pspnet" else 2)

    def onnx(self, node, b):
        rank = len(node.in_shapes[0])
        c = node.in_shapes[0][1]
        if bn_flavour(node) == "pspnet":
            slope, bias, mean, var = (b.weight(node, i, (c,)) for i in range(4))
            b.add("BatchNormalization", [node.inputs[0], slope, bias, mean, var], node.outputs, name=node.name,
                  epsilon=float(node.param("bn_param").eps))
            return
        view = (1, c) + (1,) * (rank - 2)
        y = b.op("Mul", [node.inputs[0], b.weight(node, 0, view)], f"{node.name}/scaled")
        b.add("Add", [y, b.weight(node, 1, view)], node.outputs, name=node.name)

    def torch(self, node):
        if bn_flavour(node) == "pspnet":
            return _PSPNetBN(node, float(node.param("bn_param").eps))
        return _SegNetBN(node)
