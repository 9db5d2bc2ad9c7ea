"""Spatial resizing layers of the Caffe forks: Upsample (nearest, darknet2caffe / MobileNet-YOLO)
and Interp (bilinear with aligned corners, DeepLab-v2 / PSPNet).

Both work on the last two axes and keep the batch dynamic: ONNX Resize gets scales (Upsample)
or a ``sizes`` built from the input's own Shape (Interp), never a baked batch size.
"""

from __future__ import annotations

import math

from ..errors import GraftError
from ..registry import Converter, register
from ._common import F, TorchModule

# ----------------------------------------------------------------------------- Upsample


def upsample_geometry(node, shape) -> tuple[tuple[int, int], tuple[int, int]]:
    """((s_h, s_w), (out_h, out_w)): output pixel (h, w) copies input (h // s_h, w // s_w).

    The darknet forks only know ``scale`` (out = in·scale); SegNet's parameter set adds
    ``scale_h``/``scale_w``, ``pad_out_h``/``pad_out_w`` (out = in·scale − 1) and an explicit
    ``upsample_h``/``upsample_w``, for which the factor is the smallest integer that covers it.
    """
    p = node.param("upsample_param")
    name = node.name
    if len(shape) < 3:
        raise GraftError(f"layer '{name}': Upsample needs a blob with two spatial axes, got {shape}")
    h, w = shape[-2], shape[-1]
    if p.HasField("scale_h") != p.HasField("scale_w"):
        raise GraftError(f"layer '{name}': upsample_param needs both scale_h and scale_w, or neither")
    if p.HasField("upsample_h") != p.HasField("upsample_w"):
        raise GraftError(f"layer '{name}': upsample_param needs both upsample_h and upsample_w, or neither")
    if p.HasField("upsample_h"):
        out = (int(p.upsample_h), int(p.upsample_w))
        if min(out) < 1:
            raise GraftError(f"layer '{name}': upsample_h/upsample_w must be positive, got {out}")
        scale = (math.ceil(out[0] / h), math.ceil(out[1] / w))
        return scale, out
    scale = (int(p.scale_h), int(p.scale_w)) if p.HasField("scale_h") else (int(p.scale), int(p.scale))
    if min(scale) < 1:
        raise GraftError(f"layer '{name}': upsample scale must be a positive integer, got {scale}")
    pads = (int(p.pad_out_h), int(p.pad_out_w))
    for s, pad, axis in zip(scale, pads, "hw"):
        if pad and s != 2:
            raise GraftError(f"layer '{name}': pad_out_{axis} needs scale_{axis} 2 (Caffe's rule), got {s}")
    return scale, (h * scale[0] - pads[0], w * scale[1] - pads[1])


class _Nearest(TorchModule):
    def __init__(self, scale: tuple[int, int], out: tuple[int, int]):
        super().__init__()
        self.scale, self.out = scale, out

    def forward(self, x):
        y = x.repeat_interleave(self.scale[0], dim=-2).repeat_interleave(self.scale[1], dim=-1)
        return y[..., : self.out[0], : self.out[1]]

    def extra_repr(self) -> str:
        return f"nearest scale={self.scale} out={self.out}"


@register
class Upsample(Converter):
    """Nearest-neighbour upsampling by integer factors; SegNet's two-bottom (mask) form is
    max-unpooling, which needs Pooling's mask top, and is refused."""

    types = ("Upsample",)

    def infer(self, node, shapes):
        if len(shapes) != 1:
            raise GraftError(f"layer '{node.name}': Upsample with a mask bottom (SegNet max-unpooling) is not supported")
        _, out = upsample_geometry(node, shapes[0])
        return [tuple(shapes[0][:-2]) + out]

    def onnx(self, node, b):
        shape = node.in_shapes[0]
        rank = len(shape)
        scale, out = upsample_geometry(node, shape)
        cropped = out != (shape[-2] * scale[0], shape[-1] * scale[1])
        scales = b.const(f"{node.name}/scales", [1.0] * (rank - 2) + [float(s) for s in scale])
        attrs = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        if not cropped:
            b.add("Resize", [node.inputs[0], "", scales], node.outputs, name=node.name, **attrs)
            return
        y = b.op("Resize", [node.inputs[0], "", scales], f"{node.name}/nearest", **attrs)
        ins = [y, b.const(f"{node.name}/starts", [0, 0], dtype="int64"), b.const(f"{node.name}/ends", list(out), dtype="int64"),
               b.const(f"{node.name}/axes", [rank - 2, rank - 1], dtype="int64")]
        b.add("Slice", ins, node.outputs, name=node.name)

    def torch(self, node):
        return _Nearest(*upsample_geometry(node, node.in_shapes[0]))


# ----------------------------------------------------------------------------- Interp


