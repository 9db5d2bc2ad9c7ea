"""Graph -> :class:`CaffeNet`, a torch ``nn.Module`` that runs the layers in Caffe's order.

Submodules carry the Caffe layer names (``net.layers["conv1_1"]``), learned blobs are
parameters in Caffe's layout, and ``forward`` can return any named value: Caffe blob names
(final values) or ``<blob>/pre_<layer>`` names (values before an in-place layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .ir import Graph, layer_errors


class CaffeNet(nn.Module):
    """A converted Caffe net.

    ``net(x)`` returns ``{output blob: tensor}`` for the net's outputs; ``net(x, blobs=[...])``
    returns just the named values, and stops computing once they are all known.
    """

    def __init__(self, graph: Graph):
        super().__init__()
        self.input_names: list[str] = list(graph.inputs)
        self.output_names: list[str] = list(graph.outputs)
        self.value_names: list[str] = list(graph.shapes)
        self.layers = nn.ModuleDict()
        self._plan: list[tuple[str, list[str], list[str]]] = []
        self._types: dict[str, str] = {}
        for node in graph.nodes:
            with layer_errors(node.name, node.type, "build its torch module"):
                self.layers[node.name] = node.converter.torch(node)
            self._plan.append((node.name, list(node.inputs), list(node.outputs)))
            self._types[node.name] = node.type

    def forward(self, *inputs: torch.Tensor, blobs: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), got {len(inputs)}")
        wanted = list(blobs) if blobs is not None else self.output_names
        unknown = [b for b in wanted if b not in self.value_names]
        if unknown:
            raise KeyError(f"unknown blob(s) {unknown}; known: {', '.join(self.value_names)}")
        env: dict[str, torch.Tensor] = dict(zip(self.input_names, inputs))
        remaining = {b for b in wanted if b not in env}
        last_use = self._last_use(wanted)
        for step, (name, ins, outs) in enumerate(self._plan):
            if not remaining:
                break
            try:
                result = self.layers[name](*[env[i] for i in ins])
            except Exception as err:  # keep the type; say where (verification reports it)
                err.add_note(f"in layer '{name}' ({self._types.get(name, '?')})")
                raise
            if isinstance(result, torch.Tensor):
                result = (result,)
            for o, r in zip(outs, result):
                env[o] = r
                remaining.discard(o)
            for i in ins:  # free what no later step reads
                if last_use.get(i, -1) <= step and i not in wanted:
                    env.pop(i, None)
        return {b: env[b] for b in wanted}

    def _last_use(self, wanted: Sequence[str]) -> dict[str, int]:
        last: dict[str, int] = {}
        for step, (_, ins, _) in enumerate(self._plan):
            for i in ins:
                last[i] = step
        return last


def emit_torch(graph: Graph) -> CaffeNet:
    return CaffeNet(graph).eval()
