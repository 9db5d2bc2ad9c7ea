"""Tile: repeat the blob ``tiles`` times along ``axis`` (numpy's ``tile`` on that axis)."""

from __future__ import annotations

from ..errors import GraftError
from ..registry import Converter, register
from ._common import Lambda, axis_index


def _tile(node, shape) -> tuple[int, int]:
    p = node.param("tile_param")
    if not p.HasField("tiles"):
        raise GraftError(f"layer '{node.name}': tile_param.tiles is not set")
    if p.tiles < 1:
        raise GraftError(f"layer '{node.name}': tiles must be positive, got {p.tiles}")
    return axis_index(p.axis, len(shape), node.name), int(p.tiles)


@register
class Tile(Converter):
    """Caffe copies each span from ``axis`` on ``tiles`` times: out[.., t·S + s, ..] = in[.., s, ..]."""

    types = ("Tile",)

    def keeps_batch(self, node):
        axis, tiles = _tile(node, node.in_shapes[0])
        return axis != 0 or tiles == 1  # tiling axis 0 makes it tiles·N long

    def infer(self, node, shapes):
        axis, tiles = _tile(node, shapes[0])
        out = list(shapes[0])
        out[axis] *= tiles
        return [tuple(out)]

    def _repeats(self, node) -> list[int]:
        axis, tiles = _tile(node, node.in_shapes[0])
        return [tiles if i == axis else 1 for i in range(len(node.in_shapes[0]))]

    def onnx(self, node, b):
        reps = b.const(f"{node.name}/repeats", self._repeats(node), dtype="int64")
        b.add("Tile", [node.inputs[0], reps], node.outputs, name=node.name)

    def torch(self, node):
        reps = self._repeats(node)
        return Lambda(lambda x: x.repeat(*reps), f"repeats={reps}")
