"""Convolution and Deconvolution (group, dilation, per-axis kernel/pad/stride, bias_term), and the
forks' depthwise spellings ConvolutionDepthwise / DepthwiseConvolution."""

from __future__ import annotations

from ..errors import GraftError
from ..registry import Converter, register
from ._common import F, TorchModule, hw, param


def conv_geometry(node, need_num_output: bool = True) -> dict:
    p = node.param("convolution_param")
    name = node.name
    if p.axis != 1:
        raise GraftError(f"layer '{name}': convolution axis {p.axis} is not supported (only 1)")
    kernel = hw(p.kernel_size, p.kernel_h, p.kernel_w, p.HasField("kernel_h"), None, "kernel_size", name)
    pad = hw(p.pad, p.pad_h, p.pad_w, p.HasField("pad_h") or p.HasField("pad_w"), 0, "pad", name)
    stride = hw(p.stride, p.stride_h, p.stride_w, p.HasField("stride_h") or p.HasField("stride_w"), 1, "stride", name)
    dilation = hw(p.dilation, 0, 0, False, 1, "dilation", name)
    if p.HasField("hole") or p.HasField("hole_h") or p.HasField("hole_w"):  # DeepLab v1's name for it
        hole = hw(p.hole, p.hole_h or p.hole, p.hole_w or p.hole, True, 1, "hole", name)
        if len(p.dilation) and hole != dilation:
            raise GraftError(f"layer '{name}': dilation {dilation} and hole {hole} disagree; give one")
        dilation = hole
    if any(d < 1 for d in dilation):
        raise GraftError(f"layer '{name}': dilation/hole must be at least 1, got {dilation}")
    if need_num_output and not p.HasField("num_output"):
        raise GraftError(f"layer '{name}': num_output is not set")
    return dict(kernel=kernel, pad=pad, stride=stride, dilation=dilation, group=int(p.group),
                num_output=int(p.num_output), bias=bool(p.bias_term))


class _Conv(TorchModule):
    def __init__(self, node, g: dict, transpose: bool):
        super().__init__()
        self.transpose = transpose
        self.stride, self.pad, self.dilation, self.group = g["stride"], g["pad"], g["dilation"], g["group"]
        self.weight = param(node.weights[0])
        self.bias = param(node.weights[1]) if g["bias"] else None

    def forward(self, x):
        f = F.conv_transpose2d if self.transpose else F.conv2d
        if self.transpose:
            return f(x, self.weight, self.bias, self.stride, self.pad, 0, self.group, self.dilation)
        return f(x, self.weight, self.bias, self.stride, self.pad, self.dilation, self.group)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, stride={self.stride}, pad={self.pad}, dilation={self.dilation}, group={self.group}"


@register
class Convolution(Converter):
    types = ("Convolution",)

    def geometry(self, node, shape) -> dict:
        return conv_geometry(node)

    def infer(self, node, shapes):
        g = self.geometry(node, shapes[0])
        n, c, h, w = shapes[0]
        if c % g["group"] or g["num_output"] % g["group"]:
            raise GraftError(f"layer '{node.name}': group {g['group']} does not divide channels {c} / num_output {g['num_output']}")
        out = [n, g["num_output"]]
        for size, k, p, s, d in zip((h, w), g["kernel"], g["pad"], g["stride"], g["dilation"]):
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return [tuple(out)]

    def weight_shapes(self, node, shapes):
        g = self.geometry(node, shapes[0])
        ws = [(g["num_output"], shapes[0][1] // g["group"], *g["kernel"])]
        return ws + [(g["num_output"],)] if g["bias"] else ws

    def _attrs(self, g):
        return dict(kernel_shape=list(g["kernel"]), strides=list(g["stride"]), dilations=list(g["dilation"]),
                    pads=[g["pad"][0], g["pad"][1], g["pad"][0], g["pad"][1]], group=g["group"])

    def onnx(self, node, b):
        g = self.geometry(node, node.in_shapes[0])
        ins = [node.inputs[0], b.weight(node, 0)] + ([b.weight(node, 1)] if g["bias"] else [])
        b.add("Conv", ins, node.outputs, name=node.name, **self._attrs(g))

    def torch(self, node):
        return _Conv(node, self.geometry(node, node.in_shapes[0]), transpose=False)


@register
class Deconvolution(Convolution):
    types = ("Deconvolution",)

    def infer(self, node, shapes):
        g = conv_geometry(node)
        n, c, h, w = shapes[0]
        out = [n, g["num_output"]]
        for size, k, p, s, d in zip((h, w), g["kernel"], g["pad"], g["stride"], g["dilation"]):
            out.append(s * (size - 1) + d * (k - 1) + 1 - 2 * p)
        return [tuple(out)]

    def weight_shapes(self, node, shapes):
        g = conv_geometry(node)
        ws = [(shapes[0][1], g["num_output"] // g["group"], *g["kernel"])]
        return ws + [(g["num_output"],)] if g["bias"] else ws

    def onnx(self, node, b):
        g = conv_geometry(node)
        ins = [node.inputs[0], b.weight(node, 0)] + ([b.weight(node, 1)] if g["bias"] else [])
        b.add("ConvTranspose", ins, node.outputs, name=node.name, **self._attrs(g))

    def torch(self, node):
        return _Conv(node, conv_geometry(node), transpose=True)


@register
class DepthwiseConvolution(Convolution):
    """The forks' depthwise convolution: one k×k filter per input channel (group = num_output =
    C), weight (C, 1, kh, kw). yonghenglh6's ``ConvolutionDepthwise`` ignores ``num_output`` and
    ``group`` (its output has C channels whatever they say); MobileNet-YOLO's
    ``DepthwiseConvolution`` is a BaseConvolution whose CPU path is a grouped convolution and
    whose GPU kernel assumes depthwise, so any other num_output/group is refused."""

    types = ("ConvolutionDepthwise", "DepthwiseConvolution")

    def geometry(self, node, shape) -> dict:
        c = shape[1]
        strict = node.type == "DepthwiseConvolution"
        g = conv_geometry(node, need_num_output=strict)
        p = node.param("convolution_param")
        if strict and (g["num_output"] != c or (p.HasField("group") and g["group"] != c)):
            raise GraftError(
                f"layer '{node.name}': DepthwiseConvolution needs num_output = group = input channels ({c}), "
                f"got num_output {g['num_output']}, group {g['group']}"
            )
        return dict(g, group=c, num_output=c)