def interp_geometry(node, shapes) -> dict:
    """The fork's InterpLayer::Reshape: crop by ``pad_beg``/``pad_end`` (non-positive), then the
    output size from, in this order: shrink_factor alone, zoom_factor alone, height + width,
    shrink then zoom. A second bottom (some forks) gives the size instead."""
    p = node.param("interp_param")
    name = node.name
    shape = shapes[0]
    if len(shape) != 4:
        raise GraftError(f"layer '{name}': Interp needs a 4-D input, got {shape}")
    pad_beg, pad_end = int(p.pad_beg), int(p.pad_end)
    if pad_beg > 0 or pad_end > 0:
        raise GraftError(f"layer '{name}': Interp supports only non-positive pad_beg/pad_end (cropping), got {pad_beg}/{pad_end}")
    h, w = shape[2], shape[3]
    h_eff, w_eff = h + pad_beg + pad_end, w + pad_beg + pad_end
    if h_eff <= 0 or w_eff <= 0:
        raise GraftError(f"layer '{name}': pad_beg/pad_end {pad_beg}/{pad_end} crop away the whole {h}x{w} input")
    zoom, shrink = p.HasField("zoom_factor"), p.HasField("shrink_factor")
    for has, field in ((zoom, "zoom_factor"), (shrink, "shrink_factor")):
        if has and getattr(p, field) < 1:
            raise GraftError(f"layer '{name}': {field} must be at least 1, got {getattr(p, field)}")

    def zoomed(size: int) -> int:
        return size + (size - 1) * (int(p.zoom_factor) - 1)

    def shrunk(size: int) -> int:
        return (size - 1) // int(p.shrink_factor) + 1

    if len(shapes) > 1:
        out = tuple(shapes[1][2:4])
    elif shrink and not zoom:
        out = (shrunk(h_eff), shrunk(w_eff))
    elif zoom and not shrink:
        out = (zoomed(h_eff), zoomed(w_eff))
    elif p.HasField("height") and p.HasField("width"):
        out = (int(p.height), int(p.width))
    elif zoom and shrink:
        out = (zoomed(shrunk(h_eff)), zoomed(shrunk(w_eff)))
    else:
        raise GraftError(f"layer '{name}': interp_param needs zoom_factor, shrink_factor, or both height and width")
    if min(out) <= 0:
        raise GraftError(f"layer '{name}': Interp output size {out} is not positive")
    crop = (-pad_beg, h + pad_end, -pad_beg, w + pad_end)
    return dict(out=(int(out[0]), int(out[1])), crop=crop, eff=(h_eff, w_eff), cropped=(pad_beg, pad_end) != (0, 0))


class _Bilinear(TorchModule):
    def __init__(self, g: dict):
        super().__init__()
        self.out, self.crop, self.cropped = g["out"], g["crop"], g["cropped"]
        self.same = g["out"] == g["eff"]

    def forward(self, x, _like=None):
        if self.cropped:
            h0, h1, w0, w1 = self.crop
            x = x[:, :, h0:h1, w0:w1]
        if self.same:
            return x
        return F.interpolate(x, size=self.out, mode="bilinear", align_corners=True)

    def extra_repr(self) -> str:
        return f"bilinear align_corners out={self.out} crop={self.crop if self.cropped else None}"


@register
class Interp(Converter):
    """Bilinear interpolation with aligned corners (Caffe's caffe_cpu_interp2)."""

    types = ("Interp",)

    def infer(self, node, shapes):
        g = interp_geometry(node, shapes)
        return [tuple(shapes[0][:2]) + g["out"]]

    def onnx(self, node, b):
        g = interp_geometry(node, node.in_shapes)
        x = node.inputs[0]
        if g["cropped"]:
            h0, h1, w0, w1 = g["crop"]
            ins = [x, b.const(f"{node.name}/starts", [h0, w0], dtype="int64"),
                   b.const(f"{node.name}/ends", [h1, w1], dtype="int64"),
                   b.const(f"{node.name}/axes", [2, 3], dtype="int64")]
            if g["out"] == g["eff"]:
                b.add("Slice", ins, node.outputs, name=node.name)
                return
            x = b.op("Slice", ins, f"{node.name}/cropped")
        if g["out"] == g["eff"]:
            b.add("Identity", [x], node.outputs, name=node.name)
            return
        lead = b.op("Shape", [x], f"{node.name}/batch_channels", start=0, end=2)
        sizes = b.op("Concat", [lead, b.const(f"{node.name}/hw", list(g["out"]), dtype="int64")], f"{node.name}/sizes", axis=0)
        b.add("Resize", [x, "", "", sizes], node.outputs, name=node.name, mode="linear",
              coordinate_transformation_mode="align_corners")

    def torch(self, node):
        return _Bilinear(interp_geometry(node, node.in_shapes))
