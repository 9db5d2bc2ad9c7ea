"""ShuffleChannel (ShuffleNet forks): channel i·(C/g) + j moves to j·g + i, i.e. view the
channels as (g, C/g), transpose, flatten back."""

from __future__ import annotations

from ..errors import GraftError
from ..registry import Converter, register
from ._common import Lambda


def shuffle_group(node, shape) -> int:
    g = int(node.param("shuffle_channel_param").group)
    if len(shape) < 2:
        raise GraftError(f"layer '{node.name}': ShuffleChannel needs a blob with a channel axis, got {shape}")
    if g < 1 or shape[1] % g:
        raise GraftError(f"layer '{node.name}': shuffle group {g} does not divide the {shape[1]} channels")
    return g


@register
class ShuffleChannel(Converter):
    types = ("ShuffleChannel",)

    def infer(self, node, shapes):
        shuffle_group(node, shapes[0])
        return [shapes[0]]

    def onnx(self, node, b):
        shape = node.in_shapes[0]
        g = shuffle_group(node, shape)
        c, rest = shape[1], list(shape[2:])
        if g == 1:
            b.add("Identity", node.inputs, node.outputs, name=node.name)
            return
        split = b.const(f"{node.name}/grouped_shape", [0, g, c // g] + rest, dtype="int64")
        y = b.op("Reshape", [node.inputs[0], split], f"{node.name}/grouped")
        perm = [0, 2, 1] + list(range(3, 3 + len(rest)))
        y = b.op("Transpose", [y], f"{node.name}/transposed", perm=perm)
        b.add("Reshape", [y, b.const(f"{node.name}/shape", [0, c] + rest, dtype="int64")], node.outputs, name=node.name)

    def torch(self, node):
        shape = node.in_shapes[0]
        g = shuffle_group(node, shape)
        c, rest = shape[1], tuple(shape[2:])

        def shuffle(x):
            n = x.shape[0]
            return x.reshape(n, g, c // g, *rest).transpose(1, 2).reshape(n, c, *rest)

        return Lambda(shuffle, f"group={g}")
